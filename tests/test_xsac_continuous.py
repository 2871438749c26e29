"""xsac_continuous.py: end-to-end runs with real updates, outputs read back, bad input, NaN stop, the fast path
(whole-update compile = eager; bf16 matmuls close to fp32), clip modes and the Taylor loss.

Budget: about 1 minute on a 2-core CPU (tiny networks, a few hundred env steps per run).
"""
import glob
import math
import os
import subprocess
import sys
from functools import partial

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

xsac = load_script("xsac_continuous")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot
    (spinning OpenMP workers): run this module's updates on one thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(hidden_dim=32, batch_size=32, log_freq=50, eval_episodes=1, cuda=False)


def scalars(run_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_buffer_file(path: str, steps: int, obs_dim: int, action_dim: int, episode_length: int) -> None:
    """D4RL keys, one row per env step in time order, timeouts at the time limit and at the cut, no terminals."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys()}
    assert set(data) == {"observations", "actions", "rewards", "terminals", "timeouts", "next_observations"}
    assert data["observations"].shape == data["next_observations"].shape == (steps, obs_dim)
    assert data["actions"].shape == (steps, action_dim) and np.abs(data["actions"]).max() <= 1.0
    assert data["rewards"].shape == data["terminals"].shape == data["timeouts"].shape == (steps,)
    assert data["terminals"].dtype == bool and not data["terminals"].any()
    expected_timeouts = np.zeros(steps, dtype=bool)
    expected_timeouts[episode_length - 1 :: episode_length] = True
    expected_timeouts[-1] = True
    np.testing.assert_array_equal(data["timeouts"], expected_timeouts)
    # inside an episode, the next observation is the next row's observation
    inside = ~data["timeouts"][:-1]
    np.testing.assert_array_equal(data["next_observations"][:-1][inside], data["observations"][1:][inside])
    assert all(np.isfinite(v.astype(np.float64)).all() for v in data.values())


def make_optimizers(agent, args) -> dict:
    """The optimisers as main builds them: fused Adams on the critics, on V, and on the actor with log alpha."""
    adam = partial(torch.optim.Adam, lr=args.learning_rate, fused=True)
    return {"critic": adam(agent.critic.parameters()), "value": adam(agent.value.parameters()),
            "actor_alpha": adam([*agent.actor.parameters(), agent.log_alpha])}


def run_updates(update, steps: int, **overrides) -> torch.Tensor:
    """`steps` real updates of a fresh agent (seed 0) on fixed random batches; the LOSS_TAGS rows, stacked.
    The actor and the V target are updated on alternate steps, so both branches of `update` run."""
    args = xsac.Args(hidden_dim=32, batch_size=32, beta=2.0, cuda=False, **overrides)
    torch.manual_seed(0)
    agent = xsac.Agent(5, 1, args)
    optimizers = make_optimizers(agent, args)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        batch = xsac.Batch(torch.randn(32, 5, generator=generator), torch.rand(32, 1, generator=generator) * 2 - 1,
                           torch.randn(32, generator=generator), torch.randn(32, 5, generator=generator),
                           (torch.rand(32, generator=generator) < 0.1).float())
        torch.manual_seed(100 + step)
        losses.append(update(agent, optimizers, batch, step % 2 == 0, step % 2 == 1, args).clone())
    return torch.stack(losses)


@pytest.mark.slow
def test_dm_control_gumbel_end_to_end(tmp_path):
    """cartpole-swingup: 201 updates, eval, Bellman errors, TensorBoard, checkpoint, eval-only, buffer."""
    args = xsac.Args(env_id="dm_control/cartpole-swingup-v0", total_timesteps=300, learning_starts=100,
                     eval_freq=300, save_model=True, save_buffer=str(tmp_path / "buffer.hdf5"),
                     log_bellman_errors=True, bellman_log_freq=100, runs_dir=str(tmp_path / "runs"), seed=3, **TINY)
    result = xsac.main(args)
    run_dir = result["run_dir"]
    assert os.path.basename(run_dir).startswith("dm_control-cartpole-swingup-v0__xsac_continuous__3__")
    assert [step for step, _ in result["evaluations"]] == [300]
    assert result["final_return"] == result["best_return"] == result["evaluations"][0][1]

    logged = scalars(run_dir)
    for tag in ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "losses/alpha", "values/v", "values/q",
                "values/clip_fraction", "charts/SPS", "eval/episodic_return", "eval/episodic_length"):
        assert logged.get(tag), f"{tag} missing"
        assert np.isfinite(logged[tag]).all(), tag
    assert len(logged["losses/q_loss"]) == 5  # steps 100, 150, ..., 300
    assert logged["losses/alpha"][-1] < 0.1  # alpha was tuned (it starts at 0.1 and entropy is high)
    assert logged["eval/episodic_length"] == [1000.0]

    files = sorted(glob.glob(os.path.join(run_dir, "bellman_errors", "*.npy")))
    assert [os.path.basename(f) for f in files] == ["step_00000200.npy", "step_00000300.npy"]
    errors = np.load(files[-1])
    assert errors.dtype == np.float32 and errors.shape == (32,) and np.isfinite(errors).all()

    check_buffer_file(str(tmp_path / "buffer.hdf5"), steps=300, obs_dim=5, action_dim=1, episode_length=1000)

    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert set(checkpoint) == {"agent", "args", "step", "optimizers"} and checkpoint["step"] == 300
    assert set(checkpoint["optimizers"]) == {"critic", "value", "actor_alpha"}
    steps = {int(state["step"]) for o in checkpoint["optimizers"].values() for state in o["state"].values()}
    assert steps == {201}  # 300 - 100 + 1 updates, every parameter (the actor is updated every step by default)
    assert checkpoint["args"]["beta"] == 2.0 and checkpoint["args"]["env_id"] == "dm_control/cartpole-swingup-v0"
    agent = xsac.Agent(5, 1, xsac.Args(**checkpoint["args"]))
    agent.load_state_dict(checkpoint["agent"])  # every tensor (actor, critics, V, V target, log alpha) is there
    assert not torch.equal(checkpoint["agent"]["value.net.0.weight"], checkpoint["agent"]["value_target.net.0.weight"])
    eval_args = xsac.Args(eval_only=True, checkpoint=os.path.join(run_dir, "checkpoint.pt"), eval_episodes=1, cuda=False)
    evaluated = xsac.main(eval_args)
    assert evaluated["lengths"] == [1000] and len(evaluated["returns"]) == 1 and np.isfinite(evaluated["returns"]).all()


@pytest.mark.slow
def test_pendulum_mse_cli_subprocess(tmp_path):
    """The SAC baseline through the real CLI: policy/target frequency 2, buffer with time-limit ends."""
    buffer_path = tmp_path / "buffer.hdf5"
    cmd = [sys.executable, str(ROOT / "xsac_continuous.py"), "--env-id", "Pendulum-v1", "--value-loss", "mse",
           "--total-timesteps", "400", "--learning-starts", "150", "--hidden-dim", "32", "--batch-size", "32",
           "--policy-frequency", "2", "--eval-freq", "400", "--eval-episodes", "1", "--log-freq", "50",
           "--save-buffer", str(buffer_path), "--exp-name", "sac", "--runs-dir", str(tmp_path / "runs"), "--no-cuda"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "value loss mse, beta = 2.0 (fallback for tasks outside Table 6), 1 env(s)" in result.stdout
    assert "step 400/400 | eval return " in result.stdout and "run folder" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum-v1__sac__1__*"))
    assert f"; run folder {run_dir}" in result.stdout
    logged = scalars(run_dir)
    assert len(logged["losses/v_loss"]) == 6 and np.isfinite(logged["losses/v_loss"]).all()
    assert len(logged["charts/episodic_return"]) == 2  # two 200-step episodes
    check_buffer_file(str(buffer_path), steps=400, obs_dim=3, action_dim=1, episode_length=200)
    offline = load_script("xql_offline")  # the offline script reads what --save-buffer writes
    dataset = offline.qlearning_dataset(offline.read_hdf5(str(buffer_path)), 200)
    assert len(dataset["observations"]) == 398  # rows 199 (timeout) and 399 (last) are dropped


@pytest.mark.slow
def test_capture_video_headless_default(tmp_path):
    """With MUJOCO_GL unset, --capture-video picks a headless backend (OSMesa here) and writes the eval episode."""
    pytest.importorskip("moviepy")
    import ctypes.util

    if ctypes.util.find_library("OSMesa") is None:
        pytest.skip("libOSMesa is not installed (apt-get install libosmesa6)")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    # InvertedPendulum: MuJoCo rendering like the DMC tasks, but an untrained policy falls within a few
    # dozen steps, so software rendering stays cheap (a 1000-step DMC episode takes minutes on 2 cores).
    cmd = [sys.executable, str(ROOT / "xsac_continuous.py"), "--env-id", "InvertedPendulum-v4",
           "--total-timesteps", "120", "--learning-starts", "100", "--hidden-dim", "16", "--batch-size", "16",
           "--eval-freq", "120", "--eval-episodes", "1", "--capture-video", "--runs-dir", str(tmp_path / "runs"), "--no-cuda"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    expected = "egl" if os.path.exists("/dev/nvidiactl") else "osmesa"
    assert f"xsac_continuous: MUJOCO_GL was unset; using MUJOCO_GL={expected} for headless video" in result.stdout
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert len(videos) == 1 and os.path.getsize(videos[0]) > 1000


def test_beta_resolution(capsys):
    def resolved(**overrides):
        return xsac.resolve_args(xsac.Args(**overrides)).beta

    assert resolved(env_id="dm_control/hopper-hop-v0") == 2.0  # Table 6
    assert resolved(env_id="dm_control/quadruped-run-v0") == 5.0
    assert resolved(env_id="dm_control/hopper-hop-v0", beta_table="authors") == 1.0
    assert resolved(env_id="Pendulum-v1") == xsac.BETA_FALLBACK == 2.0
    assert resolved(env_id="dm_control/walker-run-v0", beta=3.5) == 3.5
    assert capsys.readouterr().out.splitlines() == [
        "xsac_continuous: dm_control/hopper-hop-v0, value loss gumbel, beta = 2.0 (--beta-table paper), 1 env(s)",
        "xsac_continuous: dm_control/quadruped-run-v0, value loss gumbel, beta = 5.0 (--beta-table paper), 1 env(s)",
        "xsac_continuous: dm_control/hopper-hop-v0, value loss gumbel, beta = 1.0 (--beta-table authors), 1 env(s)",
        "xsac_continuous: Pendulum-v1, value loss gumbel, beta = 2.0 (fallback for tasks outside Table 6), 1 env(s)",
        "xsac_continuous: dm_control/walker-run-v0, value loss gumbel, beta = 3.5 (--beta), 1 env(s)",
    ]
    args = xsac.Args(env_id="Pendulum-v1", cudagraphs=False, compile=False)
    assert xsac.resolve_args(args) is not args and args.beta is None  # a new Args; the given one is untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="dm_control/hoper-hop-v0"), "unknown environment id 'dm_control/hoper-hop-v0'. Did you mean: dm_control/hopper-hop-v0"),
        (dict(env_id="CartPole-v1"), "'CartPole-v1' has action space Discrete(2); this script needs a bounded continuous (Box) one."),
        (dict(env_id="Pendulum-v1", beta=0.0), "--beta must be > 0"),
        (dict(env_id="Pendulum-v1", beta=-1.0), "--beta must be > 0"),
        (dict(env_id="Pendulum-v1", cudagraphs=True), "--cudagraphs needs a CUDA device"),
        (dict(env_id="Pendulum-v1", num_envs=0), "--num-envs must be > 0."),
        (dict(env_id="Pendulum-v1", value_loss="taylor", taylor_order=3), "--taylor-order must be even and >= 2"),
        (dict(eval_only=True, checkpoint="/nonexistent/checkpoint.pt"),
         "/nonexistent/checkpoint.pt is not a checkpoint of xsac_continuous --save-model (FileNotFoundError)."),
    ],
)
def test_bad_input_one_line_no_run_folder(tmp_path, overrides, message):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as error:
        xsac.main(xsac.Args(runs_dir=str(runs), cuda=False, **overrides))
    text = str(error.value.code)
    assert text.startswith("xsac_continuous: ") and message in text and "\n" not in text
    assert not runs.exists()


def test_bad_input_cli_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "xsac_continuous.py"), "--env-id", "dm_control/hopper-hop-v0",
                             "--beta", "0", "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "xsac_continuous: --beta must be > 0 (it divides Q - V in Eq. 11)."
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_nan_stops_run_and_saves_last_finite_snapshot(tmp_path, monkeypatch):
    """A value loss that turns NaN after 60 updates: exit at that update's env step with the last finite values,
    the snapshot of the last log interval, and the buffer up to that step."""
    real_loss, calls = xsac.gumbel_loss, []

    def poisoned(pred, target, beta, clip, clip_mode):
        calls.append(1)
        loss = real_loss(pred, target, beta, clip, clip_mode)
        return loss * float("nan") if len(calls) > 60 else loss

    monkeypatch.setattr(xsac, "gumbel_loss", poisoned)
    buffer_path = tmp_path / "buffer.hdf5"
    args = xsac.Args(env_id="Pendulum-v1", total_timesteps=400, learning_starts=50, eval_freq=10_000,
                     save_buffer=str(buffer_path), runs_dir=str(tmp_path / "runs"), **TINY)
    with pytest.raises(SystemExit) as error:
        xsac.main(args)
    text = str(error.value.code)
    assert text.startswith("xsac_continuous: a loss became NaN/inf at step 110; ")  # update 61 = env step 110
    assert "; last finite values (step 100): q_loss=" in text and "\n" not in text
    assert len(calls) == 61  # the run stopped at the first NaN update
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    path = os.path.join(run_dir, "last_finite_checkpoint.pt")
    assert f"parameters of step 100 saved to {path}. Try a larger --beta" in text
    snapshot = torch.load(path, weights_only=False)
    assert snapshot["step"] == 100 and snapshot["args"]["learning_starts"] == 50
    assert all(torch.isfinite(v).all() for v in snapshot["agent"].values())
    xsac.Agent(3, 1, xsac.Args(**snapshot["args"])).load_state_dict(snapshot["agent"])
    with h5py.File(buffer_path, "r") as f:
        assert len(f["observations"]) == 110  # written on the way out, up to the step that stopped


def fast_update(compile=False, medium=False):
    """`update` as main builds it: compiled with --compile, under bf16 autocast with --matmul-precision medium."""
    return torch.autocast("cpu", torch.bfloat16, enabled=medium)(torch.compile(xsac.update) if compile else xsac.update)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_actor_and_alpha_move_only_on_actor_updates(compile):
    """With the actor updated every 2nd step, the actor and log alpha change (and their Adam counts a step) only on
    those steps, eager and compiled: compiled, their gradient on the other steps is a zero tensor, not None, and an
    Adam stepped on it would still move them by its momentum."""
    args = xsac.Args(hidden_dim=32, batch_size=32, beta=2.0, cuda=False)
    torch.manual_seed(0)
    agent = xsac.Agent(5, 1, args)
    optimizers = make_optimizers(agent, args)
    update = torch.compile(xsac.update) if compile else xsac.update
    batch = xsac.Batch(torch.randn(32, 5), torch.rand(32, 1) * 2 - 1, torch.randn(32), torch.randn(32, 5), torch.zeros(32))
    for step in range(6):
        before = [p.clone() for p in [*agent.actor.parameters(), agent.log_alpha]]
        update(agent, optimizers, batch, step % 2 == 0, False, args)
        moved = [not torch.equal(p, old) for p, old in zip([*agent.actor.parameters(), agent.log_alpha], before)]
        assert all(moved) if step % 2 == 0 else not any(moved), step
    assert {int(state["step"]) for state in optimizers["value"].state.values()} == {6}
    assert {int(state["step"]) for state in optimizers["actor_alpha"].state.values()} == {3}


@pytest.mark.slow
def test_compiled_update_matches_eager():
    """The whole update (losses, backward, optimiser steps, Polyak) compiled: same seed, same batches, its loss
    vectors agree with eager to rtol 1e-4, atol 1e-5 over 6 updates (actor and V-target branches both taken). Dynamo
    must have compiled graphs: a function it runs eagerly would pass the comparison and fail that check.

    The compiled graph draws its Gaussian noise with inductor's own generator unless `fallback_random`
    is set, so the test sets it; the remaining differences are float reassociation.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    eager = run_updates(xsac.update, 6)
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = run_updates(fast_update(compile=True), 6)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert torch.isfinite(eager).all() and not torch.equal(eager[0], eager[-1])  # the parameters did change
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_update_close_to_fp32():
    """--matmul-precision medium: the update under bf16 autocast, each network's output layer in fp32 (FP32Linear).
    The same 6 updates stay within rtol 2e-2 / atol 1e-3 of fp32 (bf16 keeps 8 mantissa bits, ~4e-3 relative per
    rounded operand) and differ from them (the rounding is real). Under autocast the hidden layers compute in bf16;
    Q, V and the actor's outputs in fp32."""
    fp32 = run_updates(xsac.update, 6)
    medium = run_updates(fast_update(medium=True), 6)
    assert torch.isfinite(medium).all() and (medium - fp32).abs().max() > 1e-5
    torch.testing.assert_close(medium, fp32, rtol=2e-2, atol=1e-3)
    agent, obs, actions = xsac.Agent(5, 1, xsac.Args(hidden_dim=32)), torch.randn(4, 5), torch.rand(4, 1)
    with torch.autocast("cpu", torch.bfloat16):
        assert agent.value.net[0](obs).dtype == torch.bfloat16
        outputs = agent.critic(obs, actions), agent.value(obs), *agent.actor(obs)
    assert [out.dtype for out in outputs] == [torch.float32] * 4


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fast_path_through_main(tmp_path, monkeypatch, compile):
    """--matmul-precision medium (and --compile) through `main`: the V loss is computed under bf16 autocast (seen
    eagerly; compiled, Dynamo must have made graphs), the losses are finite, and torch's fp32 matmuls stay at
    "highest" (its "medium" would round the fp32 output layers)."""
    from torch._dynamo.utils import counters

    seen, gumbel_loss = [], xsac.gumbel_loss
    if not compile:
        spy = lambda *a: seen.append(torch.is_autocast_enabled("cpu")) or gumbel_loss(*a)  # noqa: E731
        monkeypatch.setattr(xsac, "gumbel_loss", spy)
    counters.clear()
    result = xsac.main(xsac.Args(env_id="Pendulum-v1", total_timesteps=120, learning_starts=100, eval_freq=0,
                                 matmul_precision="medium", compile=compile, runs_dir=str(tmp_path / "runs"), **TINY))
    assert torch.get_float32_matmul_precision() == "highest"
    assert seen == ([] if compile else [True] * 21)  # 120 - 100 + 1 updates
    assert counters["stats"]["unique_graphs"] >= (2 if compile else 0)
    logged = scalars(result["run_dir"])
    assert len(logged["losses/q_loss"]) == 1 and all(math.isfinite(v) for v in logged["losses/q_loss"] + logged["losses/v_loss"])


@pytest.mark.parametrize("overrides", [dict(clip_mode="upper", loss_clip=1.0), dict(clip_mode="both", loss_clip=0.05),
                                       dict(value_loss="taylor", taylor_order=4)],
                         ids=["upper", "both-small-clip", "taylor"])
def test_clip_modes_and_taylor_end_to_end(tmp_path, overrides, capsys):
    """Each value-loss variant trains (finite losses) and logs values/clip_fraction within [0, 1]; a clip of 0.05
    is hit by some samples."""
    result = xsac.main(xsac.Args(env_id="Pendulum-v1", total_timesteps=150, learning_starts=100, eval_freq=0,
                                 save_model=True, runs_dir=str(tmp_path / "runs"), **{**TINY, "log_freq": 10},
                                 **overrides))
    assert f"value loss {overrides.get('value_loss', 'gumbel')}, beta = 2.0" in capsys.readouterr().out
    logged = scalars(result["run_dir"])
    assert len(logged["losses/v_loss"]) == 6  # steps 100, 110, ..., 150
    for tag in ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "values/v"):
        assert np.isfinite(logged[tag]).all(), tag
    fractions = np.array(logged["values/clip_fraction"])
    assert len(fractions) == 6 and ((0 <= fractions) & (fractions <= 1)).all()
    if overrides.get("loss_clip") == 0.05:
        assert fractions.max() > 0
    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    assert int(checkpoint["optimizers"]["value"]["state"][0]["step"]) == 51
    assert {key: checkpoint["args"][key] for key in overrides} == overrides
