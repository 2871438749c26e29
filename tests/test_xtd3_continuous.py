"""End-to-end and unit tests of xtd3_continuous.py (online X-TD3, X-TD3 - DQ and TD3; issue 4).

Runs are tiny (32-wide networks, batch 32, a few hundred env steps) but real: gradient steps of the
critics and the delayed actor, evaluations, checkpoints, replay-buffer files, Bellman-error files and
TensorBoard scalars are all produced by `main(args)` and read back.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, load_script

xtd3 = load_script("xtd3_continuous")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and the CI machine has two cores shared by other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(tmp_path, **overrides) -> "xtd3.Args":
    settings = dict(env_id="Pendulum-v1", total_timesteps=300, learning_starts=100, hidden_dim=32, batch_size=32,
                    buffer_size=10_000, log_freq=50, eval_freq=10_000, eval_episodes=1, bellman_log_freq=100,
                    runs_dir=str(tmp_path / "runs"), seed=3)
    settings.update(overrides)
    return xtd3.Args(**settings)


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---- per-task settings ----
def test_beta_resolution_follows_table_6():
    for task, (xtd3_beta, dq_beta) in {"cheetah-run": (5, 4), "walker-run": (2, 4), "hopper-hop": (2, 3), "quadruped-run": (5, 20)}.items():
        env_id = f"dm_control/{task}-v0"
        assert xtd3.resolve_beta(env_id, None, double_q=True)[0] == xtd3_beta
        assert xtd3.resolve_beta(env_id, None, double_q=False)[0] == dq_beta
        assert "Table 6" in xtd3.resolve_beta(env_id, None, double_q=False)[1]
    assert xtd3.resolve_beta("dm_control/cheetah-run-v0", 7.5, double_q=True) == (7.5, "--beta")
    assert xtd3.resolve_beta("Pendulum-v1", None, double_q=True) == (xtd3.BETA_FALLBACK[True], xtd3.resolve_beta("Pendulum-v1", None, True)[1])
    assert "fallback" in xtd3.resolve_beta("Pendulum-v1", None, double_q=False)[1]
    # Table 5: exploration noise 0.05 on hopper, 0.1 elsewhere, a given value wins.
    assert xtd3.resolve_exploration_noise("dm_control/hopper-hop-v0", None) == 0.05
    assert xtd3.resolve_exploration_noise("dm_control/walker-run-v0", None) == 0.1
    assert xtd3.resolve_exploration_noise("dm_control/hopper-hop-v0", 0.3) == 0.3


def test_batched_critics_equal_separate_networks():
    """The stacked critic is num independent MLPs: member i equals a plain MLP with member i's weights."""
    torch.manual_seed(0)
    critics = xtd3.Critics(5, 2, 16, num=2)
    obs, actions = torch.randn(7, 5), torch.randn(7, 2)
    q = critics(obs, actions)
    assert q.shape == (2, 7)
    for i in range(2):
        x = torch.cat([obs, actions], -1)
        for j, layer in enumerate(critics.layers):
            x = x @ layer.weight[i] + layer.bias[i]
            x = torch.relu(x) if j < 2 else x
        assert torch.allclose(q[i], x.squeeze(-1), atol=1e-6)
    assert torch.allclose(critics.first(obs, actions), q[0], atol=1e-6)


# ---- end-to-end runs ----
ARMS = {"xtd3": {}, "xtd3-dq": {"double_q": False}, "td3": {"critic_loss": "mse"}}


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "dm_control/cartpole-swingup-v0"])
@pytest.mark.parametrize("arm", list(ARMS))
def test_end_to_end(tmp_path, env_id, arm):
    buffer_path = str(tmp_path / "buffer.hdf5")
    args = tiny_args(tmp_path, env_id=env_id, exp_name=arm, save_model=True, save_buffer=buffer_path,
                     log_bellman_errors=True, **ARMS[arm])
    run_dir = xtd3.main(args)
    assert os.path.basename(run_dir).startswith(f"{env_id.replace('/', '-')}__{arm}__3__")

    # TensorBoard: the tags, all finite; losses logged from learning starts on.
    logged = scalars(run_dir)
    for tag in ("losses/q_loss", "losses/actor_loss", "values/q", "eval/episodic_return", "eval/episodic_length", "charts/SPS"):
        assert logged.get(tag), f"missing {tag}: {sorted(logged)}"
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    assert [s for s, _ in logged["losses/q_loss"]] == [100, 150, 200, 250, 300]
    assert [s for s, _ in logged["eval/episodic_return"]] == [300]
    if env_id == "Pendulum-v1":  # 200-step episodes end within the run
        assert [s for s, _ in logged["charts/episodic_return"]] == [200]
        assert [v for _, v in logged["charts/episodic_length"]] == [200]

    # Checkpoint: real critic and delayed actor updates happened (Adam step counts), targets moved.
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    num_critics = 1 if arm == "xtd3-dq" else 2
    assert checkpoint["critics"]["layers.0.weight"].shape[0] == num_critics
    critic_updates = args.total_timesteps - args.learning_starts + 1
    assert int(checkpoint["critic_optimizer"]["state"][0]["step"]) == critic_updates
    assert int(checkpoint["actor_optimizer"]["state"][0]["step"]) == critic_updates // 2
    assert not torch.equal(checkpoint["actor"]["net.0.weight"], checkpoint["actor_target"]["net.0.weight"])
    assert checkpoint["resolved"]["beta"] == (None if arm == "td3" else xtd3.BETA_FALLBACK[arm == "xtd3"])
    for name in ("actor", "critics", "actor_target", "critics_target"):
        assert all(torch.isfinite(t).all() for t in checkpoint[name].values()), name

    # The eval-only path loads the checkpoint back and runs the actor.
    returns = xtd3.main(xtd3.Args(eval_only=True, checkpoint=os.path.join(run_dir, "checkpoint.pt"), eval_episodes=1))
    assert returns.shape == (1,) and np.isfinite(returns).all()

    # Replay buffer in D4RL layout; Bellman errors (App. D.2) at multiples of 100 after learning starts.
    with h5py.File(buffer_path) as f:
        assert sorted(f) == ["actions", "next_observations", "observations", "rewards", "terminals", "timeouts"]
        assert f["observations"].shape[0] == args.total_timesteps and f["observations"].dtype == np.float32
    files = sorted(glob.glob(os.path.join(run_dir, "bellman_errors", "step_*.npy")))
    assert [os.path.basename(p) for p in files] == ["step_00000200.npy", "step_00000300.npy"]
    errors = np.load(files[-1])
    assert errors.dtype == np.float32 and errors.shape == (args.batch_size,) and np.isfinite(errors).all()


def test_cli_run_and_eval_only(tmp_path):
    """A real command line, as a user types it, then the documented evaluation of its checkpoint."""
    runs = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "xtd3_continuous.py"), "--env-id", "Pendulum-v1", "--total-timesteps", "250",
               "--learning-starts", "100", "--hidden-dim", "32", "--batch-size", "32", "--eval-episodes", "1",
               "--log-freq", "50", "--no-double-q", "--exp-name", "xtd3-dq", "--runs-dir", str(runs), "--save-model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "beta=4.0 (fallback" in done.stdout and "one critic" in done.stdout
    (run_dir,) = list(runs.iterdir())
    checkpoint = run_dir / "checkpoint.pt"
    assert f"run folder {run_dir}" in done.stdout
    evaluated = subprocess.run([sys.executable, str(ROOT / "xtd3_continuous.py"), "--eval-only", "--checkpoint", str(checkpoint),
                                "--eval-episodes", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "return" in evaluated.stdout and "over 1 episodes" in evaluated.stdout


# ---- bad input ----
@pytest.mark.parametrize("overrides, words", [
    ({"env_id": "dm_control/cheetah-rnu-v0"}, "unknown environment id"),
    ({"env_id": "CartPole-v1"}, "bounded continuous"),
    ({"beta": 0.0}, "--beta must be > 0"),
    ({"beta": -2.0}, "--beta must be > 0"),
    ({"cudagraphs": True}, "--cudagraphs needs a CUDA device"),
    ({"eval_only": True, "checkpoint": "/nonexistent/checkpoint.pt"}, "--eval-only needs --checkpoint"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, overrides, words):
    args = tiny_args(tmp_path, **overrides)
    with pytest.raises(SystemExit) as error:
        xtd3.main(args)
    message = str(error.value.code)
    assert message.startswith("xtd3_continuous: ") and words in message and "\n" not in message
    assert not os.path.exists(args.runs_dir)


def test_eval_only_refuses_a_foreign_file(tmp_path):
    foreign = tmp_path / "not_a_checkpoint.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(SystemExit) as error:
        xtd3.main(xtd3.Args(eval_only=True, checkpoint=str(foreign)))
    assert "is not a checkpoint written by xtd3_continuous" in str(error.value.code)


def test_bad_input_cli(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "xtd3_continuous.py"), "--env-id", "dm_control/cheetah-rnu-v0",
                           "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("xtd3_continuous: unknown environment id")
    assert "Did you mean: dm_control/cheetah-run-v0" in done.stderr
    assert not (tmp_path / "runs").exists()


# ---- NaN / inf stop ----
class NaNRewardAfter(gym.Wrapper):
    """Pendulum whose rewards turn NaN after `clean_steps` steps: the critic loss becomes NaN."""

    def __init__(self, env, clean_steps=180):
        super().__init__(env)
        self.steps, self.clean_steps = 0, clean_steps

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs, (float("nan") if self.steps > self.clean_steps else reward), terminated, truncated, info


def make_nan_pendulum(**kwargs):
    return NaNRewardAfter(gym.make("Pendulum-v1", **kwargs))


gym.register("XTD3NaNPendulum-v0", entry_point=make_nan_pendulum, max_episode_steps=200)


def test_nan_stops_run_with_message_and_saves(tmp_path):
    buffer_path = str(tmp_path / "buffer.hdf5")
    args = tiny_args(tmp_path, env_id="XTD3NaNPendulum-v0", total_timesteps=400, learning_starts=50, log_freq=50,
                     save_buffer=buffer_path)
    with pytest.raises(SystemExit) as error:
        xtd3.main(args)
    message = str(error.value.code)
    assert "NaN/inf" in message and "\n" not in message
    # The first NaN reward is stored at step 181; a batch drawn at or after it can contain it.
    bad_step = int(message.split("env step ")[1].split(";")[0])
    assert 181 <= bad_step <= 250
    assert "last finite values (step " in message and "losses/q_loss" in message
    (run_dir,) = glob.glob(os.path.join(args.runs_dir, "*"))
    snapshot = torch.load(os.path.join(run_dir, "last_finite_checkpoint.pt"), weights_only=False)
    assert snapshot["global_step"] < bad_step
    assert all(torch.isfinite(t).all() for t in snapshot["actor"].values())
    with h5py.File(buffer_path) as f:
        assert f["rewards"].shape[0] >= bad_step  # saved at the log interval that noticed the NaN


# ---- compiled path ----
def test_compiled_update_matches_eager(tmp_path):
    """--compile runs the same update: with the same seed and batches, losses match eager for 6 steps.

    Tolerance: 1e-4 relative + 1e-5 absolute (float32; inductor fuses and reorders reductions).
    fallback_random makes the compiled target-policy noise draw from the same RNG stream as eager.
    """
    import torch._inductor.config as inductor_config

    def run(compiled: bool):
        torch.manual_seed(0)
        args = tiny_args(tmp_path)
        actor, critics = xtd3.Actor(3, 1, 32), xtd3.Critics(3, 1, 32, 2)
        actor_target, critics_target = xtd3.Actor(3, 1, 32), xtd3.Critics(3, 1, 32, 2)
        actor_target.load_state_dict(actor.state_dict())
        critics_target.load_state_dict(critics.state_dict())
        actor_opt = xtd3.make_optimizer(actor.parameters(), 1e-3, torch.device("cpu"), False)
        critic_opt = xtd3.make_optimizer(critics.parameters(), 1e-3, torch.device("cpu"), False)
        update = xtd3.make_update(args, 2.0, actor, actor_target, critics, critics_target, actor_opt, critic_opt)
        if compiled:
            update = torch.compile(update)
        generator = torch.Generator().manual_seed(1)
        losses = []
        for step in range(6):
            batch = xtd3.Batch(torch.randn(32, 3, generator=generator), torch.rand(32, 1, generator=generator) * 2 - 1,
                               torch.randn(32, generator=generator), torch.randn(32, 3, generator=generator), torch.zeros(32))
            metrics, actor_loss = update(batch, step % 2 == 1)
            losses.append(metrics.tolist() + ([actor_loss.item()] if actor_loss is not None else []))
        return losses

    eager = run(False)
    previous = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        compiled = run(True)
    finally:
        inductor_config.fallback_random = previous
    assert len(compiled) == len(eager) == 6
    for e, c in zip(eager, compiled):
        assert c == pytest.approx(e, rel=1e-4, abs=1e-5)
    assert eager[0] != eager[-1]  # the parameters did change between steps


def test_compile_flag_runs_main_and_matches_eager(tmp_path):
    """`--compile` through main (compiled update and policy): the first logged losses match the eager run.

    Same seed; fallback_random gives the compiled noise the eager RNG stream. The two runs can drift
    apart only by float32 rounding (inductor reorders reductions), amplified through the updates, so
    the first three log points (10 updates apart) are compared at 1e-3 relative.
    """
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    logged = {}
    counters.clear()
    for compiled in (False, True):
        args = tiny_args(tmp_path / str(compiled), total_timesteps=130, learning_starts=100, log_freq=10, compile=compiled)
        previous = inductor_config.fallback_random
        inductor_config.fallback_random = True
        try:
            logged[compiled] = scalars(xtd3.main(args))
        finally:
            inductor_config.fallback_random = previous
    assert counters["stats"]["unique_graphs"] >= 3  # the update (with and without the actor step) and the policy
    for tag in ("losses/q_loss", "values/q"):
        eager, compiled = logged[False][tag][:3], logged[True][tag][:3]
        assert [s for s, _ in eager] == [s for s, _ in compiled] == [100, 110, 120]
        assert [v for _, v in compiled] == pytest.approx([v for _, v in eager], rel=1e-3), tag


def test_benchmark_script_pins_table_6(tmp_path):
    """benchmark/xtd3_continuous.sh (dry run): 4 tasks x 3 arms with Table 6's beta per task and arm."""
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "1 2", "SWEEP_ARGS": "--dry-run"}
    done = subprocess.run(["bash", str(ROOT / "benchmark" / "xtd3_continuous.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = [line for line in done.stdout.splitlines() if "xtd3_continuous.py --env-id" in line]
    assert len(commands) == 4 * 3 * 2
    expected = {("cheetah-run", "xtd3"): "--beta 5", ("cheetah-run", "xtd3-dq"): "--no-double-q --beta 4",
                ("walker-run", "xtd3"): "--beta 2", ("walker-run", "xtd3-dq"): "--no-double-q --beta 4",
                ("hopper-hop", "xtd3"): "--beta 2", ("hopper-hop", "xtd3-dq"): "--no-double-q --beta 3",
                ("quadruped-run", "xtd3"): "--beta 5", ("quadruped-run", "xtd3-dq"): "--no-double-q --beta 20"}
    for (task, arm), flags in expected.items():
        matching = [c for c in commands if f"dm_control/{task}-v0" in c and f"--exp-name {arm} " in c]
        assert len(matching) == 2 and all(flags in c for c in matching), (task, arm, matching)
    td3 = [c for c in commands if "--exp-name td3 " in c]
    assert len(td3) == 8 and all("--critic-loss mse" in c and "--beta" not in c for c in td3)


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="--capture-video needs moviepy")
def test_capture_video_headless_default(tmp_path):
    """--capture-video with MUJOCO_GL unset: the script picks a headless backend, says so, and writes videos.

    InvertedPendulum-v4 (MuJoCo, rendered by gymnasium) keeps the evaluation episode short."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(ROOT / "xtd3_continuous.py"), "--env-id", "InvertedPendulum-v4",
                           "--total-timesteps", "150", "--learning-starts", "100", "--hidden-dim", "32", "--batch-size", "32",
                           "--eval-episodes", "1", "--log-freq", "50", "--runs-dir", str(tmp_path / "runs"), "--capture-video"],
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0 and ("OSMesa" in done.stderr or "EGL" in done.stderr or "GLError" in done.stderr):
        pytest.skip(f"no headless OpenGL on this machine: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MUJOCO_GL was unset; using MUJOCO_GL=" in done.stdout
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert videos and all(os.path.getsize(v) > 0 for v in videos)
