"""Tests of xql_offline.py: D4RL conversion and preprocessing, the per-domain and tuned tables, every bad input,
the IQL arm, a dataset of one's own, the V-fitting augmentations (--noise, --sample-random-times), clip
diagnostics, evaluation seeding, end-to-end runs on a D4RL-format HDF5 file and a Minari dataset that the tests
write, fine-tuning and resume, the NaN stop, and the fast path (torch.compile, bf16 matmuls) against eager.
Networks are tiny (--hidden-dim 32 or less) and runs a few hundred steps."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, load_script

xql = load_script("xql_offline")

TINY = dict(hidden_dim=32, batch_size=64, log_freq=50, cuda=False)
HOPPER_REF = (-20.272305, 3234.3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
    spinning against other processes slow a step down a hundredfold; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def d4rl_stand_ins(tmp_path_factory, monkeypatch):
    """`resolve_args` checks that a D4RL name's file exists where d4rl keeps it ($D4RL_DATASET_DIR): point that at a
    folder holding an empty stand-in for every D4RL file, so that tests of the tables need no download. Nothing reads
    them: tests that load data pass --dataset-path; the missing-file test points the variable elsewhere."""
    folder = tmp_path_factory.getbasetemp() / "d4rl_stand_ins"
    if not folder.exists():
        folder.mkdir()
        for info in xql.D4RL.values():
            (folder / os.path.basename(info["url"])).touch()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(folder))


def write_d4rl_file(path: Path, obs_dim=11, act_dim=3, episodes=8, length=60, timeouts=True, seed=0,
                    reward_scale=1.0, reward_shift=0.0, drop=(), truncate=None, attrs=None):
    """A small file in the layout of the D4RL v2 locomotion files (observations, actions, rewards,
    terminals, timeouts, next_observations, infos/*). Odd episodes end on a terminal, even on a timeout."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for episode in range(episodes):
        obs = rng.normal(size=(length + 1, obs_dim)).astype(np.float32)
        cols["observations"].append(obs[:-1])
        cols["next_observations"].append(obs[1:])
        cols["actions"].append(rng.uniform(-1.2, 1.2, size=(length, act_dim)).astype(np.float32))
        cols["rewards"].append((rng.normal(size=length) * reward_scale + reward_shift).astype(np.float32))
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
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def reference_qlearning_dataset(data, max_episode_steps):
    """d4rl.qlearning_dataset, transcribed loop by loop (the d4rl package cannot be imported here)."""
    n = data["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = data.get("timeouts") is not None  # read_hdf5 gives None for a file without the key
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


def cosine_lrs(steps, max_steps, lr=3e-4):
    """The actor lr the script must log at `steps`: optax.cosine_decay_schedule to 0 over --max-steps."""
    return [lr * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps)) for s in steps]


# ---- update-level helpers: real updates on a buffer of random transitions, no files, no env ----
def make_optimizers(agent, args):
    """As `main` builds them: a fused Adam on V; one on the actor and the critics, a parameter group each."""
    adam = partial(torch.optim.Adam, lr=args.learning_rate, fused=True)
    return {"value": adam(agent.value.parameters()),
            "actor_critic": adam([{"params": agent.actor.parameters()}, {"params": agent.critic.parameters()}])}


def random_buffer(n=500, obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    buffer = xql.ReplayBuffer(n, obs_dim, act_dim, torch.device("cpu"))
    buffer.add(rng.normal(size=(n, obs_dim)), rng.uniform(-1, 1, (n, act_dim)), rng.normal(size=n),
               rng.normal(size=(n, obs_dim)), rng.uniform(size=n) < 0.05, np.zeros(n))
    return buffer


def make_agent(seed=0, obs_dim=11, act_dim=3, **overrides):
    args = xql.resolve_args(xql.Args(env_id="hopper-medium-v2", max_steps=1000, cuda=False,
                                     **{"hidden_dim": 16, "batch_size": 64, **overrides}))
    torch.manual_seed(seed)
    agent = xql.Agent(obs_dim, act_dim, args)
    return args, agent, make_optimizers(agent, args)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timeouts", [True, False])
def test_qlearning_dataset_matches_d4rl(tmp_path, timeouts):
    path = write_d4rl_file(tmp_path / "d.hdf5", timeouts=timeouts, length=37)
    raw = xql.read_hdf5(str(path))
    ours = xql.qlearning_dataset(raw, max_episode_steps=25)
    ref = reference_qlearning_dataset(raw, max_episode_steps=25)
    assert len(ours["rewards"]) == len(ref["rewards"]) < len(raw["rewards"]) - 1
    for key in ref:
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    if timeouts:  # rows ending on a timeout are dropped and no next observation crosses an episode
        assert len(ours["rewards"]) == len(raw["rewards"]) - 4 - 1  # 4 timeouts and the last row


def test_preprocessing_follows_the_authors(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", reward_scale=3.0)
    data = xql.load_dataset(xql.resolve_args(xql.Args(env_id="hopper-medium-v2", dataset_path=str(path))))
    raw = xql.qlearning_dataset(xql.read_hdf5(str(path)), 1000)
    returns = xql.episode_returns(raw)
    assert len(returns) == 8
    np.testing.assert_allclose(data["rewards"], raw["rewards"] * 1000 / (returns.max() - returns.min()), rtol=1e-5)
    assert data["reward_scale"] == pytest.approx(1000 / (returns.max() - returns.min())) and data["reward_shift"] == 0.0
    assert np.abs(data["actions"]).max() <= 1 - 1e-5 and np.abs(raw["actions"]).max() > 1
    np.testing.assert_array_equal(data["terminals"], raw["terminals"])
    assert data["ref"] == HOPPER_REF and data["env_spec"] == "Hopper-v4" and data["no_eval_reason"] is None
    # antmaze: reward - 1, no scaling, and no eval env (v0 layout differs from gymnasium-robotics)
    data = xql.load_dataset(xql.resolve_args(xql.Args(env_id="antmaze-umaze-v0", dataset_path=str(path))))
    np.testing.assert_allclose(data["rewards"], raw["rewards"] - 1.0)
    assert (data["reward_scale"], data["reward_shift"]) == (1.0, -1.0)
    assert data["env_spec"] is None and "antmaze" in data["no_eval_reason"]


def test_domain_defaults_and_overrides():
    s = xql.resolve_args(xql.Args(env_id="antmaze-medium-play-v0"))
    assert (s.beta, s.awr_temperature, s.expectile, s.value_dropout, s.eval_episodes) == (0.6, 10.0, 0.9, 0.0, 100)  # value dropout: the authors never applied it
    assert not s.cosine_actor_lr
    s = xql.resolve_args(xql.Args(env_id="kitchen-partial-v0"))
    assert (s.beta, s.awr_temperature, s.actor_dropout) == (5.0, 0.5, 0.1)
    s = xql.resolve_args(xql.Args(env_id="hopper-medium-expert-v2", tuned=True))
    assert (s.beta, s.loss_clip, s.batch_size) == (2.0, 7.0, 1024)
    s = xql.resolve_args(xql.Args(env_id="hopper-medium-v2", beta=0.8, awr_temperature=1.0))
    assert (s.beta, s.awr_temperature, s.loss_clip) == (0.8, 1.0, 7.0)
    assert xql.resolve_args(xql.Args()).env_id == "hopper-medium-v2"  # the default dataset
    assert os.path.basename(xql.D4RL["hopper-medium-replay-v2"]["url"]) == "hopper_medium_replay-v2.hdf5"
    assert os.path.basename(xql.D4RL["antmaze-umaze-v0"]["url"]) == \
        "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse.hdf5"


def test_tuned_tables_paper_and_authors():
    """--tuned --tuned-table paper (Table 4's X-QL-T) vs authors (their reproduce/*.sh), resolved once."""
    def resolved(env_id, table, **kwargs):
        a = xql.resolve_args(xql.Args(env_id=env_id, tuned=True, tuned_table=table, **kwargs))
        return a.beta, a.loss_clip, a.batch_size, a.num_v_updates, a.noise, a.sample_random_times

    assert resolved("walker2d-medium-replay-v2", "paper") == (5, 7, 256, 1, False, 0)
    assert resolved("walker2d-medium-replay-v2", "authors") == (5, 5, 1024, 1, False, 0)
    assert resolved("hopper-medium-expert-v2", "paper") == (2, 7, 1024, 1, False, 0)
    assert resolved("hopper-medium-expert-v2", "authors") == (2, 7, 1024, 1, False, 1)
    assert resolved("halfcheetah-medium-v2", "paper") == (1, 7, 256, 1, False, 0)
    assert resolved("halfcheetah-medium-v2", "authors") == (1, 7, 1024, 1, True, 0)
    assert resolved("antmaze-umaze-v0", "paper") == (1, 7, 256, 4, False, 0)
    assert resolved("antmaze-umaze-v0", "authors") == (2, 7, 256, 1, False, 0)
    assert resolved("antmaze-umaze-diverse-v0", "authors") == (5, 7, 256, 1, False, 1)
    # A flag the user sets wins over the table; without --tuned the per-domain values hold.
    assert resolved("antmaze-umaze-v0", "authors", beta=3.0, num_v_updates=2, sample_random_times=3) == \
        (3.0, 7, 256, 2, False, 3)
    a = xql.resolve_args(xql.Args(env_id="walker2d-medium-replay-v2", tuned_table="authors"))
    assert (a.beta, a.loss_clip, a.batch_size, a.num_v_updates, a.noise, a.sample_random_times) == \
        (2.0, 7.0, 256, 1, False, 0)


def test_twin_critic_is_two_independent_mlps():
    torch.manual_seed(0)
    critic = xql.TwinCritic(5, 2, 16)
    obs, act = torch.randn(7, 5), torch.randn(7, 2)
    out = critic(obs, act)
    assert out.shape == (2, 7) and len(critic.nets) == 2
    x = torch.cat([obs, act], -1)
    for k in range(2):
        first, second, last = (layer for layer in critic.nets[k] if isinstance(layer, nn.Linear))
        h = torch.relu(x @ first.weight.T + first.bias)
        h = torch.relu(h @ second.weight.T + second.bias)
        torch.testing.assert_close(out[k], (h @ last.weight.T + last.bias).squeeze(-1))
    assert not torch.allclose(out[0], out[1])
    pointers = [{p.data_ptr() for p in net.parameters()} for net in critic.nets]
    assert not pointers[0] & pointers[1]  # no shared parameter
    assert len(xql.TwinCritic(5, 2, 16, num_critics=1)(obs, act)) == 1


def test_iql_arm_value_network_and_lr_schedule():
    """IQL's V has no LayerNorm (X-QL's has one per hidden layer); the IQL arm decays the actor lr by the
    cosine on every domain, X-QL everywhere but antmaze; no run with --online-steps decays it."""
    for env_id in ("hopper-medium-v2", "antmaze-umaze-v0"):
        iql = xql.resolve_args(xql.Args(env_id=env_id, value_loss="expectile"))
        assert not any(isinstance(m, nn.LayerNorm) for m in xql.Value(11, iql).modules())
        xql_args = xql.resolve_args(xql.Args(env_id=env_id))
        assert sum(isinstance(m, nn.LayerNorm) for m in xql.Value(11, xql_args).modules()) == 2
        assert iql.cosine_actor_lr and xql_args.cosine_actor_lr == (env_id == "hopper-medium-v2")
        for loss in ("expectile", "gumbel"):
            assert not xql.resolve_args(xql.Args(env_id=env_id, value_loss=loss, online_steps=10)).cosine_actor_lr
    iql = xql.resolve_args(xql.Args(env_id="antmaze-umaze-v0", value_loss="expectile"))
    assert (iql.expectile, iql.awr_temperature) == (0.9, 10.0)
    assert xql.resolve_args(xql.Args(env_id="hopper-medium-v2", value_loss="expectile")).expectile == 0.7


def test_no_cosine_actor_lr_keeps_the_lr_constant(tmp_path):
    """--no-cosine-actor-lr forces a constant actor lr, also where the source config decays it."""
    for env_id, loss in (("hopper-medium-v2", "gumbel"), ("antmaze-umaze-v0", "expectile")):
        assert not xql.resolve_args(xql.Args(env_id=env_id, value_loss=loss, cosine_actor_lr=False)).cosine_actor_lr
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    result = xql.main(xql.Args(env_id="kitchen-partial-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                               max_steps=100, cosine_actor_lr=False, **TINY))
    assert scalars(result["run_dir"])["charts/actor_lr"] == pytest.approx([3e-4] * 2, rel=1e-5)


@pytest.mark.parametrize("value_loss", ["expectile", "gumbel"])
def test_iql_arm_actor_lr_in_tensorboard_on_antmaze(tmp_path, value_loss):
    """The logged `charts/actor_lr` on an antmaze-named file: the cosine for IQL, constant for X-QL."""
    path = write_d4rl_file(tmp_path / "a.hdf5", obs_dim=29, act_dim=8)
    result = xql.main(xql.Args(env_id="antmaze-umaze-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                               max_steps=150, value_loss=value_loss, **TINY))
    tags = scalars(result["run_dir"])
    assert all(math.isfinite(v) for v in tags["losses/v_loss"])
    expected = cosine_lrs([50, 100, 150], 150) if value_loss == "expectile" else [3e-4] * 3
    assert tags["charts/actor_lr"] == pytest.approx(expected, rel=1e-5, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# The V-fitting augmentations and clip diagnostics, on real updates
# --------------------------------------------------------------------------------------------------
def record_calls(module, calls):
    """Record the inputs of every forward of `module` (a module instance attribute shadows the class's)."""
    original = module.forward

    def forward(*inputs):
        calls.append(tuple(x.detach().clone() for x in inputs))
        return original(*inputs)

    module.forward = forward


@pytest.mark.parametrize("noise,times", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_noise_and_random_times_change_what_v_is_fitted_on(noise, times):
    buffer = random_buffer()
    torch.manual_seed(5)
    batch = buffer.sample(64)
    batch = batch._replace(actions=torch.cat([torch.full((8, 3), 0.99), torch.full((8, 3), -0.99), batch.actions[16:]]))
    b, a = 64, 3
    args, agent, optimizers = make_agent(noise=noise, sample_random_times=times)
    plain_args, baseline, baseline_opts = make_agent()
    critic_calls, value_calls = [], []
    record_calls(agent.critic_target, critic_calls)
    record_calls(agent.value, value_calls)
    torch.manual_seed(7)
    losses = xql.update(agent, optimizers, batch, args)
    assert torch.isfinite(losses).all()
    # The first target-critic pass is V's target, on V's own rows; Q at the dataset actions (the actor's advantage)
    # is its first b rows, but with --noise, which moves those actions, a second pass of its own.
    v_obs, v_actions = critic_calls[0]
    v_inputs = value_calls[0][0]  # V's first call is its fit; its last, V(s) and V(s') for Q's target
    assert len(value_calls) == 2 and value_calls[1][0].shape == (2 * b, 11)
    assert v_obs.shape == (b * (1 + times), 11) == v_inputs.shape and v_actions.shape == (b * (1 + times), a)
    torch.testing.assert_close(v_inputs, v_obs, rtol=0, atol=0)  # V's target was computed on V's own rows
    assert len(critic_calls) == (2 if noise else 1)
    if noise:
        torch.testing.assert_close(critic_calls[1][0], batch.obs, rtol=0, atol=0)
        torch.testing.assert_close(critic_calls[1][1], batch.actions, rtol=0, atol=0)
    if not (noise or times):  # V is fitted at the dataset actions: one target-critic pass serves both
        torch.testing.assert_close(v_obs, batch.obs, rtol=0, atol=0)
        torch.testing.assert_close(v_actions, batch.actions, rtol=0, atol=0)
        return
    torch.testing.assert_close(v_obs[:b], batch.obs, rtol=0, atol=0)
    if times:  # each state again `times` times, at uniform actions in [-1, 1]
        torch.testing.assert_close(v_obs[b:], batch.obs.repeat_interleave(times, 0), rtol=0, atol=0)
        uniform = v_actions[b:]
        assert uniform.min() >= -1 and uniform.max() <= 1 and uniform.min() < -0.8 and uniform.max() > 0.8
        assert abs(float(uniform.mean())) < 0.15 and float(uniform.std()) == pytest.approx(1 / math.sqrt(3), abs=0.06)
    near = v_actions[:b]
    if noise:  # N(0, 0.1) clipped to +-0.5, then the action clipped to [-1, 1]
        diff = near - batch.actions
        assert (diff != 0).all() and diff.abs().max() <= 0.5 + 1e-6
        assert near.min() >= -1 and near.max() <= 1
        assert (near[:16].abs() == 1).any()  # actions at +-0.99 pushed past the bound were clipped to it
        assert float(diff[16:].std()) == pytest.approx(0.1, abs=0.02)
    else:
        torch.testing.assert_close(near, batch.actions, rtol=0, atol=0)
    # The same initial networks fitted on the dataset actions alone give another V loss.
    torch.manual_seed(7)
    plain = xql.update(baseline, baseline_opts, batch, plain_args)
    assert losses[0] != plain[0]


def test_clip_fraction_values():
    """The share of z = (target - pred) / beta past the clip: above it only (`upper`) or on both sides."""
    pred, target = torch.zeros(5), torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    for beta, clip_mode, expected in [(1.0, "upper", 1 / 5), (1.0, "both", 2 / 5), (2.0, "both", 0.0),
                                      (0.25, "both", 4 / 5), (0.25, "upper", 2 / 5)]:
        fraction = xql.clip_fraction(pred, target, beta, 2.0, clip_mode)
        assert torch.equal(fraction, torch.tensor(expected)), (beta, clip_mode, fraction)


@pytest.mark.parametrize("clip_mode", ["upper", "both"])
def test_update_reports_the_clip_fraction_of_its_v_fit(clip_mode):
    """`values/clip_fraction` = the share of z = (Q' - V) / beta past the clip in V's fit, recomputed here
    from a copy of the networks before the update; a small beta makes it non-zero."""
    buffer = random_buffer()
    args, agent, optimizers = make_agent(beta=0.02, loss_clip=3.0, clip_mode=clip_mode)
    with torch.no_grad():
        agent.value.net[-1].bias.fill_(0.05)  # V above some targets and below others: both tails present
    before = copy.deepcopy(agent)
    torch.manual_seed(3)
    batch = buffer.sample(64)
    fraction = float(xql.update(agent, optimizers, batch, args)[xql.LOSS_TAGS.index("values/clip_fraction")])
    with torch.no_grad():
        z = (before.critic_target(batch.obs, batch.actions).min(0).values - before.value(batch.obs)) / args.beta
    upper, lower = float((z > 3.0).float().mean()), float((z < -3.0).float().mean())
    assert upper > 0 and lower > 0
    assert fraction == pytest.approx(upper + (lower if clip_mode == "both" else 0.0), abs=1e-7)
    assert 0 < fraction <= 1


# --------------------------------------------------------------------------------------------------
# Evaluation seeding
# --------------------------------------------------------------------------------------------------
def test_eval_env_is_seeded_once():
    """Two evaluations on one env see new start states; two envs made with one seed give identical returns."""
    weights = torch.tensor([[0.5], [-0.3], [0.2]])
    policy = lambda obs: torch.tanh(obs @ weights)  # noqa: E731 - deterministic
    env_a, env_b = xql.make_env("Pendulum-v1", 7), xql.make_env("Pendulum-v1", 7)
    first, lengths = xql.evaluate(policy, env_a, 2, torch.device("cpu"))
    second, _ = xql.evaluate(policy, env_a, 2, torch.device("cpu"))
    again, _ = xql.evaluate(policy, env_b, 2, torch.device("cpu"))
    assert lengths.tolist() == [200, 200] and first.shape == (2,)
    assert first[0] != first[1] and not np.isin(second, first).any()
    np.testing.assert_array_equal(again, first)
    other, _ = xql.evaluate(policy, xql.make_env("Pendulum-v1", 8), 2, torch.device("cpu"))
    assert not np.isin(other, first).any()


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
    expect_user_error(tmp_path, "unknown --env-id 'hopper-mediun-v2': not a D4RL name (e.g. hopper-medium-v2",
                      env_id="hopper-mediun-v2")


def test_missing_dataset_file_names_file_and_dir(tmp_path, monkeypatch):
    """The file is looked up where d4rl keeps it: $D4RL_DATASET_DIR if set, else ~/.d4rl/datasets."""
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5"
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(nowhere))
    msg = expect_user_error(tmp_path, f"{nowhere / 'hopper_medium-v2.hdf5'} (the file of hopper-medium-v2) not found; "
                            f"download it with `wget -P {nowhere} {url}`, or pass --dataset-path.",
                            env_id="hopper-medium-v2")
    assert ".d4rl" not in msg
    monkeypatch.delenv("D4RL_DATASET_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".d4rl" / "datasets"
    expect_user_error(tmp_path, f"{default / 'hopper_medium-v2.hdf5'} (the file of hopper-medium-v2) not found; "
                      f"download it with `wget -P {default} {url}`", env_id="hopper-medium-v2")
    expect_user_error(tmp_path, f"--dataset-path {str(tmp_path / 'x.hdf5')!r} does not exist",
                      env_id="hopper-medium-v2", dataset_path=str(tmp_path / "x.hdf5"))


def test_hdf5_missing_keys(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", drop=("terminals",))
    expect_user_error(tmp_path, "the file lacks ['terminals']", env_id="hopper-medium-v2", dataset_path=str(path))


def test_hdf5_mismatched_lengths(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", truncate="actions")
    expect_user_error(tmp_path, "actions has 477 rows but observations has 480", env_id="hopper-medium-v2",
                      dataset_path=str(path))


def test_observation_size_differs_from_eval_env(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", obs_dim=5)
    expect_user_error(tmp_path, "the dataset's observations/actions are 5/3-d but the eval env Hopper-v4 has 11/3-d",
                      env_id="hopper-medium-v2", dataset_path=str(path))


def test_bad_beta_and_batch(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5")
    expect_user_error(tmp_path, "--beta must be > 0", env_id="hopper-medium-v2", dataset_path=str(path), beta=0.0)
    expect_user_error(tmp_path, "--beta must be > 0", env_id="hopper-medium-v2", dataset_path=str(path), beta=-1.0)
    expect_user_error(tmp_path, "--batch-size 100000 is larger than the dataset (475 transitions)",
                      env_id="hopper-medium-v2", dataset_path=str(path), **{**TINY, "batch_size": 100_000})


def test_tuned_without_table_entry_and_negative_random_times(tmp_path):
    expect_user_error(tmp_path, "--tuned: no tuned values for 'pen-human-v0'", env_id="pen-human-v0", tuned=True)
    expect_user_error(tmp_path, "--online-steps, --eval-freq and --sample-random-times must be >= 0",
                      env_id="hopper-medium-v2", sample_random_times=-1)


def test_cudagraphs_without_cuda(tmp_path):
    expect_user_error(tmp_path, "--cudagraphs needs a CUDA device", env_id="hopper-medium-v2", cudagraphs=True)


def test_bad_checkpoint_paths(tmp_path):
    expect_user_error(tmp_path, "--eval-only needs --checkpoint PATH", eval_only=True)
    missing = tmp_path / "no.pt"
    expect_user_error(tmp_path, f"{missing} is not a checkpoint of xql_offline --save-model (FileNotFoundError).",
                      eval_only=True, checkpoint=str(missing))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    junk = tmp_path / "junk.pt"
    expect_user_error(tmp_path, f"{junk} is not a checkpoint of xql_offline --save-model (UnpicklingError).",
                      eval_only=True, checkpoint=str(junk))
    expect_user_error(tmp_path, f"{junk} is not a checkpoint of xql_offline --save-model (UnpicklingError).",
                      env_id="hopper-medium-v2", resume=str(junk))
    expect_user_error(tmp_path, "--online-steps, --eval-freq and --sample-random-times must be >= 0",
                      env_id="hopper-medium-v2", online_steps=-1)


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
def make_minari_dataset(env_id, dataset_id, episodes=6, seed=0, ref=HOPPER_REF):
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
    expect_user_error(tmp_path, "test/cartpole/random-v0: action space Discrete(2) is not continuous (Box)",
                      env_id="test/cartpole/random-v0")


def test_minari_missing_dataset(tmp_path, minari_store):
    expect_user_error(tmp_path, "Minari dataset 'test/hopper/none-v0' not found", env_id="test/hopper/none-v0")


def test_minari_dict_observations_match_eval_env_layout(minari_store):
    """AntMaze (dict observations): the dataset is flattened in the order the eval env's
    FlattenObservation uses, checked on the first observation of an episode recorded from reset(seed)."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
    import gymnasium as gym

    gym.register_envs(gymnasium_robotics)
    make_minari_dataset("AntMaze_UMaze-v5", "test/antmaze/tiny-v0", episodes=2, seed=3, ref=(0.0, 1.0))
    data = xql.load_dataset(xql.resolve_args(xql.Args(env_id="test/antmaze/tiny-v0")))
    env = xql.make_env(data["env_spec"], 0, data["obs_mean"], data["obs_std"])
    first, _ = env.reset(seed=3)
    assert data["observations"].shape[1] == env.observation_space.shape[0] == 109
    np.testing.assert_allclose(data["observations"][0], first, rtol=1e-6)
    assert (data["reward_scale"], data["reward_shift"]) == (1.0, -1.0) and data["ref"] == (0.0, 1.0)
    env.close()


@pytest.mark.slow
def test_end_to_end_minari(tmp_path, minari_store):
    dataset = make_minari_dataset("Hopper-v4", "test/hopper/random-v0")
    runs = tmp_path / "runs"
    result = xql.main(xql.Args(env_id="test/hopper/random-v0", runs_dir=str(runs), max_steps=200, eval_freq=100,
                               eval_episodes=2, normalize_states=True, save_model=True, **TINY))
    assert [e[0] for e in result["evaluations"]] == [100, 200]
    assert Path(result["run_dir"]).name.startswith("test-hopper-random-v0__xql_offline__1__")
    assert math.isfinite(result["final_normalized_score"]) and result["best_normalized_score"] >= result["final_normalized_score"]
    expected = 100 * (result["evaluations"][-1][1] - HOPPER_REF[0]) / (HOPPER_REF[1] - HOPPER_REF[0])
    assert result["final_normalized_score"] == pytest.approx(expected)
    tags = scalars(result["run_dir"])
    assert tags["eval/normalized_score"] == pytest.approx([s for _, _, s in result["evaluations"]], rel=1e-6)
    assert all(math.isfinite(v) for t in ("losses/v_loss", "losses/q_loss", "losses/actor_loss") for v in tags[t])
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoint.pt", weights_only=False)
    obs = np.concatenate([np.asarray(e.observations)[:-1] for e in dataset.iterate_episodes()])
    np.testing.assert_allclose(ckpt["obs_mean"], obs.mean(0), rtol=1e-4, atol=1e-5)  # stored for the eval env
    assert ckpt["step"] == 200 and json.loads(ckpt["env_spec"])["id"] == "Hopper-v4" and ckpt["ref"] == HOPPER_REF
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
    assert ("value_loss=gumbel, beta=2.0, loss_clip=7.0, batch_size=64, num_v_updates=1, awr_temperature=3.0, "
            "expectile=0.7, cosine_actor_lr=True") in out
    assert "eval env Hopper-v4" in out and "step 300/300 | SPS" in out and "step 300/300 | eval return" in out
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == runs and run_dir.name.startswith("hopper-medium-v2__xql__1__")
    assert f"final normalised score {result['final_normalized_score']:.1f}" in out
    assert out.rstrip().endswith(f"; run folder {run_dir}; checkpoint {run_dir / 'checkpoint.pt'}")
    tags = scalars(run_dir)
    for tag in xql.LOSS_TAGS + ("charts/SPS",):
        assert len(tags[tag]) == 6 and all(math.isfinite(v) for v in tags[tag]), tag
    assert all(0 <= v <= 1 for v in tags["values/clip_fraction"])
    assert len(tags["eval/normalized_score"]) == 2 and len(tags["eval/episodic_return"]) == 2
    assert tags["eval/normalized_score"][-1] == pytest.approx(result["final_normalized_score"])
    assert max(tags["eval/normalized_score"]) == pytest.approx(result["best_normalized_score"])
    assert [e[0] for e in result["evaluations"]] == [150, 300]
    assert tags["charts/actor_lr"] == pytest.approx(cosine_lrs(range(50, 301, 50), 300), rel=1e-5, abs=1e-12)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["final_normalized_score"] == pytest.approx(result["final_normalized_score"])
    assert on_disk["evaluations"] == [list(e) for e in result["evaluations"]]
    assert not list(run_dir.glob("*.tmp*"))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 300 and ckpt["args"]["beta"] == 2.0 and ckpt["env_spec"] == "Hopper-v4"
    assert set(ckpt["optimizers"]) == {"value", "actor_critic"}
    # Only the actor's lr follows the cosine (to 0 at --max-steps); the critics' and V's stay at --learning-rate.
    groups = ckpt["optimizers"]["actor_critic"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) and groups[1]["lr"] == 3e-4
    assert ckpt["optimizers"]["value"]["param_groups"][0]["lr"] == 3e-4
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
    assert "xql_offline: evaluation skipped: D4RL's kitchen observations match no gymnasium env" in out
    assert "value_loss=expectile" in out and "num_v_updates=2" in out
    assert result["final_normalized_score"] is None and "kitchen" in result["evaluation_skipped"]
    assert result["evaluations"] == [] and result["final_return"] is None
    tags = scalars(result["run_dir"])
    assert all(math.isfinite(v) for v in tags["losses/v_loss"])
    assert "eval/normalized_score" not in tags and "eval/episodic_return" not in tags


# --------------------------------------------------------------------------------------------------
# A dataset of one's own (issue 11 item 6)
# --------------------------------------------------------------------------------------------------
class RecordingBuffer(xql.ReplayBuffer):
    """The script's ReplayBuffer, remembering its instances (to read what `main` trained on)."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingBuffer.instances.append(self)


@pytest.mark.slow
def test_custom_dataset_is_not_hopper(tmp_path, capsys, monkeypatch):
    """--dataset-path my_pendulum.hdf5 alone: named after the file, rewards untouched, evaluated on the file's
    env_id attribute with raw returns and no normalised score, unless --ref-min/max-score are given."""
    path = write_d4rl_file(tmp_path / "my_pendulum.hdf5", obs_dim=3, act_dim=1, reward_scale=2.0, reward_shift=-6.0,
                           attrs={"env_id": "Pendulum-v1"})
    file_rewards = xql.qlearning_dataset(xql.read_hdf5(str(path)), 0)["rewards"]
    data = xql.load_dataset(xql.resolve_args(xql.Args(dataset_path=str(path))))
    np.testing.assert_array_equal(data["rewards"], file_rewards)
    assert (data["reward_scale"], data["reward_shift"], data["env_spec"], data["ref"]) == (1.0, 0.0, "Pendulum-v1",
                                                                                          (None, None))
    RecordingBuffer.instances.clear()
    monkeypatch.setattr(xql, "ReplayBuffer", RecordingBuffer)
    runs = tmp_path / "runs"
    result = xql.main(xql.Args(dataset_path=str(path), runs_dir=str(runs), max_steps=100, eval_freq=50,
                               eval_episodes=2, **TINY))
    out = capsys.readouterr().out
    run_dir = Path(result["run_dir"])
    assert run_dir.name.startswith("my_pendulum__xql_offline__1__") and result["env_id"] == "my_pendulum"
    assert "xql_offline: my_pendulum, 475 transitions, rewards x 1 + 0, eval env Pendulum-v1" in out
    assert "xql_offline: no reference returns" in out and "normalised" not in out
    (buffer,) = RecordingBuffer.instances
    assert buffer.size == len(file_rewards) == 475
    torch.testing.assert_close(buffer.rewards[:buffer.size], torch.as_tensor(file_rewards), rtol=0, atol=0)
    assert [(e[0], e[2]) for e in result["evaluations"]] == [(50, None), (100, None)]
    assert isinstance(result["final_return"], float) and math.isfinite(result["final_return"])
    assert result["final_return"] == result["evaluations"][-1][1] and -16.3 * 200 < result["final_return"] <= 0
    assert result["final_normalized_score"] is None and result["best_normalized_score"] is None
    assert result["dataset_normalized_score"] is None and result["evaluation_skipped"] is None
    assert result["dataset_return"] == pytest.approx(xql.episode_returns(dict(data, rewards=file_rewards)).mean())
    tags = scalars(run_dir)
    assert "eval/normalized_score" not in tags and len(tags["eval/episodic_return"]) == 2
    # With reference returns of the user's choosing, the score is 100 (R - min) / (max - min).
    low, high = -1500.0, -100.0
    result = xql.main(xql.Args(dataset_path=str(path), runs_dir=str(runs), max_steps=50, eval_freq=0,
                               eval_episodes=2, ref_min_score=low, ref_max_score=high, **TINY))
    (step, episode_return, score), = result["evaluations"]
    assert step == 50 and score == pytest.approx(100 * (episode_return - low) / (high - low))
    assert result["final_normalized_score"] == score
    assert result["dataset_normalized_score"] == pytest.approx(100 * (result["dataset_return"] - low) / (high - low))
    assert scalars(result["run_dir"])["eval/normalized_score"] == [pytest.approx(score)]


def test_custom_dataset_without_env(tmp_path, capsys):
    """A file with no env_id attribute and no --eval-env-id: trains, says why there is no evaluation."""
    path = write_d4rl_file(tmp_path / "mine.hdf5", obs_dim=4, act_dim=2)
    result = xql.main(xql.Args(dataset_path=str(path), runs_dir=str(tmp_path / "runs"), max_steps=50, **TINY))
    assert "xql_offline: evaluation skipped: pass --eval-env-id to evaluate" in capsys.readouterr().out
    assert result["evaluation_skipped"] == "pass --eval-env-id to evaluate" and result["final_return"] is None
    assert Path(result["run_dir"]).name.startswith("mine__xql_offline__1__")


# --------------------------------------------------------------------------------------------------
# The NaN stop
# --------------------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_the_run(tmp_path):
    """Rewards of ~1e37 are finite in float32 but their squared TD error is not: the run must stop at
    step 1, saving the step-0 parameters (no --save-model needed)."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9, reward_scale=1e37)
    with pytest.raises(SystemExit) as info:
        xql.main(xql.Args(env_id="kitchen-partial-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                          max_steps=100, **TINY))
    (run_dir,) = run_dirs(tmp_path / "runs")
    message = str(info.value.code)
    assert message.startswith("xql_offline: a loss became NaN/inf at step 1; last finite values (step 0): none yet; "
                              f"parameters of step 0 saved to {run_dir / 'last_finite_checkpoint.pt'}. "
                              "Try a larger --beta")
    saved = xql.load_checkpoint(str(run_dir / "last_finite_checkpoint.pt"))
    assert saved["step"] == 0 and not (run_dir / "checkpoint.pt").exists()


def test_nonfinite_loss_keeps_the_last_finite_interval(tmp_path, monkeypatch):
    """Batches turn to rewards of 1e37 from step 61 on: the stop names step 61, reports the losses logged at
    step 50 and saves step 50's (finite) parameters."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    sample, calls = xql.ReplayBuffer.sample, []

    def poisoned(self, batch_size):
        calls.append(1)
        batch = sample(self, batch_size)
        return batch._replace(rewards=torch.full_like(batch.rewards, 1e37)) if len(calls) > 60 else batch

    monkeypatch.setattr(xql.ReplayBuffer, "sample", poisoned)
    with pytest.raises(SystemExit) as info:
        xql.main(xql.Args(env_id="kitchen-partial-v0", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                          max_steps=200, **TINY))
    (run_dir,) = run_dirs(tmp_path / "runs")
    message = str(info.value.code)
    assert "\n" not in message and len(calls) == 100  # stopped at the next log interval
    assert message.startswith("xql_offline: a loss became NaN/inf at step 61; last finite values (step 50): v_loss=")
    assert f"; parameters of step 50 saved to {run_dir / 'last_finite_checkpoint.pt'}. Try a larger --beta" in message
    saved = xql.load_checkpoint(str(run_dir / "last_finite_checkpoint.pt"))
    assert saved["step"] == 50 and saved["args"]["env_id"] == "kitchen-partial-v0"
    assert all(torch.isfinite(v).all() for v in saved["agent"].values() if v.is_floating_point())
    assert all(math.isfinite(float(message.split(f"{name}=")[1].split(",")[0])) for name in ("v_loss", "q_loss"))


def test_last_finite_checkpoint_serves_eval_only(tmp_path, monkeypatch):
    """What a NaN stop saves is a checkpoint --eval-only can use: the last finite parameters with the data's state
    statistics (here --normalize-states, which the eval env must apply), eval env and reference returns."""
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    sample, calls = xql.ReplayBuffer.sample, []

    def poisoned(self, batch_size):
        calls.append(1)
        batch = sample(self, batch_size)
        return batch._replace(rewards=torch.full_like(batch.rewards, 1e37)) if len(calls) > 60 else batch

    monkeypatch.setattr(xql.ReplayBuffer, "sample", poisoned)
    common = dict(env_id="hopper-medium-v2", dataset_path=str(path), normalize_states=True)
    with pytest.raises(SystemExit, match="a loss became NaN/inf at step 61"):
        xql.main(xql.Args(runs_dir=str(tmp_path / "runs"), max_steps=200, eval_freq=0, **common, **TINY))
    monkeypatch.setattr(xql.ReplayBuffer, "sample", sample)
    (run_dir,) = run_dirs(tmp_path / "runs")
    saved = torch.load(run_dir / "last_finite_checkpoint.pt", weights_only=False)
    data = xql.load_dataset(xql.resolve_args(xql.Args(**common)))
    assert saved["step"] == 50 and "values" not in saved and saved["env_spec"] == "Hopper-v4" and saved["ref"] == HOPPER_REF
    np.testing.assert_array_equal(saved["obs_mean"], data["obs_mean"])
    np.testing.assert_array_equal(saved["obs_std"], data["obs_std"])
    assert np.abs(data["obs_mean"]).max() > 0 and np.abs(data["obs_std"] - 1).max() > 0  # the statistics are real ones
    evaluated = xql.main(xql.Args(eval_only=True, checkpoint=str(run_dir / "last_finite_checkpoint.pt"), eval_episodes=1,
                                  cuda=False))
    assert len(evaluated["returns"]) == 1 and math.isfinite(evaluated["normalized_score"])


# --------------------------------------------------------------------------------------------------
# Fast path (issue 12): compiled update and bf16 matmuls against eager fp32, through real updates
# --------------------------------------------------------------------------------------------------
def losses_of(update, steps=3, **overrides):
    """The loss vectors of `steps` real updates from one seed on fixed batches."""
    buffer = random_buffer()
    torch.manual_seed(1)
    batches = [buffer.sample(32) for _ in range(steps)]
    args, agent, optimizers = make_agent(batch_size=32, **overrides)
    out = []
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # --noise / --sample-random-times draw from it
        out.append(update(agent, optimizers, batch, args))
    return torch.stack(out)


def compiled_as_main(mode=None):
    """`update` with its two steps compiled, as `main` builds it for --compile."""
    return partial(xql.update, value_step=torch.compile(xql.update_value, mode=mode),
                   actor_critic_step=torch.compile(xql.update_actor_critic, mode=mode))


@pytest.mark.slow
def test_compiled_update_matches_eager():
    """--compile through real updates, with both V-fitting augmentations on and 2 V steps, so that the compiled graphs
    draw random numbers and one runs twice per step: 3 steps' losses agree with eager within rtol 1e-4 / atol 1e-5
    (fusion reorders float32 sums; nothing else may differ). Dynamo must have compiled both steps into graphs: a function
    it runs eagerly (as it does `update`, whose loop calls backward) would pass the comparison and fail this.
    `fallback_random` makes the compiled draws come from eager's RNG stream."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    augmented = dict(noise=True, sample_random_times=1, num_v_updates=2)
    eager = losses_of(xql.update, **augmented)
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = losses_of(compiled_as_main(), **augmented)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert torch.isfinite(eager).all() and eager.shape == (3, len(xql.LOSS_TAGS))
    assert not torch.equal(eager[0], eager[-1])  # the steps did change the networks
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_update_matches_fp32():
    """--matmul-precision medium runs the update under bf16 autocast, each network's output layer in fp32 (FP32Linear).
    Through 3 real updates the losses agree with fp32 within rtol 2e-2 / atol 2e-3 (bf16 keeps 8 mantissa bits, ~4e-3
    relative per rounded operand; measured: <= 1.6%), but the actor loss within rtol 8e-2 (its AWR weight
    exp(3 (Q - V)) triples the advantage's error; measured: <= 5.3%), and differ from them (the rounding is real: the
    tolerance is not vacuous). Under autocast the hidden layers compute in bf16; Q, V and the actor's mean in fp32."""
    fp32 = losses_of(xql.update, hidden_dim=32)
    medium = losses_of(torch.autocast("cpu", torch.bfloat16)(xql.update), hidden_dim=32)
    assert torch.isfinite(medium).all() and (medium - fp32).abs().max() > 1e-5
    actor = xql.LOSS_TAGS.index("losses/actor_loss")
    others = [i for i in range(len(xql.LOSS_TAGS)) if i != actor]
    torch.testing.assert_close(medium[:, others], fp32[:, others], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(medium[:, actor], fp32[:, actor], rtol=8e-2, atol=2e-3)
    _, agent, _ = make_agent(hidden_dim=32)
    obs, actions = torch.randn(4, 11), torch.rand(4, 3)
    with torch.autocast("cpu", torch.bfloat16):
        assert agent.critic.nets[0][0](torch.cat([obs, actions], -1)).dtype == torch.bfloat16
        outputs = agent.critic(obs, actions), agent.value(obs), agent.actor(obs)
    assert [out.dtype for out in outputs] == [torch.float32] * 3


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fast_path_through_main(tmp_path, monkeypatch, compile):
    """--matmul-precision medium (and --compile) through `main`: the V loss is computed under bf16 autocast (seen eagerly;
    compiled, Dynamo must have made graphs), 100 steps log finite losses, torch's fp32 matmuls stay at "highest" (its
    "medium" would round the fp32 output layers) and the evaluation runs."""
    from torch._dynamo.utils import counters

    seen, gumbel_loss = [], xql.gumbel_loss
    if not compile:
        spy = lambda *a: seen.append(torch.is_autocast_enabled("cpu")) or gumbel_loss(*a)  # noqa: E731
        monkeypatch.setattr(xql, "gumbel_loss", spy)
    counters.clear()
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    result = xql.main(xql.Args(env_id="hopper-medium-v2", dataset_path=str(path), runs_dir=str(tmp_path / "runs"),
                               max_steps=100, eval_episodes=1, matmul_precision="medium", compile=compile, **TINY))
    assert torch.get_float32_matmul_precision() == "highest"
    assert seen == ([] if compile else [True] * 100)
    assert counters["stats"]["unique_graphs"] >= (2 if compile else 0)
    tags = scalars(result["run_dir"])
    assert len(tags["losses/v_loss"]) == 2
    assert all(math.isfinite(v) for v in tags["losses/v_loss"] + tags["losses/q_loss"])
    assert [e[0] for e in result["evaluations"]] == [100]


# --------------------------------------------------------------------------------------------------
# Offline-to-online fine-tuning
# --------------------------------------------------------------------------------------------------
def test_online_finetuning_needs_an_environment(tmp_path):
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    expect_user_error(tmp_path, "--online-steps needs an environment: D4RL's kitchen observations match no "
                      "gymnasium env", env_id="kitchen-partial-v0", dataset_path=str(path), online_steps=10)


@pytest.mark.slow
def test_online_finetuning_and_resume(tmp_path, capsys):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    common = dict(env_id="hopper-medium-v2", dataset_path=str(path), max_steps=100, eval_freq=100,
                  eval_episodes=1, save_model=True, **TINY)
    first = xql.main(xql.Args(runs_dir=str(tmp_path / "a"), online_steps=100, **common))
    assert [e[0] for e in first["evaluations"]] == [100] and [e[0] for e in first["online_evaluations"]] == [100]
    ckpt_a = torch.load(Path(first["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt_a["step"] == 200
    assert [tuple(x.shape) for x in ckpt_a["online_rows"]] == [(100, 11), (100, 3), (100,), (100, 11), (100,), (100,)]
    # No lr decay in either phase when fine-tuning (the authors' fine-tuning configs).
    tags_a = scalars(first["run_dir"])
    assert tags_a["charts/actor_lr"] == pytest.approx([3e-4] * 4, rel=1e-5)
    assert len(tags_a["finetune/normalized_score"]) == 1 and len(tags_a["eval/normalized_score"]) == 1
    # Online rewards get the dataset's locomotion scaling 1000 / (max - min trajectory return): Hopper's
    # per-step reward is about 1 (the healthy bonus), so rewards / scale must come back near 1.
    returns = xql.episode_returns(xql.qlearning_dataset(xql.read_hdf5(str(path)), 1000))
    scale = 1000.0 / (returns.max() - returns.min())
    assert scale > 5 and 0.5 < float(ckpt_a["online_rows"][2].median()) / scale < 2.0
    # Resume the online phase from the checkpoint and run it to 200 online steps.
    second = xql.main(xql.Args(runs_dir=str(tmp_path / "b"), online_steps=200,
                               resume=str(Path(first["run_dir"]) / "checkpoint.pt"), **common))
    out = capsys.readouterr().out
    assert f"xql_offline: resumed {Path(first['run_dir']) / 'checkpoint.pt'} at step 200" in out
    assert "step 300/300 | finetune return" in out
    assert (f"xql_offline: fine-tuning hopper-medium-v2: normalised score {second['finetune_before']:.1f} -> "
            f"{second['finetune_after']:.1f}") in out
    assert [e[0] for e in second["online_evaluations"]] == [100, 200]
    assert second["finetune_before"] == pytest.approx(first["final_normalized_score"])
    assert math.isfinite(second["finetune_after"])
    ckpt_b = torch.load(Path(second["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt_b["step"] == 300 and len(ckpt_b["online_rows"][0]) == 200
    for rows_b, rows_a in zip(ckpt_b["online_rows"], ckpt_a["online_rows"]):
        torch.testing.assert_close(rows_b[:100], rows_a)
    tags = scalars(second["run_dir"])
    assert tags["finetune/normalized_score"] == [pytest.approx(second["finetune_after"])]
    assert len(tags["charts/episodic_return"]) >= 1
    assert len(tags["losses/q_loss"]) == 2 and all(math.isfinite(v) for v in tags["losses/q_loss"])  # steps 250, 300
    assert "losses/q_loss" in tags_a and len(tags["charts/SPS"]) == 2
