"""Tests of xql_offline.py's checkpoints on a short Pendulum dataset: --eval-only reproduces a run's
final evaluation from what its checkpoint stores (the agent and the observation statistics), and
--resume continues a run stopped by a signal exactly (bit for bit on the CPU: parameters,
evaluations, fine-tuning data), offline and mid-episode while fine-tuning, in the run's own
folder; a checkpoint it cannot continue is refused in one line before anything is written."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from conftest import load_script

xql = load_script("xql_offline")

TINY = dict(hidden_dim=32, batch_size=64, eval_episodes=1, cuda=False)


@pytest.fixture(scope="module")
def pendulum_file(tmp_path_factory) -> str:
    """pendulum.hdf5: 3 episodes of 200 random-action steps of Pendulum-v1 in D4RL's layout
    (actions in [-1, 1], timeouts), its env_id attribute naming the eval env."""
    path = tmp_path_factory.mktemp("data") / "pendulum.hdf5"
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(0)
    columns = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        done = False
        while not done:
            action = rng.uniform(-1, 1, 1).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(2 * action)
            for key, value in zip(columns, (obs, action, reward, terminated, truncated)):
                columns[key].append(value)
            obs = next_obs
            done = terminated or truncated
    with h5py.File(path, "w") as f:
        for key, value in columns.items():
            f[key] = np.array(value)
        f.attrs["env_id"] = "Pendulum-v1"
    return str(path)


@pytest.fixture
def stop_at(monkeypatch):
    """A list of (step, signal): at the log of that step the process sends itself that signal
    (SIGTERM, or SIGUSR1: Slurm's notices before it stops or requeues a job); the script's handler
    notes it, and the run checkpoints at the end of that step and exits. The handlers a stopped
    run leaves installed are replaced afterwards by those pytest had."""
    steps = []
    log_progress = xql.log_progress

    def log_and_stop(writer, values, step, *rest):
        log_progress(writer, values, step, *rest)
        for stop_step, number in steps:
            if step == stop_step:
                os.kill(os.getpid(), number)

    monkeypatch.setattr(xql, "log_progress", log_and_stop)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}

    def unhandled(number, frame):  # `main` installs its own: were it not to, fail (not die)
        raise AssertionError(f"xql_offline does not handle {signal.Signals(number).name}")

    for number in handlers:
        signal.signal(number, unhandled)
    yield steps
    for number, handler in handlers.items():
        signal.signal(number, handler)


def listing(folder) -> dict:
    """Every file under `folder` with its size and modification time: to see nothing was written."""
    files = sorted(Path(folder).rglob("*"))
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def stopped_run(settings: dict, runs: Path, step: int, stop_at, number=signal.SIGTERM) -> Path:
    """Run `settings` in `runs`, stopped by signal `number` at `step`: returns its checkpoint."""
    stop_at.append((step, number))
    with pytest.raises(SystemExit) as info:
        xql.main(xql.Args(runs_dir=str(runs), **settings))
    stop_at.clear()
    (run_dir,) = sorted(runs.iterdir())
    checkpoint = run_dir / "checkpoint.pt"
    assert info.value.code == (
        f"xql_offline: stopped by a signal at step {step}; --resume {checkpoint}"
    )
    assert load(checkpoint)["step"] == step
    return checkpoint


def assert_same_run(whole: dict, resumed: dict, online_rows=False):
    """The final checkpoints hold equal tensors, bit for bit, and the evaluations are equal."""
    a = load(Path(whole["run_dir"]) / "checkpoint.pt")
    b = load(Path(resumed["run_dir"]) / "checkpoint.pt")
    assert a["step"] == b["step"] and a["agent"].keys() == b["agent"].keys()
    different = [key for key in a["agent"] if not torch.equal(a["agent"][key], b["agent"][key])]
    assert different == []
    for name in ("value", "actor_critic"):  # Adam's moments too
        assert len(a["optimizers"][name]["state"]) == len(b["optimizers"][name]["state"]) > 0
        for state_a, state_b in zip(
            a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()
        ):
            assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    if online_rows:
        assert torch.equal(a["online_rows"], b["online_rows"])
    assert resumed["evaluations"] == whole["evaluations"]
    assert resumed["online_evaluations"] == whole["online_evaluations"]


def logged_losses(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [tag for tag in acc.Tags()["scalars"] if tag.startswith(("losses/", "eval", "fine"))]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def test_eval_only_reproduces_the_final_evaluation(tmp_path, pendulum_file):
    """--normalize-states --save-model --eval-freq 0: one evaluation, at the end, on the eval env
    seeded with seed + 10000. --eval-only with that seed on the checkpoint returns the same
    episodes' returns exactly; not with the agent re-initialised, nor with the observation
    statistics made the identity (they are far from it: Pendulum's angular velocity has std ~4)."""
    settings = dict(normalize_states=True, save_model=True, eval_freq=0, **TINY)
    settings |= dict(dataset_path=pendulum_file, max_steps=60, log_freq=30, eval_episodes=2)
    result = xql.main(xql.Args(runs_dir=str(tmp_path / "runs"), **settings))
    ((step, final_return, _),) = result["evaluations"]
    checkpoint = Path(result["run_dir"]) / "checkpoint.pt"

    def eval_only(path) -> list:
        return xql.main(xql.Args(eval_only=True, checkpoint=str(path), cuda=False))["returns"]

    returns = eval_only(checkpoint)
    assert step == 60 and len(returns) == 2 and np.mean(returns) == final_return
    other_seed = xql.main(xql.Args(eval_only=True, checkpoint=str(checkpoint), seed=2, cuda=False))
    assert not np.isin(other_seed["returns"], returns).any()  # the eval env is seeded seed + 10000
    saved = load(checkpoint)
    assert np.abs(saved["obs_std"] - 1).max() > 1 and np.abs(saved["obs_mean"]).max() > 0.1
    torch.manual_seed(123)
    fresh = xql.Agent(3, 1, xql.Args(**saved["args"])).state_dict()
    torch.save(dict(saved, agent=fresh), tmp_path / "fresh.pt")
    identity = dict(obs_mean=np.zeros(3, np.float32), obs_std=np.ones(3, np.float32))
    torch.save(dict(saved, **identity), tmp_path / "identity.pt")
    for other in (eval_only(tmp_path / "fresh.pt"), eval_only(tmp_path / "identity.pt")):
        assert not np.isin(other, returns).any()


def test_offline_run_resumed_ends_as_uninterrupted(tmp_path, pendulum_file, stop_at, capsys):
    """Stopped by SIGTERM at step 45 of 90 (after the evaluation of step 30), then resumed: the
    same parameters and Adam state bit for bit, the same evaluations and logged losses as the run
    left alone; the resumed run says so in one line and stays in the stopped run's folder."""
    settings = dict(dataset_path=pendulum_file, max_steps=90, log_freq=15, eval_freq=30, **TINY)
    settings["save_model"] = True
    whole = xql.main(xql.Args(runs_dir=str(tmp_path / "whole"), **settings))
    parts = tmp_path / "parts"
    checkpoint = stopped_run(settings, parts, 45, stop_at)
    run_dir = checkpoint.parent
    capsys.readouterr()
    resumed = xql.main(xql.Args(resume=str(checkpoint), **settings))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("xql_offline: resumed")] == [
        f"xql_offline: resumed {run_dir} at step 45"
    ]
    assert resumed["run_dir"] == str(run_dir) and sorted(parts.iterdir()) == [run_dir]
    assert [e[0] for e in whole["evaluations"]] == [30, 60, 90]
    assert_same_run(whole, resumed)
    assert logged_losses(run_dir) == logged_losses(whole["run_dir"])


def test_finetuning_resumed_mid_episode_ends_as_uninterrupted(tmp_path, pendulum_file, stop_at):
    """Stopped at step 80: fine-tuning step 50, in the middle of a 200-step Pendulum episode (and
    after an evaluation). Resumed, the episode in progress is replayed into a new env, every random
    state restored: the same online data, parameters and evaluations as the run left alone."""
    settings = dict(dataset_path=pendulum_file, max_steps=30, online_steps=90, log_freq=10, **TINY)
    settings |= dict(eval_freq=40, checkpoint_freq=1000)  # a resumable checkpoint at the end
    whole = xql.main(xql.Args(runs_dir=str(tmp_path / "whole"), **settings))
    checkpoint = stopped_run(settings, tmp_path / "parts", 80, stop_at)
    saved = load(checkpoint)
    train_episode, eval_episode = saved["episodes"]
    assert len(saved["online_rows"]) == 50 and len(train_episode["actions"]) == 50
    assert len(eval_episode["actions"]) == 200  # the eval env's last episode: done
    resumed = xql.main(xql.Args(resume=str(checkpoint), **settings))
    assert [e[0] for e in whole["online_evaluations"]] == [40, 80, 90]
    assert_same_run(whole, resumed, online_rows=True)


def test_resume_refuses_what_it_cannot_continue(tmp_path, pendulum_file, stop_at):
    """--resume refuses, in one line and before anything is written: a checkpoint of another
    script, one of other settings or another dataset, and --save-model's (not resumable). (The
    resumable one here is from a run stopped by SIGUSR1.)"""
    settings = dict(dataset_path=pendulum_file, max_steps=20, log_freq=10, eval_freq=0, **TINY)
    checkpoint = stopped_run(settings, tmp_path / "runs", 10, stop_at, signal.SIGUSR1)
    saved = load(checkpoint)
    torch.save(dict(saved, script="xsac_continuous"), tmp_path / "xsac.pt")
    model_only = xql.main(xql.Args(runs_dir=str(tmp_path / "model"), save_model=True, **settings))
    model_only = Path(model_only["run_dir"]) / "checkpoint.pt"
    same_name = tmp_path / "elsewhere" / "pendulum.hdf5"
    same_name.parent.mkdir()
    same_name.write_bytes(Path(pendulum_file).read_bytes())
    before = listing(tmp_path)
    cases = [
        (
            dict(resume=str(tmp_path / "xsac.pt")),
            f"{tmp_path / 'xsac.pt'} is not a checkpoint of xql_offline --save-model "
            "(AssertionError).",
        ),
        (
            dict(resume=str(checkpoint), beta=3.0),
            f"--resume {checkpoint} was trained with --beta 2.0: resume with its settings.",
        ),
        (
            dict(resume=str(checkpoint), dataset_path=str(same_name)),
            f"--resume {checkpoint} was trained with --dataset-path {pendulum_file}: resume with "
            "its settings.",
        ),
        (
            dict(resume=str(model_only)),
            f"--resume {model_only} holds no training state (--save-model's); --checkpoint-freq N "
            "writes one.",
        ),
    ]
    for changes, message in cases:
        args = xql.Args(runs_dir=str(tmp_path / "new"), **{**settings, **changes})
        with pytest.raises(SystemExit) as info:
            xql.main(args)
        assert info.value.code == f"xql_offline: {message}"
        assert listing(tmp_path) == before
