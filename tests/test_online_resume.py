"""--checkpoint-freq, signals and --resume in the online scripts (issue 18, item 8).

A run stopped by SIGTERM at the end of an iteration and resumed from its checkpoint must end bit
for bit where the same run uninterrupted ends: every tensor of the agent and of the optimisers,
and every evaluation return. The cases stop runs in the random phase (the action space's random
stream) and in the learning phase (torch's, numpy's and the replay buffer's), mid-episode (the
episodes in progress are replayed), with one env and two, on Pendulum, on a dm_control task and on
a MuJoCo task with terminations. In-process, the signal comes from a patched `log_progress` (or,
before learning starts, when nothing is logged, a patched `ReplayBuffer.add`); one CLI run gets it
from outside. Resuming refuses, in one line and before anything is written, what it cannot
continue.
"""

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, scripts_defining

ONLINE = scripts_defining("save_buffer")
BASE = dict(total_timesteps=300, learning_starts=100, hidden_dim=16, batch_size=16, log_freq=25)
BASE |= dict(eval_freq=100, eval_episodes=1, seed=4, cuda=False, save_model=True)
# (env id, --num-envs, --eval-freq, the steps to stop at): each stop is mid-episode in every env;
# steps up to learning_starts (100) are in the random phase.
CASES = [
    ("Pendulum-v1", 1, 100, [70, 250]),  # 250: in the second episode, begun by an unseeded reset
    ("Pendulum-v1", 2, 100, [150]),
    ("dm_control/cartpole-swingup-v0", 2, 150, [50, 200]),
    ("Hopper-v4", 2, 100, [226]),  # both envs past their second episode
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_at(monkeypatch, module, step: int) -> None:
    """Send this process SIGTERM during env step `step`, as a cluster's scheduler would."""
    if step > BASE["learning_starts"]:
        log_progress = module.log_progress

        def logged(writer, values, at, *rest):
            log_progress(writer, values, at, *rest)
            if at == step:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(module, "log_progress", logged)
    else:  # before learning starts nothing is logged: stop when the step's transitions are stored
        add = module.ReplayBuffer.add

        def stored(self, *columns):
            add(self, *columns)
            if self.size == step:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(module.ReplayBuffer, "add", stored)


def assert_same_tensors(got: dict, expected: dict, where: str) -> None:
    assert got.keys() == expected.keys(), where
    for key, tensor in expected.items():
        if isinstance(tensor, dict):
            assert_same_tensors(got[key], tensor, f"{where}.{key}")
        elif isinstance(tensor, torch.Tensor):
            assert torch.equal(got[key], tensor), f"{where}.{key}"
        else:
            assert got[key] == tensor, f"{where}.{key}"


@pytest.mark.parametrize("stem", ONLINE)
@pytest.mark.parametrize(
    "env_id, num_envs, eval_freq, stops", CASES, ids=[f"{c[0]}-{c[1]}env" for c in CASES]
)
def test_resumed_run_ends_bit_for_bit_like_the_uninterrupted_one(
    stem, env_id, num_envs, eval_freq, stops, tmp_path, monkeypatch, capsys
):
    module = load_script(stem)
    settings = dict(BASE, env_id=env_id, num_envs=num_envs, eval_freq=eval_freq)
    whole = module.main(module.Args(**settings, run_dir=str(tmp_path / "whole")))
    expected = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    assert len(whole["evaluations"]) >= 2
    for stop in stops:
        run_dir = tmp_path / f"stopped_at_{stop}"
        args = module.Args(**settings, run_dir=str(run_dir))
        with monkeypatch.context() as patch:
            stop_at(patch, module, stop)
            with pytest.raises(SystemExit) as stopped:
                module.main(args)
        path = run_dir / "checkpoint.pt"
        assert stopped.value.code == f"{stem}: stopped by a signal at step {stop}; --resume {path}"
        assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["step"] == checkpoint["state"]["step"] == stop
        assert len(checkpoint["rows"]) == checkpoint["ptr"] == stop
        updates = max(0, stop - BASE["learning_starts"] + num_envs)  # from learning starts on
        assert checkpoint["state"]["num_updates"] == updates
        # mid-episode: every training env has stepped since its last reset
        episodes = checkpoint["episodes"][:num_envs]
        assert all(len(episode["actions"]) > 0 for episode in episodes), stop

        capsys.readouterr()
        resumed = module.main(dataclasses.replace(args, resume=str(path)))
        out = capsys.readouterr().out
        assert f"\n{stem}: resumed {run_dir} at step {stop}\n" in out
        assert resumed["run_dir"] == str(run_dir)
        assert resumed["evaluations"] == whole["evaluations"]
        assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
        final = torch.load(path, weights_only=False)
        assert final["step"] == expected["step"] == settings["total_timesteps"]
        assert_same_tensors(final["agent"], expected["agent"], f"stopped at {stop}: agent")
        assert_same_tensors(final["optimizers"], expected["optimizers"], "optimizers")


@pytest.mark.parametrize("stem", ONLINE)
def test_sigterm_from_outside_then_resume_on_the_command_line(stem, tmp_path):
    """The CLI with --checkpoint-freq gets SIGTERM once its first progress line is out: it ends
    the iteration, writes a resumable checkpoint, exits with status 1 and one line naming the step
    and the --resume command; the same command with --resume runs the remaining steps in the same
    folder (whatever --runs-dir says) and ends with the full number of steps."""
    module = load_script(stem)
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / f"{stem}.py"), "--env-id", "Pendulum-v1"]
    command += ["--total-timesteps", "1000", "--learning-starts", "100", "--hidden-dim", "16"]
    command += ["--batch-size", "16", "--log-freq", "100", "--eval-freq", "0"]
    command += ["--eval-episodes", "1", "--checkpoint-freq", "400", "--no-cuda"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in process.stdout:
        if line.startswith("step 100/1000 | SPS "):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    path = run_dir / "checkpoint.pt"
    message = stderr.splitlines()[-1]
    prefix = f"{stem}: stopped by a signal at step "
    assert message.startswith(prefix) and message.endswith(f"; --resume {path}")
    stop = int(message[len(prefix) :].split(";")[0])
    assert 100 <= stop < 1000
    checkpoint = module.load_checkpoint(str(path))
    assert checkpoint["step"] == stop and len(checkpoint["rows"]) == stop
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]

    elsewhere = tmp_path / "elsewhere"
    resumed = subprocess.run(
        [*command, "--runs-dir", str(elsewhere), "--resume", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = resumed.stdout.splitlines()
    assert f"{stem}: resumed {run_dir} at step {stop}" in lines
    progress = [int(line.split()[1].split("/")[0]) for line in lines if " | SPS " in line]
    assert progress == list(range((stop // 100 + 1) * 100, 1001, 100))
    closing = f"; run folder {run_dir}; checkpoint {path}"
    assert lines[-1].startswith(f"{stem}: done, final eval return ") and lines[-1].endswith(closing)
    final = module.load_checkpoint(str(path))
    assert final["step"] == 1000 and len(final["rows"]) == 1000
    assert final["state"]["num_updates"] == 1000 - 100 + 1
    assert not elsewhere.exists()


def folder_state(folder) -> dict:
    return {path: os.stat(path).st_mtime_ns for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("stem", ONLINE)
def test_resume_refuses_what_it_cannot_continue(stem, tmp_path, capsys, monkeypatch):
    """--checkpoint-freq N writes a resumable checkpoint every N env steps and at the end,
    --save-model one that is not. A checkpoint of the other script, one of another env or other
    settings, and a --save-model-only checkpoint are refused in one line, before anything is
    written; where the run writes and how often it checkpoints may change."""
    module = load_script(stem)
    settings = dict(env_id="Pendulum-v1", total_timesteps=120, learning_starts=100)
    settings |= dict(hidden_dim=16, batch_size=16, eval_freq=0, eval_episodes=1, cuda=False)
    written = []
    save_checkpoint = module.save_checkpoint

    def spy(args, state, agent, optimizers, resumable=None):
        written.append((os.path.basename(args.run_dir), state["step"], resumable is not None))
        save_checkpoint(args, state, agent, optimizers, resumable)

    with monkeypatch.context() as patch:
        patch.setattr(module, "save_checkpoint", spy)
        module.main(module.Args(**settings, checkpoint_freq=50, run_dir=str(tmp_path / "run")))
        module.main(module.Args(**settings, save_model=True, run_dir=str(tmp_path / "model")))
    assert written == [("run", 50, True), ("run", 100, True), ("run", 120, True)] + [
        ("model", 120, False)
    ]
    path = tmp_path / "run" / "checkpoint.pt"
    model = tmp_path / "model" / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)["args"]
    others = [other for other in ONLINE if other != stem]
    for other in others:
        other_settings = {**settings, "run_dir": str(tmp_path / other), "checkpoint_freq": 60}
        load_script(other).main(load_script(other).Args(**other_settings))
    before = folder_state(tmp_path)
    runs = tmp_path / "runs"
    refused = [
        (dict(resume=str(model)), f"--resume {model} holds no training state (--save-model's); "),
        (dict(resume=str(path), env_id="dm_control/cartpole-swingup-v0"), "--env-id Pendulum-v1"),
        (dict(resume=str(path), learning_rate=0.5), f"--learning-rate {saved['learning_rate']}"),
        (dict(resume=str(path), seed=2), "--seed 1"),
    ]
    for other in others:
        other_path = tmp_path / other / "checkpoint.pt"
        problem = f"{other_path} is not a checkpoint of {stem} --save-model (AssertionError)."
        refused.append((dict(resume=str(other_path)), problem))
    capsys.readouterr()
    for overrides, problem in refused:
        args = module.Args(**{**settings, "runs_dir": str(runs), **overrides})
        with pytest.raises(SystemExit) as error:
            module.main(args)
        message = str(error.value.code)
        assert message.startswith(f"{stem}: ") and "\n" not in message
        if "is not a checkpoint" in problem:
            assert message == f"{stem}: {problem}"
        elif "holds no" in problem:
            assert message == f"{stem}: {problem}--checkpoint-freq N writes one."
        else:
            trained = f"{stem}: --resume {path} was trained with {problem}: resume with its"
            assert message == f"{trained} settings."
        assert folder_state(tmp_path) == before and not runs.exists()
    # --checkpoint-freq, --save-model, --runs-dir and --run-dir may differ: the finished run is
    # continued (no step is left) in the checkpoint's folder
    changed = dict(checkpoint_freq=30, save_model=True, runs_dir=str(runs), run_dir="elsewhere")
    continued = module.main(module.Args(**settings, **changed, resume=str(path)))
    assert continued["run_dir"] == str(tmp_path / "run") and not runs.exists()
    assert f"{stem}: resumed {tmp_path / 'run'} at step 120\n" in capsys.readouterr().out


@pytest.mark.parametrize("stem", ONLINE)
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "dm_control/cartpole-swingup-v0", "Hopper-v4"])
def test_replayable_rebuilds_the_episode_in_progress(stem, env_id):
    """An env made with another seed, given a recorded episode, is then in the recorded env's
    state: the same last observation, the same future under the same actions (terminations and
    episode statistics included), and the same next start state (its random stream restored)."""
    module = load_script(stem)
    env = module.make_env(env_id, 3)
    rng = np.random.default_rng(0)
    for t in range(40):  # Hopper's random episodes end within a few dozen steps
        obs, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        if terminated or truncated or t == 5:  # the episode in progress begins unseeded
            obs, _ = env.reset()
    assert "seed" not in env.episode["reset"] or env.episode["reset"]["seed"] is None
    assert env.episode["actions"], "the episode in progress has begun"
    twin = module.make_env(env_id, 99)
    np.testing.assert_array_equal(twin.replay(env.episode), obs)
    ended = 0
    for _ in range(60):
        action = rng.uniform(-1, 1, env.action_space.shape)
        first = env.step(action)
        second = twin.step(action)
        np.testing.assert_array_equal(first[0], second[0])
        assert first[1:4] == second[1:4]
        if first[2] or first[3]:
            ended += 1
            for key in ("r", "l"):  # "t" is wall-clock time
                assert first[4]["episode"][key] == second[4]["episode"][key]
            np.testing.assert_array_equal(env.reset()[0], twin.reset()[0])
    assert ended > 0 or env_id != "Hopper-v4"
