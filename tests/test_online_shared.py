"""The pieces the online scripts share (make_env, evaluate, ReplayBuffer, the checkpoint and
NaN-stop helpers), --eval-only, --num-envs, --track without wandb, the quiet headless start, and
the source identity of the shared block.

Each check runs against every top-level script that defines `save_buffer` (found by AST, so a new
online script is covered as soon as it exists). The shared block must have identical source in
every pair of such scripts, so a behaviour is tested once per script, against values computed here.
xql_offline.py's copies of the loss, network, evaluation, checkpoint and buffer pieces are held to
the online ones too. The exact continuation of a stopped run (--resume) is in test_online_resume.py.
"""

import ast
import dataclasses
import itertools
import os
import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, scripts_defining
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ONLINE = scripts_defining("save_buffer")
PAIRS = list(itertools.combinations(ONLINE, 2))
TINY = dict(hidden_dim=32, batch_size=32, eval_episodes=1, cuda=False)

# Pendulum with 50-step episodes: several episode ends (random and policy phase) in a few hundred
# env steps.
SHORT_PENDULUM = "OnlineSharedShortPendulum-v0"
if SHORT_PENDULUM not in gym.registry:
    gym.register(
        SHORT_PENDULUM,
        entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
        max_episode_steps=50,
    )


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_online_scripts_found():
    assert "xsac_continuous" in ONLINE and "xtd3_continuous" in ONLINE
    assert "xql_offline" not in ONLINE


def rollout(module, env_id: str, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Observations and rewards of `steps` random steps, seeded by make_env alone (env and action
    space)."""
    env = module.make_env(env_id, seed)
    obs, _ = env.reset()
    observations = [obs]
    rewards = []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.stack(observations), np.array(rewards)


def filled_buffer(module, capacity: int, steps: int) -> object:
    """A buffer after `steps` single-transition adds (a termination at 7, time limits at 5, 11)."""
    buffer = module.ReplayBuffer(capacity, obs_dim=3, action_dim=2, device=torch.device("cpu"))
    for t in range(steps):
        obs = np.full(3, t, dtype=np.float32)
        buffer.add(
            obs[None],
            np.array([[t / 100, -t / 100]], dtype=np.float32),
            [float(t)],
            (obs + 1)[None],
            [t == 7],
            [t in (5, 11)],
        )
    return buffer


def read_hdf5(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()} | {"attrs": dict(f.attrs)}


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def tiny_agent(module, run_dir: str, seed: int = 0):
    """A small agent, its optimisers as a dict, and resolved-enough Args for save_checkpoint."""
    args = module.Args(env_id="Pendulum-v1", hidden_dim=8, run_dir=run_dir, cuda=False)
    torch.manual_seed(seed)
    agent = module.Agent(3, 1, args)
    optimizers = {"critic": torch.optim.Adam(agent.critic.parameters())}
    agent.critic.q1(torch.ones(2, 3), torch.ones(2, 1)).sum().backward()
    optimizers["critic"].step()  # an optimiser with state
    return args, agent, optimizers


# ---- make_env, evaluate ----
@pytest.mark.parametrize("stem", ONLINE)
def test_make_env_dm_control_flat_float32_and_seeded(stem):
    module = load_script(stem)
    env = module.make_env("dm_control/cartpole-swingup-v0", seed=0)
    assert env.observation_space.shape == (5,) and env.observation_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, _ = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (5,)
    env.close()
    first, rewards_first = rollout(module, "dm_control/cartpole-swingup-v0", 7, 30)
    second, rewards_second = rollout(module, "dm_control/cartpole-swingup-v0", 7, 30)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(rewards_first, rewards_second)
    other, _ = rollout(module, "dm_control/cartpole-swingup-v0", 8, 30)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("stem", ONLINE)
def test_make_env_rescales_actions_to_env_bounds(stem):
    module = load_script(stem)
    env = module.make_env("Pendulum-v1", seed=0)  # torque bounds are [-2, 2]
    env.reset()
    env.step(np.array([1.0], dtype=np.float32))
    assert env.unwrapped.last_u == pytest.approx(2.0)
    env.step(np.array([-0.5], dtype=np.float32))
    assert env.unwrapped.last_u == pytest.approx(-1.0)
    env.close()


@pytest.mark.parametrize("stem", ONLINE)
def test_env_errors_are_one_line(stem, capsys):
    module = load_script(stem)
    with pytest.raises(SystemExit) as error:
        module.make_env("CartPole-v1", seed=0)
    assert str(error.value.code) == (
        f"{stem}: 'CartPole-v1' has action space Discrete(2); this script needs a bounded "
        "continuous (Box) one."
    )
    with pytest.raises(SystemExit) as error:  # gymnasium's own message, which suggests close ids
        module.make_env("Pendulm-v1", seed=0)
    assert str(error.value.code) == (
        f"{stem}: --env-id Pendulm-v1: Environment `Pendulm` doesn't exist. Did you mean: "
        "`Pendulum`?"
    )
    with pytest.raises(SystemExit) as error:
        module.make_env("dm_control/walker-rnu-v0", seed=0)
    assert str(error.value.code) == (
        f"{stem}: --env-id dm_control/walker-rnu-v0: Environment `walker-rnu` doesn't exist in "
        "namespace dm_control. Did you mean: `walker-run`?"
    )
    resolved, resume = module.resolve_args(module.Args(env_id="dm_control/walker-run-v0"))
    assert resolved.env_id == "dm_control/walker-run-v0" and resolved.beta is not None
    assert resume is None
    assert capsys.readouterr().out.startswith(f"{stem}: dm_control/walker-run-v0, ")


@pytest.mark.parametrize("stem", ONLINE)
def test_evaluate_seeding_counts_episodes(stem):
    """The eval env is seeded once: a second evaluation on it sees new start states (another
    return on Pendulum), while two envs made with the same seed give identical results."""
    module = load_script(stem)

    def policy(obs):
        return torch.tanh(obs[:, :1])

    env = module.make_env("Pendulum-v1", seed=5)
    twin = module.make_env("Pendulum-v1", seed=5)
    returns, lengths = module.evaluate(policy, env, 2, torch.device("cpu"))
    assert returns.shape == (2,) and list(lengths) == [200, 200] and np.isfinite(returns).all()
    assert returns[0] != returns[1]  # the episodes of one evaluation start apart too
    again, _ = module.evaluate(policy, env, 2, torch.device("cpu"))
    assert not np.any(np.isin(again, returns))  # a second evaluation on the same env: new starts
    twin_returns, twin_lengths = module.evaluate(policy, twin, 2, torch.device("cpu"))
    np.testing.assert_array_equal(twin_returns, returns)
    np.testing.assert_array_equal(twin_lengths, lengths)
    env.close()
    twin.close()


@pytest.mark.parametrize("stem", ONLINE)
def test_evaluate_runs_the_policy_it_is_given(stem):
    """A constant-action policy scores exactly the return of stepping an identically made env with
    that action; another policy scores differently on an identically seeded env; every step asks
    the policy, with the observation as a (1, obs_dim) tensor."""
    module = load_script(stem)
    calls = []

    def constant(obs):
        calls.append(obs.clone())
        return torch.full((len(obs), 1), 0.5)

    returns, lengths = module.evaluate(
        constant, module.make_env("Pendulum-v1", seed=9), 2, torch.device("cpu")
    )
    env = gym.make("Pendulum-v1")  # by hand: the env's own torque units, 0.5 of the bound 2
    env.reset(seed=9)
    expected = []
    starts = []
    for _ in range(2):
        obs, _ = env.reset()
        starts.append(obs)
        total = 0.0
        for _ in range(200):
            obs, reward, _, _, _ = env.step(np.array([1.0], dtype=np.float32))
            total += float(reward)
        expected.append(total)
    np.testing.assert_allclose(returns, expected, rtol=1e-12)
    assert list(lengths) == [200, 200] and len(calls) == 400
    assert calls[0].shape == (1, 3) and calls[0].dtype == torch.float32
    np.testing.assert_allclose(calls[200][0].numpy(), starts[1], rtol=1e-6)  # episode 2, step 1
    other, _ = module.evaluate(
        lambda obs: -torch.tanh(obs[:, 1:2]),
        module.make_env("Pendulum-v1", seed=9),
        2,
        torch.device("cpu"),
    )
    assert not np.any(np.isin(other, returns))


# ---- replay buffer ----
@pytest.mark.parametrize("stem", ONLINE)
def test_replay_buffer_sample_shapes_device_and_content(stem):
    module = load_script(stem)
    buffer = filled_buffer(module, capacity=20, steps=12)
    assert buffer.size == 12 and buffer.ptr == 12
    assert buffer.rows.shape == (20, 3 + 2 + 1 + 3 + 1 + 1)
    torch.manual_seed(0)
    batch = buffer.sample(64)
    obs, actions, rewards, next_obs, terminated = batch
    assert obs.shape == next_obs.shape == (64, 3) and actions.shape == (64, 2)
    assert rewards.shape == terminated.shape == (64,)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in batch)
    t = rewards.long()
    assert t.max() < 12 and len(t.unique()) > 6  # only filled rows are drawn, and many of them
    torch.testing.assert_close(obs[:, 0], rewards)
    torch.testing.assert_close(actions, torch.stack([t / 100, -t / 100], 1).float())
    torch.testing.assert_close(next_obs, obs + 1)
    torch.testing.assert_close(terminated, (t == 7).float())  # time limits are not terminations


@pytest.mark.parametrize("stem", ONLINE)
def test_replay_buffer_adds_batches_with_wrap_around(stem):
    """One add of n transitions = n single adds, also across the end of the circular buffer."""
    module = load_script(stem)
    single = filled_buffer(module, capacity=8, steps=13)
    batched = module.ReplayBuffer(8, obs_dim=3, action_dim=2, device=torch.device("cpu"))
    for start, stop in ((0, 3), (3, 6), (6, 10), (10, 13)):  # the third batch wraps around
        t = np.arange(start, stop)
        obs = np.repeat(t[:, None], 3, axis=1).astype(np.float32)
        batched.add(
            obs,
            np.stack([t / 100, -t / 100], 1),
            t.astype(float),
            obs + 1,
            t == 7,
            np.isin(t, (5, 11)),
        )
    assert batched.size == single.size == 8 and batched.ptr == single.ptr == 5
    assert torch.equal(batched.rows, single.rows)
    np.testing.assert_array_equal(batched.rows[:, 0], [8, 9, 10, 11, 12, 5, 6, 7])  # the newest 8
    np.testing.assert_array_equal(batched.rows[:, -2:].sum(0), [1, 2])  # 7 ends; 5, 11 time out


@pytest.mark.parametrize("stem", ONLINE)
def test_save_hdf5_round_trip_with_wrap_around(stem, tmp_path):
    module = load_script(stem)
    buffer = filled_buffer(module, capacity=8, steps=13)  # rows 0..4 overwritten by steps 8..12
    path = tmp_path / "buffer.hdf5"
    buffer.save_hdf5(str(path), env_id="Pendulum-v1", seed=4)
    data = read_hdf5(path)
    assert not (tmp_path / "buffer.hdf5.tmp").exists()
    keys = {"observations", "actions", "rewards", "terminals", "timeouts", "next_observations"}
    assert set(data) == keys | {"attrs"}
    assert data["attrs"] == {"env_id": "Pendulum-v1", "seed": 4}
    oldest_first = np.arange(5, 13, dtype=np.float32)
    np.testing.assert_array_equal(data["rewards"], oldest_first)
    np.testing.assert_array_equal(data["observations"][:, 0], oldest_first)
    np.testing.assert_array_equal(data["next_observations"], data["observations"] + 1)
    np.testing.assert_array_equal(data["actions"][:, 0], oldest_first / 100)
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    np.testing.assert_array_equal(np.nonzero(data["terminals"])[0], [2])  # step 7
    # steps 5, 11 and the cut at 12
    np.testing.assert_array_equal(np.nonzero(data["timeouts"])[0], [0, 6, 7])

    # the last stored step (7) is a termination: not a timeout too
    terminated_last = filled_buffer(module, capacity=8, steps=8)
    terminated_last.save_hdf5(str(path))
    data = read_hdf5(path)
    assert data["terminals"][-1] and not data["timeouts"][-1]
    np.testing.assert_array_equal(np.nonzero(data["timeouts"])[0], [5])


# ---- checkpoints, the NaN stop, log intervals ----
@pytest.mark.parametrize("stem", ONLINE)
def test_save_and_load_checkpoint(stem, tmp_path):
    module = load_script(stem)
    args, agent, optimizers = tiny_agent(module, str(tmp_path))
    state = {"step": 7, "num_updates": 3, "evaluations": []}
    module.save_checkpoint(args, state, agent, optimizers)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no .tmp left
    loaded = module.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert set(loaded) == {"script", "args", "step", "agent", "optimizers"}  # not resumable
    assert loaded["script"] == stem and loaded["step"] == 7 and loaded["args"] == vars(args)
    assert loaded["agent"].keys() == agent.state_dict().keys()
    assert all(torch.equal(loaded["agent"][k], v) for k, v in agent.state_dict().items())
    restored = module.Agent(3, 1, args)
    restored.load_state_dict(loaded["agent"])
    saved_adam = loaded["optimizers"]["critic"]["state"][0]
    assert int(saved_adam["step"]) == 1
    assert torch.equal(
        saved_adam["exp_avg"], optimizers["critic"].state[agent.critic.nets[0][0].weight]["exp_avg"]
    )

    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:200])
    cases = [("missing.pt", "FileNotFoundError"), ("foreign.pt", "KeyError")]
    cases += [("truncated.pt", "RuntimeError")]
    for other in ONLINE:  # a checkpoint of another online script: its script name differs
        if other != stem:
            os.makedirs(tmp_path / other)
            other_args, other_agent, other_optimizers = tiny_agent(
                load_script(other), str(tmp_path / other)
            )
            load_script(other).save_checkpoint(other_args, state, other_agent, other_optimizers)
            cases.append((f"{other}/checkpoint.pt", "AssertionError"))
    for name, error in cases:
        with pytest.raises(SystemExit) as raised:
            module.load_checkpoint(str(tmp_path / name))
        assert str(raised.value.code) == (
            f"{stem}: {tmp_path / name} is not a checkpoint of {stem} --save-model ({error})."
        )


@pytest.mark.parametrize("stem", ONLINE)
def test_checkpoint_is_replaced_atomically(stem, tmp_path, monkeypatch):
    """A crash while a new checkpoint is written leaves the previous one whole."""
    module = load_script(stem)
    args, agent, optimizers = tiny_agent(module, str(tmp_path))
    module.save_checkpoint(args, {"step": 7}, agent, optimizers)

    def crash(contents, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        module.save_checkpoint(args, {"step": 8}, agent, optimizers)
    monkeypatch.undo()
    assert module.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 7


@pytest.mark.parametrize("stem", ONLINE)
def test_snapshot_and_stop_on_nonfinite(stem, tmp_path):
    """The snapshot is a copy (later steps do not change it); the stop saves it and names both
    steps in one line."""
    module = load_script(stem)
    net = torch.nn.Linear(2, 1)
    args = module.Args(env_id="Pendulum-v1")
    last_finite = module.snapshot(net, args, 100, {"losses/q_loss": 1.5, "values/q": -2.25})
    kept = last_finite["agent"]["weight"].clone()
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    assert torch.equal(last_finite["agent"]["weight"], kept) and last_finite["step"] == 100
    assert last_finite["args"]["env_id"] == "Pendulum-v1" and last_finite["script"] == stem
    with pytest.raises(SystemExit) as error:
        module.stop_on_nonfinite(str(tmp_path), 137, last_finite)
    path = tmp_path / "last_finite_checkpoint.pt"
    assert str(error.value.code) == (
        f"{stem}: a loss became NaN/inf at step 137; last finite values (step 100): q_loss=1.5, "
        f"q=-2.25; parameters of step 100 saved to {path}. Try a larger --beta or a smaller "
        "--loss-clip."
    )
    saved = module.load_checkpoint(str(path))
    assert saved["step"] == 100 and torch.equal(saved["agent"]["weight"], kept)
    assert sorted(os.listdir(tmp_path)) == ["last_finite_checkpoint.pt"]
    with pytest.raises(SystemExit) as error:  # a NaN before the first log interval
        module.stop_on_nonfinite(str(tmp_path), 3, module.snapshot(net, args, 0, {}))
    expected = "at step 3; last finite values (step 0): none yet; parameters of step 0 saved"
    assert expected in str(error.value.code)


@pytest.mark.parametrize("stem", ONLINE)
def test_crossed_multiples(stem):
    crossed = load_script(stem).crossed
    assert [s for s in range(1, 301) if crossed(s, 1, 100)] == [100, 200, 300]
    assert [s for s in range(3, 301, 3) if crossed(s, 3, 100)] == [102, 201, 300]
    assert [s for s in range(4, 41, 4) if crossed(s, 4, 3)] == list(range(4, 41, 4))
    assert not any(crossed(s, 2, 0) for s in range(2, 100, 2))  # every = 0: never


@pytest.mark.parametrize("stem", ONLINE)
def test_log_progress_line_and_scalars(stem, capsys):
    """The console line holds the step, SPS, the losses (not the other values), the last
    evaluation and the ETA; TensorBoard gets every value and the SPS."""
    module = load_script(stem)

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    writer = Writer()
    values = {"losses/q_loss": 0.123456, "values/q": 3.0, "losses/actor_loss": -2.5}
    module.log_progress(writer, values, 300, 1000, 70.0, "-12.50 +- 1.00")
    assert capsys.readouterr().out == (
        "step 300/1000 | SPS 70 | q_loss 0.1235 | actor_loss -2.5 | last eval -12.50 +- 1.00 | "
        "ETA 0:00:10\n"
    )
    assert writer.scalars == [(t, v, 300) for t, v in values.items()] + [("charts/SPS", 70.0, 300)]


# ---- --eval-only ----
@pytest.mark.parametrize("stem", ONLINE)
def test_eval_only_reproduces_the_final_evaluation(stem, tmp_path, capsys):
    """With --eval-freq 0 the run evaluates once, at the end, on an eval env seeded with
    seed + 10000 and not stepped before: --eval-only with that seed and episode count rebuilds the
    same env and the saved agent, so it gives that evaluation's returns exactly; the same
    checkpoint with freshly initialised weights does not."""
    module = load_script(stem)
    args = module.Args(
        env_id="Pendulum-v1",
        total_timesteps=160,
        learning_starts=100,
        seed=6,
        eval_freq=0,
        save_model=True,
        runs_dir=str(tmp_path / "runs"),
        **{**TINY, "eval_episodes": 2},
    )
    result = module.main(args)
    path = os.path.join(result["run_dir"], "checkpoint.pt")
    capsys.readouterr()
    evaluated = module.main(module.Args(eval_only=True, checkpoint=path, seed=6, eval_episodes=2))
    assert float(np.mean(evaluated["returns"])) == result["final_return"]
    assert evaluated["lengths"] == [200, 200] and evaluated["returns"][0] != evaluated["returns"][1]
    returns = np.array(evaluated["returns"])
    summary = (
        f"return {returns.mean():.2f} +- {returns.std():.2f} over 2 episodes (mean length 200)"
    )
    assert capsys.readouterr().out == f"{stem}: {path} (step 160) on Pendulum-v1: {summary}\n"

    checkpoint = torch.load(path, weights_only=False)
    torch.manual_seed(123)
    fresh = module.Agent(3, 1, module.Args(**checkpoint["args"]))
    torch.save({**checkpoint, "agent": fresh.state_dict()}, tmp_path / "fresh.pt")
    eval_args = module.Args(eval_only=True, checkpoint=str(tmp_path / "fresh.pt"), seed=6)
    untrained = module.main(dataclasses.replace(eval_args, eval_episodes=2))
    assert not np.any(np.isin(untrained["returns"], evaluated["returns"]))


# ---- --track without wandb ----
@pytest.mark.parametrize("stem", ONLINE)
def test_track_without_wandb_is_one_line_and_creates_nothing(stem, tmp_path, monkeypatch):
    module = load_script(stem)
    real_find_spec = module.find_spec

    def find_spec(name):
        return None if name == "wandb" else real_find_spec(name)

    monkeypatch.setattr(module, "find_spec", find_spec)
    runs = tmp_path / "runs"
    args = module.Args(env_id="Pendulum-v1", track=True, runs_dir=str(runs), cuda=False)
    with pytest.raises(SystemExit) as error:
        module.main(args)
    # a string code: Python prints it on one line and exits with status 1
    assert error.value.code == f"{stem}: --track needs wandb: pip install wandb."
    assert not runs.exists()


# ---- --num-envs ----
@pytest.mark.parametrize("stem", ONLINE)
def test_one_env_reproduces_the_single_env_loop(stem, tmp_path):
    """--num-envs 1: the stored transitions are those of one make_env env reset with the seed,
    random actions from its action space seeded with the seed for the first learning_starts steps,
    and updates from learning_starts on. The --save-buffer file also carries its provenance as
    attributes."""
    module = load_script(stem)
    path = tmp_path / "buffer.hdf5"
    args = module.Args(
        env_id="Pendulum-v1",
        total_timesteps=300,
        learning_starts=150,
        seed=5,
        log_freq=100,
        eval_freq=0,
        save_buffer=str(path),
        save_model=True,
        runs_dir=str(tmp_path / "runs"),
        **TINY,
    )
    result = module.main(args)
    data = read_hdf5(path)
    assert data["attrs"] == {
        "env_id": "Pendulum-v1",
        "script": stem,
        "exp_name": stem,
        "seed": 5,
        "env_steps": 300,
        "policy": data["attrs"]["policy"],
    }
    assert data["attrs"]["policy"].startswith("uniform random for 150 env steps, then the ")

    env = module.make_env("Pendulum-v1", 5)
    env.action_space.seed(5)
    obs, _ = env.reset(seed=5)
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    rows = {key: [] for key in keys}
    for t in range(300):
        action = env.action_space.sample() if t < 150 else data["actions"][t]
        next_obs, reward, terminated, truncated, _ = env.step(action)
        row = (obs, action, np.float32(reward), next_obs, terminated, truncated or t == 299)
        for key, value in zip(rows, row):
            rows[key].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    for key, values in rows.items():
        np.testing.assert_array_equal(data[key], np.array(values), err_msg=key)
    assert np.nonzero(data["timeouts"])[0].tolist() == [199, 299]
    # what random acting would have drawn: from step learning_starts + 1 on, the policy acts
    random_stream = np.array([env.action_space.sample() for _ in range(150)])
    assert not np.any(data["actions"][150:] == random_stream)

    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    assert checkpoint["step"] == 300
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == 300 - 150 + 1
    assert [step for step, _ in result["evaluations"]] == [300]


@pytest.mark.parametrize("stem", ONLINE)
def test_three_envs_lose_no_transition(stem, tmp_path, capsys):
    """--num-envs 3 with 50-step episodes: every env step is stored once, episode ends keep the
    true final observation (the next row of that env is the reset), one update per env step from
    learning starts on, and the progress, evaluation and episode logs land on the iterations that
    cross their multiples."""
    module = load_script(stem)
    path = tmp_path / "buffer.hdf5"
    args = module.Args(
        env_id=SHORT_PENDULUM,
        total_timesteps=330,
        learning_starts=150,
        num_envs=3,
        seed=2,
        log_freq=50,
        eval_freq=100,
        save_buffer=str(path),
        save_model=True,
        runs_dir=str(tmp_path / "runs"),
        **TINY,
    )
    result = module.main(args)
    out = capsys.readouterr().out
    data = read_hdf5(path)
    assert len(data["observations"]) == data["attrs"]["env_steps"] == 330  # 110 iterations x 3
    assert np.isfinite(data["observations"]).all() and np.isfinite(data["next_observations"]).all()

    # Random phase (iterations up to step 150): the batched action space seeded with the seed, one
    # row per env.
    space = gym.spaces.Box(-1.0, 1.0, (3, 1), np.float32)
    space.seed(2)
    random_actions = np.stack([space.sample() for _ in range(50)])  # (iteration, env, action)

    # The file holds env after env (110 rows each), so that each env's episodes are contiguous, as
    # D4RL's are.
    for i in range(3):
        env = module.make_env(SHORT_PENDULUM, 2 + i)
        obs, _ = env.reset(seed=2 + i)
        rows = slice(110 * i, 110 * (i + 1))
        np.testing.assert_array_equal(data["actions"][rows][:50], random_actions[:, i])
        ends = []
        for t, action in enumerate(data["actions"][rows]):
            np.testing.assert_array_equal(data["observations"][rows][t], obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            # the true last observation at episode ends
            np.testing.assert_array_equal(data["next_observations"][rows][t], next_obs)
            assert data["rewards"][rows][t] == np.float32(reward)
            assert data["terminals"][rows][t] == terminated
            # each env's cut at the end
            assert data["timeouts"][rows][t] == (truncated or (t == 109 and not terminated))
            if truncated:
                ends.append(t)
                obs = env.reset()[0]
                # the next row of this env starts a new episode
                assert not np.array_equal(next_obs, obs)
                np.testing.assert_array_equal(data["observations"][rows][t + 1], obs)
            else:
                obs = next_obs
        assert ends == [49, 99]
    # What xql_offline.py makes of it: row i+1 is row i's next observation on every transition it
    # keeps.
    offline = load_script("xql_offline")
    kept = offline.qlearning_dataset(offline.read_hdf5(str(path)), 0)
    assert len(kept["rewards"]) == 330 - 3 * 3  # each env's two time limits and its last row
    index = np.flatnonzero(~data["timeouts"][:-1])
    np.testing.assert_array_equal(kept["next_observations"], data["next_observations"][index])
    # 3 envs x 3 episodes (the last one cut)
    np.testing.assert_array_equal(offline.episode_returns(kept).shape, (9,))

    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    # env steps 148..330: 61 iterations x 3
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == 183

    logged = scalars(result["run_dir"])
    # crossing 150, 200, 250, 300
    assert [s for s, _ in logged["losses/q_loss"]] == [150, 201, 252, 300]
    # crossing 100, 200, 300; the end
    assert [s for s, _ in logged["eval/episodic_return"]] == [102, 201, 300, 330]
    assert [s for s, _ in result["evaluations"]] == [102, 201, 300, 330]
    # the returned evaluations are the logged ones; best and final are read from them
    evaluations = [value for _, value in result["evaluations"]]
    assert [v for _, v in logged["eval/episodic_return"]] == pytest.approx(evaluations, rel=1e-6)
    assert len(set(evaluations)) == 4 and evaluations.index(max(evaluations)) != 3
    assert result["best_return"] == max(evaluations) and result["final_return"] == evaluations[3]
    assert [s for s, _ in logged["charts/episodic_return"]] == [150] * 3 + [300] * 3
    assert [v for _, v in logged["charts/episodic_length"]] == [50.0] * 6
    progress = [line.split(" | ")[0] for line in out.splitlines() if " | SPS " in line]
    assert progress == ["step 150/330", "step 201/330", "step 252/330", "step 300/330"]
    evals = [line.split(" | ")[0] for line in out.splitlines() if " | eval return " in line]
    assert evals == ["step 102/330", "step 201/330", "step 300/330", "step 330/330"]
    assert "3 env(s)" in out
    closing = f"{stem}: done, final eval return {evaluations[3]:.2f}; run folder "
    assert out.endswith(
        f"{closing}{result['run_dir']}; checkpoint {result['run_dir']}/checkpoint.pt\n"
    )


# ---- a quiet start ----
@pytest.mark.parametrize("stem", ONLINE)
def test_quiet_headless_start(stem, tmp_path):
    """With no display and MUJOCO_GL unset, neither --help nor a normal run prints a GLFW or other
    library warning, on a gymnasium task and on a dm_control one (float64 action space: float32
    bounds there made numpy warn)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "PYTHONWARNINGS")
    }
    env["OMP_NUM_THREADS"] = "1"
    script = str(ROOT / f"{stem}.py")
    run = ["--env-id", "Pendulum-v1", "--total-timesteps", "150", "--learning-starts", "100"]
    run += ["--hidden-dim", "32", "--batch-size", "32", "--eval-episodes", "1", "--log-freq", "50"]
    run += ["--runs-dir", str(tmp_path / "runs"), "--no-cuda"]
    results = []
    for command in (["--help"], run, ["--env-id", "dm_control/cartpole-swingup-v0", *run[2:]]):
        done = subprocess.run(
            [sys.executable, script, *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        text = done.stdout + done.stderr
        for noise in ("GLFW", "Warning", "WARN", "DeprecationWarning", "MUJOCO_GL"):
            assert noise not in text, f"{stem} {command[0]}: {noise!r} in\n{text[-3000:]}"
        results.append(done)
    helped, ran, ran_dmc = results
    assert "--num-envs" in helped.stdout and "--matmul-precision" in helped.stdout
    assert "--resume" in helped.stdout and helped.stderr == ""
    for done in (ran, ran_dmc):
        assert "eval return" in done.stdout and f"{stem}: done, final eval return " in done.stdout
        assert done.stderr == ""


# ---- the shared block: identical source ----
SHARED = (
    "make_env",
    "Replayable",
    "evaluate",
    "gumbel_loss",
    "clip_fraction",
    "ReplayBuffer",
    "save_buffer",
    "FP32Linear",
    "TwinCritic",
    "crossed",
    "log_progress",
    "save_checkpoint",
    "load_checkpoint",
    "restore",
    "snapshot",
    "stop_on_nonfinite",
    "atomic_save",
    "evaluate_checkpoint",
    "PROG",
)
OFFLINE_SHARED = (
    "gumbel_loss",
    "clip_fraction",
    "FP32Linear",
    "TwinCritic",
    "evaluate",
    "Replayable",
    "log_progress",
    "load_checkpoint",
    "snapshot",
    "stop_on_nonfinite",
    "atomic_save",
    "ReplayBuffer.__init__",
    "ReplayBuffer.add",
    "ReplayBuffer.sample",
    "crossed",
)
# The known differences, as (old, new) replacements that make the copies equal: the policy that
# --eval-only runs (X-SAC's actor is stochastic; its mean action is the deterministic policy).
ONLINE_REWRITES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("xsac_continuous", "evaluate_checkpoint"): [("agent.actor.mean_action", "agent.actor")],
}
OFFLINE_REWRITES: dict[str, list[tuple[str, str]]] = {}


def shared_sources(stem: str) -> dict[str, str]:
    """Source of each module-level function, class (and class method, as `Class.method`) and
    assignment."""
    source = (ROOT / f"{stem}.py").read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
            for member in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(member, ast.FunctionDef):
                    found[f"{node.name}.{member.name}"] = ast.get_source_segment(source, member)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            if isinstance(node.targets[0], ast.Name):
                found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def rewritten(text: str, rewrites: list[tuple[str, str]]) -> str:
    for old, new in rewrites:
        assert old in text, f"stale rewrite {old!r}"
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pairs_have_identical_source(first, second):
    """The shared block is pasted verbatim: a fix in one copy must reach every copy."""
    a = shared_sources(first)
    b = shared_sources(second)
    for stem, found in ((first, a), (second, b)):
        assert set(SHARED) <= set(found), f"{stem} lacks {set(SHARED) - set(found)}"
    for name in SHARED:
        assert rewritten(a[name], ONLINE_REWRITES.get((first, name), [])) == rewritten(
            b[name], ONLINE_REWRITES.get((second, name), [])
        ), f"{name} differs between {first} and {second}"


@pytest.mark.parametrize("stem", ONLINE)
def test_offline_copies_match_the_online_ones(stem):
    """xql_offline.py pastes the same losses, critic, evaluation, episode replay, checkpoint and
    NaN-stop helpers, and the same ReplayBuffer less save_hdf5 (the dataset is loaded into it,
    fine-tuning appends to it)."""
    offline = shared_sources("xql_offline")
    online = shared_sources(stem)
    missing = set(OFFLINE_SHARED) - set(offline)
    assert not missing, f"xql_offline lacks {missing}"
    assert "ReplayBuffer.save_hdf5" not in offline and "ReplayBuffer.save_hdf5" in online
    for name in OFFLINE_SHARED:
        rewrites = ONLINE_REWRITES.get((stem, name), []) + OFFLINE_REWRITES.get(name, [])
        expected = rewritten(online[name], rewrites)
        assert offline[name] == expected, f"{name} differs between xql_offline and {stem}"
