"""The pieces the online scripts share (make_env, final_observations, evaluate, ReplayBuffer, the checkpoint and
NaN-stop helpers), --num-envs, the quiet headless start, and the source identity of the shared block.

Each check runs against every top-level script that defines `final_observations` (found by AST, so a new online
script is covered as soon as it exists), and, for every pair of such scripts, the two copies must give identical
results on the same inputs and have identical source. xql_offline.py's copies of the loss, network, checkpoint and
buffer pieces are held to the online ones too.
"""
import ast
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

ONLINE = scripts_defining("final_observations")
PAIRS = list(itertools.combinations(ONLINE, 2))
TINY = dict(hidden_dim=32, batch_size=32, eval_episodes=1, cuda=False)

# Pendulum with 50-step episodes: several episode ends (random and policy phase) in a few hundred env steps.
SHORT_PENDULUM = "OnlineSharedShortPendulum-v0"
if SHORT_PENDULUM not in gym.registry:
    gym.register(SHORT_PENDULUM, entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv", max_episode_steps=50)


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
    """Observations and rewards of `steps` steps with random actions, seeded by make_env alone (env and action space)."""
    env = module.make_env(env_id, seed)
    obs, _ = env.reset()
    observations, rewards = [obs], []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.stack(observations), np.array(rewards)


def filled_buffer(module, capacity: int, steps: int) -> object:
    """A buffer after `steps` single-transition adds (terminations at 7, time limits at 5 and 11)."""
    buffer = module.ReplayBuffer(capacity, obs_dim=3, action_dim=2, device=torch.device("cpu"))
    for t in range(steps):
        obs = np.full(3, t, dtype=np.float32)
        buffer.add(obs[None], np.array([[t / 100, -t / 100]], dtype=np.float32), [float(t)], (obs + 1)[None],
                   [t == 7], [t in (5, 11)])
    return buffer


def read_hdf5(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()} | {"attrs": dict(f.attrs)}


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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
    text = str(error.value.code)
    assert text == f"{stem}: 'CartPole-v1' has action space Discrete(2); this script needs a bounded continuous (Box) one."
    with pytest.raises(SystemExit) as error:
        module.resolve_args(module.Args(env_id="Pendulm-v1"))
    assert str(error.value.code).startswith(f"{stem}: unknown environment id 'Pendulm-v1'. Did you mean: Pendulum-v1")
    assert "\n" not in str(error.value.code)
    resolved = module.resolve_args(module.Args(env_id="dm_control/walker-run-v0"))  # registered by `import shimmy`
    assert resolved.env_id == "dm_control/walker-run-v0" and resolved.beta is not None
    assert capsys.readouterr().out.startswith(f"{stem}: dm_control/walker-run-v0, ")


@pytest.mark.parametrize("stem", ONLINE)
def test_evaluate_seeding_counts_episodes(stem):
    """The eval env is seeded once: a second evaluation on it sees new start states (another return on Pendulum),
    while two envs made with the same seed give identical results."""
    module = load_script(stem)
    policy = lambda obs: torch.tanh(obs[:, :1])  # noqa: E731  deterministic
    env, twin = module.make_env("Pendulum-v1", seed=5), module.make_env("Pendulum-v1", seed=5)
    returns, lengths = module.evaluate(policy, env, 2, torch.device("cpu"))
    assert returns.shape == (2,) and list(lengths) == [200, 200] and np.isfinite(returns).all()
    assert returns[0] != returns[1]  # the episodes of one evaluation start apart too
    again, _ = module.evaluate(policy, env, 2, torch.device("cpu"))
    assert not np.any(np.isin(again, returns))  # a second evaluation on the same env: new start states
    twin_returns, twin_lengths = module.evaluate(policy, twin, 2, torch.device("cpu"))
    np.testing.assert_array_equal(twin_returns, returns)
    np.testing.assert_array_equal(twin_lengths, lengths)
    env.close()
    twin.close()


@pytest.mark.parametrize("stem", ONLINE)
def test_final_observations_restores_the_true_last_observation(stem):
    """With same-step autoreset, next_obs holds the reset observation where an episode ended; final_observations
    puts the env's true last observation back, and returns the finished episodes' return and length."""
    module = load_script(stem)
    envs = gym.vector.SyncVectorEnv([lambda i=i: module.make_env(SHORT_PENDULUM, 3 + i) for i in range(2)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    singles = [module.make_env(SHORT_PENDULUM, 3 + i) for i in range(2)]
    obs, _ = envs.reset(seed=3)
    for i, env in enumerate(singles):
        np.testing.assert_array_equal(obs[i], env.reset(seed=3 + i)[0])
    totals = np.zeros(2)
    for t in range(60):
        actions = np.array([[np.sin(t)], [np.cos(t)]], dtype=np.float32)
        next_obs, rewards, _, truncations, infos = envs.step(actions)
        real_next_obs, finished = module.final_observations(next_obs, infos)
        totals += rewards
        for i, env in enumerate(singles):
            true_next, reward, _, truncated, _ = env.step(actions[i])
            np.testing.assert_array_equal(real_next_obs[i], true_next)
            assert reward == rewards[i] and truncated == truncations[i]
            if truncated:
                np.testing.assert_array_equal(next_obs[i], env.reset()[0])  # the vector env's obs is the reset one
                assert not np.array_equal(next_obs[i], real_next_obs[i])
        if t == 49:
            assert truncations.all()
            assert finished == [(pytest.approx(totals[0]), 50), (pytest.approx(totals[1]), 50)]
            totals[:] = 0
        else:
            assert finished == [] and not truncations.any()
            np.testing.assert_array_equal(real_next_obs, next_obs)
        obs = next_obs
    envs.close()


# ---- replay buffer ----
@pytest.mark.parametrize("stem", ONLINE)
def test_replay_buffer_sample_shapes_device_and_content(stem):
    module = load_script(stem)
    buffer = filled_buffer(module, capacity=20, steps=12)
    assert buffer.size == 12 and buffer.ptr == 12
    torch.manual_seed(0)
    batch = buffer.sample(64)
    assert batch.obs.shape == batch.next_obs.shape == (64, 3) and batch.actions.shape == (64, 2)
    assert batch.rewards.shape == batch.terminated.shape == (64,)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in batch)
    t = batch.rewards.long()
    assert t.max() < 12  # only filled rows are drawn
    torch.testing.assert_close(batch.obs[:, 0], batch.rewards)
    torch.testing.assert_close(batch.next_obs, batch.obs + 1)
    torch.testing.assert_close(batch.terminated, (t == 7).float())  # time limits are not terminations


@pytest.mark.parametrize("stem", ONLINE)
def test_replay_buffer_adds_batches_with_wrap_around(stem):
    """One add of n transitions = n single adds, also across the end of the circular buffer."""
    module = load_script(stem)
    single = filled_buffer(module, capacity=8, steps=13)
    batched = module.ReplayBuffer(8, obs_dim=3, action_dim=2, device=torch.device("cpu"))
    for start, stop in ((0, 3), (3, 6), (6, 10), (10, 13)):  # batches of 3, 3, 4, 3: the third one wraps around
        t = np.arange(start, stop)
        obs = np.repeat(t[:, None], 3, axis=1).astype(np.float32)
        batched.add(obs, np.stack([t / 100, -t / 100], 1), t.astype(float), obs + 1, t == 7, np.isin(t, (5, 11)))
    assert batched.size == single.size == 8 and batched.ptr == single.ptr == 5
    for name in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated"):
        assert torch.equal(getattr(batched, name), getattr(single, name)), name


@pytest.mark.parametrize("stem", ONLINE)
def test_save_hdf5_round_trip_with_wrap_around(stem, tmp_path):
    module = load_script(stem)
    buffer = filled_buffer(module, capacity=8, steps=13)  # rows 0..4 overwritten by steps 8..12
    path = tmp_path / "buffer.hdf5"
    buffer.save_hdf5(str(path), env_id="Pendulum-v1", seed=4)
    data = read_hdf5(path)
    assert not (tmp_path / "buffer.hdf5.tmp").exists()
    assert set(data) == {"observations", "actions", "rewards", "terminals", "timeouts", "next_observations", "attrs"}
    assert data["attrs"] == {"env_id": "Pendulum-v1", "seed": 4}
    np.testing.assert_array_equal(data["rewards"], np.arange(5, 13, dtype=np.float32))  # oldest first
    np.testing.assert_array_equal(data["observations"][:, 0], np.arange(5, 13))
    np.testing.assert_array_equal(data["next_observations"], data["observations"] + 1)
    np.testing.assert_array_equal(data["actions"][:, 0], np.arange(5, 13, dtype=np.float32) / 100)
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    np.testing.assert_array_equal(np.nonzero(data["terminals"])[0], [2])  # step 7
    np.testing.assert_array_equal(np.nonzero(data["timeouts"])[0], [0, 6, 7])  # steps 5, 11 and the cut at 12

    terminated_last = filled_buffer(module, capacity=8, steps=8)  # the last stored step (7) is a termination
    terminated_last.save_hdf5(str(path))
    data = read_hdf5(path)
    assert data["terminals"][-1] and not data["timeouts"][-1]
    np.testing.assert_array_equal(np.nonzero(data["timeouts"])[0], [5])


# ---- checkpoints, the NaN stop, log intervals ----
@pytest.mark.parametrize("stem", ONLINE)
def test_save_and_load_checkpoint(stem, tmp_path):
    module = load_script(stem)
    path = tmp_path / "checkpoint.pt"
    module.save_checkpoint(str(path), agent={"w": torch.arange(3)}, args={"seed": 1}, step=7)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    loaded = module.load_checkpoint(str(path))
    assert loaded["step"] == 7 and loaded["args"] == {"seed": 1} and torch.equal(loaded["agent"]["w"], torch.arange(3))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:200])
    for name, error in (("missing.pt", "FileNotFoundError"), ("foreign.pt", "AssertionError"),
                        ("truncated.pt", "RuntimeError")):
        with pytest.raises(SystemExit) as raised:
            module.load_checkpoint(str(tmp_path / name))
        assert str(raised.value.code) == (f"{stem}: {tmp_path / name} is not a checkpoint of {stem} "
                                          f"--save-model ({error}).")


@pytest.mark.parametrize("stem", ONLINE)
def test_snapshot_and_stop_on_nonfinite(stem, tmp_path):
    """The snapshot is a copy (later steps do not change it); the stop saves it and names both steps in one line."""
    module = load_script(stem)
    net = torch.nn.Linear(2, 1)
    args = module.Args(env_id="Pendulum-v1")
    last_finite = module.snapshot(net, args, 100, {"losses/q_loss": 1.5, "values/q": -2.25})
    kept = last_finite["agent"]["weight"].clone()
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    assert torch.equal(last_finite["agent"]["weight"], kept) and last_finite["step"] == 100
    assert last_finite["args"]["env_id"] == "Pendulum-v1"
    with pytest.raises(SystemExit) as error:
        module.stop_on_nonfinite(str(tmp_path), 137, last_finite)
    path = tmp_path / "last_finite_checkpoint.pt"
    assert str(error.value.code) == (
        f"{stem}: a loss became NaN/inf at step 137; last finite values (step 100): q_loss=1.5, q=-2.25; parameters "
        f"of step 100 saved to {path}. Try a larger --beta or a smaller --loss-clip (App. D.6).")
    saved = module.load_checkpoint(str(path))
    assert saved["step"] == 100 and torch.equal(saved["agent"]["weight"], kept)
    with pytest.raises(SystemExit) as error:  # a NaN before the first log interval
        module.stop_on_nonfinite(str(tmp_path), 3, module.snapshot(net, args, 0, {}))
    assert "at step 3; last finite values (step 0): none yet; parameters of step 0 saved" in str(error.value.code)


@pytest.mark.parametrize("stem", ONLINE)
def test_crossed_multiples(stem):
    crossed = load_script(stem).crossed
    assert [s for s in range(1, 301) if crossed(s, 1, 100)] == [100, 200, 300]
    assert [s for s in range(3, 301, 3) if crossed(s, 3, 100)] == [102, 201, 300]
    assert [s for s in range(4, 41, 4) if crossed(s, 4, 3)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert not any(crossed(s, 2, 0) for s in range(2, 100, 2))  # every = 0: never


# ---- --num-envs ----
@pytest.mark.parametrize("stem", ONLINE)
def test_one_env_reproduces_the_single_env_loop(stem, tmp_path):
    """--num-envs 1: the stored transitions are those of one make_env env reset with the seed, random actions from
    its action space seeded with the seed for the first learning_starts steps, and updates from learning_starts on.
    The --save-buffer file also carries its provenance as attributes."""
    module = load_script(stem)
    path = tmp_path / "buffer.hdf5"
    args = module.Args(env_id="Pendulum-v1", total_timesteps=300, learning_starts=150, seed=5, log_freq=100,
                       eval_freq=0, save_buffer=str(path), save_model=True, runs_dir=str(tmp_path / "runs"), **TINY)
    result = module.main(args)
    data = read_hdf5(path)
    assert data["attrs"] == {"env_id": "Pendulum-v1", "script": stem, "exp_name": stem, "seed": 5, "env_steps": 300,
                             "policy": data["attrs"]["policy"]}
    assert data["attrs"]["policy"].startswith("uniform random for 150 env steps, then the ")

    env = module.make_env("Pendulum-v1", 5)
    env.action_space.seed(5)
    obs, _ = env.reset(seed=5)
    rows = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for t in range(300):
        action = env.action_space.sample() if t < 150 else data["actions"][t]
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (obs, action, np.float32(reward), next_obs, terminated, truncated or t == 299)):
            rows[key].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    for key, values in rows.items():
        np.testing.assert_array_equal(data[key], np.array(values), err_msg=key)
    assert np.nonzero(data["timeouts"])[0].tolist() == [199, 299]
    random_stream = np.array([env.action_space.sample() for _ in range(150)])  # what random acting would have drawn
    assert not np.any(data["actions"][150:] == random_stream)  # from step learning_starts + 1 on, the policy acts

    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    assert checkpoint["step"] == 300
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == 300 - 150 + 1
    assert [step for step, _ in result["evaluations"]] == [300]


@pytest.mark.parametrize("stem", ONLINE)
def test_three_envs_lose_no_transition(stem, tmp_path, capsys):
    """--num-envs 3 with 50-step episodes: every env step is stored once, episode ends keep the true final observation
    (the next row of that env is the reset), one update per env step from learning starts on, and the progress,
    evaluation and episode logs land on the iterations that cross their multiples."""
    module = load_script(stem)
    path = tmp_path / "buffer.hdf5"
    args = module.Args(env_id=SHORT_PENDULUM, total_timesteps=330, learning_starts=150, num_envs=3, seed=2, log_freq=50,
                       eval_freq=100, save_buffer=str(path), save_model=True, runs_dir=str(tmp_path / "runs"), **TINY)
    result = module.main(args)
    out = capsys.readouterr().out
    data = read_hdf5(path)
    assert len(data["observations"]) == data["attrs"]["env_steps"] == 330  # 110 iterations x 3 envs
    assert np.isfinite(data["observations"]).all() and np.isfinite(data["next_observations"]).all()

    # Random phase (iterations up to step 150): the batched action space seeded with the seed, one row per env.
    space = gym.spaces.Box(-1.0, 1.0, (3, 1), np.float32)
    space.seed(2)
    random_actions = np.stack([space.sample() for _ in range(50)])  # (iteration, env, action)

    # The file holds env after env (110 rows each), so that each env's episodes are contiguous, as D4RL's are.
    for i in range(3):
        env = module.make_env(SHORT_PENDULUM, 2 + i)
        obs, _ = env.reset(seed=2 + i)
        rows = slice(110 * i, 110 * (i + 1))
        np.testing.assert_array_equal(data["actions"][rows][:50], random_actions[:, i])
        ends = []
        for t, action in enumerate(data["actions"][rows]):
            np.testing.assert_array_equal(data["observations"][rows][t], obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            np.testing.assert_array_equal(data["next_observations"][rows][t], next_obs)  # the true last one at ends
            assert data["rewards"][rows][t] == np.float32(reward) and data["terminals"][rows][t] == terminated
            assert data["timeouts"][rows][t] == (truncated or (t == 109 and not terminated))  # each env's cut at the end
            if truncated:
                ends.append(t)
                obs = env.reset()[0]
                assert not np.array_equal(next_obs, obs)  # the next row of this env starts a new episode
                np.testing.assert_array_equal(data["observations"][rows][t + 1], obs)
            else:
                obs = next_obs
        assert ends == [49, 99]
    # What xql_offline.py makes of it: row i+1 is row i's next observation on every transition it keeps.
    offline = load_script("xql_offline")
    kept = offline.qlearning_dataset(offline.read_hdf5(str(path)), 0)
    assert len(kept["rewards"]) == 330 - 3 * 3  # every env's two time limits and its last row are dropped
    index = np.flatnonzero(~data["timeouts"][:-1])
    np.testing.assert_array_equal(kept["next_observations"], data["next_observations"][index])  # the true next ones
    np.testing.assert_array_equal(offline.episode_returns(kept).shape, (9,))  # 3 envs x 3 episodes (the last one cut)

    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == 183  # env steps 148..330: 61 iterations x 3

    logged = scalars(result["run_dir"])
    assert [s for s, _ in logged["losses/q_loss"]] == [150, 201, 252, 300]  # crossing 150, 200, 250, 300
    assert [s for s, _ in logged["eval/episodic_return"]] == [102, 201, 300, 330]  # crossing 100, 200, 300; the end
    assert [s for s, _ in result["evaluations"]] == [102, 201, 300, 330]
    assert [s for s, _ in logged["charts/episodic_return"]] == [150] * 3 + [300] * 3
    assert [v for _, v in logged["charts/episodic_length"]] == [50.0] * 6
    progress = [line.split(" | ")[0] for line in out.splitlines() if " | SPS " in line]
    assert progress == ["step 150/330", "step 201/330", "step 252/330", "step 300/330"]
    evals = [line.split(" | ")[0] for line in out.splitlines() if " | eval return " in line]
    assert evals == ["step 102/330", "step 201/330", "step 300/330", "step 330/330"]
    assert "3 env(s)" in out


# ---- a quiet start ----
@pytest.mark.parametrize("stem", ONLINE)
def test_quiet_headless_start(stem, tmp_path):
    """With no display and MUJOCO_GL unset, neither --help nor a normal run prints a GLFW or other library warning,
    on a gymnasium task and on a dm_control one (float64 action space: float32 bounds there made numpy warn)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "PYTHONWARNINGS")}
    env["OMP_NUM_THREADS"] = "1"
    script = str(ROOT / f"{stem}.py")
    run = ["--env-id", "Pendulum-v1", "--total-timesteps", "150", "--learning-starts", "100", "--hidden-dim", "32",
           "--batch-size", "32", "--eval-episodes", "1", "--log-freq", "50", "--runs-dir", str(tmp_path / "runs"),
           "--no-cuda"]
    results = []
    for command in (["--help"], run, ["--env-id", "dm_control/cartpole-swingup-v0", *run[2:]]):
        done = subprocess.run([sys.executable, script, *command], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        text = done.stdout + done.stderr
        for noise in ("GLFW", "Warning", "WARN", "DeprecationWarning", "MUJOCO_GL"):
            assert noise not in text, f"{stem} {command[0]}: {noise!r} in\n{text[-3000:]}"
        results.append(done)
    helped, ran, ran_dmc = results
    assert "--num-envs" in helped.stdout and "--matmul-precision" in helped.stdout and helped.stderr == ""
    assert "eval return" in ran.stdout and f"{stem}: done in " in ran.stdout and ran.stderr == ""
    assert "eval return" in ran_dmc.stdout and ran_dmc.stderr == ""


# ---- the pairs: identical results, identical source ----
@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pairs_give_identical_results(first, second, tmp_path):
    a, b = load_script(first), load_script(second)
    for env_id in ("dm_control/cartpole-swingup-v0", "Pendulum-v1"):
        obs_a, rewards_a = rollout(a, env_id, 3, 40)
        obs_b, rewards_b = rollout(b, env_id, 3, 40)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rewards_a, rewards_b)
    for stem, module in ((first, a), (second, b)):
        filled_buffer(module, capacity=8, steps=13).save_hdf5(str(tmp_path / f"{stem}.hdf5"))
    data_a, data_b = read_hdf5(tmp_path / f"{first}.hdf5"), read_hdf5(tmp_path / f"{second}.hdf5")
    assert data_a.keys() == data_b.keys()
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key])
    torch.manual_seed(1)
    batch_a = filled_buffer(a, 20, 12).sample(16)
    torch.manual_seed(1)
    batch_b = filled_buffer(b, 20, 12).sample(16)
    for x, y in zip(batch_a, batch_b):
        assert torch.equal(x, y)
    pred, target = torch.randn(64), 3 * torch.randn(64)
    for mode in ("both", "upper"):
        assert torch.equal(a.gumbel_loss(pred, target, 0.5, 2.0, mode), b.gumbel_loss(pred, target, 0.5, 2.0, mode))
        assert torch.equal(a.clip_fraction(pred, target, 0.5, 2.0, mode), b.clip_fraction(pred, target, 0.5, 2.0, mode))
    assert torch.equal(a.taylor_loss(pred, target, 0.5, 4), b.taylor_loss(pred, target, 0.5, 4))
    assert all(a.crossed(s, n, e) == b.crossed(s, n, e) for s in range(1, 60) for n in (1, 3) for e in (0, 7, 10))


SHARED = ("make_env", "final_observations", "evaluate", "gumbel_loss", "taylor_loss", "clip_fraction", "Batch",
          "ReplayBuffer", "FP32Linear", "TwinCritic", "log_progress", "save_checkpoint", "load_checkpoint", "snapshot",
          "stop_on_nonfinite", "crossed")
OFFLINE_SHARED = ("gumbel_loss", "taylor_loss", "clip_fraction", "Batch", "FP32Linear", "TwinCritic", "evaluate", "log_progress",
                  "save_checkpoint", "load_checkpoint", "snapshot", "stop_on_nonfinite", "ReplayBuffer.__init__",
                  "ReplayBuffer.add", "ReplayBuffer.sample")
# No known differences: the shared pieces are byte-for-byte the same in every script that has them.
ONLINE_REWRITES: dict[tuple[str, str], list[tuple[str, str]]] = {}
OFFLINE_REWRITES: dict[str, list[tuple[str, str]]] = {}


def shared_sources(stem: str) -> dict[str, str]:
    """Source of each module-level function, class (and class method, as `Class.method`) and assignment."""
    source = (ROOT / f"{stem}.py").read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
            for member in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(member, ast.FunctionDef):
                    found[f"{node.name}.{member.name}"] = ast.get_source_segment(source, member)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def rewritten(text: str, rewrites: list[tuple[str, str]]) -> str:
    for old, new in rewrites:
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pairs_have_identical_source(first, second):
    """The shared block is pasted verbatim: a fix in one copy must reach every copy."""
    a, b = shared_sources(first), shared_sources(second)
    for stem, found in ((first, a), (second, b)):
        assert set(SHARED) <= set(found), f"{stem} lacks {set(SHARED) - set(found)}"
    for name in SHARED:
        assert rewritten(a[name], ONLINE_REWRITES.get((first, name), [])) == \
            rewritten(b[name], ONLINE_REWRITES.get((second, name), [])), f"{name} differs between {first} and {second}"


@pytest.mark.parametrize("stem", ONLINE)
def test_offline_copies_match_the_online_ones(stem):
    """xql_offline.py pastes the same losses, critic, evaluation, checkpoint and NaN-stop helpers, and the same
    ReplayBuffer less save_hdf5 (the dataset is loaded into it, fine-tuning appends to it)."""
    offline, online = shared_sources("xql_offline"), shared_sources(stem)
    assert set(OFFLINE_SHARED) <= set(offline), f"xql_offline lacks {set(OFFLINE_SHARED) - set(offline)}"
    assert "ReplayBuffer.save_hdf5" not in offline and "ReplayBuffer.save_hdf5" in online
    for name in OFFLINE_SHARED:
        expected = rewritten(online[name], ONLINE_REWRITES.get((stem, name), []) + OFFLINE_REWRITES.get(name, []))
        assert offline[name] == expected, f"{name} differs between xql_offline and {stem}"
