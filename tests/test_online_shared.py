"""The online pieces every online script copies (make_env, evaluate, ReplayBuffer, FiniteGuard, save_atomically).

Each check runs against every top-level script that defines a `ReplayBuffer` class (found by AST, so a
new online script is covered as soon as it exists), and, for every pair of such scripts, the two copies
must give identical results on the same inputs.
"""
import ast
import itertools

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script


def scripts_defining_class(name: str) -> list[str]:
    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body):
            found.append(path.stem)
    return found


ONLINE = scripts_defining_class("ReplayBuffer")
PAIRS = list(itertools.combinations(ONLINE, 2))


def test_online_scripts_found():
    assert "xsac_continuous" in ONLINE


def rollout(module, env_id: str, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Observations and rewards of `steps` steps with the env's own seeded random actions."""
    env = module.make_env(env_id, seed)
    obs, _ = env.reset(seed=seed)
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
    """A buffer after `steps` adds of deterministic transitions (terminations at 7, time limits at 5 and 11)."""
    buffer = module.ReplayBuffer(capacity, obs_dim=3, action_dim=2, device=torch.device("cpu"))
    for t in range(steps):
        obs = np.full(3, t, dtype=np.float32)
        buffer.add(obs, np.array([t / 100, -t / 100], dtype=np.float32), float(t), obs + 1, t == 7, t in (5, 11))
    return buffer


def read_hdf5(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}


@pytest.mark.parametrize("stem", ONLINE)
def test_make_env_dm_control_flat_float32_and_seeded(stem):
    module = load_script(stem)
    env = module.make_env("dm_control/cartpole-swingup-v0", seed=0)
    assert env.observation_space.shape == (5,) and env.observation_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, _ = env.reset(seed=0)
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
    env.reset(seed=0)
    env.step(np.array([1.0], dtype=np.float32))
    assert env.unwrapped.last_u == pytest.approx(2.0)
    env.step(np.array([-0.5], dtype=np.float32))
    assert env.unwrapped.last_u == pytest.approx(-1.0)
    env.close()


@pytest.mark.parametrize("stem", ONLINE)
def test_env_errors_are_one_line(stem):
    module = load_script(stem)
    with pytest.raises(SystemExit) as error:
        module.make_env("CartPole-v1", seed=0)
    assert "bounded continuous (Box) action space" in str(error.value.code) and "\n" not in str(error.value.code)
    with pytest.raises(SystemExit) as error:
        module.check_env_id("Pendulm-v1")
    assert str(error.value.code).startswith(f"{stem}: unknown environment id 'Pendulm-v1'. Did you mean: Pendulum-v1")
    module.check_env_id("dm_control/walker-run-v0")  # registered by the script's `import shimmy`


@pytest.mark.parametrize("stem", ONLINE)
def test_evaluate_is_deterministic_and_counts_episodes(stem):
    module = load_script(stem)
    env = module.make_env("Pendulum-v1", seed=0)
    policy = lambda obs: torch.tanh(obs[:, :1])  # noqa: E731
    returns, lengths = module.evaluate(policy, env, 2, seed=5, device=torch.device("cpu"))
    again, _ = module.evaluate(policy, env, 2, seed=5, device=torch.device("cpu"))
    assert returns.shape == (2,) and list(lengths) == [200, 200]
    np.testing.assert_array_equal(returns, again)
    env.close()


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
def test_save_hdf5_round_trip_with_wrap_around(stem, tmp_path):
    module = load_script(stem)
    buffer = filled_buffer(module, capacity=8, steps=13)  # rows 0..4 overwritten by steps 8..12
    path = tmp_path / "buffer.hdf5"
    buffer.save_hdf5(str(path))
    data = read_hdf5(path)
    assert not (tmp_path / "buffer.hdf5.tmp").exists()
    assert set(data) == {"observations", "actions", "rewards", "terminals", "timeouts", "next_observations"}
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


@pytest.mark.parametrize("stem", ONLINE)
def test_finite_guard_keeps_first_bad_step(stem):
    module = load_script(stem)
    guard = module.FiniteGuard(torch.device("cpu"))
    guard.update(1, torch.tensor([1.0, 2.0]))
    assert guard.first_bad() is None
    guard.update(2, torch.tensor([1.0, float("inf")]))
    guard.update(3, torch.tensor([float("nan"), 0.0]))
    guard.update(4, torch.tensor([1.0, 2.0]))
    assert guard.first_bad() == 2


@pytest.mark.parametrize("stem", ONLINE)
def test_save_atomically_leaves_no_temporary(stem, tmp_path):
    module = load_script(stem)
    path = tmp_path / "checkpoint.pt"
    module.save_atomically({"x": torch.arange(3)}, str(path))
    assert torch.equal(torch.load(path)["x"], torch.arange(3)) and not (tmp_path / "checkpoint.pt.tmp").exists()


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
    losses = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 3.0]])
    guards = [a.FiniteGuard(torch.device("cpu")), b.FiniteGuard(torch.device("cpu"))]
    for step, row in enumerate(losses):
        for guard in guards:
            guard.update(step, row)
    assert guards[0].first_bad() == guards[1].first_bad() == 1


SHARED = ("check_env_id", "make_env", "evaluate", "save_atomically", "FiniteGuard", "Batch", "ReplayBuffer")


def shared_sources(stem: str) -> dict[str, str]:
    source = (ROOT / f"{stem}.py").read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED}


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pairs_have_identical_source(first, second):
    """The shared block is pasted verbatim: a fix in one copy must reach every copy."""
    a, b = shared_sources(first), shared_sources(second)
    assert set(a) == set(SHARED), f"{first} lacks {set(SHARED) - set(a)}"
    for name in SHARED:
        assert a[name] == b.get(name), f"{name} differs between {first}.py and {second}.py"
