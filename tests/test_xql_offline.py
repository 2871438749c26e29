"""Tests of xql_offline.py: D4RL conversion and preprocessing, the per-domain and tuned tables (and
that they reach the loop), every bad input, the IQL arm and X-QL's losses against their formulas, a
dataset of one's own, the V-fitting augmentations (--noise, --sample-random-times), clip diagnostics
and --clip-mode, evaluation, end-to-end runs on a D4RL-format HDF5 file (also found through
$D4RL_DATASET_DIR) and on Minari datasets that the tests write, fine-tuning, the NaN stop, and the
fast path (torch.compile, bf16 matmuls) against eager. Checkpoints (--eval-only, --resume):
test_offline_resume.py. Networks are tiny (--hidden-dim 32 or less) and runs a few hundred steps."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, load_script

xql = load_script("xql_offline")

TINY = dict(hidden_dim=32, batch_size=64, log_freq=50, cuda=False)
HOPPER_REF = (-20.272305, 3234.3)
# What `update` returns, in its order: the TensorBoard tags of the losses and diagnostics.
TAGS = (
    "losses/v_loss",
    "values/v",
    "values/clip_fraction",
    "losses/q_loss",
    "losses/actor_loss",
    "values/q",
    "values/advantage",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
    threads spinning against other processes slow a step down a hundredfold; restored after this
    module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def signal_handlers():
    """A run that stops by SystemExit (the NaN stop) leaves the script's SIGTERM and SIGUSR1
    handlers installed: put back the ones pytest had."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


@pytest.fixture(autouse=True)
def d4rl_stand_ins(tmp_path_factory, monkeypatch):
    """`resolve_args` checks that a D4RL name's file exists where d4rl keeps it
    ($D4RL_DATASET_DIR): point that at a folder holding an empty stand-in for every D4RL file, so
    that tests of the tables need no download. Nothing reads them: tests that load data pass
    --dataset-path or point the variable at a folder of real files; the missing-file test points
    it elsewhere."""
    folder = tmp_path_factory.getbasetemp() / "d4rl_stand_ins"
    if not folder.exists():
        folder.mkdir()
        for info in xql.D4RL.values():
            (folder / os.path.basename(info["url"])).touch()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(folder))


def write_d4rl_file(
    path: Path,
    obs_dim=11,
    act_dim=3,
    episodes=8,
    length=60,
    timeouts=True,
    seed=0,
    reward_scale=1.0,
    reward_shift=0.0,
    drop=(),
    truncate=None,
    attrs=None,
):
    """A small file in the layout of the D4RL v2 locomotion files (observations, actions, rewards,
    terminals, timeouts, next_observations, infos/*). Odd episodes end on a terminal, even on a
    timeout."""
    rng = np.random.default_rng(seed)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    cols = {k: [] for k in keys}
    for episode in range(episodes):
        obs = rng.normal(size=(length + 1, obs_dim)).astype(np.float32)
        cols["observations"].append(obs[:-1])
        cols["next_observations"].append(obs[1:])
        cols["actions"].append(rng.uniform(-1.2, 1.2, size=(length, act_dim)).astype(np.float32))
        rewards = rng.normal(size=length) * reward_scale + reward_shift
        cols["rewards"].append(rewards.astype(np.float32))
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


def read_file(path) -> dict:
    """The arrays of a file of write_d4rl_file, read with h5py alone."""
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in ("observations", "actions", "rewards", "timeouts")}


def file_transitions(path) -> np.ndarray:
    """The rows d4rl.qlearning_dataset keeps of a file of write_d4rl_file (with timeouts): all but
    those ending in a timeout and the last one."""
    timeouts = read_file(path)["timeouts"]
    return np.array([i for i in range(len(timeouts) - 1) if not timeouts[i]])


def file_episode_returns(path) -> np.ndarray:
    """Each episode's return in a file of write_d4rl_file, cut at the file's own episode ends
    (terminals, timeouts) and without the rows qlearning_dataset drops; the script's
    `episode_returns` finds the episodes otherwise (IQL's cuts at observation jumps)."""
    with h5py.File(path, "r") as f:
        rewards, terminals, timeouts = (f[k][()] for k in ("rewards", "terminals", "timeouts"))
    returns = []
    total = 0.0
    last = len(rewards) - 1
    for i, reward in enumerate(rewards):
        if not timeouts[i] and i < last:
            total += float(reward)
        if terminals[i] or timeouts[i] or i == last:
            returns.append(total)
            total = 0.0
    return np.array(returns)


def reference_qlearning_dataset(data, max_episode_steps):
    """d4rl.qlearning_dataset, transcribed loop by loop (the d4rl package cannot be imported)."""
    n = data["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = data.get("timeouts") is not None  # read_hdf5: None for a file without the key
    episode_step = 0
    for i in range(n - 1):
        done_bool = bool(data["terminals"][i])
        if use_timeouts:
            final_timestep = data["timeouts"][i]
        else:
            final_timestep = episode_step == max_episode_steps - 1
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
    return dict(
        observations=np.array(obs_),
        actions=np.array(action_),
        next_observations=np.array(next_obs_),
        rewards=np.array(reward_),
        terminals=np.array(done_),
    )


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_dirs(runs):
    return sorted(Path(runs).glob("*")) if Path(runs).exists() else []


def cosine_lrs(steps, max_steps, lr=3e-4):
    """The actor lr of each of `steps` (1-based), by torch's CosineAnnealingLR to 0 over
    --max-steps: an implementation other than the script's (optax's cosine_decay_schedule counts
    updates from 0: the first runs at the full lr)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    used = {}
    for step in range(1, max(steps) + 1):
        used[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    return [used[step] for step in steps]


def resolved(**kwargs) -> xql.Args:
    """The settings `resolve_args` fills in (it also returns the checkpoint of --resume)."""
    args, resume = xql.resolve_args(xql.Args(**kwargs))
    assert resume is None
    return args


# ---- update-level helpers: real updates on a buffer of random transitions, no files, no env ----
def make_optimizers(agent, args):
    """As `main` builds them: a fused Adam on V; one on the actor and the critics, a parameter
    group each; every lr a tensor."""
    lr = args.learning_rate
    groups = [
        {"params": m.parameters(), "lr": torch.tensor(lr)} for m in (agent.actor, agent.critic)
    ]
    return {
        "value": torch.optim.Adam(agent.value.parameters(), torch.tensor(lr), fused=True),
        "actor_critic": torch.optim.Adam(groups, fused=True),
    }


def random_buffer(n=500, obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    buffer = xql.ReplayBuffer(n, obs_dim, act_dim, torch.device("cpu"))
    buffer.add(
        rng.normal(size=(n, obs_dim)),
        rng.uniform(-1, 1, (n, act_dim)),
        rng.normal(size=n),
        rng.normal(size=(n, obs_dim)),
        rng.uniform(size=n) < 0.05,
        np.zeros(n),
    )
    return buffer


def make_agent(seed=0, obs_dim=11, act_dim=3, **overrides):
    settings = {"hidden_dim": 16, "batch_size": 64, **overrides}
    args = resolved(env_id="hopper-medium-v2", max_steps=1000, cuda=False, **settings)
    torch.manual_seed(seed)
    agent = xql.Agent(obs_dim, act_dim, args)
    return args, agent, make_optimizers(agent, args)


def constant_value(agent, value: float):
    """V(s) = value for every s: V's output layer's weights zeroed, its bias set to `value`."""
    with torch.no_grad():
        agent.value.net[-1].weight.zero_()
        agent.value.net[-1].bias.fill_(value)


def expect_user_error(tmp_path, match, **kwargs):
    """`main` stops with one line (a str exit code: exit status 1) and writes no run folder."""
    runs = tmp_path / "runs"
    args = xql.Args(runs_dir=str(runs), max_steps=5, **{**TINY, **kwargs})
    with pytest.raises(SystemExit) as info:
        xql.main(args)
    assert isinstance(info.value.code, str)
    message = info.value.code
    assert message.startswith("xql_offline: ") and "\n" not in message
    assert match in message, message
    assert run_dirs(runs) == []
    return message


class RecordingBuffer(xql.ReplayBuffer):
    """The script's ReplayBuffer, remembering its instances (to read what `main` trained on)."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingBuffer.instances.append(self)


def buffer_columns(buffer) -> tuple:
    """A buffer's filled rows as (obs, actions, rewards, next_obs, terminated, truncated)."""
    obs, actions, rewards, next_obs, terminated, truncated = buffer.rows[: buffer.size].split(
        buffer.widths, dim=1
    )
    return obs, actions, rewards[:, 0], next_obs, terminated[:, 0], truncated[:, 0]


def record_updates(monkeypatch) -> list:
    """Make `main` record what each `update` returns, as floats (the list it returns)."""
    records = []
    update = xql.update

    def recording(agent, optimizers, batch, args):
        losses = update(agent, optimizers, batch, args)
        records.append({tag: value.item() for tag, value in losses.items()})
        return losses

    monkeypatch.setattr(xql, "update", recording)
    return records


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
    if timeouts:  # rows ending on a timeout are dropped; no next observation crosses an episode
        assert len(ours["rewards"]) == len(raw["rewards"]) - 4 - 1  # 4 timeouts and the last row


def test_preprocessing_follows_the_authors(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", reward_scale=3.0)
    data = xql.load_dataset(resolved(env_id="hopper-medium-v2", dataset_path=str(path)))
    raw = xql.qlearning_dataset(xql.read_hdf5(str(path)), 1000)
    returns = file_episode_returns(path)
    assert len(returns) == 8
    scale = 1000 / (returns.max() - returns.min())
    np.testing.assert_allclose(data["rewards"], raw["rewards"] * scale, rtol=1e-5)
    assert data["reward_scale"] == pytest.approx(scale, rel=1e-9) and data["reward_shift"] == 0.0
    assert data["returns"] == pytest.approx(returns, rel=1e-9)
    assert np.abs(data["actions"]).max() <= 1 - 1e-5 and np.abs(raw["actions"]).max() > 1
    np.testing.assert_array_equal(data["terminals"], raw["terminals"])
    assert data["ref"] == HOPPER_REF and data["env_spec"] == "Hopper-v4"
    assert data["no_eval_reason"] is None
    # antmaze: reward - 1, no scaling, and no eval env (v0 layout differs from gymnasium-robotics)
    data = xql.load_dataset(resolved(env_id="antmaze-umaze-v0", dataset_path=str(path)))
    np.testing.assert_allclose(data["rewards"], raw["rewards"] - 1.0)
    assert (data["reward_scale"], data["reward_shift"]) == (1.0, -1.0)
    assert data["env_spec"] is None and "antmaze" in data["no_eval_reason"]


def test_domain_defaults_and_overrides():
    s = resolved(env_id="antmaze-medium-play-v0")
    settings = (s.beta, s.awr_temperature, s.expectile, s.value_dropout, s.eval_episodes)
    assert settings == (0.6, 10.0, 0.9, 0.0, 100)  # value dropout: the authors never applied it
    assert not s.cosine_actor_lr
    s = resolved(env_id="kitchen-partial-v0")
    assert (s.beta, s.awr_temperature, s.actor_dropout) == (5.0, 0.5, 0.1)
    s = resolved(env_id="hopper-medium-expert-v2", tuned=True)
    assert (s.beta, s.loss_clip, s.batch_size) == (2.0, 7.0, 1024)
    s = resolved(env_id="hopper-medium-v2", beta=0.8, awr_temperature=1.0)
    assert (s.beta, s.awr_temperature, s.loss_clip) == (0.8, 1.0, 7.0)
    assert resolved().env_id == "hopper-medium-v2"  # the default dataset
    url = xql.D4RL["hopper-medium-replay-v2"]["url"]
    assert os.path.basename(url) == "hopper_medium_replay-v2.hdf5"
    url = xql.D4RL["antmaze-umaze-v0"]["url"]
    assert (
        os.path.basename(url)
        == "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse.hdf5"
    )


def test_tuned_tables_paper_and_authors():
    """--tuned --tuned-table paper (Table 4's X-QL-T) vs authors (their reproduce/*.sh)."""

    def settings(env_id, table, **kwargs):
        a = resolved(env_id=env_id, tuned=True, tuned_table=table, **kwargs)
        return a.beta, a.loss_clip, a.batch_size, a.num_v_updates, a.noise, a.sample_random_times

    assert settings("walker2d-medium-replay-v2", "paper") == (5, 7, 256, 1, False, 0)
    assert settings("walker2d-medium-replay-v2", "authors") == (5, 5, 1024, 1, False, 0)
    assert settings("hopper-medium-expert-v2", "paper") == (2, 7, 1024, 1, False, 0)
    assert settings("hopper-medium-expert-v2", "authors") == (2, 7, 1024, 1, False, 1)
    assert settings("halfcheetah-medium-v2", "paper") == (1, 7, 256, 1, False, 0)
    assert settings("halfcheetah-medium-v2", "authors") == (1, 7, 1024, 1, True, 0)
    assert settings("antmaze-umaze-v0", "paper") == (1, 7, 256, 4, False, 0)
    assert settings("antmaze-umaze-v0", "authors") == (2, 7, 256, 1, False, 0)
    assert settings("antmaze-umaze-diverse-v0", "authors") == (5, 7, 256, 1, False, 1)
    # A flag the user sets wins over the table; without --tuned the per-domain values hold.
    mine = dict(beta=3.0, num_v_updates=2, sample_random_times=3)
    assert settings("antmaze-umaze-v0", "authors", **mine) == (3.0, 7, 256, 2, False, 3)
    a = resolved(env_id="walker2d-medium-replay-v2", tuned_table="authors")
    untuned = (a.beta, a.loss_clip, a.batch_size, a.num_v_updates, a.noise, a.sample_random_times)
    assert untuned == (2.0, 7.0, 256, 1, False, 0)


@pytest.mark.parametrize("table,batch_size,v_steps", [("paper", 1024, 2), ("authors", 256, 1)])
def test_tuned_batch_size_and_v_steps_reach_the_loop(
    tmp_path, monkeypatch, table, batch_size, v_steps
):
    """antmaze-medium-play-v0 --tuned: Table 4 fits V twice per update on batches of 1024, the
    authors' script once on batches of 256. Seen inside `main`: the batch size `sample` receives,
    the number of `update_value` calls per `update`, and the rows each V step fits."""
    path = write_d4rl_file(tmp_path / "a.hdf5", obs_dim=29, act_dim=8, length=130)
    sizes = []
    v_fits = []
    updates = []
    sample = xql.ReplayBuffer.sample
    update = xql.update
    update_value = xql.update_value

    def counting_sample(self, n):
        sizes.append(n)
        return sample(self, n)

    def counting_update(*args):
        updates.append(1)
        return update(*args)

    def counting_update_value(agent, optimizer, v_obs, v_target, args):
        v_fits.append((len(updates), len(v_obs), len(v_target)))
        return update_value(agent, optimizer, v_obs, v_target, args)

    monkeypatch.setattr(xql.ReplayBuffer, "sample", counting_sample)
    monkeypatch.setattr(xql, "update", counting_update)
    monkeypatch.setattr(xql, "update_value", counting_update_value)
    xql.main(
        xql.Args(
            env_id="antmaze-medium-play-v0",
            dataset_path=str(path),
            tuned=True,
            tuned_table=table,
            runs_dir=str(tmp_path / "runs"),
            max_steps=3,
            hidden_dim=32,
            cuda=False,
        )
    )
    assert sizes == [batch_size] * 3 and len(updates) == 3
    assert v_fits == [(step, batch_size, batch_size) for step in (1, 2, 3) for _ in range(v_steps)]


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
    """IQL's V has no LayerNorm (X-QL's has one per hidden layer); the IQL arm decays the actor lr
    by the cosine on every domain, X-QL everywhere but antmaze; no run with --online-steps decays
    it."""
    for env_id in ("hopper-medium-v2", "antmaze-umaze-v0"):
        iql = resolved(env_id=env_id, value_loss="expectile")
        assert not any(isinstance(m, nn.LayerNorm) for m in xql.Value(11, iql).modules())
        xql_args = resolved(env_id=env_id)
        assert sum(isinstance(m, nn.LayerNorm) for m in xql.Value(11, xql_args).modules()) == 2
        assert iql.cosine_actor_lr and xql_args.cosine_actor_lr == (env_id == "hopper-medium-v2")
        for loss in ("expectile", "gumbel"):
            assert not resolved(env_id=env_id, value_loss=loss, online_steps=10).cosine_actor_lr
    iql = resolved(env_id="antmaze-umaze-v0", value_loss="expectile")
    assert (iql.expectile, iql.awr_temperature) == (0.9, 10.0)
    assert resolved(env_id="hopper-medium-v2", value_loss="expectile").expectile == 0.7


def test_no_cosine_actor_lr_keeps_the_lr_constant(tmp_path):
    """--no-cosine-actor-lr forces a constant actor lr, also where the source config decays it."""
    for env_id, loss in (("hopper-medium-v2", "gumbel"), ("antmaze-umaze-v0", "expectile")):
        assert not resolved(env_id=env_id, value_loss=loss, cosine_actor_lr=False).cosine_actor_lr
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    result = xql.main(
        xql.Args(
            env_id="kitchen-partial-v0",
            dataset_path=str(path),
            runs_dir=str(tmp_path / "runs"),
            max_steps=4,
            cosine_actor_lr=False,
            **{**TINY, "log_freq": 2},
        )
    )  # kitchen's config decays the actor lr: 3e-4 (2 + sqrt 2) / 4 at step 2
    assert scalars(result["run_dir"])["charts/actor_lr"] == pytest.approx([3e-4] * 2, rel=1e-6)


@pytest.mark.parametrize("value_loss", ["expectile", "gumbel"])
def test_iql_arm_actor_lr_in_tensorboard_on_antmaze(tmp_path, value_loss):
    """The logged `charts/actor_lr` of each of 4 steps on an antmaze-named file: for IQL the cosine
    0.5 (1 + cos(pi t / 4)) of the update count t = 0..3 (the first update at the full lr), for
    X-QL constant."""
    path = write_d4rl_file(tmp_path / "a.hdf5", obs_dim=29, act_dim=8)
    result = xql.main(
        xql.Args(
            env_id="antmaze-umaze-v0",
            dataset_path=str(path),
            runs_dir=str(tmp_path / "runs"),
            max_steps=4,
            value_loss=value_loss,
            **{**TINY, "log_freq": 1},
        )
    )
    tags = scalars(result["run_dir"])
    assert all(math.isfinite(v) for v in tags["losses/v_loss"])
    root2 = math.sqrt(2)
    cosine = [3e-4, 3e-4 * (2 + root2) / 4, 1.5e-4, 3e-4 * (2 - root2) / 4]
    expected = cosine if value_loss == "expectile" else [3e-4] * 4
    assert tags["charts/actor_lr"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The V-fitting augmentations, the losses against their formulas, clip diagnostics and --clip-mode
# --------------------------------------------------------------------------------------------------
def record_calls(module, calls):
    """Record the inputs of every forward of `module` (an instance attribute shadows the
    class's)."""
    original = module.forward

    def forward(*inputs):
        calls.append(tuple(x.detach().clone() for x in inputs))
        return original(*inputs)

    module.forward = forward


@pytest.mark.parametrize("noise,times", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_noise_and_random_times_change_what_v_is_fitted_on(noise, times):
    buffer = random_buffer()
    torch.manual_seed(5)
    obs, actions, rewards, next_obs, terminated = buffer.sample(64)
    edges = [torch.full((8, 3), 0.99), torch.full((8, 3), -0.99)]
    actions = torch.cat([*edges, actions[16:]])
    batch = (obs, actions, rewards, next_obs, terminated)
    b, a = 64, 3
    args, agent, optimizers = make_agent(noise=noise, sample_random_times=times)
    plain_args, baseline, baseline_opts = make_agent()
    critic_calls, value_calls = [], []
    record_calls(agent.critic_target, critic_calls)
    record_calls(agent.value, value_calls)
    torch.manual_seed(7)
    losses = xql.update(agent, optimizers, batch, args)
    assert tuple(losses) == TAGS and torch.isfinite(torch.stack(list(losses.values()))).all()
    # The first target-critic pass is V's target, on V's own rows; Q at the dataset actions (the
    # actor's advantage) is its first b rows, but with --noise, which moves those actions, a
    # second pass of its own.
    v_obs, v_actions = critic_calls[0]
    v_inputs = value_calls[0][0]  # V's first call is its fit; its last, V(s), V(s') for Q's target
    assert len(value_calls) == 2 and value_calls[1][0].shape == (2 * b, 11)
    assert v_obs.shape == (b * (1 + times), 11) == v_inputs.shape
    assert v_actions.shape == (b * (1 + times), a)
    torch.testing.assert_close(v_inputs, v_obs, rtol=0, atol=0)  # V's target: on V's own rows
    assert len(critic_calls) == (2 if noise else 1)
    if noise:
        torch.testing.assert_close(critic_calls[1][0], obs, rtol=0, atol=0)
        torch.testing.assert_close(critic_calls[1][1], actions, rtol=0, atol=0)
    if not (noise or times):  # V fitted at the dataset actions: one target-critic pass serves both
        torch.testing.assert_close(v_obs, obs, rtol=0, atol=0)
        torch.testing.assert_close(v_actions, actions, rtol=0, atol=0)
        return
    torch.testing.assert_close(v_obs[:b], obs, rtol=0, atol=0)
    if times:  # each state again `times` times, at uniform actions in [-1, 1]
        torch.testing.assert_close(v_obs[b:], obs.repeat_interleave(times, 0), rtol=0, atol=0)
        uniform = v_actions[b:]
        assert uniform.min() >= -1 and uniform.max() <= 1
        assert uniform.min() < -0.8 and uniform.max() > 0.8
        assert abs(float(uniform.mean())) < 0.15
        assert float(uniform.std()) == pytest.approx(1 / math.sqrt(3), abs=0.06)
    near = v_actions[:b]
    if noise:  # N(0, 0.1) clipped to +-0.5, then the action clipped to [-1, 1]
        diff = near - actions
        assert (diff != 0).all() and diff.abs().max() <= 0.5 + 1e-6
        assert near.min() >= -1 and near.max() <= 1
        assert (near[:16].abs() == 1).any()  # actions at +-0.99 pushed past the bound: clipped
        assert float(diff[16:].std()) == pytest.approx(0.1, abs=0.02)
    else:
        torch.testing.assert_close(near, actions, rtol=0, atol=0)
    # The same initial networks fitted on the dataset actions alone give another V loss.
    torch.manual_seed(7)
    plain = xql.update(baseline, baseline_opts, batch, plain_args)
    assert losses["losses/v_loss"] != plain["losses/v_loss"]


def test_expectile_loss_weights_by_hand():
    """IQL's V loss |tau - 1(u < 0)| u^2, u = Q - V, tau = 0.7, for V = 0.5 and targets with
    u = 1, -1, 2, -3: weights 0.7, 0.3, 0.7, 0.3; the loss (0.7 + 0.3 + 2.8 + 2.7) / 4, its
    gradient in V -2 (0.7 - 0.3 + 1.4 - 0.9) / 4 = -0.45 (one SGD step of lr 1: V -> 0.95)."""
    args, agent, _ = make_agent(value_loss="expectile")
    assert args.expectile == 0.7
    constant_value(agent, 0.5)
    targets = torch.tensor([1.5, -0.5, 2.5, -2.5])
    sgd = torch.optim.SGD(agent.value.parameters(), lr=1.0)
    losses = xql.update_value(agent, sgd, torch.randn(4, 11), targets, args)
    assert losses["losses/v_loss"].item() == pytest.approx(6.5 / 4, rel=1e-6)
    assert losses["values/v"].item() == pytest.approx(0.5, rel=1e-6)
    assert agent.value.net[-1].bias.item() == pytest.approx(0.95, rel=1e-6)


def test_awr_weights_and_their_cap_by_hand():
    """The actor loss -mean(min(exp(temperature (Q - V)), cap) log pi(a|s)) for a unit Gaussian at
    0 (the actor's mean tanh(0), log-std 0), temperature 3 and cap 10: advantages 0, 1, 2, -1 give
    weights 1, 10 (e^3 capped), 10 (e^6 capped), e^-3; Q's loss regresses
    r + 0.99 (1 - done) V(s')."""
    args, agent, optimizers = make_agent(
        obs_dim=2, act_dim=1, awr_temperature=3.0, max_exp_advantage=10.0
    )
    constant_value(agent, 0.5)
    with torch.no_grad():
        agent.actor.net[-1].weight.zero_()
        agent.actor.net[-1].bias.zero_()
    torch.manual_seed(0)
    obs = torch.randn(4, 2)
    next_obs = torch.randn(4, 2)
    actions = torch.tensor([[0.0], [1.0], [0.5], [-1.0]])
    rewards = torch.tensor([1.0, 0.0, -1.0, 2.0])
    terminated = torch.tensor([0.0, 1.0, 0.0, 1.0])
    q_data = torch.tensor([0.5, 1.5, 2.5, -0.5])  # advantages 0, 1, 2, -1 (V = 0.5)
    q_before = agent.critic(obs, actions).detach()
    batch = (obs, actions, rewards, next_obs, terminated)
    losses = xql.update_actor_critic(agent, optimizers["actor_critic"], batch, q_data, args)
    weights = [1.0, 10.0, 10.0, math.exp(-3.0)]
    log_probs = [-0.5 * a * a - 0.5 * math.log(2 * math.pi) for a in (0.0, 1.0, 0.5, -1.0)]
    expected = -sum(w * lp for w, lp in zip(weights, log_probs)) / 4
    assert losses["losses/actor_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["values/advantage"].item() == pytest.approx(0.5, rel=1e-6)
    targets = [1.0 + 0.99 * 0.5, 0.0, -1.0 + 0.99 * 0.5, 2.0]
    q_loss = sum(
        sum((float(q_before[k, i]) - targets[i]) ** 2 for i in range(4)) / 4 for k in range(2)
    )
    assert losses["losses/q_loss"].item() == pytest.approx(q_loss, rel=1e-5)


def gumbel_by_hand(z, m):
    """App. D.3's loss mean(e^{z - m} - z e^{-m} - e^{-m}) of clipped z, with m = max(max z, -1)."""
    return sum(math.exp(x - m) - x * math.exp(-m) - math.exp(-m) for x in z) / len(z)


def test_clip_mode_reaches_the_v_loss():
    """beta 1, clip 2, V = 0, targets -5, 0.5, 1: `upper` keeps z = -5, `both` clips it to -2 and
    so takes its gradient away. Through `update_value`: the loss, and V after one SGD step of lr 1
    (dL/dV = -mean((e^{z - m} - e^{-m}) [z not clipped]), m = 1 here)."""
    for clip_mode, low in (("upper", -5.0), ("both", -2.0)):
        args, agent, _ = make_agent(beta=1.0, loss_clip=2.0, clip_mode=clip_mode)
        constant_value(agent, 0.0)
        sgd = torch.optim.SGD(agent.value.parameters(), lr=1.0)
        targets = torch.tensor([-5.0, 0.5, 1.0])
        losses = xql.update_value(agent, sgd, torch.randn(3, 11), targets, args)
        assert losses["losses/v_loss"].item() == pytest.approx(gumbel_by_hand([low, 0.5, 1.0], 1))
        unclipped = [z for z in (-5.0, 0.5, 1.0) if clip_mode == "upper" or z > -2]
        gradient = -sum(math.exp(z - 1) - math.exp(-1) for z in unclipped) / 3
        assert agent.value.net[-1].bias.item() == pytest.approx(-gradient, rel=1e-5)
        fraction = losses["values/clip_fraction"].item()
        assert fraction == pytest.approx(0.0 if clip_mode == "upper" else 1 / 3)


def test_clip_mode_reaches_the_loss_inside_update():
    """Through `update`: with V far above its targets (z = (min Q'(s, a) - V) / beta near -50,
    below -clip), `both` clips every z to -2: the loss is e^{-2 + 1} + 2 e - e; `upper` keeps z:
    the loss of the targets of the networks before the update."""
    buffer = random_buffer()
    torch.manual_seed(2)
    batch = buffer.sample(64)
    losses = {}
    for clip_mode in ("upper", "both"):
        args, agent, optimizers = make_agent(beta=1.0, loss_clip=2.0, clip_mode=clip_mode)
        constant_value(agent, 50.0)
        with torch.no_grad():
            targets = agent.critic_target(batch[0], batch[1]).min(0).values
        z = [float(q) - 50.0 for q in targets]
        if clip_mode == "both":
            z = [max(x, -2.0) for x in z]
        losses[clip_mode] = xql.update(agent, optimizers, batch, args)["losses/v_loss"].item()
        assert losses[clip_mode] == pytest.approx(gumbel_by_hand(z, -1.0), rel=1e-5)
    assert losses["both"] == pytest.approx(math.exp(-1) + math.e, rel=1e-5)
    assert losses["upper"] > 40


def test_clip_fraction_values():
    """The share of z = (target - pred) / beta past the clip: above it (`upper`) or both sides."""
    pred, target = torch.zeros(5), torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    for beta, clip_mode, expected in [
        (1.0, "upper", 1 / 5),
        (1.0, "both", 2 / 5),
        (2.0, "both", 0.0),
        (0.25, "both", 4 / 5),
        (0.25, "upper", 2 / 5),
    ]:
        fraction = xql.clip_fraction(pred, target, beta, 2.0, clip_mode)
        assert torch.equal(fraction, torch.tensor(expected)), (beta, clip_mode, fraction)


@pytest.mark.parametrize("clip_mode", ["upper", "both"])
def test_update_reports_the_clip_fraction_of_its_v_fit(clip_mode):
    """`values/clip_fraction` = the share of z = (Q' - V) / beta past the clip in V's fit,
    recomputed here from a copy of the networks before the update; a small beta makes both tails
    non-empty."""
    buffer = random_buffer()
    args, agent, optimizers = make_agent(beta=0.02, loss_clip=3.0, clip_mode=clip_mode)
    with torch.no_grad():
        agent.value.net[-1].bias.fill_(0.05)  # V above some targets and below others
    before = copy.deepcopy(agent)
    torch.manual_seed(3)
    batch = buffer.sample(64)
    fraction = xql.update(agent, optimizers, batch, args)["values/clip_fraction"].item()
    obs, actions = batch[:2]
    with torch.no_grad():
        target = before.critic_target(obs, actions).min(0).values
        z = (target - before.value(obs)) / args.beta
    upper, lower = float((z > 3.0).float().mean()), float((z < -3.0).float().mean())
    assert upper > 0 and lower > 0
    assert fraction == pytest.approx(upper + (lower if clip_mode == "both" else 0.0), abs=1e-7)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def test_eval_env_is_seeded_once():
    """Two evaluations on one env see new start states; two envs made with one seed give identical
    returns."""
    weights = torch.tensor([[0.5], [-0.3], [0.2]])

    def policy(obs):
        return torch.tanh(obs @ weights)

    env_a, env_b = xql.make_env("Pendulum-v1", 7), xql.make_env("Pendulum-v1", 7)
    first, lengths = xql.evaluate(policy, env_a, 2, torch.device("cpu"))
    second, _ = xql.evaluate(policy, env_a, 2, torch.device("cpu"))
    again, _ = xql.evaluate(policy, env_b, 2, torch.device("cpu"))
    assert lengths.tolist() == [200, 200] and first.shape == (2,)
    assert first[0] != first[1] and not np.isin(second, first).any()
    np.testing.assert_array_equal(again, first)
    other, _ = xql.evaluate(policy, xql.make_env("Pendulum-v1", 8), 2, torch.device("cpu"))
    assert not np.isin(other, first).any()


def pendulum_by_hand(torque: float, seed: int, episodes: int) -> tuple:
    """Returns and observations of Pendulum-v1 episodes under a constant torque, stepped here:
    reset(seed) as make_env does, then the unseeded resets that continue its random stream."""
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed)
    returns = []
    observations = []
    for _ in range(episodes):
        obs, _ = env.reset()
        total = 0.0
        done = False
        while not done:
            observations.append(obs)
            obs, reward, terminated, truncated, _ = env.step(np.array([torque], np.float32))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return np.array(returns), np.array(observations)


def test_evaluate_runs_the_policy_it_is_given():
    """A policy of constant action 0.5 (-0.5) in [-1, 1] is a torque of 1 (-1) in Pendulum's
    [-2, 2]: its returns are those of stepping the env by hand, the policy sees the env's
    observations, and the two policies' returns differ."""
    returns_of = {}
    for action in (0.5, -0.5):
        seen = []

        def constant(obs, action=action, seen=seen):
            seen.append(obs[0].numpy().copy())
            return torch.full((1, 1), action)

        env = xql.make_env("Pendulum-v1", 3)
        returns, lengths = xql.evaluate(constant, env, 2, torch.device("cpu"))
        expected, observations = pendulum_by_hand(2 * action, seed=3, episodes=2)
        assert lengths.tolist() == [200, 200]
        np.testing.assert_array_equal(returns, expected)
        np.testing.assert_array_equal(np.array(seen), observations)
        returns_of[action] = returns
    assert not np.isin(returns_of[0.5], returns_of[-0.5]).any()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no run folder
# --------------------------------------------------------------------------------------------------
def test_unknown_env_id(tmp_path):
    expect_user_error(
        tmp_path,
        "unknown --env-id 'hopper-mediun-v2': not a D4RL name (e.g. hopper-medium-v2",
        env_id="hopper-mediun-v2",
    )


def test_missing_dataset_file_names_file_and_dir(tmp_path, monkeypatch):
    """The file is looked up where d4rl keeps it: $D4RL_DATASET_DIR if set, else
    ~/.d4rl/datasets."""
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5"
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(nowhere))
    msg = expect_user_error(
        tmp_path,
        f"{nowhere / 'hopper_medium-v2.hdf5'} (the file of hopper-medium-v2) not found; "
        f"download it with `wget -P {nowhere} {url}`, or pass --dataset-path.",
        env_id="hopper-medium-v2",
    )
    assert ".d4rl" not in msg
    monkeypatch.delenv("D4RL_DATASET_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".d4rl" / "datasets"
    expect_user_error(
        tmp_path,
        f"{default / 'hopper_medium-v2.hdf5'} (the file of hopper-medium-v2) not found; "
        f"download it with `wget -P {default} {url}`",
        env_id="hopper-medium-v2",
    )
    expect_user_error(
        tmp_path,
        f"--dataset-path {str(tmp_path / 'x.hdf5')!r} does not exist",
        env_id="hopper-medium-v2",
        dataset_path=str(tmp_path / "x.hdf5"),
    )


def test_hdf5_missing_keys(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", drop=("terminals",))
    expect_user_error(
        tmp_path, "the file lacks ['terminals']", env_id="hopper-medium-v2", dataset_path=str(path)
    )


def test_hdf5_mismatched_lengths(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", truncate="actions")
    expect_user_error(
        tmp_path,
        "actions has 477 rows but observations has 480",
        env_id="hopper-medium-v2",
        dataset_path=str(path),
    )


def test_observation_size_differs_from_eval_env(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", obs_dim=5)
    expect_user_error(
        tmp_path,
        "the dataset's observations/actions are 5/3-d but the eval env Hopper-v4 has 11/3-d",
        env_id="hopper-medium-v2",
        dataset_path=str(path),
    )


def test_bad_beta_and_batch(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5")
    data = dict(env_id="hopper-medium-v2", dataset_path=str(path))
    expect_user_error(tmp_path, "--beta must be > 0", beta=0.0, **data)
    expect_user_error(tmp_path, "--beta must be > 0", beta=-1.0, **data)
    expect_user_error(
        tmp_path,
        "--batch-size 100000 is larger than the dataset (475 transitions)",
        **{**TINY, "batch_size": 100_000},
        **data,
    )


def test_tuned_without_table_entry_and_negative_counts(tmp_path):
    expect_user_error(
        tmp_path, "--tuned: no tuned values for 'pen-human-v0'", env_id="pen-human-v0", tuned=True
    )
    negative = (
        "--online-steps, --eval-freq, --sample-random-times and --checkpoint-freq must be >= 0"
    )
    for flag in ("online_steps", "eval_freq", "sample_random_times", "checkpoint_freq"):
        expect_user_error(tmp_path, negative, env_id="hopper-medium-v2", **{flag: -1})


def test_track_without_wandb(tmp_path, monkeypatch):
    """--track where wandb is not installed (hidden here from the script's `find_spec`): the one
    line before anything is written, not an ImportError after."""
    find_spec = xql.find_spec
    monkeypatch.setattr(xql, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    path = write_d4rl_file(tmp_path / "d.hdf5")
    message = expect_user_error(
        tmp_path, "", env_id="hopper-medium-v2", dataset_path=str(path), track=True
    )
    assert message == "xql_offline: --track needs wandb: pip install wandb."


def test_bad_checkpoint_paths(tmp_path):
    expect_user_error(tmp_path, "--eval-only needs --checkpoint PATH", eval_only=True)
    missing = tmp_path / "no.pt"
    expect_user_error(
        tmp_path,
        f"{missing} is not a checkpoint of xql_offline --save-model (FileNotFoundError).",
        eval_only=True,
        checkpoint=str(missing),
    )
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    junk = tmp_path / "junk.pt"
    expect_user_error(
        tmp_path,
        f"{junk} is not a checkpoint of xql_offline --save-model (UnpicklingError).",
        eval_only=True,
        checkpoint=str(junk),
    )
    expect_user_error(
        tmp_path,
        f"{junk} is not a checkpoint of xql_offline --save-model (UnpicklingError).",
        env_id="hopper-medium-v2",
        resume=str(junk),
    )


def test_cli_user_error_is_one_line(tmp_path):
    command = [sys.executable, str(ROOT / "xql_offline.py"), "--env-id", "nope-v0"]
    command += ["--runs-dir", str(tmp_path / "runs")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("xql_offline: unknown --env-id 'nope-v0'")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# Minari
# --------------------------------------------------------------------------------------------------
def make_minari_dataset(env_id, dataset_id, episodes=6, seed=0, ref=HOPPER_REF):
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
        if isinstance(observations[0], dict):  # Minari stores dict observations as dicts of lists
            observations = {k: [o[k] for o in observations] for k in observations[0]}
        buffers.append(
            EpisodeBuffer(
                id=episode,
                observations=observations,
                actions=actions,
                rewards=rewards,
                terminations=terminations,
                truncations=truncations,
            )
        )
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env_id, eval_env=env_id, ref_min_score=ref[0], ref_max_score=ref[1]
    )


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def test_discrete_action_space(tmp_path, minari_store):
    make_minari_dataset("CartPole-v1", "test/cartpole/random-v0", ref=(0.0, 500.0))
    expect_user_error(
        tmp_path,
        "test/cartpole/random-v0: action space Discrete(2); the AWR actor needs a continuous (Box)",
        env_id="test/cartpole/random-v0",
    )


def test_minari_missing_dataset(tmp_path, minari_store):
    expect_user_error(
        tmp_path, "Minari dataset 'test/hopper/none-v0' not found", env_id="test/hopper/none-v0"
    )


def test_minari_actions_rewards_and_terminals(minari_store):
    """InvertedPendulum's actions lie in [-3, 3]: loaded, they are a / 3 in [-1, 1] (clipped to
    1 - 1e-5 for the AWR actor's log-likelihood), and the eval env's RescaleAction maps them back:
    replayed in it from the episode's reset, they reproduce the recorded next observations.
    Observations, rewards and terminals are the dataset episodes', row for row."""
    dataset = make_minari_dataset(
        "InvertedPendulum-v4", "test/invpend/random-v0", episodes=5, ref=(0.0, 1000.0)
    )
    assert dataset.action_space.high.tolist() == [3.0]
    data = xql.load_dataset(resolved(env_id="test/invpend/random-v0"))
    episodes = list(dataset.iterate_episodes())
    actions = np.concatenate([e.actions for e in episodes])
    np.testing.assert_allclose(
        data["actions"], np.clip(actions / 3, -1 + 1e-5, 1 - 1e-5), rtol=0, atol=1e-6
    )
    assert np.abs(actions).max() > 2.5 and np.abs(data["actions"]).max() <= 1
    np.testing.assert_array_equal(data["rewards"], np.concatenate([e.rewards for e in episodes]))
    terminals = np.concatenate([e.terminations for e in episodes])
    assert terminals.sum() == len(episodes) < len(terminals)  # each falls within 40 steps
    np.testing.assert_array_equal(data["terminals"], terminals)
    observations = np.concatenate([e.observations[:-1] for e in episodes])
    np.testing.assert_array_equal(data["observations"], observations.astype(np.float32))
    next_observations = np.concatenate([e.observations[1:] for e in episodes])
    np.testing.assert_array_equal(data["next_observations"], next_observations.astype(np.float32))
    assert (data["reward_scale"], data["reward_shift"]) == (1.0, 0.0)  # no D4RL robot in the id
    env = xql.make_env(data["env_spec"], 0)
    assert env.spec.id == "InvertedPendulum-v4"
    env.reset(seed=0)  # episode 0 of make_minari_dataset
    length = len(episodes[0].actions)
    replayed = [env.step(action)[0] for action in data["actions"][:length]]
    np.testing.assert_allclose(replayed, data["next_observations"][:length], atol=1e-4)
    env.close()


def test_minari_dict_observations_match_eval_env_layout(minari_store):
    """AntMaze (dict observations): the dataset is flattened in the order the eval env's
    FlattenObservation uses, checked on the first observation of an episode recorded from
    reset(seed)."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")

    gym.register_envs(gymnasium_robotics)
    make_minari_dataset(
        "AntMaze_UMaze-v5", "test/antmaze/tiny-v0", episodes=2, seed=3, ref=(0.0, 1.0)
    )
    data = xql.load_dataset(resolved(env_id="test/antmaze/tiny-v0"))
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
    result = xql.main(
        xql.Args(
            env_id="test/hopper/random-v0",
            runs_dir=str(runs),
            max_steps=200,
            eval_freq=100,
            eval_episodes=2,
            normalize_states=True,
            save_model=True,
            **TINY,
        )
    )
    assert [e[0] for e in result["evaluations"]] == [100, 200]
    assert Path(result["run_dir"]).name.startswith("test-hopper-random-v0__xql_offline__1__")
    low, high = HOPPER_REF
    scores = [100 * (r - low) / (high - low) for _, r, _ in result["evaluations"]]
    assert [s for _, _, s in result["evaluations"]] == pytest.approx(scores)
    assert result["final_normalized_score"] == pytest.approx(scores[-1])
    assert result["best_normalized_score"] == pytest.approx(max(scores))
    tags = scalars(result["run_dir"])
    assert tags["eval/normalized_score"] == pytest.approx(scores, rel=1e-6)
    for tag in ("losses/v_loss", "losses/q_loss", "losses/actor_loss"):
        assert all(math.isfinite(v) for v in tags[tag])
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoint.pt", weights_only=False)
    obs = np.concatenate([np.asarray(e.observations)[:-1] for e in dataset.iterate_episodes()])
    # stored for the eval env
    np.testing.assert_allclose(ckpt["obs_mean"], obs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ckpt["obs_std"], obs.std(0) + 1e-3, rtol=1e-4, atol=1e-5)
    assert ckpt["step"] == 200 and json.loads(ckpt["env_spec"])["id"] == "Hopper-v4"
    assert ckpt["ref"] == HOPPER_REF
    checkpoint = str(Path(result["run_dir"]) / "checkpoint.pt")
    evaluated = xql.main(xql.Args(eval_only=True, checkpoint=checkpoint, cuda=False))
    # on the dataset's recorded eval env (test_offline_resume.py: it reproduces an evaluation)
    assert len(evaluated["returns"]) == 2 and math.isfinite(evaluated["normalized_score"])


# --------------------------------------------------------------------------------------------------
# End to end on a D4RL-format file
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_d4rl_file(tmp_path, capsys, monkeypatch):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    runs = tmp_path / "runs"
    records = record_updates(monkeypatch)
    result = xql.main(
        xql.Args(
            env_id="hopper-medium-v2",
            dataset_path=str(path),
            runs_dir=str(runs),
            max_steps=300,
            eval_freq=150,
            eval_episodes=2,
            save_model=True,
            exp_name="xql",
            **TINY,
        )
    )
    out = capsys.readouterr().out
    assert (
        "value_loss=gumbel, beta=2.0, loss_clip=7.0, batch_size=64, num_v_updates=1, "
        "awr_temperature=3.0, expectile=0.7, cosine_actor_lr=True"
    ) in out
    assert "eval env Hopper-v4" in out and "step 300/300 | SPS" in out
    assert "step 300/300 | eval return" in out
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == runs and run_dir.name.startswith("hopper-medium-v2__xql__1__")
    assert f"final normalised score {result['final_normalized_score']:.1f}" in out
    assert out.rstrip().endswith(f"; run folder {run_dir}; checkpoint {run_dir / 'checkpoint.pt'}")
    # TensorBoard has what `update` returned at each logged step, every tag of it
    tags = scalars(run_dir)
    assert len(records) == 300 and all(tuple(record) == TAGS for record in records)
    for tag in TAGS:
        logged = [records[step - 1][tag] for step in range(50, 301, 50)]
        assert tags[tag] == pytest.approx(logged, rel=1e-6, abs=1e-30), tag
    assert len(tags["charts/SPS"]) == 6 and all(v > 0 for v in tags["charts/SPS"])
    assert len(tags["eval/normalized_score"]) == 2 and len(tags["eval/episodic_return"]) == 2
    assert tags["eval/normalized_score"][-1] == pytest.approx(result["final_normalized_score"])
    assert max(tags["eval/normalized_score"]) == pytest.approx(result["best_normalized_score"])
    assert [e[0] for e in result["evaluations"]] == [150, 300]
    expected = cosine_lrs(range(50, 301, 50), 300)
    assert tags["charts/actor_lr"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["final_normalized_score"] == pytest.approx(result["final_normalized_score"])
    assert on_disk["evaluations"] == [list(e) for e in result["evaluations"]]
    assert not list(run_dir.glob("*.tmp*"))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 300 and ckpt["args"]["beta"] == 2.0 and ckpt["env_spec"] == "Hopper-v4"
    assert set(ckpt["optimizers"]) == {"value", "actor_critic"}
    assert "online_rows" not in ckpt  # --save-model's checkpoint is not a resumable one
    # Only the actor's lr follows the cosine (its last step's: update 299 of 300); the critics'
    # and V's stay at --learning-rate.
    groups = ckpt["optimizers"]["actor_critic"]["param_groups"]
    last = cosine_lrs([300], 300)[0]
    assert last == pytest.approx(3e-4 * (1 + math.cos(math.pi * 299 / 300)) / 2)
    assert float(groups[0]["lr"]) == pytest.approx(last, rel=1e-6)
    assert torch.equal(groups[1]["lr"], torch.tensor(3e-4))
    assert torch.equal(ckpt["optimizers"]["value"]["param_groups"][0]["lr"], torch.tensor(3e-4))
    assert all(torch.isfinite(v).all() for v in ckpt["agent"].values() if v.is_floating_point())
    # The documented way to evaluate a saved checkpoint.
    checkpoint = str(run_dir / "checkpoint.pt")
    evaluated = xql.main(xql.Args(eval_only=True, checkpoint=checkpoint, cuda=False))
    assert len(evaluated["returns"]) == 2 and math.isfinite(evaluated["normalized_score"])
    assert len(run_dirs(runs)) == 1


def test_d4rl_name_is_read_from_d4rl_dataset_dir(tmp_path, monkeypatch, capsys):
    """--env-id hopper-medium-v2 alone reads d4rl's file name (hopper_medium-v2.hdf5) in
    $D4RL_DATASET_DIR: `main` trains on that file's transitions (the rows qlearning_dataset keeps,
    rewards x 1000 / (max - min episode return)), and the dataset's return is the file's."""
    folder = tmp_path / "datasets"
    folder.mkdir()
    path = write_d4rl_file(folder / "hopper_medium-v2.hdf5", seed=4, reward_scale=2.0)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(folder))
    RecordingBuffer.instances.clear()
    monkeypatch.setattr(xql, "ReplayBuffer", RecordingBuffer)
    runs = str(tmp_path / "runs")
    result = xql.main(
        xql.Args(env_id="hopper-medium-v2", runs_dir=runs, max_steps=2, eval_episodes=1, **TINY)
    )
    (buffer,) = RecordingBuffer.instances
    raw = read_file(path)
    keep = file_transitions(path)
    returns = file_episode_returns(path)
    scale = 1000 / (returns.max() - returns.min())
    obs, actions, rewards, next_obs, terminated, truncated = buffer_columns(buffer)
    assert buffer.size == len(keep) == 475
    np.testing.assert_array_equal(obs.numpy(), raw["observations"][keep])
    np.testing.assert_array_equal(next_obs.numpy(), raw["observations"][keep + 1])
    np.testing.assert_allclose(rewards.numpy(), raw["rewards"][keep] * scale, rtol=1e-6)
    clipped = np.clip(raw["actions"][keep], -1 + 1e-5, 1 - 1e-5)
    np.testing.assert_allclose(actions.numpy(), clipped, rtol=1e-6)
    assert terminated.sum() == 3 and truncated.sum() == 0  # episodes 1, 3, 5 (7's end: dropped)
    assert result["dataset_return"] == pytest.approx(returns.mean(), rel=1e-9)
    low, high = HOPPER_REF
    expected = 100 * (returns.mean() - low) / (high - low)
    assert result["dataset_normalized_score"] == pytest.approx(expected, rel=1e-9)
    assert f"xql_offline: hopper-medium-v2, 475 transitions, rewards x {scale:.4g} + 0" in (
        capsys.readouterr().out
    )


def test_iql_arm_and_skipped_evaluation(tmp_path, capsys):
    """--value-loss expectile on a kitchen-named file: trains, says evaluation is skipped."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    result = xql.main(
        xql.Args(
            env_id="kitchen-partial-v0",
            dataset_path=str(path),
            runs_dir=str(tmp_path / "runs"),
            max_steps=100,
            value_loss="expectile",
            num_v_updates=2,
            **TINY,
        )
    )
    out = capsys.readouterr().out
    skipped = "xql_offline: evaluation skipped: D4RL's kitchen observations match no gymnasium env"
    assert skipped in out
    assert "value_loss=expectile" in out and "num_v_updates=2" in out
    assert result["final_normalized_score"] is None and "kitchen" in result["evaluation_skipped"]
    assert result["evaluations"] == [] and result["final_return"] is None
    tags = scalars(result["run_dir"])
    assert all(math.isfinite(v) for v in tags["losses/v_loss"])
    assert "eval/normalized_score" not in tags and "eval/episodic_return" not in tags


# --------------------------------------------------------------------------------------------------
# A dataset of one's own (issue 11 item 6)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_custom_dataset_is_not_hopper(tmp_path, capsys, monkeypatch):
    """--dataset-path my_pendulum.hdf5 alone: named after the file, rewards untouched, evaluated on
    the file's env_id attribute with raw returns and no normalised score, unless
    --ref-min/max-score are given."""
    path = write_d4rl_file(
        tmp_path / "my_pendulum.hdf5",
        obs_dim=3,
        act_dim=1,
        reward_scale=2.0,
        reward_shift=-6.0,
        attrs={"env_id": "Pendulum-v1"},
    )
    file_rewards = read_file(path)["rewards"][file_transitions(path)]
    data = xql.load_dataset(resolved(dataset_path=str(path)))
    np.testing.assert_array_equal(data["rewards"], file_rewards)
    transforms = (data["reward_scale"], data["reward_shift"], data["env_spec"], data["ref"])
    assert transforms == (1.0, 0.0, "Pendulum-v1", (None, None))
    RecordingBuffer.instances.clear()
    monkeypatch.setattr(xql, "ReplayBuffer", RecordingBuffer)
    runs = tmp_path / "runs"
    result = xql.main(
        xql.Args(
            dataset_path=str(path),
            runs_dir=str(runs),
            max_steps=100,
            eval_freq=50,
            eval_episodes=2,
            **TINY,
        )
    )
    out = capsys.readouterr().out
    run_dir = Path(result["run_dir"])
    assert run_dir.name.startswith("my_pendulum__xql_offline__1__")
    assert result["env_id"] == "my_pendulum"
    assert "xql_offline: my_pendulum, 475 transitions, rewards x 1 + 0, eval env Pendulum-v1" in out
    assert "xql_offline: no reference returns" in out and "normalised" not in out
    (buffer,) = RecordingBuffer.instances
    assert buffer.size == len(file_rewards) == 475
    torch.testing.assert_close(
        buffer_columns(buffer)[2], torch.as_tensor(file_rewards), rtol=0, atol=0
    )
    assert [(e[0], e[2]) for e in result["evaluations"]] == [(50, None), (100, None)]
    assert isinstance(result["final_return"], float)
    assert result["final_return"] == result["evaluations"][-1][1]
    assert -16.3 * 200 < result["final_return"] <= 0  # Pendulum's reward is in [-16.3, 0]
    assert result["final_normalized_score"] is None and result["best_normalized_score"] is None
    assert result["dataset_normalized_score"] is None and result["evaluation_skipped"] is None
    returns = file_episode_returns(path)
    assert result["dataset_return"] == pytest.approx(returns.mean(), rel=1e-9)
    tags = scalars(run_dir)
    assert "eval/normalized_score" not in tags and len(tags["eval/episodic_return"]) == 2
    # With reference returns of the user's choosing, the score is 100 (R - min) / (max - min).
    low, high = -1500.0, -100.0
    result = xql.main(
        xql.Args(
            dataset_path=str(path),
            runs_dir=str(runs),
            max_steps=50,
            eval_freq=0,
            eval_episodes=2,
            ref_min_score=low,
            ref_max_score=high,
            **TINY,
        )
    )
    ((step, episode_return, score),) = result["evaluations"]
    assert step == 50 and score == pytest.approx(100 * (episode_return - low) / (high - low))
    assert result["final_normalized_score"] == pytest.approx(score)
    expected = 100 * (returns.mean() - low) / (high - low)
    assert result["dataset_normalized_score"] == pytest.approx(expected, rel=1e-9)
    assert scalars(result["run_dir"])["eval/normalized_score"] == [pytest.approx(score)]


def test_custom_dataset_without_env(tmp_path, capsys):
    """A file with no env_id attribute and no --eval-env-id: trains, says why it is not
    evaluated."""
    path = write_d4rl_file(tmp_path / "mine.hdf5", obs_dim=4, act_dim=2)
    result = xql.main(
        xql.Args(dataset_path=str(path), runs_dir=str(tmp_path / "runs"), max_steps=50, **TINY)
    )
    out = capsys.readouterr().out
    assert "xql_offline: evaluation skipped: pass --eval-env-id to evaluate" in out
    assert result["evaluation_skipped"] == "pass --eval-env-id to evaluate"
    assert result["final_return"] is None
    assert Path(result["run_dir"]).name.startswith("mine__xql_offline__1__")


# --------------------------------------------------------------------------------------------------
# The NaN stop
# --------------------------------------------------------------------------------------------------
def poison_batches_from(monkeypatch, first: int) -> list:
    """From the `first`-th batch on, `sample` returns rewards of 1e37: finite in float32, but their
    squared TD error is not. Returns the list of calls."""
    calls = []
    sample = xql.ReplayBuffer.sample

    def poisoned(self, batch_size):
        calls.append(1)
        obs, actions, rewards, next_obs, terminated = sample(self, batch_size)
        if len(calls) >= first:
            rewards = torch.full_like(rewards, 1e37)
        return obs, actions, rewards, next_obs, terminated

    monkeypatch.setattr(xql.ReplayBuffer, "sample", poisoned)
    return calls


def test_nonfinite_loss_stops_the_run(tmp_path):
    """Rewards of ~1e37 make the first update's Q loss inf: the run stops at step 1, saving the
    step-0 parameters (no --save-model needed)."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9, reward_scale=1e37)
    with pytest.raises(SystemExit) as info:
        xql.main(
            xql.Args(
                env_id="kitchen-partial-v0",
                dataset_path=str(path),
                runs_dir=str(tmp_path / "runs"),
                max_steps=100,
                **TINY,
            )
        )
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert info.value.code == (
        "xql_offline: a loss became NaN/inf at step 1; last finite values (step 0): none yet; "
        f"parameters of step 0 saved to {run_dir / 'last_finite_checkpoint.pt'}. "
        "Try a larger --beta or a smaller --loss-clip."
    )
    saved = xql.load_checkpoint(str(run_dir / "last_finite_checkpoint.pt"))
    assert saved["step"] == 0 and not (run_dir / "checkpoint.pt").exists()


def test_nonfinite_loss_keeps_the_last_finite_interval(tmp_path, monkeypatch):
    """Batches turn to rewards of 1e37 from step 61 on: the run stops at once (the check follows
    every update), the message names step 61 and the values logged at step 50 (what `update`
    returned then and the actor lr), and the saved parameters are those of step 50."""
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    calls = poison_batches_from(monkeypatch, 61)
    records = []
    at_step_50 = {}
    update = xql.update

    def recording(agent, optimizers, batch, args):
        losses = update(agent, optimizers, batch, args)
        records.append({tag: value.item() for tag, value in losses.items()})
        if len(records) == 50:
            at_step_50.update({k: v.clone() for k, v in agent.state_dict().items()})
        return losses

    monkeypatch.setattr(xql, "update", recording)
    with pytest.raises(SystemExit) as info:
        xql.main(
            xql.Args(
                env_id="kitchen-partial-v0",
                dataset_path=str(path),
                runs_dir=str(tmp_path / "runs"),
                max_steps=200,
                **TINY,
            )
        )
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert len(calls) == 61
    logged = dict(records[49], **{"charts/actor_lr": float(np.float32(cosine_lrs([50], 200)[0]))})
    values = ", ".join(f"{tag.split('/')[1]}={value:.4g}" for tag, value in logged.items())
    assert info.value.code == (
        f"xql_offline: a loss became NaN/inf at step 61; last finite values (step 50): {values}; "
        f"parameters of step 50 saved to {run_dir / 'last_finite_checkpoint.pt'}. "
        "Try a larger --beta or a smaller --loss-clip."
    )
    saved = xql.load_checkpoint(str(run_dir / "last_finite_checkpoint.pt"))
    assert saved["step"] == 50 and saved["args"]["env_id"] == "kitchen-partial-v0"
    assert saved["agent"].keys() == at_step_50.keys()
    assert all(torch.equal(saved["agent"][k], at_step_50[k]) for k in at_step_50)
    assert all(math.isfinite(value) for value in logged.values())


def test_last_finite_checkpoint_serves_eval_only(tmp_path, monkeypatch):
    """What a NaN stop saves is a checkpoint --eval-only can use: the last finite parameters with
    the data's state statistics (here --normalize-states, which the eval env must apply), eval env
    and reference returns."""
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    poison_batches_from(monkeypatch, 61)
    common = dict(env_id="hopper-medium-v2", dataset_path=str(path), normalize_states=True)
    with pytest.raises(SystemExit, match="a loss became NaN/inf at step 61"):
        xql.main(
            xql.Args(runs_dir=str(tmp_path / "runs"), max_steps=200, eval_freq=0, **common, **TINY)
        )
    (run_dir,) = run_dirs(tmp_path / "runs")
    saved = torch.load(run_dir / "last_finite_checkpoint.pt", weights_only=False)
    data = xql.load_dataset(resolved(**common))
    assert saved["step"] == 50 and set(saved["values"]) == {*TAGS, "charts/actor_lr"}
    assert saved["env_spec"] == "Hopper-v4" and saved["ref"] == HOPPER_REF
    np.testing.assert_array_equal(saved["obs_mean"], data["obs_mean"])
    np.testing.assert_array_equal(saved["obs_std"], data["obs_std"])
    observations = read_file(path)["observations"][file_transitions(path)]
    np.testing.assert_allclose(saved["obs_mean"], observations.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved["obs_std"], observations.std(0) + 1e-3, rtol=1e-5)
    checkpoint = str(run_dir / "last_finite_checkpoint.pt")
    evaluated = xql.main(
        xql.Args(eval_only=True, checkpoint=checkpoint, eval_episodes=1, cuda=False)
    )
    assert len(evaluated["returns"]) == 1 and math.isfinite(evaluated["normalized_score"])


# --------------------------------------------------------------------------------------------------
# Fast path (issue 12): compiled update and bf16 matmuls against eager fp32, through real updates
# --------------------------------------------------------------------------------------------------
def losses_of(update, steps=3, **overrides):
    """What `steps` real updates from one seed on fixed batches return: (steps, len(TAGS))."""
    buffer = random_buffer()
    torch.manual_seed(1)
    batches = [buffer.sample(32) for _ in range(steps)]
    args, agent, optimizers = make_agent(batch_size=32, **overrides)
    out = []
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # --noise / --sample-random-times draw from it
        losses = update(agent, optimizers, batch, args)
        out.append(torch.stack([losses[tag] for tag in TAGS]))
    return torch.stack(out)


@pytest.mark.slow
def test_compiled_update_matches_eager():
    """--compile (`main` compiles `update`) through real updates, with both V-fitting augmentations
    on and 2 V steps, so that the compiled graphs draw random numbers and V's runs twice per
    step: 3 steps' losses agree with eager within rtol 1e-4 / atol 1e-5 (fusion reorders float32
    sums; nothing else may differ). Dynamo must have made graphs: were it to run `update` eagerly,
    the comparison would pass and this fail. `fallback_random` makes the compiled draws come from
    eager's RNG stream."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    augmented = dict(noise=True, sample_random_times=1, num_v_updates=2)
    eager = losses_of(xql.update, **augmented)
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = losses_of(torch.compile(xql.update), **augmented)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert torch.isfinite(eager).all() and eager.shape == (3, len(TAGS))
    assert not torch.equal(eager[0], eager[-1])  # the steps did change the networks
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_update_matches_fp32():
    """--matmul-precision medium runs the update under bf16 autocast, each network's output layer
    in fp32 (FP32Linear). Through 3 real updates the losses agree with fp32 within rtol 2e-2 /
    atol 2e-3 (bf16 keeps 8 mantissa bits, ~4e-3 relative per rounded operand; measured:
    <= 1.6%), but the actor loss within rtol 8e-2 (its AWR weight exp(3 (Q - V)) triples the
    advantage's error; measured: <= 5.3%), and differ from them (the rounding is real: the
    tolerance is not vacuous). Under autocast the hidden layers compute in bf16; Q, V and the
    actor's mean in fp32."""
    fp32 = losses_of(xql.update, hidden_dim=32)
    medium = losses_of(torch.autocast("cpu", torch.bfloat16)(xql.update), hidden_dim=32)
    assert torch.isfinite(medium).all() and (medium - fp32).abs().max() > 1e-5
    actor = TAGS.index("losses/actor_loss")
    others = [i for i in range(len(TAGS)) if i != actor]
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
    """--matmul-precision medium (and --compile) through `main`: the V loss is computed under bf16
    autocast (seen eagerly; compiled, Dynamo must have made graphs), 100 steps log finite losses,
    torch's fp32 matmuls stay at "highest" (its "medium" would round the fp32 output layers) and
    the evaluation runs."""
    from torch._dynamo.utils import counters

    seen = []
    gumbel_loss = xql.gumbel_loss

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return gumbel_loss(*args)

    if not compile:
        monkeypatch.setattr(xql, "gumbel_loss", spy)
    counters.clear()
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    result = xql.main(
        xql.Args(
            env_id="hopper-medium-v2",
            dataset_path=str(path),
            runs_dir=str(tmp_path / "runs"),
            max_steps=100,
            eval_episodes=1,
            matmul_precision="medium",
            compile=compile,
            **TINY,
        )
    )
    assert torch.get_float32_matmul_precision() == "highest"
    assert seen == ([] if compile else [True] * 100)
    assert counters["stats"]["unique_graphs"] >= (2 if compile else 0)
    tags = scalars(result["run_dir"])
    assert len(tags["losses/v_loss"]) == 2
    assert all(math.isfinite(v) for v in tags["losses/v_loss"] + tags["losses/q_loss"])
    assert [e[0] for e in result["evaluations"]] == [100]


# --------------------------------------------------------------------------------------------------
# Offline-to-online fine-tuning (its exact resume: test_offline_resume.py)
# --------------------------------------------------------------------------------------------------
def test_online_finetuning_needs_an_environment(tmp_path):
    path = write_d4rl_file(tmp_path / "k.hdf5", obs_dim=60, act_dim=9)
    expect_user_error(
        tmp_path,
        "--online-steps needs an environment: D4RL's kitchen observations match no gymnasium env",
        env_id="kitchen-partial-v0",
        dataset_path=str(path),
        online_steps=10,
    )


@pytest.mark.slow
def test_online_finetuning(tmp_path, capsys):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5")
    result = xql.main(
        xql.Args(
            env_id="hopper-medium-v2",
            dataset_path=str(path),
            runs_dir=str(tmp_path / "runs"),
            max_steps=100,
            online_steps=100,
            eval_freq=100,
            eval_episodes=1,
            checkpoint_freq=1000,  # one resumable checkpoint, at the end: it keeps the online rows
            **TINY,
        )
    )
    out = capsys.readouterr().out
    assert [e[0] for e in result["evaluations"]] == [100]
    assert [e[0] for e in result["online_evaluations"]] == [100]
    assert "step 200/200 | finetune return" in out
    ckpt = torch.load(Path(result["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 200 and ckpt["online_rows"].shape == (100, 11 + 3 + 1 + 11 + 1 + 1)
    # No lr decay in either phase when fine-tuning (the authors' fine-tuning configs).
    tags = scalars(result["run_dir"])
    assert tags["charts/actor_lr"] == pytest.approx([3e-4] * 4, rel=1e-6)
    assert len(tags["finetune/normalized_score"]) == 1 and len(tags["eval/normalized_score"]) == 1
    # Online rewards get the dataset's locomotion scaling 1000 / (max - min episode return):
    # Hopper's per-step reward is about 1 (the healthy bonus), so rewards / scale come back near
    # 1, and the first episode's stored rewards add up to its logged return times the scale.
    returns = file_episode_returns(path)
    scale = 1000.0 / (returns.max() - returns.min())
    rewards = ckpt["online_rows"][:, 14].double()
    assert scale > 5 and 0.5 < float(rewards.median()) / scale < 2.0
    ends = ckpt["online_rows"][:, 26] + ckpt["online_rows"][:, 27]  # terminated, truncated
    first_end = int(torch.nonzero(ends)[0])
    episode_return = tags["charts/episodic_return"][0]
    assert float(rewards[: first_end + 1].sum()) == pytest.approx(episode_return * scale, rel=1e-4)
    # Table 2's before -> after: the normalised scores of each phase's last evaluation.
    low, high = HOPPER_REF
    before = 100 * (result["evaluations"][-1][1] - low) / (high - low)
    after = 100 * (result["online_evaluations"][-1][1] - low) / (high - low)
    assert result["finetune_before"] == pytest.approx(before)
    assert result["finetune_after"] == pytest.approx(after)
    change = f"normalised score {before:.1f} -> {after:.1f}"
    assert f"xql_offline: fine-tuning hopper-medium-v2: {change}" in out
    assert tags["finetune/normalized_score"] == [pytest.approx(after)]
    assert len(tags["losses/q_loss"]) == 4 and all(math.isfinite(v) for v in tags["losses/q_loss"])
