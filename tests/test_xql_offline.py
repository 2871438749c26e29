"""Tests of xql_offline.py: D4RL conversion and preprocessing, every bad input of issue 2 section 4,
end-to-end runs on a D4RL-format HDF5 file and a Minari dataset that the tests write, compiled vs eager
updates, and the NaN stop. Networks are tiny (--hidden-dim 32) and runs a few hundred steps."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script

xql = load_script("xql_offline")

TINY = dict(hidden_dim=32, batch_size=64, log_freq=50, cuda=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
    spinning against other processes slow a step down a hundredfold; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_d4rl_file(path: Path, obs_dim=11, act_dim=3, episodes=8, length=60, timeouts=True, seed=0,
                    reward_scale=1.0, drop=(), truncate=None):
    """A small file in the layout of the D4RL v2 locomotion files (observations, actions, rewards,
    terminals, timeouts, next_observations, infos/*). Odd episodes end on a terminal, even on a timeout."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for episode in range(episodes):
        obs = rng.normal(size=(length + 1, obs_dim)).astype(np.float32)
        cols["observations"].append(obs[:-1])
        cols["next_observations"].append(obs[1:])
        cols["actions"].append(rng.uniform(-1.2, 1.2, size=(length, act_dim)).astype(np.float32))
        cols["rewards"].append((rng.normal(size=length) * reward_scale).astype(np.float32))
        terminals, ends = np.zeros(length, bool), np.zeros(length, bool)
        (terminals if episode % 2 else ends)[-1] = True
        cols["terminals"].append(terminals)
        cols["timeouts"].append(ends)
    with h5py.File(path, "w") as f:
        for key, value in cols.items():
            if key in drop or (key == "timeouts" and not timeouts):
                continue
            value = np.concatenate(value)
            if truncate == key:
                value = value[:-3]
            f[key] = value
        n = sum(len(r) for r in cols["rewards"])
        f["infos/qpos"] = np.zeros((n, 6), np.float32)
        f["infos/qvel"] = np.zeros((n, 6), np.float32)
        f["infos/action_log_probs"] = np.zeros(n, np.float32)
    return path


def reference_qlearning_dataset(data, max_episode_steps):
    """d4rl.qlearning_dataset, transcribed loop by loop (the d4rl package cannot be imported here)."""
    n = data["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = "timeouts" in data
    episode_step = 0
    for i in range(n - 1):
        done_bool = bool(data["terminals"][i])
        final_timestep = data["timeouts"][i] if use_timeouts else (episode_step == max_episode_steps - 1)
        if final_timestep:
            episode_step = 0
            continue
        if done_bool or final_timestep:
            episode_step = 0
        obs_.append(data["observations"][i])
        next_obs_.append(data["observations"][i + 1])
        action_.append(data["actions"][i])
        reward_.append(data["rewards"][i])
        done_.append(done_bool)
        episode_step += 1
    return dict(observations=np.array(obs_), actions=np.array(action_), next_observations=np.array(next_obs_),
                rewards=np.array(reward_), terminals=np.array(done_))


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_dirs(runs):
    return sorted(Path(runs).glob("*")) if Path(runs).exists() else []


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timeouts", [True, False])
def test_qlearning_dataset_matches_d4rl(tmp_path, timeouts):
    path = write_d4rl_file(tmp_path / "d.hdf5", timeouts=timeouts, length=37)
    raw = xql.read_d4rl_hdf5(str(path))
    ours = xql.qlearning_dataset(raw, max_episode_steps=25)
    ref = reference_qlearning_dataset(raw, max_episode_steps=25)
    assert len(ours["rewards"]) == len(ref["rewards"]) < len(raw["rewards"]) - 1
    for key in ref:
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    if timeouts:  # rows ending on a timeout are dropped and no next observation crosses an episode
        assert len(ours["rewards"]) == len(raw["rewards"]) - 4 - 1  # 4 timeouts and the last row


def test_preprocessing_follows_the_authors(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", reward_scale=3.0)
    args = xql.Args(env_id="hopper-medium-v2", dataset_path=str(path))
    data, factory, _, ref, _ = xql.load_dataset(args, xql.resolve_settings(args))
    raw = xql.qlearning_dataset(xql.read_d4rl_hdf5(str(path)), 1000)
    returns = xql.episode_returns_d4rl(raw)
    assert len(returns) == 8
    np.testing.assert_allclose(data["rewards"], raw["rewards"] * 1000 / (returns.max() - returns.min()), rtol=1e-5)
    assert np.abs(data["actions"]).max() <= 1 - 1e-5 and np.abs(raw["actions"]).max() > 1
    np.testing.assert_array_equal(data["masks"], 1.0 - raw["terminals"])
    assert ref == (-20.272305, 3234.3) and factory is not None
    # antmaze: reward - 1, no scaling, and no eval env (v0 layout differs from gymnasium-robotics)
    args = xql.Args(env_id="antmaze-umaze-v0", dataset_path=str(path))
    data, factory, reason, _, _ = xql.load_dataset(args, xql.resolve_settings(args))
    np.testing.assert_allclose(data["rewards"], raw["rewards"] - 1.0)
    assert factory is None and "antmaze" in reason


def test_domain_defaults_and_overrides():
    s = xql.resolve_settings(xql.Args(env_id="antmaze-medium-play-v0"))
    assert (s["beta"], s["awr_temperature"], s["expectile"], s["value_dropout"], s["eval_episodes"]) == (0.6, 10.0, 0.9, 0.0, 100)  # value dropout: the authors never applied it
    assert not s["cosine_actor_lr"]
    s = xql.resolve_settings(xql.Args(env_id="kitchen-partial-v0"))
    assert (s["beta"], s["awr_temperature"], s["actor_dropout"]) == (5.0, 0.5, 0.1)
    s = xql.resolve_settings(xql.Args(env_id="hopper-medium-expert-v2", tuned=True))
    assert (s["beta"], s["loss_clip"], s["batch_size"]) == (2.0, 7.0, 1024)
    s = xql.resolve_settings(xql.Args(env_id="hopper-medium-v2", beta=0.8, awr_temperature=1.0))
    assert (s["beta"], s["awr_temperature"], s["loss_clip"]) == (0.8, 1.0, 7.0)
    assert xql.D4RL_DATASETS["hopper-medium-replay-v2"]["file"] == "hopper_medium_replay-v2.hdf5"
    assert xql.D4RL_DATASETS["antmaze-umaze-v0"]["file"] == \
        "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse.hdf5"


def test_twin_critic_is_two_independent_mlps():
    torch.manual_seed(0)
    critic = xql.TwinCritic(5, 2, 16)
    obs, act = torch.randn(7, 5), torch.randn(7, 2)
    out = critic(obs, act)
    x = torch.cat([obs, act], -1)
    for k in range(2):
        h = torch.relu(x @ critic.weights[0][k] + critic.biases[0][k])
        h = torch.relu(h @ critic.weights[1][k] + critic.biases[1][k])
        torch.testing.assert_close(out[k], (h @ critic.weights[2][k] + critic.biases[2][k]).squeeze(-1))
    assert not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no run folder
# --------------------------------------------------------------------------------------------------
def expect_user_error(tmp_path, match, **kwargs):
    runs = tmp_path / "runs"
    args = xql.Args(runs_dir=str(runs), max_steps=5, **{**TINY, **kwargs})
    with pytest.raises(SystemExit) as info:
        xql.main(args)
    message = str(info.value.code)
    assert message.startswith("xql_offline: ") and "\n" not in message
    assert match in message, message
    assert run_dirs(runs) == []
    return message


def test_unknown_env_id(tmp_path):
    expect_user_error(tmp_path, "unknown --env-id 'hopper-mediun-v2'", env_id="hopper-mediun-v2")


def test_missing_dataset_file_names_file_and_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "nowhere"))
    msg = expect_user_error(tmp_path, "hopper_medium-v2.hdf5", env_id="hopper-medium-v2")
    assert str(tmp_path / "nowhere") in msg and os.path.expanduser("~/.d4rl/datasets") in msg and "wget" in msg
    expect_user_error(tmp_path, "does not exist", env_id="hopper-medium-v2", dataset_path=str(tmp_path / "x.hdf5"))


def test_hdf5_missing_keys(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", drop=("terminals",))
    expect_user_error(tmp_path, "lacks key(s) ['terminals']", env_id="hopper-medium-v2", dataset_path=str(path))


def test_hdf5_mismatched_lengths(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", truncate="actions")
    expect_user_error(tmp_path, "actions has 477 rows but observations has 480", env_id="hopper-medium-v2",
                      dataset_path=str(path))


def test_observation_size_differs_from_eval_env(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", obs_dim=5)
    expect_user_error(tmp_path, "5/3-d but the eval env Hopper-v4 has 11/3-d", env_id="hopper-medium-v2",
                      dataset_path=str(path))


def test_bad_beta_and_batch(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5")
    expect_user_error(tmp_path, "--beta must be > 0", env_id="hopper-medium-v2", dataset_path=str(path), beta=0.0)
    expect_user_error(tmp_path, "--beta must be > 0", env_id="hopper-medium-v2", dataset_path=str(path), beta=-1.0)
    expect_user_error(tmp_path, "larger than the dataset (475 transitions)", env_id="hopper-medium-v2",
                      dataset_path=str(path), **{**TINY, "batch_size": 100_000})


def test_cudagraphs_without_cuda(tmp_path):
    expect_user_error(tmp_path, "--cudagraphs needs a CUDA device", env_id="hopper-medium-v2", cudagraphs=True)


def test_bad_checkpoint_paths(tmp_path):
    expect_user_error(tmp_path, "--eval-only needs --checkpoint", eval_only=True, checkpoint=str(tmp_path / "no.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    expect_user_error(tmp_path, "not a checkpoint of this script", eval_only=True, checkpoint=str(tmp_path / "junk.pt"))
    expect_user_error(tmp_path, "not a checkpoint of this script", env_id="hopper-medium-v2",
                      resume=str(tmp_path / "junk.pt"))
    expect_user_error(tmp_path, "--online-steps must be >= 0", env_id="hopper-medium-v2", online_steps=-1)


def test_cli_user_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "xql_offline.py"), "--env-id", "nope-v0",
                          "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("xql_offline: unknown --env-id 'nope-v0'")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# Minari
# --------------------------------------------------------------------------------------------------
def make_minari_dataset(env_id, dataset_id, episodes=6, seed=0, ref=(-20.272305, 3234.3)):
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env = gym.make(env_id)
    buffers = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        env.action_space.seed(seed + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        for t in range(40):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated or t == 39
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated and not terminated))
            if terminated or truncated:
                break
        if isinstance(observations[0], dict):  # Minari stores dict observations as a dict of lists
            observations = {k: [o[k] for o in observations] for k in observations[0]}
        buffers.append(EpisodeBuffer(id=episode, observations=observations, actions=actions, rewards=rewards,
                                     terminations=terminations, truncations=truncations))
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, eval_env=env_id,
                                              ref_min_score=ref[0], ref_max_score=ref[1])


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def test_discrete_action_space(tmp_path, minari_store):
    make_minari_dataset("CartPole-v1", "test/cartpole/random-v0", ref=(0.0, 500.0))
    expect_user_error(tmp_path, "is not continuous", env_id="test/cartpole/random-v0")


def test_minari_missing_dataset(tmp_path, minari_store):
    expect_user_error(tmp_path, "Minari dataset 'test/hopper/none-v0' not found", env_id="test/hopper/none-v0")


def test_minari_dict_observations_match_eval_env_layout(minari_store):
    """AntMaze (dict observations): the dataset is flattened in the order the eval env's
    FlattenObservation uses, checked on the first observation of an episode recorded from reset(seed)."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
    import gymnasium as gym

    gym.register_envs(gymnasium_robotics)
    make_minari_dataset("AntMaze_UMaze-v5", "test/antmaze/tiny-v0", episodes=2, seed=3, ref=(0.0, 1.0))
    args = xql.Args(env_id="test/antmaze/tiny-v0")
    data, factory, _, ref, (scale, shift) = xql.load_dataset(args, xql.resolve_settings(args))
    env = xql.make_eval_env(factory, 0)
    first, _ = env.reset(seed=3)
    assert data["observations"].shape[1] == env.observation_space.shape[0] == 109
    np.testing.assert_allclose(data["observations"][0], first, rtol=1e-6)
    assert (scale, shift) == (1.0, -1.0) and ref == (0.0, 1.0)
    env.close()


@pytest.mark.slow
def test_end_to_end_minari(tmp_path, minari_store):
    dataset = make_minari_dataset("Hopper-v4", "test/hopper/random-v0")
    runs = tmp_path / "runs"
    result = xql.main(xql.Args(env_id="test/hopper/random-v0", runs_dir=str(runs), max_steps=200, eval_freq=100,
                               eval_episodes=2, normalize_states=True, save_model=True, **TINY))
    assert [e[0] for e in result["evaluations"]] == [100, 200]
    assert math.isfinite(result["final_normalized_score"]) and result["best_normalized_score"] >= result["final_normalized_score"]
    expected = 100 * (result["evaluations"][-1][1] + 20.272305) / (3234.3 + 20.272305)
    assert result["final_normalized_score"] == pytest.approx(expected)
    tags = scalars(result["run_dir"])
    assert len(tags["charts/normalized_score"]) == 2
    assert all(math.isfinite(v) for t in ("losses/v_loss", "losses/q_loss", "losses/actor_loss") for v in tags[t])
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoint.pt", weights_only=False)
    obs = np.concatenate([np.asarray(e.observations)[:-1] for e in dataset.iterate_episodes()])
    np.testing.assert_allclose(ckpt["obs_mean"], obs.mean(0), rtol=1e-4, atol=1e-5)  # stored for the eval env
    assert ckpt["step"] == 200 and ckpt["eval_env_id"] == "Hopper-v4"
    evaluated = xql.main(xql.Args(eval_only=True, checkpoint=str(Path(result["run_dir"]) / "checkpoint.pt"),
                                  eval_episodes=1, cuda=False))  # on the dataset's recorded eval env
    assert len(evaluated["returns"]) == 1 and math.isfinite(evaluated["normalized_score"])


# --------------------------------------------------------------------------------------------------
# End to end on a D4RL-format file
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_d4rl_file(tmp_path, capsys):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    runs = tmp_path / "runs"
    result = xql.main(xql.Args(env_id="hopper-medium-v2", dataset_path=str(path), runs_dir=str(runs),
                               max_steps=300, eval_freq=150, eval_episodes=2, save_model=True, exp_name="xql",
                               **TINY))
    out = capsys.readouterr().out
    assert "resolved settings: beta=2.0, loss_clip=7.0, batch_size=64" in out
    assert "step 300/300 | SPS" in out and "final normalised score" in out
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == runs and run_dir.name.startswith("hopper-medium-v2__xql__1__")
    tags = scalars(run_dir)
    for tag in ("losses/v_loss", "losses/q_loss", "losses/actor_loss", "values/v", "values/q", "charts/SPS"):
        assert len(tags[tag]) == 6 and all(math.isfinite(v) for v in tags[tag]), tag
    assert len(tags["charts/normalized_score"]) == 2 and len(tags["charts/episodic_return"]) == 2
    assert tags["eval/final_normalized_score"] == [pytest.approx(result["final_normalized_score"])]
    assert max(tags["charts/normalized_score"]) == pytest.approx(result["best_normalized_score"])
    lrs = tags["charts/actor_lr"]  # cosine decay
    assert lrs[0] > lrs[-1] > 0 and lrs[0] < 3e-4
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["final_normalized_score"] == pytest.approx(result["final_normalized_score"])
    assert not list(run_dir.glob("*.tmp*"))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 300 and ckpt["settings"]["beta"] == 2.0
    assert all(torch.isfinite(v).all() for v in ckpt["agent"].values() if v.is_floating_point())
    # The documented way to evaluate a saved checkpoint.
    evaluated = xql.main(xql.Args(eval_only=True, checkpoint=str(run_dir / "checkpoint.pt"), eval_episodes=2,
                                  cuda=False))
    assert len(evaluated["returns"]) == 2 and math.isfinite(evaluated["normalized_score"])
    assert len(run_dirs(runs)) == 1


def test_iql_arm_and_skipped_evaluation(tmp_path, capsys):
    """--value-loss expectile on a kitchen-named file: trains, says evaluation is skipped, no score."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    result = xql.main(xql.Args(env_id="kitchen-partial-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                               max_steps=100, value_loss="expectile", num_v_updates=2, **TINY))
    out = capsys.readouterr().out
    assert "evaluation skipped for kitchen-partial-v0" in out and "value_loss=expectile" in out
    assert result["final_normalized_score"] is None and "kitchen" in result["evaluation_skipped"]
    tags = scalars(result["run_dir"])
    assert all(math.isfinite(v) for v in tags["losses/v_loss"]) and "charts/normalized_score" not in tags


def test_nonfinite_loss_stops_the_run(tmp_path):
    """Rewards of ~1e37 are finite in float32 but their squared TD error is not: the run must stop."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9, reward_scale=1e37)
    with pytest.raises(SystemExit) as info:
        xql.main(xql.Args(env_id="kitchen-partial-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                          max_steps=100, save_model=True, **TINY))
    message = str(info.value.code)
    assert "NaN/inf at gradient step 1;" in message and "v_loss=" in message
    assert (Path(run_dirs(tmp_path / "runs")[0]) / "checkpoint_nonfinite.pt").exists()


# --------------------------------------------------------------------------------------------------
# Compiled path
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_update_matches_eager():
    """torch.compile'd loss functions through real updates: the first 3 steps' statistics agree with the
    eager path within rtol 1e-4 (fusion reorders float32 sums; nothing else may differ)."""
    rng = np.random.default_rng(0)
    n = 500
    data = dict(observations=rng.normal(size=(n, 11)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32), rewards=rng.normal(size=n).astype(np.float32),
                masks=np.ones(n, np.float32), next_observations=rng.normal(size=(n, 11)).astype(np.float32))
    args = xql.Args(env_id="hopper-medium-v2", max_steps=1000)
    settings = xql.resolve_settings(args)
    device = torch.device("cpu")
    dataset = xql.DeviceDataset(data, device)
    torch.manual_seed(1)
    batches = [dataset.sample(32) for _ in range(3)]
    history = {}
    for mode in (None, "default"):
        torch.manual_seed(0)
        agent = xql.Agent(11, 3, settings, 16)
        opts = {k: xql.make_optimizer(getattr(agent, k).parameters(), 3e-4, device) for k in ("actor", "critic", "value")}
        update = xql.make_update_fn(agent, opts, settings, args, mode)
        history[mode] = torch.stack([update(*batch) for batch in batches])
    assert torch.isfinite(history[None]).all()
    torch.testing.assert_close(history["default"], history[None], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Offline-to-online fine-tuning (issue 7)
# --------------------------------------------------------------------------------------------------
def test_online_finetuning_needs_an_environment(tmp_path):
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    expect_user_error(tmp_path, "--online-steps needs an environment", env_id="kitchen-partial-v0",
                      dataset_path=str(path), online_steps=10)


@pytest.mark.slow
def test_online_finetuning_and_resume(tmp_path, capsys):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    common = dict(env_id="hopper-medium-v2", dataset_path=str(path), max_steps=100, eval_freq=100,
                  eval_episodes=1, save_model=True, **TINY)
    first = xql.main(xql.Args(runs_dir=str(tmp_path / "a"), online_steps=100, **common))
    assert [e[0] for e in first["evaluations"]] == [100] and [e[0] for e in first["online_evaluations"]] == [100]
    ckpt_a = torch.load(Path(first["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt_a["online_step"] == 100 and ckpt_a["online_rows"].shape == (100, 11 + 3 + 2 + 11)
    # Online rewards get the dataset's locomotion scaling 1000 / (max - min trajectory return): Hopper's
    # per-step reward is about 1 (the healthy bonus), so rewards / scale must come back near 1.
    returns = xql.episode_returns_d4rl(xql.qlearning_dataset(xql.read_d4rl_hdf5(str(path)), 1000))
    scale = 1000.0 / (returns.max() - returns.min())
    assert scale > 5 and 0.5 < float(ckpt_a["online_rows"][:, 14].median()) / scale < 2.0
    # Resume the online phase from the checkpoint and run it to 200 online steps.
    second = xql.main(xql.Args(runs_dir=str(tmp_path / "b"), online_steps=200,
                               resume=str(Path(first["run_dir"]) / "checkpoint.pt"), **common))
    out = capsys.readouterr().out
    assert "resumed" in out and "online step 200/200" in out and "fine-tuning (Table 2 form) hopper-medium-v2:" in out
    assert [e[0] for e in second["online_evaluations"]] == [100, 200]
    assert second["finetune_before"] == pytest.approx(first["final_normalized_score"])
    assert math.isfinite(second["finetune_after"])
    ckpt_b = torch.load(Path(second["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt_b["online_step"] == 200 and len(ckpt_b["online_rows"]) == 200
    torch.testing.assert_close(ckpt_b["online_rows"][:100], ckpt_a["online_rows"])
    tags = scalars(second["run_dir"])
    assert len(tags["online/normalized_score"]) == 1 and tags["online/score_after"] == [pytest.approx(second["finetune_after"])]
    assert len(tags["online/train_episodic_return"]) >= 1
    assert len(tags["losses/q_loss"]) == 2 and all(math.isfinite(v) for v in tags["losses/q_loss"])  # steps 250, 300
    assert "losses/q_loss" in scalars(first["run_dir"]) and len(tags["charts/SPS"]) == 2
