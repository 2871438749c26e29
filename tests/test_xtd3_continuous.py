"""End-to-end and unit tests of xtd3_continuous.py (online X-TD3, X-TD3 - DQ and TD3).

The update is held to TD3's and Eq. 9's losses written out here, --clip-mode and the Bellman-error
files to values computed here. Runs are tiny (32-wide networks, batch 32, a few hundred env steps)
but real: gradient steps of the critics and the delayed actor, evaluations, checkpoints,
replay-buffer files, Bellman-error files and TensorBoard scalars are all produced by `main(args)`
and read back. The fast path (the whole update compiled; bf16 matmuls) is compared with the eager
fp32 update.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import math
import os
import subprocess
import sys
from functools import partial

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

xtd3 = load_script("xtd3_continuous")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and the CI machine has two cores shared by other
    work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(tmp_path, **overrides) -> "xtd3.Args":
    settings = dict(
        env_id="Pendulum-v1",
        total_timesteps=300,
        learning_starts=100,
        hidden_dim=32,
        batch_size=32,
        buffer_size=10_000,
        log_freq=50,
        eval_freq=10_000,
        eval_episodes=1,
        bellman_log_freq=100,
        runs_dir=str(tmp_path / "runs"),
        seed=3,
        cuda=False,
    )
    settings.update(overrides)
    return xtd3.Args(**settings)


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def random_batches(steps: int, obs_dim: int, action_dim: int, batch_size: int) -> list[tuple]:
    """Fixed random batches (obs, actions, rewards, next_obs, terminated), a tenth terminal."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        batch = (
            torch.randn(batch_size, obs_dim, generator=generator),
            torch.rand(batch_size, action_dim, generator=generator) * 2 - 1,
            torch.randn(batch_size, generator=generator),
            torch.randn(batch_size, obs_dim, generator=generator),
            (torch.rand(batch_size, generator=generator) < 0.1).float(),
        )
        batches.append(batch)
    return batches


def make_optimizers(agent, args) -> dict:
    """As main builds them: fused Adams on the critics and on the actor."""
    adam = partial(torch.optim.Adam, lr=args.learning_rate, fused=True)
    return {"critic": adam(agent.critic.parameters()), "actor": adam(agent.actor.parameters())}


def run_updates(update, steps: int, **overrides) -> list[dict]:
    """`steps` real updates of a fresh agent (seed 0) on fixed random batches, optimisers as main
    builds them; each update's returned values. Actor and target updates on alternate steps, so
    every branch of `update` runs."""
    args = xtd3.Args(
        hidden_dim=32, batch_size=32, beta=2.0, exploration_noise=0.1, cuda=False, **overrides
    )
    torch.manual_seed(0)
    agent = xtd3.Agent(3, 1, args)
    optimizers = make_optimizers(agent, args)
    values = []
    for step, batch in enumerate(random_batches(steps, 3, 1, 32)):
        torch.manual_seed(100 + step)
        got = update(agent, optimizers, batch, step % 2 == 1, step % 2 == 0, args)
        values.append({tag: value.clone() for tag, value in got.items()})
    return values


def stacked(values: list[dict], tag: str) -> torch.Tensor:
    """One tag over the updates that returned it."""
    return torch.stack([step[tag] for step in values if tag in step])


# ---- the update, against TD3's and Eq. 9's losses written out here ----
def forward(layers: list, x: torch.Tensor) -> torch.Tensor:
    """The scripts' MLP: two ReLU hidden layers, a linear output."""
    for i, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


def layers_of(state: dict, prefix: str) -> list:
    """The (weight, bias) pairs of one of the scripts' MLPs in a state dict."""
    return [(state[f"{prefix}.{i}.weight"], state[f"{prefix}.{i}.bias"]) for i in (0, 2, 4)]


def flat(*nets) -> list[torch.Tensor]:
    return [tensor for layers in nets for pair in layers for tensor in pair]


class ReferenceXTD3:
    """TD3 and X-TD3's update written out from the papers, on copies of an agent's tensors,
    sharing no code with the script: the target r + gamma (1 - d) min_i Q'_i(s', a') with
    a' = clip(pi'(s') + clip(eps sigma, -c, c), -1, 1) (TD3; Eq. 41); each critic fitted to it by
    the squared error (TD3) or by Eq. 9 in the stable form of App. D.3 with the script's clip;
    the delayed actor maximising Q_1(s, pi(s)); torch.optim's fused Adam; Polyak targets
    theta' <- tau theta + (1 - tau) theta'."""

    def __init__(self, agent, args):
        state = {key: value.detach().clone() for key, value in agent.state_dict().items()}
        self.args = args
        self.num_critics = 2 if args.double_q else 1
        self.actor = [
            (w.requires_grad_(), b.requires_grad_()) for w, b in layers_of(state, "actor.net")
        ]
        self.critics = []
        self.critic_targets = []
        for i in range(self.num_critics):
            layers = layers_of(state, f"critic.nets.{i}")
            self.critics.append([(w.requires_grad_(), b.requires_grad_()) for w, b in layers])
            self.critic_targets.append(layers_of(state, f"critic_target.nets.{i}"))
        self.actor_target = layers_of(state, "actor_target.net")
        adam = partial(torch.optim.Adam, lr=args.learning_rate, fused=True)
        self.critic_adam = adam(flat(*self.critics))
        self.actor_adam = adam(flat(self.actor))

    def update(self, batch, update_actor: bool, update_target: bool) -> dict:
        args = self.args
        obs, actions, rewards, next_obs, terminated = batch
        with torch.no_grad():
            noise = torch.randn(actions.shape) * args.policy_noise  # the one random draw
            noise = noise.clamp(-args.noise_clip, args.noise_clip)
            next_actions = (torch.tanh(forward(self.actor_target, next_obs)) + noise).clamp(-1, 1)
            next_obs_actions = torch.cat([next_obs, next_actions], dim=-1)
            next_q = [forward(net, next_obs_actions)[:, 0] for net in self.critic_targets]
            target = rewards + args.gamma * (1 - terminated) * torch.stack(next_q).amin(0)
        q = [forward(net, torch.cat([obs, actions], dim=-1))[:, 0] for net in self.critics]
        q_loss = 0
        clipped = []
        for q_i in q:
            z = (target - q_i) / args.beta  # Eq. 9
            above = z > args.loss_clip
            below = z < -args.loss_clip
            clipped.append(above | below if args.clip_mode == "both" else above)
            if args.critic_loss == "mse":
                q_loss = q_loss + ((q_i - target) ** 2).mean()
                continue
            if args.clip_mode == "both":
                z = z.clamp(-args.loss_clip, args.loss_clip)
            else:
                z = z.clamp(max=args.loss_clip)
            m = torch.clamp(z.max(), min=-1.0).detach()
            q_loss = q_loss + (torch.exp(z - m) - z * torch.exp(-m) - torch.exp(-m)).mean()
        self.critic_adam.zero_grad()
        q_loss.backward()
        self.critic_adam.step()
        values = {"losses/q_loss": q_loss, "values/q": torch.stack(q).mean()}
        values["values/clip_fraction"] = torch.cat(clipped).float().mean()
        if update_actor:
            policy_actions = torch.tanh(forward(self.actor, obs))
            critic = self.critics[0]
            actor_loss = -forward(critic, torch.cat([obs, policy_actions], dim=-1)).mean()
            grads = torch.autograd.grad(actor_loss, flat(self.actor))
            for param, grad in zip(flat(self.actor), grads):
                param.grad = grad
            self.actor_adam.step()
            values["losses/actor_loss"] = actor_loss
        if update_target:
            with torch.no_grad():
                pairs = zip(
                    flat(self.actor_target, *self.critic_targets), flat(self.actor, *self.critics)
                )
                for target_param, param in pairs:
                    target_param.copy_(args.tau * param + (1 - args.tau) * target_param)
        return values


REFERENCE_ARGS = dict(hidden_dim=16, batch_size=16, beta=0.5, loss_clip=0.5, tau=0.5)
REFERENCE_ARGS |= dict(learning_rate=3e-3, exploration_noise=0.1, cuda=False)
# noise this wide: both of the smoothing clamps (noise to +-c, actions to [-1, 1]) take part
REFERENCE_ARGS |= dict(policy_noise=1.0, noise_clip=1.5)


@pytest.mark.parametrize(
    "overrides",
    [dict(critic_loss="mse"), dict(), dict(clip_mode="upper"), dict(double_q=False)],
    ids=["td3-mse", "xtd3-both", "xtd3-upper", "xtd3-dq"],
)
def test_update_matches_an_independent_implementation(overrides):
    """Four consecutive updates from the same weights on the same batches (the actor on odd steps,
    the targets' Polyak step on even ones) give the losses written out here to 1e-6 relative, and
    the same parameters: TD3's critic MSE, and X-TD3's Eq. 9 with twin critics, one critic and
    either clip mode (its clip hit by some but not all samples). The actor loss is returned on
    actor steps only."""
    args = xtd3.Args(**REFERENCE_ARGS, **overrides)
    torch.manual_seed(0)
    agent = xtd3.Agent(4, 2, args)
    optimizers = make_optimizers(agent, args)
    reference = ReferenceXTD3(agent, args)
    fractions = []
    for step, batch in enumerate(random_batches(4, 4, 2, 16)):
        torch.manual_seed(100 + step)
        got = xtd3.update(agent, optimizers, batch, step % 2 == 1, step % 2 == 0, args)
        torch.manual_seed(100 + step)
        expected = reference.update(batch, step % 2 == 1, step % 2 == 0)
        assert ("losses/actor_loss" in got) == (step % 2 == 1)
        for tag, value in expected.items():
            torch.testing.assert_close(got[tag], value.detach(), rtol=1e-6, atol=1e-7, msg=tag)
        fractions.append(got["values/clip_fraction"].item())
    if overrides == {}:
        assert 0 < max(fractions) and min(fractions) < 1, fractions
    params = dict(agent.named_parameters())
    torch.testing.assert_close(
        params["actor.net.0.weight"], reference.actor[0][0], rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        params["critic.nets.0.4.bias"], reference.critics[0][2][1], rtol=1e-5, atol=1e-7
    )
    moved = agent.critic_target.nets[0][2].weight
    assert not torch.equal(moved, xtd3.Agent(4, 2, args).critic_target.nets[0][2].weight)
    torch.testing.assert_close(moved, reference.critic_targets[0][1][0], rtol=1e-5, atol=1e-7)


def test_clip_mode_reaches_the_critic_loss_in_update():
    """Targets 1000 below every Q (z = (target - Q) / beta < -clip for all samples), through
    `update`: `both` clamps z to -clip, so each critic's loss is e^(1-c) + (c-1) e (m = -1) and the
    critics get no gradient; `upper` leaves z alone: each critic's output bias gets e / beta
    (d/dQ of each sample's loss is (e - e^(z+1)) / (n beta), e^(z+1) ~ 0)."""
    obs, actions, rewards, next_obs, terminated = random_batches(1, 4, 2, 16)[0]
    batch = (obs, actions, rewards - 1000, next_obs, torch.zeros(16))
    losses = {}
    grads = {}
    for mode in ("both", "upper"):
        args = xtd3.Args(**{**REFERENCE_ARGS, "beta": 2.0, "loss_clip": 3.0}, clip_mode=mode)
        torch.manual_seed(0)
        agent = xtd3.Agent(4, 2, args)
        torch.manual_seed(1)
        losses[mode] = xtd3.update(agent, make_optimizers(agent, args), batch, False, False, args)
        grads[mode] = torch.stack([net[4].bias.grad[0] for net in agent.critic.nets])
    e = math.e
    assert losses["both"]["losses/q_loss"].item() == pytest.approx(2 * (e**-2 + 2 * e), rel=1e-6)
    assert losses["both"]["values/clip_fraction"] == 1
    assert losses["upper"]["values/clip_fraction"] == 0
    assert losses["upper"]["losses/q_loss"] > 2 * 400 * e  # -z ~ 500 per critic: unclipped
    assert torch.equal(grads["both"], torch.zeros(2))
    torch.testing.assert_close(grads["upper"], torch.full((2,), e / 2.0), rtol=1e-5, atol=0)


def test_bellman_errors_are_the_first_critics_td_errors(tmp_path, monkeypatch):
    """--log-bellman-errors: each file holds r + gamma (1 - d) Q1(s', pi(s')) - Q1(s, a) of the
    batch it was given, computed here from the agent's weights at that step: by the critic, not its
    target network (which has moved away from it by then), by critic 1, and with this sign."""
    captured = []
    real = xtd3.save_bellman_errors

    def spy(agent, batch, step, args):
        captured.append((copy.deepcopy(agent.state_dict()), batch, step))
        real(agent, batch, step, args)

    monkeypatch.setattr(xtd3, "save_bellman_errors", spy)
    args = tiny_args(tmp_path, total_timesteps=200, bellman_log_freq=50, log_bellman_errors=True)
    run_dir = xtd3.main(args)["run_dir"]
    files = sorted(glob.glob(os.path.join(run_dir, "bellman_errors", "*.npy")))
    assert [os.path.basename(f) for f in files] == ["step_00000150.npy", "step_00000200.npy"]
    assert [step for _, _, step in captured] == [150, 200]
    for path, (state, batch, _) in zip(files, captured):
        errors = np.load(path)
        assert errors.dtype == np.float32 and errors.shape == (32,)
        expected = td_error(state, batch, "critic", "actor.net")
        np.testing.assert_allclose(errors, expected.numpy(), rtol=1e-5, atol=1e-5)
        alternatives = [td_error(state, batch, "critic_target", "actor_target.net")]
        alternatives.append(td_error(state, batch, "critic", "actor.net", critic_index=1))
        alternatives.append(td_error(state, batch, "critic", "actor_target.net"))
        for alternative in alternatives:  # each differs by more than the tolerance
            assert np.abs(errors - alternative.numpy()).max() > 1e-3


def td_error(state: dict, batch, critic: str, actor: str, critic_index: int = 0) -> torch.Tensor:
    """r + gamma (1 - d) Q(s', pi(s')) - Q(s, a), Q and pi the named networks of a state dict."""
    obs, actions, rewards, next_obs, terminated = batch
    next_actions = torch.tanh(forward(layers_of(state, actor), next_obs))
    net = layers_of(state, f"{critic}.nets.{critic_index}")
    next_q = forward(net, torch.cat([next_obs, next_actions], -1))[:, 0]
    q = forward(net, torch.cat([obs, actions], -1))[:, 0]
    return rewards + 0.99 * (1 - terminated) * next_q - q


# ---- per-task settings ----
def test_beta_resolution_follows_table_6(capsys):
    def resolved(env_id, beta=None, double_q=True, exploration_noise=None):
        args = xtd3.Args(
            env_id=env_id, beta=beta, double_q=double_q, exploration_noise=exploration_noise
        )
        filled, resume = xtd3.resolve_args(args)
        assert resume is None and args.beta == beta  # the given Args are left as they were
        return filled

    for task, (xtd3_beta, dq_beta) in {
        "cheetah-run": (5, 4),
        "walker-run": (2, 4),
        "hopper-hop": (2, 3),
        "quadruped-run": (5, 20),
    }.items():
        env_id = f"dm_control/{task}-v0"
        assert resolved(env_id, double_q=True).beta == xtd3_beta
        assert (
            f"twin critics, beta = {float(xtd3_beta)} (Table 6, X-TD3 column)"
            in capsys.readouterr().out
        )
        assert resolved(env_id, double_q=False).beta == dq_beta
        assert (
            f"one critic, beta = {float(dq_beta)} (Table 6, X-TD3 - DQ column)"
            in capsys.readouterr().out
        )
    assert resolved("dm_control/cheetah-run-v0", 7.5).beta == 7.5
    assert "beta = 7.5 (--beta)" in capsys.readouterr().out
    assert resolved("Pendulum-v1").beta == xtd3.BETA_FALLBACK[True] == 2.0
    assert resolved("Pendulum-v1", double_q=False).beta == xtd3.BETA_FALLBACK[False] == 4.0
    assert capsys.readouterr().out.count("(fallback outside Table 6)") == 2
    # Table 5: exploration noise 0.05 on hopper, 0.1 elsewhere, a given value wins.
    assert resolved("dm_control/hopper-hop-v0").exploration_noise == 0.05
    assert resolved("dm_control/walker-run-v0").exploration_noise == 0.1
    assert resolved("dm_control/hopper-hop-v0", exploration_noise=0.3).exploration_noise == 0.3
    assert "exploration noise 0.3, 1 env(s)" in capsys.readouterr().out.splitlines()[-1]


def test_twin_critic_members_are_independent_mlps():
    """TwinCritic is num_critics independent MLPs on [obs, action]: member i equals a plain mlp
    with member i's weights, and a loss on member 0 gives member 1 no gradient (the actor loss
    reads Q_1 only)."""
    torch.manual_seed(0)
    critic = xtd3.TwinCritic(5, 2, 16, num_critics=2)
    obs, actions = torch.randn(7, 5), torch.randn(7, 2)
    q = critic(obs, actions)
    assert q.shape == (2, 7)
    for i in range(2):
        plain = xtd3.mlp(7, 16, 1)
        plain.load_state_dict(critic.nets[i].state_dict())
        torch.testing.assert_close(
            q[i], plain(torch.cat([obs, actions], -1)).squeeze(-1), rtol=0, atol=1e-6
        )
    assert not torch.allclose(q[0], q[1])  # independently initialised
    q[0].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in critic.nets[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.nets[0].parameters())
    assert xtd3.TwinCritic(5, 2, 16, num_critics=1)(obs, actions).shape == (1, 7)


# ---- end-to-end runs ----
ARMS = {"xtd3": {}, "xtd3-dq": {"double_q": False}, "td3": {"critic_loss": "mse"}}


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "dm_control/cartpole-swingup-v0"])
@pytest.mark.parametrize("arm", list(ARMS))
def test_end_to_end(tmp_path, env_id, arm):
    buffer_path = str(tmp_path / "buffer.hdf5")
    args = tiny_args(
        tmp_path,
        env_id=env_id,
        exp_name=arm,
        save_model=True,
        save_buffer=buffer_path,
        log_bellman_errors=True,
        **ARMS[arm],
    )
    result = xtd3.main(args)
    run_dir = result["run_dir"]
    assert os.path.basename(run_dir).startswith(f"{env_id.replace('/', '-')}__{arm}__3__")
    assert [step for step, _ in result["evaluations"]] == [300]

    # TensorBoard: the tags, all finite; losses logged from learning starts on.
    logged = scalars(run_dir)
    for tag in (
        "losses/q_loss",
        "losses/actor_loss",
        "values/q",
        "values/clip_fraction",
        "eval/episodic_return",
        "eval/episodic_length",
        "charts/SPS",
    ):
        assert logged.get(tag), f"missing {tag}: {sorted(logged)}"
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    assert [s for s, _ in logged["losses/q_loss"]] == [100, 150, 200, 250, 300]
    assert [s for s, _ in logged["eval/episodic_return"]] == [300]
    if env_id == "Pendulum-v1":  # 200-step episodes end within the run
        assert [s for s, _ in logged["charts/episodic_return"]] == [200]
        assert [v for _, v in logged["charts/episodic_length"]] == [200]

    # Checkpoint: real critic and delayed actor updates happened (Adam step counts), targets moved.
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert set(checkpoint) == {"script", "args", "step", "agent", "optimizers"}
    agent_state = checkpoint["agent"]
    num_critics = 1 if arm == "xtd3-dq" else 2
    assert {key.split(".")[2] for key in agent_state if key.startswith("critic.nets.")} == {
        str(i) for i in range(num_critics)
    }
    critic_updates = args.total_timesteps - args.learning_starts + 1
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == critic_updates
    assert int(checkpoint["optimizers"]["actor"]["state"][0]["step"]) == critic_updates // 2
    assert checkpoint["step"] == 300
    assert not torch.equal(
        agent_state["actor.net.0.weight"], agent_state["actor_target.net.0.weight"]
    )
    assert not torch.equal(
        agent_state["critic.nets.0.0.weight"], agent_state["critic_target.nets.0.0.weight"]
    )
    assert (
        checkpoint["args"]["beta"] == xtd3.BETA_FALLBACK[arm != "xtd3-dq"]
    )  # resolved once, stored as used
    assert all(torch.isfinite(t).all() for t in agent_state.values())

    # The eval-only path loads the checkpoint back and runs the actor: with the run's seed, its
    # eval env starts where the run's did, so the run's one (final) evaluation comes back exactly.
    path = os.path.join(run_dir, "checkpoint.pt")
    evaluated = xtd3.main(xtd3.Args(eval_only=True, checkpoint=path, eval_episodes=1, seed=3))
    assert evaluated["returns"] == [result["final_return"]]
    assert evaluated["lengths"] == [200 if env_id == "Pendulum-v1" else 1000]

    # Replay buffer in D4RL layout; Bellman errors (App. D.2) at multiples of 100 after learning
    # starts.
    with h5py.File(buffer_path) as f:
        assert sorted(f) == [
            "actions",
            "next_observations",
            "observations",
            "rewards",
            "terminals",
            "timeouts",
        ]
        assert (
            f["observations"].shape[0] == args.total_timesteps
            and f["observations"].dtype == np.float32
        )
        assert (
            f.attrs["exp_name"] == arm
            and f.attrs["script"] == "xtd3_continuous"
            and f.attrs["env_id"] == env_id
        )
    files = sorted(glob.glob(os.path.join(run_dir, "bellman_errors", "step_*.npy")))
    assert [os.path.basename(p) for p in files] == ["step_00000200.npy", "step_00000300.npy"]
    errors = np.load(files[-1])
    assert (
        errors.dtype == np.float32
        and errors.shape == (args.batch_size,)
        and np.isfinite(errors).all()
    )


def test_cli_run_and_eval_only(tmp_path):
    """A real command line, as a user types it, then the documented evaluation of its checkpoint."""
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        str(ROOT / "xtd3_continuous.py"),
        "--env-id",
        "Pendulum-v1",
        "--total-timesteps",
        "250",
        "--learning-starts",
        "100",
        "--hidden-dim",
        "32",
        "--batch-size",
        "32",
        "--eval-episodes",
        "1",
        "--log-freq",
        "50",
        "--no-double-q",
        "--exp-name",
        "xtd3-dq",
        "--runs-dir",
        str(runs),
        "--save-model",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one critic, beta = 4.0 (fallback outside Table 6)" in done.stdout
    (run_dir,) = list(runs.iterdir())
    checkpoint = run_dir / "checkpoint.pt"
    assert f"; run folder {run_dir}; checkpoint {checkpoint}" in done.stdout
    evaluated = subprocess.run(
        [
            sys.executable,
            str(ROOT / "xtd3_continuous.py"),
            "--eval-only",
            "--checkpoint",
            str(checkpoint),
            "--eval-episodes",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"{checkpoint} (step 250) on Pendulum-v1: return " in evaluated.stdout
    assert "over 1 episodes (mean length 200)" in evaluated.stdout


# ---- bad input ----
@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            {"env_id": "dm_control/cheetah-rnu-v0"},
            "--env-id dm_control/cheetah-rnu-v0: Environment `cheetah-rnu` doesn't exist in "
            "namespace dm_control. Did you mean: `cheetah-run`?",
        ),
        (
            {"env_id": "CartPole-v1"},
            "'CartPole-v1' has action space Discrete(2); this script needs a bounded continuous "
            "(Box) one.",
        ),
        ({"beta": 0.0}, "--beta must be > 0 (it divides the TD error in Eq. 9)."),
        ({"beta": -2.0}, "--beta must be > 0"),
        ({"num_envs": 0}, "--num-envs must be > 0."),
        ({"policy_noise": 0.0}, "--policy-noise must be > 0."),
        ({"gamma": 1.5}, "--tau must be in (0, 1] and --gamma in [0, 1]."),
        ({"checkpoint_freq": -5}, "--eval-freq and --checkpoint-freq must be >= 0."),
        (
            {"eval_only": True, "checkpoint": "/nonexistent/checkpoint.pt"},
            "/nonexistent/checkpoint.pt is not a checkpoint of xtd3_continuous --save-model "
            "(FileNotFoundError).",
        ),
    ],
)
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
    assert str(error.value.code) == (
        f"xtd3_continuous: {foreign} is not a checkpoint of xtd3_continuous "
        "--save-model (KeyError)."
    )


def test_bad_input_cli(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "xtd3_continuous.py"),
            "--env-id",
            "dm_control/cheetah-rnu-v0",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "xtd3_continuous: --env-id dm_control/cheetah-rnu-v0: Environment `cheetah-rnu` doesn't "
        "exist in namespace dm_control. Did you mean: `cheetah-run`?"
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


# ---- NaN / inf stop ----
class NaNRewardAfter(gym.Wrapper):
    """Pendulum whose rewards turn NaN after `clean_steps` steps: the critic loss becomes NaN."""

    def __init__(self, env, clean_steps=180):
        super().__init__(env)
        self.steps, self.clean_steps = 0, clean_steps

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return (
            obs,
            (float("nan") if self.steps > self.clean_steps else reward),
            terminated,
            truncated,
            info,
        )


def make_nan_pendulum(**kwargs):
    return NaNRewardAfter(gym.make("Pendulum-v1", **kwargs))


if "XTD3NaNPendulum-v0" not in gym.registry:
    gym.register("XTD3NaNPendulum-v0", entry_point=make_nan_pendulum, max_episode_steps=200)


def test_nan_stops_run_with_message_and_saves(tmp_path, monkeypatch):
    """The first update whose batch holds a NaN reward (stored from env step 181 on) stops the run
    at its env step: the check runs on the host after every update."""
    real_update, batch_has_nan = xtd3.update, []

    def watched(agent, optimizers, batch, update_actor, update_target, args):
        batch_has_nan.append(bool(torch.isnan(batch[2]).any()))
        return real_update(agent, optimizers, batch, update_actor, update_target, args)

    monkeypatch.setattr(xtd3, "update", watched)
    buffer_path = str(tmp_path / "buffer.hdf5")
    args = tiny_args(
        tmp_path,
        env_id="XTD3NaNPendulum-v0",
        total_timesteps=400,
        learning_starts=50,
        log_freq=50,
        save_buffer=buffer_path,
    )
    with pytest.raises(SystemExit) as error:
        xtd3.main(args)
    message = str(error.value.code)
    assert (
        message.startswith("xtd3_continuous: a loss became NaN/inf at step ")
        and "\n" not in message
    )
    bad_step = int(message.split("at step ")[1].split(";")[0])
    # Update k runs at env step learning_starts + k - 1; the run stops at the first update that saw
    # a NaN reward.
    assert batch_has_nan.index(True) == len(batch_has_nan) - 1
    assert bad_step == args.learning_starts + len(batch_has_nan) - 1
    assert 181 <= bad_step <= 250
    last_log = (bad_step - 1) // 50 * 50
    assert f"; last finite values (step {last_log}): q_loss=" in message
    (run_dir,) = glob.glob(os.path.join(args.runs_dir, "*"))
    snapshot = torch.load(os.path.join(run_dir, "last_finite_checkpoint.pt"), weights_only=False)
    assert snapshot["step"] == last_log
    assert all(torch.isfinite(t).all() for t in snapshot["agent"].values())
    with h5py.File(buffer_path) as f:
        assert (
            f["rewards"].shape[0] == bad_step
        )  # written on the way out, up to the step that stopped
        assert np.isnan(f["rewards"][180:]).all() and np.isfinite(f["rewards"][:180]).all()


# ---- the fast path ----
def fast_update(compile=False, medium=False):
    """`update` as main builds it: compiled with --compile, under bf16 autocast with
    --matmul-precision medium."""
    return torch.autocast("cpu", torch.bfloat16, enabled=medium)(
        torch.compile(xtd3.update) if compile else xtd3.update
    )


def test_compiled_update_matches_eager():
    """The whole update (losses, backward, optimiser steps, Polyak) compiled: with the same seed and
    batches, its values match eager for 6 updates, and Dynamo made graphs (a function it ran
    eagerly would fail that).

    Tolerance: rtol 1e-4 + atol 1e-5 (float32; inductor fuses and reorders reductions).
    fallback_random makes the compiled target-policy noise draw from the same RNG stream as eager.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    eager = run_updates(xtd3.update, 6)
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = run_updates(fast_update(compile=True), 6)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    # the actor loss comes back from the actor updates (odd steps) only
    assert [sorted(step) for step in compiled] == [sorted(step) for step in eager]
    assert ["losses/actor_loss" in step for step in eager] == [False, True] * 3
    for tag in eager[1]:
        assert torch.isfinite(stacked(eager, tag)).all(), tag
        torch.testing.assert_close(
            stacked(compiled, tag), stacked(eager, tag), rtol=1e-4, atol=1e-5, msg=tag
        )
    q_loss = stacked(eager, "losses/q_loss")
    assert not torch.equal(q_loss[0], q_loss[-1])  # the parameters did change between steps


def test_bf16_autocast_update_close_to_fp32():
    """--matmul-precision medium: the update under bf16 autocast, each network's output layer in
    fp32 (FP32Linear). The same 6 updates stay within rtol 2e-2 / atol 1e-3 of fp32 (bf16 keeps 8
    mantissa bits, ~4e-3 relative per rounded operand), but for the actor loss, -mean Q(s, pi(s))
    near 0, within atol 1e-2: Adam's first steps move each weight by about +-lr whatever its
    gradient's size, and rounding flips the sign of the smallest gradients (measured: <= 0.0065).
    They differ from fp32 (the rounding is real). Under autocast the hidden layers compute in
    bf16; Q and the action in fp32."""
    fp32 = run_updates(xtd3.update, 6)
    medium = run_updates(fast_update(medium=True), 6)
    differences = []
    for tag in fp32[1]:
        assert torch.isfinite(stacked(medium, tag)).all(), tag
        differences.append((stacked(medium, tag) - stacked(fp32, tag)).abs().max())
        if tag == "losses/actor_loss":
            tolerance = dict(rtol=0, atol=1e-2)
        else:
            tolerance = dict(rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(stacked(medium, tag), stacked(fp32, tag), **tolerance, msg=tag)
    assert max(differences) > 1e-5
    agent = xtd3.Agent(3, 1, xtd3.Args(hidden_dim=32, exploration_noise=0.1))
    obs = torch.randn(4, 3)
    actions = torch.rand(4, 1)
    with torch.autocast("cpu", torch.bfloat16):
        assert agent.actor.net[0](obs).dtype == torch.bfloat16
        outputs = agent.critic(obs, actions), agent.actor(obs)
    assert [out.dtype for out in outputs] == [torch.float32] * 2


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fast_path_through_main(tmp_path, monkeypatch, compile):
    """--matmul-precision medium (and --compile) through `main`: the critic loss is computed under
    bf16 autocast (seen eagerly; compiled, Dynamo must have made graphs), the losses are finite,
    and torch's fp32 matmuls stay at "highest" (its "medium" would round the fp32 output
    layers)."""
    from torch._dynamo.utils import counters

    seen = []
    gumbel_loss = xtd3.gumbel_loss
    if not compile:

        def spy(*args):
            seen.append(torch.is_autocast_enabled("cpu"))
            return gumbel_loss(*args)

        monkeypatch.setattr(xtd3, "gumbel_loss", spy)
    counters.clear()
    result = xtd3.main(
        tiny_args(
            tmp_path,
            total_timesteps=120,
            learning_starts=100,
            log_freq=10,
            matmul_precision="medium",
            compile=compile,
        )
    )
    assert torch.get_float32_matmul_precision() == "highest"
    assert seen == ([] if compile else [True] * 2 * 21)  # twin critics, 120 - 100 + 1 updates
    assert counters["stats"]["unique_graphs"] >= (2 if compile else 0)
    logged = scalars(result["run_dir"])
    assert len(logged["losses/q_loss"]) == 3 and all(
        math.isfinite(v) for _, v in logged["losses/q_loss"]
    )


def test_compile_flag_runs_main_and_matches_eager(tmp_path):
    """`--compile` through main (compiled update and policy): the first logged losses match the
    eager run.

    Same seed; fallback_random gives the compiled noise the eager RNG stream. The two runs can drift
    apart only by float32 rounding (inductor reorders reductions), amplified through the updates, so
    the first three log points (10 updates apart) are compared at 1e-3 relative.
    """
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    logged = {}
    counters.clear()
    for compiled in (False, True):
        args = tiny_args(
            tmp_path / str(compiled),
            total_timesteps=130,
            learning_starts=100,
            log_freq=10,
            compile=compiled,
        )
        with inductor_config.patch(fallback_random=True):
            logged[compiled] = scalars(xtd3.main(args)["run_dir"])
    assert (
        counters["stats"]["unique_graphs"] >= 3
    )  # the update (with and without the actor step) and the policy
    for tag in ("losses/q_loss", "values/q"):
        eager, compiled = logged[False][tag][:3], logged[True][tag][:3]
        assert [s for s, _ in eager] == [s for s, _ in compiled] == [100, 110, 120]
        assert [v for _, v in compiled] == pytest.approx([v for _, v in eager], rel=1e-3), tag


@pytest.mark.parametrize(
    "overrides",
    [dict(clip_mode="upper", loss_clip=1.0), dict(clip_mode="both", loss_clip=0.05)],
    ids=["upper", "both-small-clip"],
)
def test_clip_modes_end_to_end(tmp_path, overrides, capsys):
    """Each clip mode trains (finite losses) and logs values/clip_fraction, a share of the 2 x 32
    (critic, sample) pairs of a batch; a clip of 0.05 is hit by some."""
    result = xtd3.main(
        tiny_args(
            tmp_path,
            total_timesteps=150,
            learning_starts=100,
            log_freq=10,
            save_model=True,
            **overrides,
        )
    )
    assert "critic loss gumbel, twin critics, beta = 2.0" in capsys.readouterr().out
    logged = scalars(result["run_dir"])
    assert [s for s, _ in logged["losses/q_loss"]] == [100, 110, 120, 130, 140, 150]
    for tag in ("losses/q_loss", "losses/actor_loss", "values/q"):
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    counts = np.array([v for _, v in logged["values/clip_fraction"]]) * 64
    assert len(counts) == 6
    np.testing.assert_allclose(counts, counts.round(), atol=1e-4)  # whole pairs
    if overrides["loss_clip"] == 0.05:
        assert counts.max() >= 1
    checkpoint = torch.load(os.path.join(result["run_dir"], "checkpoint.pt"), weights_only=False)
    assert int(checkpoint["optimizers"]["critic"]["state"][0]["step"]) == 51
    assert {key: checkpoint["args"][key] for key in overrides} == overrides


def test_benchmark_script_pins_table_6(tmp_path):
    """benchmark/xtd3_continuous.sh (dry run): 4 tasks x 3 arms with Table 6's beta per task and
    arm."""
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "1 2", "SWEEP_ARGS": "--dry-run"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "xtd3_continuous.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    commands = [line for line in done.stdout.splitlines() if "xtd3_continuous.py --env-id" in line]
    assert len(commands) == 4 * 3 * 2
    expected = {
        ("cheetah-run", "xtd3"): "--beta 5",
        ("cheetah-run", "xtd3-dq"): "--no-double-q --beta 4",
        ("walker-run", "xtd3"): "--beta 2",
        ("walker-run", "xtd3-dq"): "--no-double-q --beta 4",
        ("hopper-hop", "xtd3"): "--beta 2",
        ("hopper-hop", "xtd3-dq"): "--no-double-q --beta 3",
        ("quadruped-run", "xtd3"): "--beta 5",
        ("quadruped-run", "xtd3-dq"): "--no-double-q --beta 20",
    }
    for (task, arm), flags in expected.items():
        matching = [
            c for c in commands if f"dm_control/{task}-v0" in c and f"--exp-name {arm} " in c
        ]
        assert len(matching) == 2 and all(flags in c for c in matching), (task, arm, matching)
    td3 = [c for c in commands if "--exp-name td3 " in c]
    assert len(td3) == 8 and all("--critic-loss mse" in c and "--beta" not in c for c in td3)


@pytest.mark.skipif(
    importlib.util.find_spec("moviepy") is None, reason="--capture-video needs moviepy"
)
def test_capture_video_headless_default(tmp_path):
    """--capture-video with MUJOCO_GL unset: the script picks a headless backend, says so, and
    writes videos.

    InvertedPendulum-v4 (MuJoCo, rendered by gymnasium) keeps the evaluation episode short."""
    import ctypes.util

    if not os.path.exists("/dev/nvidiactl") and ctypes.util.find_library("OSMesa") is None:
        pytest.skip("libOSMesa is not installed (apt-get install libosmesa6)")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")
    }
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "xtd3_continuous.py"),
            "--env-id",
            "InvertedPendulum-v4",
            "--total-timesteps",
            "150",
            "--learning-starts",
            "100",
            "--hidden-dim",
            "32",
            "--batch-size",
            "32",
            "--eval-episodes",
            "1",
            "--log-freq",
            "50",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--capture-video",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "egl" if os.path.exists("/dev/nvidiactl") else "osmesa"
    assert (
        f"xtd3_continuous: MUJOCO_GL was unset; using MUJOCO_GL={expected} for headless video"
        in done.stdout
    )
    videos = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "*.mp4"))
    assert videos and all(os.path.getsize(v) > 0 for v in videos)
