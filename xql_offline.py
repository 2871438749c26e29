"""Offline X-QL: the soft value fitted by Gumbel regression on a dataset, and IQL beside it.

V(s) regresses min_i Q'_i(s, a) at the dataset's actions with the Gumbel loss (Eq. 11), whose
minimiser is the soft value beta log E_{a~data}[exp(Q / beta)] (Lemma 3.5): no action is sampled
from the policy, none is out of distribution. Q regresses r + gamma V(s') (Eq. 14); the policy is
extracted by advantage-weighted regression (Eq. 12), as in the authors' (IQL's) code.
`--value-loss expectile` is IQL (Table 1's baseline); `--online-steps` fine-tunes (Table 2). The
one line where X-QL departs from IQL is marked "X-QL:" in `update_value`. Paper: Sec. 3.2-3.5,
App. D.3-D.4, Tables 1-4. Deviations from the paper and the authors' code: docs/deviations.md.

Usage: python xql_offline.py --env-id hopper-medium-v2 [--tuned] [--value-loss expectile]
       python xql_offline.py --dataset-path buffer.hdf5 --eval-env-id Pendulum-v1
       python xql_offline.py --eval-only --checkpoint runs/<run>/checkpoint.pt
"""

import copy
import dataclasses
import datetime
import difflib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from importlib.util import find_spec
from typing import Literal

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

PROG = os.path.splitext(os.path.basename(__file__))[0]


@dataclasses.dataclass
class Args:
    exp_name: str = PROG  # the arm in benchmarks (`xql`, `iql`); part of the run folder's name
    seed: int = 1  # seed of python, numpy, torch and the environments
    cuda: bool = True  # use CUDA when it is available, else the CPU
    compile: bool = False  # torch.compile the update's V and actor-critic steps, and the policy
    matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16
    track: bool = False  # log to Weights & Biases (pip install wandb)
    wandb_project_name: str = "xql"  # the wandb project
    wandb_entity: str | None = None  # the wandb entity (team)
    env_id: str | None = None  # a D4RL name or a Minari id (has a `/`); default hopper-medium-v2
    dataset_path: str | None = None  # a D4RL-format HDF5 file: D4RL's, or your own (--save-buffer)
    eval_env_id: str | None = None  # the gymnasium env to evaluate on (default: the dataset's)
    normalize_states: bool = False  # standardise observations by the dataset's mean and std
    reward_norm: Literal["auto", "none", "returns", "antmaze"] = "auto"  # auto: the authors'
    ref_min_score: float | None = None  # a random policy's return (normalised score; D4RL's)
    ref_max_score: float | None = None  # an expert policy's return (normalised score; D4RL's)
    value_loss: Literal["gumbel", "expectile"] = "gumbel"  # X-QL (Eq. 11) or IQL (the baseline)
    tuned: bool = False  # per-dataset values of --tuned-table (X-QL-T), not the per-domain ones
    tuned_table: Literal["paper", "authors"] = "paper"  # Table 4 or the authors' scripts
    beta: float | None = None  # Gumbel temperature of Eq. 11 (default: Table 4)
    loss_clip: float | None = None  # clip of z = (Q - V) / beta (default: Table 4 "Grad Clip")
    clip_mode: Literal["both", "upper"] = "upper"  # z <= clip (authors' offline code) or +-clip
    expectile: float | None = None  # IQL's expectile (default 0.7, antmaze 0.9)
    batch_size: int | None = None  # batch size (default: Table 4)
    num_v_updates: int | None = None  # V steps per update, on one batch (Table 4 "v_updates")
    noise: bool = False  # fit V at the dataset's actions plus clipped noise (the authors' flag)
    sample_random_times: int = 0  # also fit V at this many random actions per state (authors')
    awr_temperature: float | None = None  # AWR weights exp(temperature (Q - V)); per domain
    max_exp_advantage: float = 100.0  # cap of the AWR weight (the authors' code, IQL)
    actor_dropout: float | None = None  # dropout in the actor (default 0.1 kitchen, adroit; else 0)
    value_dropout: float = 0.0  # dropout in V (the authors' antmaze 0.5 never took effect)
    cosine_actor_lr: bool = True  # the actor lr's cosine decay where the config has it
    max_steps: int = 1_000_000  # offline gradient steps
    learning_rate: float = 3e-4  # Adam lr of actor, critics and V
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    hidden_dim: int = 256  # width of the two hidden layers of every network
    online_steps: int = 0  # then fine-tune for this many env steps, one update each (Table 2: 1M)
    runs_dir: str = "runs"  # parent folder of the run folders
    run_dir: str | None = None  # this run's folder; default {runs_dir}/{env}__{exp}__{seed}__{time}
    log_freq: int = 1000  # gradient steps between logged losses (TensorBoard, console)
    eval_freq: int = 5000  # gradient (fine-tuning: env) steps between evaluations; 0: at the ends
    eval_episodes: int | None = None  # episodes per evaluation (default 10, antmaze 100)
    save_model: bool = False  # write {run_dir}/checkpoint.pt at the end
    checkpoint_freq: int = 0  # gradient steps between resumable checkpoints; 0: none
    resume: str | None = None  # continue the run of this resumable checkpoint, in its folder
    eval_only: bool = False  # evaluate --checkpoint and exit
    checkpoint: str | None = None  # a checkpoint.pt, for --eval-only


# Per domain: Table 4's X-QL column (beta, clip, batch); the rest from the authors' configs
# (offline/configs: IQL's, but for no lr decay on antmaze). Adroit: kitchen's settings.
LOCOMOTION = dict(
    beta=2.0,
    loss_clip=7.0,
    batch_size=256,
    awr_temperature=3.0,
    expectile=0.7,
    actor_dropout=0.0,
    cosine=True,
    eval_episodes=10,
)
ANTMAZE = LOCOMOTION | dict(beta=0.6, awr_temperature=10.0, expectile=0.9, eval_episodes=100)
KITCHEN = LOCOMOTION | dict(beta=5.0, awr_temperature=0.5, actor_dropout=0.1)
DOMAINS = {"locomotion": LOCOMOTION, "antmaze": ANTMAZE | dict(cosine=False), "kitchen": KITCHEN}
DOMAINS["adroit"] = KITCHEN
# Per dataset, X-QL-T (--tuned): Table 4 (--tuned-table paper), or the authors' reproduce/*.sh
# (--tuned-table authors): they differ on 11 of 18 datasets and add V-fitting augmentations.
TUNED = {
    "paper": {
        "halfcheetah-medium-v2": dict(beta=1, loss_clip=7, batch_size=256, num_v_updates=1),
        "hopper-medium-v2": dict(beta=5, loss_clip=7, batch_size=256, num_v_updates=1),
        "walker2d-medium-v2": dict(beta=10, loss_clip=7, batch_size=256, num_v_updates=1),
        "halfcheetah-medium-replay-v2": dict(beta=1, loss_clip=5, batch_size=256, num_v_updates=1),
        "hopper-medium-replay-v2": dict(beta=2, loss_clip=7, batch_size=256, num_v_updates=1),
        "walker2d-medium-replay-v2": dict(beta=5, loss_clip=7, batch_size=256, num_v_updates=1),
        "halfcheetah-medium-expert-v2": dict(beta=1, loss_clip=5, batch_size=1024, num_v_updates=1),
        "hopper-medium-expert-v2": dict(beta=2, loss_clip=7, batch_size=1024, num_v_updates=1),
        "walker2d-medium-expert-v2": dict(beta=2, loss_clip=5, batch_size=1024, num_v_updates=1),
        "antmaze-umaze-v0": dict(beta=1, loss_clip=7, batch_size=256, num_v_updates=4),
        "antmaze-umaze-diverse-v0": dict(beta=2, loss_clip=7, batch_size=1024, num_v_updates=1),
        "antmaze-medium-play-v0": dict(beta=0.8, loss_clip=7, batch_size=1024, num_v_updates=2),
        "antmaze-medium-diverse-v0": dict(beta=0.6, loss_clip=7, batch_size=256, num_v_updates=4),
        "antmaze-large-play-v0": dict(beta=0.8, loss_clip=5, batch_size=1024, num_v_updates=1),
        "antmaze-large-diverse-v0": dict(beta=0.6, loss_clip=5, batch_size=1024, num_v_updates=1),
        "kitchen-complete-v0": dict(beta=2, loss_clip=7, batch_size=1024, num_v_updates=1),
        "kitchen-partial-v0": dict(beta=5, loss_clip=7, batch_size=1024, num_v_updates=1),
        "kitchen-mixed-v0": dict(beta=8, loss_clip=7, batch_size=1024, num_v_updates=1),
    },
    "authors": {
        "halfcheetah-medium-v2": dict(beta=1, loss_clip=7, batch_size=1024, num_v_updates=1),
        "hopper-medium-v2": dict(beta=5, loss_clip=7, batch_size=1024, num_v_updates=1),
        "walker2d-medium-v2": dict(beta=10, loss_clip=7, batch_size=1024, num_v_updates=1),
        "halfcheetah-medium-replay-v2": dict(beta=1, loss_clip=5, batch_size=256, num_v_updates=1),
        "hopper-medium-replay-v2": dict(beta=2, loss_clip=7, batch_size=256, num_v_updates=1),
        "walker2d-medium-replay-v2": dict(beta=5, loss_clip=5, batch_size=1024, num_v_updates=1),
        "halfcheetah-medium-expert-v2": dict(beta=1, loss_clip=5, batch_size=1024, num_v_updates=1),
        "hopper-medium-expert-v2": dict(beta=2, loss_clip=7, batch_size=1024, num_v_updates=1),
        "walker2d-medium-expert-v2": dict(beta=2, loss_clip=5, batch_size=256, num_v_updates=1),
        "antmaze-umaze-v0": dict(beta=2, loss_clip=7, batch_size=256, num_v_updates=1),
        "antmaze-umaze-diverse-v0": dict(beta=5, loss_clip=7, batch_size=256, num_v_updates=1),
        "antmaze-medium-play-v0": dict(beta=0.8, loss_clip=5, batch_size=256, num_v_updates=1),
        "antmaze-medium-diverse-v0": dict(beta=0.6, loss_clip=7, batch_size=256, num_v_updates=4),
        "antmaze-large-play-v0": dict(beta=0.6, loss_clip=5, batch_size=1024, num_v_updates=1),
        "antmaze-large-diverse-v0": dict(beta=0.55, loss_clip=5, batch_size=1024, num_v_updates=1),
        "kitchen-complete-v0": dict(beta=2, loss_clip=7, batch_size=1024, num_v_updates=1),
        "kitchen-partial-v0": dict(beta=5, loss_clip=7, batch_size=1024, num_v_updates=1),
        "kitchen-mixed-v0": dict(beta=8, loss_clip=7, batch_size=1024, num_v_updates=1),
    },
}
TUNED["authors"]["halfcheetah-medium-v2"]["noise"] = True  # their V-fitting augmentations
TUNED["authors"]["hopper-medium-expert-v2"]["sample_random_times"] = 1
TUNED["authors"]["antmaze-umaze-diverse-v0"]["sample_random_times"] = 1


def gumbel_loss(pred, target, beta: float, clip: float, clip_mode: str) -> torch.Tensor:
    """Gumbel regression (Eq. 7, 11) in the stable form of App. D.3.

    Unclipped, its minimiser over pred is beta log mean exp(target / beta). z = (target - pred) /
    beta is clipped (`both`: to [-clip, clip]; `upper`: from above only). Then e^m, with
    m = max(max z, -1) detached, is factored out: e^{z-m} - z e^{-m} - e^{-m} is
    e^{-m} (e^z - z - 1), so the minimiser is Eq. 7's and the gradient is rescaled per batch.
    """
    z = (target - pred) / beta
    if clip_mode == "both":
        z = z.clamp(-clip, clip)
    else:
        z = z.clamp(max=clip)
    max_z = z.max().clamp(min=-1.0).detach()
    return (torch.exp(z - max_z) - z * torch.exp(-max_z) - torch.exp(-max_z)).mean()


def clip_fraction(pred, target, beta: float, clip: float, clip_mode: str) -> torch.Tensor:
    """The share of samples whose z hits the clip: the first thing to read when beta is wrong."""
    z = (target - pred).detach() / beta
    clipped = z > clip
    if clip_mode == "both":
        clipped = clipped | (z < -clip)
    return clipped.float().mean()


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layer_norm=False, dropout=0.0) -> nn.Sequential:
    """Two ReLU hidden layers, each optionally with LayerNorm before and dropout after the ReLU
    (the authors' MLP); orthogonal weights with gain sqrt(2), zero biases (IQL's init)."""
    layers = []
    for n_in in (in_dim, hidden_dim):
        layers.append(nn.Linear(n_in, hidden_dim))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim, eps=1e-6))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
    net = nn.Sequential(*layers, FP32Linear(hidden_dim, out_dim))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, math.sqrt(2))
            nn.init.zeros_(layer.bias)
    return net


class Actor(nn.Module):
    """IQL's policy: a Gaussian with mean tanh(mu(s)) (evaluation's action) and a learned
    state-independent log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, action_dim, dropout=args.actor_dropout)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs):
        return torch.tanh(self.net(obs))

    def dist(self, obs) -> torch.distributions.Normal:
        """AWR's likelihood (Eq. 12); its samples, clipped to [-1, 1], explore when fine-tuning."""
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self(obs), std, validate_args=False)  # no checks: faster


class TwinCritic(nn.Module):
    """`num_critics` independent Q(s, a) MLPs (2: clipped double-Q); Q is (num_critics, batch)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_critics: int = 2):
        super().__init__()
        nets = [mlp(obs_dim + action_dim, hidden_dim, 1) for _ in range(num_critics)]
        self.nets = nn.ModuleList(nets)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], dim=-1)
        return torch.stack([net(x).squeeze(-1) for net in self.nets])

    def q1(self, obs, actions):
        """The first critic alone."""
        return self.nets[0](torch.cat([obs, actions], dim=-1)).squeeze(-1)


class Value(nn.Module):
    """V(s); X-QL's has LayerNorm before each ReLU (App. D.4: the authors' on every domain), IQL's
    has none."""

    def __init__(self, obs_dim: int, args: Args):
        super().__init__()
        layer_norm = args.value_loss == "gumbel"
        self.net = mlp(obs_dim, args.hidden_dim, 1, layer_norm, args.value_dropout)

    def forward(self, obs):
        return self.net(obs).squeeze(-1)


class Agent(nn.Module):
    """Every learned tensor in one module: its state_dict is what a checkpoint keeps."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args)
        self.value = Value(obs_dim, args)
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim)
        self.critic_target = TwinCritic(obs_dim, action_dim, args.hidden_dim).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())


def update(agent: Agent, optimizers: dict, batch, args: Args) -> dict:
    """One gradient step in IQL's order: V (num_v_updates steps on one batch and target, as the
    authors' code), then the actor, Q, the target critics."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():  # V's target: min_i Q'_i(s, a) of the target critics (Eq. 11, IQL)
        v_obs = obs
        v_actions = actions
        if args.noise:  # the authors' --noise: N(0, 0.1) clipped to +-0.5 on the dataset's actions
            noise = (0.1 * torch.randn_like(actions)).clamp(-0.5, 0.5)
            v_actions = (actions + noise).clamp(-1.0, 1.0)
        if args.sample_random_times:  # and uniform actions, this many per state (theirs)
            v_obs = torch.cat([obs, obs.repeat_interleave(args.sample_random_times, 0)])
            random_actions = 2 * torch.rand_like(v_actions.repeat(args.sample_random_times, 1)) - 1
            v_actions = torch.cat([v_actions, random_actions])
        v_target = agent.critic_target(v_obs, v_actions).min(dim=0).values
        q_data = v_target[: len(obs)]  # the target critics at the dataset's actions
        if args.noise:
            q_data = agent.critic_target(obs, actions).min(dim=0).values
    for _ in range(args.num_v_updates):
        losses = update_value(agent, optimizers["value"], v_obs, v_target, args)
    losses |= update_actor_critic(agent, optimizers["actor_critic"], batch, q_data, args)
    return losses


def update_value(agent: Agent, optimizer, v_obs, v_target, args: Args) -> dict:
    """One V step toward a fixed target."""
    v = agent.value(v_obs)
    if args.value_loss == "gumbel":
        # X-QL: the one change from IQL. Eq. 11 fits V = beta log E_data[e^{Q/beta}].
        v_loss = gumbel_loss(v, v_target, args.beta, args.loss_clip, args.clip_mode)
    else:  # IQL: the expectile loss |tau - 1(Q < V)| (Q - V)^2, an upper expectile of Q
        weight = torch.where(v_target > v, args.expectile, 1 - args.expectile)
        v_loss = (weight * (v_target - v).square()).mean()
    optimizer.zero_grad()
    v_loss.backward()
    optimizer.step()
    clipped = clip_fraction(v, v_target, args.beta, args.loss_clip, args.clip_mode)
    losses = {"losses/v_loss": v_loss, "values/v": v.mean(), "values/clip_fraction": clipped}
    return {tag: value.detach() for tag, value in losses.items()}


def update_actor_critic(agent: Agent, optimizer, batch, q_data, args: Args) -> dict:
    """The actor (Eq. 12) and Q (Eq. 14) from the updated V, then the target critics."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():  # the updated V at s and s', in one pass
        v, next_v = agent.value(torch.cat([obs, next_obs])).chunk(2)
        advantage = q_data - v
        weights = torch.exp(advantage * args.awr_temperature).clamp(max=args.max_exp_advantage)
        target_q = rewards + args.gamma * (1.0 - terminated) * next_v  # Eq. 14's target
    log_prob = agent.actor.dist(obs).log_prob(actions).sum(-1)
    actor_loss = -(weights * log_prob).mean()  # Eq. 12: advantage-weighted regression
    q = agent.critic(obs, actions)
    q_loss = (q - target_q).pow(2).mean(dim=1).sum()  # Eq. 14, summed over the twin critics
    optimizer.zero_grad()
    (actor_loss + q_loss).backward()  # disjoint parameters: one backward and one Adam serve both
    optimizer.step()
    with torch.no_grad():  # Polyak averaging of the target critics
        for target, online in zip(agent.critic_target.parameters(), agent.critic.parameters()):
            target.lerp_(online, args.tau)
    losses = {"losses/q_loss": q_loss, "losses/actor_loss": actor_loss, "values/q": q.mean()}
    losses["values/advantage"] = advantage.mean()
    return {tag: value.detach() for tag, value in losses.items()}


def main(args: Args) -> dict:
    """Train offline (then fine-tune with --online-steps), or with --eval-only evaluate a
    checkpoint; returns the results."""
    args, resume = resolve_args(args)  # resume: None, or the checkpoint of --resume
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as printed
    if args.eval_only:
        return evaluate_checkpoint(args)
    data = load_dataset(args)
    eval_env = make_eval_env(args, data)
    n = len(data["rewards"])
    obs_dim = data["observations"].shape[1]
    action_dim = data["actions"].shape[1]

    # ---- set-up ----
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)  # CPUs are slow on denormals (tiny floats): flush them to 0
    if args.track:
        import wandb

        name = os.path.basename(args.run_dir)  # a resumed run continues its wandb run
        project = dict(project=args.wandb_project_name, entity=args.wandb_entity)
        wandb.init(
            **project, name=name, id=name, resume="allow", sync_tensorboard=True, config=vars(args)
        )
    writer = SummaryWriter(args.run_dir, purge_step=resume["step"] + 1 if resume else None)
    rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    buffer = ReplayBuffer(n + args.online_steps, obs_dim, action_dim, device)  # data, then online
    columns = ["observations", "actions", "rewards", "next_observations", "terminals"]
    buffer.add(*(data[key] for key in columns), np.zeros(n))
    agent = Agent(obs_dim, action_dim, args).to(device)
    # Adam for V, and for the actor and the critics (a group each, the actor's first). Each lr is a
    # tensor, changed in place by the actor's cosine: no --compile graph is recompiled for it.
    lr = args.learning_rate
    groups = [
        {"params": m.parameters(), "lr": torch.tensor(lr)} for m in (agent.actor, agent.critic)
    ]
    optimizers = {
        "value": torch.optim.Adam(agent.value.parameters(), torch.tensor(lr), fused=True),
        "actor_critic": torch.optim.Adam(groups, fused=True),
    }
    update_fn = update
    policy = agent.actor
    if args.compile:
        update_fn = torch.compile(update_fn)
        policy = torch.compile(policy)
    if args.matmul_precision == "medium":  # bf16 autocast (torch's CPU "medium" measured slower)
        update_fn = torch.autocast(device.type, torch.bfloat16)(update_fn)
    else:  # high: TF32 on CUDA
        torch.set_float32_matmul_precision(args.matmul_precision)
    train_env = None
    obs = None
    if args.online_steps:
        train_env = make_env(data["env_spec"], args.seed, data["obs_mean"], data["obs_std"])
        obs, _ = train_env.reset()
    state = {"step": 0, "evaluations": [], "online_evaluations": []}  # what a resumed run continues
    if resume:
        obs = restore(resume, state, agent, optimizers, buffer, n, train_env, eval_env)
    saved = {
        key: data[key] for key in ("obs_mean", "obs_std", "env_spec", "ref")
    }  # for --eval-only
    last_finite = snapshot(agent, args, state["step"], {}) | saved
    log_time = time.time()
    log_step = state["step"]
    last_eval = "-"
    total = args.max_steps + args.online_steps
    stop_requests = []  # SIGTERM, SIGUSR1 (Slurm's notice before it stops or requeues a job)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, lambda number, frame: stop_requests.append(number))

    # ---- the loop: (fine-tuning: act, store), update, log, evaluate, checkpoint ----
    try:
        for step in range(state["step"] + 1, total + 1):
            online_step = step - args.max_steps  # > 0 while fine-tuning: one env step per update
            if online_step > 0:
                with torch.no_grad():
                    dist = agent.actor.dist(torch.as_tensor(obs, device=device).unsqueeze(0))
                    action = dist.sample()[0].clamp(-1, 1).cpu().numpy()
                next_obs, reward, terminated, truncated, info = train_env.step(action)
                reward = (
                    reward * data["reward_scale"] + data["reward_shift"]
                )  # the dataset's transform
                buffer.add([obs], [action], [reward], [next_obs], [terminated], [truncated])
                obs = next_obs
                if terminated or truncated:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], online_step)
                    obs, _ = train_env.reset()
            if args.cosine_actor_lr:  # the actor's lr decays to 0 over --max-steps (optax's cosine)
                decay = 0.5 + 0.5 * math.cos(math.pi * min((step - 1) / args.max_steps, 1))
                optimizers["actor_critic"].param_groups[0]["lr"].fill_(args.learning_rate * decay)
            losses = update_fn(agent, optimizers, buffer.sample(args.batch_size), args)
            if not torch.isfinite(torch.stack(list(losses.values()))).all():  # a host sync
                stop_on_nonfinite(args.run_dir, step, last_finite)

            phase_step = step if online_step <= 0 else online_step  # fine-tuning: env steps
            evaluate_now = step in (args.max_steps, total) or crossed(phase_step, 1, args.eval_freq)
            if step % args.log_freq == 0 or evaluate_now:
                values = {tag: value.item() for tag, value in losses.items()}
                values["charts/actor_lr"] = optimizers["actor_critic"].param_groups[0]["lr"].item()
                last_finite = snapshot(agent, args, step, values) | saved
                sps = (step - log_step) / (time.time() - log_time)
                log_time = time.time()
                log_step = step
                log_progress(writer, values, step, total, sps, last_eval)
            if evaluate_now and eval_env is not None:
                agent.eval()  # no dropout in the deterministic policy
                returns, _ = evaluate(policy, eval_env, args.eval_episodes, device)
                agent.train()
                score = normalized_score(returns.mean(), data["ref"])
                prefix = "eval" if online_step <= 0 else "finetune"
                evaluations = "evaluations" if online_step <= 0 else "online_evaluations"
                state[evaluations].append((phase_step, float(returns.mean()), score))
                writer.add_scalar(f"{prefix}/episodic_return", returns.mean(), phase_step)
                last_eval = f"{returns.mean():.2f}"
                if score is not None:
                    writer.add_scalar(f"{prefix}/normalized_score", score, phase_step)
                    last_eval = f"{score:.1f} (normalised)"
                line = f"step {step}/{total} | {prefix} return {returns.mean():.2f}"
                line += f" +- {returns.std():.2f}"
                print(line if score is None else f"{line} | normalised score {score:.1f}")

            state["step"] = step
            if stop_requests or crossed(step, 1, args.checkpoint_freq):
                save_checkpoint(
                    args, state, agent, optimizers, saved, (buffer, n, train_env, eval_env)
                )
            if stop_requests:
                path = f"{args.run_dir}/checkpoint.pt"
                raise SystemExit(f"{PROG}: stopped by a signal at step {step}; --resume {path}")
    finally:  # after a NaN stop, a signal or Ctrl-C too: the default handlers again
        for number in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, signal.SIG_DFL)

    # ---- the end ----
    writer.close()
    if args.save_model or args.checkpoint_freq:
        resumable = (buffer, n, train_env, eval_env) if args.checkpoint_freq else None
        save_checkpoint(args, state, agent, optimizers, saved, resumable)
    return report(state, data, eval_env, args)


# ---- plumbing: datasets, environments, buffer, checkpoints, logging, input checks ----


def d4rl_datasets() -> dict[str, dict]:
    """D4RL name -> download URL (its file name is d4rl's), reference returns (d4rl/infos.py) and
    episode length."""
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    table = {}
    refs = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3)}
    refs["walker2d"] = (1.629008, 4592.3)
    kinds = ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert")
    for robot, ref in refs.items():
        for v in ("v1", "v2"):
            for kind in kinds:
                path = f"gym_mujoco_{v}/{robot}_{kind.replace('-', '_')}-{v}"
                table[f"{robot}-{kind}-{v}"] = dict(url=f"{base}/{path}.hdf5", ref=ref, steps=1000)
    mazes = {"umaze": ("u", False, False), "umaze-diverse": ("u", True, True)}
    mazes |= {"medium-play": ("big", True, False), "medium-diverse": ("big", True, True)}
    mazes |= {"large-play": ("hardest", True, False), "large-diverse": ("hardest", True, True)}
    for kind, (maze, multistart, multigoal) in mazes.items():
        stem = f"Ant_maze_{maze}-maze_noisy_multistart_{multistart}_multigoal_{multigoal}_sparse"
        steps = 700 if "umaze" in kind else 1000
        url = f"{base}/ant_maze_new/{stem}.hdf5"
        table[f"antmaze-{kind}-v0"] = dict(url=url, ref=(0.0, 1.0), steps=steps)
        url = f"{base}/ant_maze_v2/{stem}_fixed.hdf5"
        table[f"antmaze-{kind}-v2"] = dict(url=url, ref=(0.0, 1.0), steps=steps)
    kitchens = {"complete": "mini_kitchen_microwave_kettle_light_slider"}
    kitchens["partial"] = "kitchen_microwave_kettle_light_slider"
    kitchens["mixed"] = "kitchen_microwave_kettle_bottomburner_light"
    for kind, stem in kitchens.items():
        url = f"{base}/kitchen/{stem}-v0.hdf5"
        table[f"kitchen-{kind}-v0"] = dict(url=url, ref=(0.0, 4.0), steps=280)
    adroit = {"pen": (96.262799, 3076.8331017826877), "hammer": (-274.856578, 12794.134825156867)}
    adroit |= {"relocate": (-6.425911, 4233.877797728884), "door": (-56.512833, 2880.5693087298737)}
    stems = {"human": "v0_demos_clipped", "cloned": "demos-v0-bc-combined"}
    stems["expert"] = "v0_expert_clipped"
    for task, ref in adroit.items():
        steps = 100 if task == "pen" else 200
        for kind, stem in stems.items():
            url = f"{base}/hand_dapg/{task}-{stem}.hdf5"
            table[f"{task}-{kind}-v0"] = dict(url=url, ref=ref, steps=steps)
            url = f"{base}/hand_dapg_v1/{task}-{kind}-v1.hdf5"
            table[f"{task}-{kind}-v1"] = dict(url=url, ref=ref, steps=steps)
    return table


D4RL = d4rl_datasets()
# D4RL's locomotion data came from gym's v2 envs, whose observations gymnasium's v4 keep.
D4RL_EVAL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}


def read_hdf5(path: str) -> dict:
    """A D4RL-format HDF5 file, read with h5py and checked as d4rl's get_dataset does, and its
    attributes."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            data = {key: f[key][()] if key in f else None for key in keys}
            data["attrs"] = dict(f.attrs)
    except OSError as error:
        raise SystemExit(f"{PROG}: {path}: not a readable HDF5 file ({error}).")
    missing = [key for key in keys[:4] if data[key] is None]
    if missing:
        raise SystemExit(
            f"{PROG}: {path}: the file lacks {missing}; D4RL's has {', '.join(keys[:4])}."
        )
    n = len(data["observations"])
    wrong = [key for key in keys[1:] if data[key] is not None and len(data[key]) != n]
    if wrong:
        rows = len(data[wrong[0]])
        raise SystemExit(f"{PROG}: {path}: {wrong[0]} has {rows} rows but observations has {n}.")
    for key in keys[2:]:  # rewards, terminals and timeouts as vectors
        if data[key] is not None:
            data[key] = data[key].reshape(n, -1)[:, 0]
    return data


def qlearning_dataset(data: dict, max_episode_steps: int) -> dict:
    """Exactly d4rl.qlearning_dataset, as the published numbers used: row i's next observation is
    row i+1; rows ending in a timeout are dropped (row i+1 starts another episode), and so is the
    last one. A file without timeouts: d4rl counts the steps of each episode."""
    if data["timeouts"] is not None:
        keep = ~data["timeouts"][:-1].astype(bool)
    else:
        keep = np.zeros(len(data["rewards"]) - 1, dtype=bool)
        episode_step = 0
        for i in range(len(keep)):
            keep[i] = episode_step != max_episode_steps - 1
            if not keep[i]:
                episode_step = 0
            elif data["terminals"][i]:
                episode_step = 1  # d4rl restarts its count, then counts this row
            else:
                episode_step += 1
    index = np.flatnonzero(keep)
    return dict(
        observations=data["observations"][index],
        actions=data["actions"][index],
        rewards=data["rewards"][index],
        next_observations=data["observations"][index + 1],
        terminals=data["terminals"][index].astype(bool),
    )


def episode_returns(data: dict) -> np.ndarray:
    """Episode returns, cut as IQL's split_into_trajectories: at obs[i+1] != next_obs[i], at
    terminals, at the end."""
    jumps = np.abs(data["observations"][1:] - data["next_observations"][:-1]).max(1) > 1e-6
    ends = np.append(jumps | data["terminals"][:-1], True)
    episode = np.append(0, np.cumsum(ends[:-1]))
    return np.bincount(episode, weights=data["rewards"].astype(np.float64))


def flatten(space: gym.Space, observations) -> np.ndarray:
    """(T, ...) observations, or a dict of them, as (T, D) in FlattenObservation's order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten(space[key], observations[key]) for key in space.spaces], 1)
    return np.asarray(observations, dtype=np.float32).reshape(len(observations), -1)


def load_minari(args: Args) -> tuple:
    """A Minari dataset from the local store: its transitions (actions mapped into [-1, 1]), eval
    env and reference returns."""
    try:
        import minari

        dataset = minari.load_dataset(args.env_id)
    except ImportError:
        hint = "pip install minari==0.5.4 pillow"
        raise SystemExit(f"{PROG}: {args.env_id!r} is a Minari id, but minari is missing: {hint}.")
    except (FileNotFoundError, ValueError) as error:
        hint = f"run `minari download {args.env_id}`"
        raise SystemExit(f"{PROG}: Minari dataset {args.env_id!r} not found ({error}); {hint}.")
    space = dataset.action_space
    if not isinstance(space, gym.spaces.Box):
        need = "the AWR actor needs a continuous (Box) one"
        raise SystemExit(f"{PROG}: {args.env_id}: action space {space}; {need}.")
    columns = {key: [] for key in ("observations", "actions", "rewards", "next_observations")}
    columns["terminals"] = []
    for episode in dataset.iterate_episodes():
        obs = flatten(dataset.observation_space, episode.observations)
        columns["observations"].append(obs[:-1])
        columns["actions"].append(np.asarray(episode.actions, dtype=np.float32))
        columns["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        columns["next_observations"].append(obs[1:])
        columns["terminals"].append(np.asarray(episode.terminations, dtype=bool))
    data = {key: np.concatenate(value) for key, value in columns.items()}
    data["actions"] = 2 * (data["actions"] - space.low) / (space.high - space.low) - 1
    spec = args.eval_env_id
    if spec is None and dataset.env_spec:
        spec = dataset.recover_environment(eval_env=True).spec.to_json()
    metadata = dataset.storage.metadata
    return data, spec, (metadata.get("ref_min_score"), metadata.get("ref_max_score"))


def load_dataset(args: Args) -> dict:
    """The transitions of --env-id or --dataset-path, preprocessed; their eval env (or why none),
    the dataset's returns and the transforms to apply to online data."""
    info = D4RL.get(args.env_id)
    robot = args.env_id.split("-")[0]
    no_eval_reason = None
    if "/" in args.env_id and not args.dataset_path:
        data, spec, ref = load_minari(args)
        if spec is None:
            no_eval_reason = "the Minari dataset records no environment (pass --eval-env-id)"
    else:
        raw = read_hdf5(args.dataset_path)  # a D4RL name's: where d4rl keeps it (resolve_args)
        data = qlearning_dataset(raw, info["steps"] if info else 0)
        ref = info["ref"] if info else (None, None)
        spec = args.eval_env_id or raw["attrs"].get("env_id")
        no_eval_reason = "pass --eval-env-id to evaluate"
        if info:
            spec = args.eval_env_id or D4RL_EVAL_ENVS.get(robot)
            no_eval_reason = f"D4RL's {robot} observations match no gymnasium env (use Minari's"
            no_eval_reason += " D4RL datasets, or --eval-env-id)"
    broken = [key for key, value in data.items() if not np.isfinite(value.astype(float)).all()]
    if broken:
        raise SystemExit(f"{PROG}: {args.env_id}: the dataset's {broken[0]} contain NaN or inf.")
    returns = episode_returns(data)
    # The authors' (IQL's) preprocessing: rewards x 1000 / (max - min return) on halfcheetah,
    # hopper and walker2d, rewards - 1 on antmaze; none on data that is not D4RL's.
    norm = args.reward_norm
    name = args.env_id.lower()
    if norm == "auto":
        norm = "none"
        d4rl_data = info is not None or "/" in name
        if d4rl_data and any(robot in name for robot in D4RL_EVAL_ENVS):
            norm = "returns"
        if d4rl_data and "antmaze" in name:
            norm = "antmaze"
    data["reward_scale"] = 1.0
    if norm == "returns":
        data["reward_scale"] = 1000.0 / max(returns.max() - returns.min(), 1e-8)
    data["reward_shift"] = -1.0 if norm == "antmaze" else 0.0  # online rewards get the same
    data["rewards"] = data["rewards"] * data["reward_scale"] + data["reward_shift"]
    # a finite log-likelihood for the AWR actor (IQL)
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    mean = 0.0
    std = 1.0
    if args.normalize_states:
        mean = data["observations"].mean(0)
        std = data["observations"].std(0) + 1e-3
    for key in ("observations", "next_observations"):
        data[key] = (data[key] - mean) / std
    if args.ref_min_score is not None:
        ref = (args.ref_min_score, ref[1])
    if args.ref_max_score is not None:
        ref = (ref[0], args.ref_max_score)
    data |= dict(obs_mean=mean, obs_std=std, env_spec=spec, ref=ref, returns=returns)
    data["no_eval_reason"] = None if spec else no_eval_reason
    return data


def make_env(env_spec: str, seed: int, obs_mean=0.0, obs_std=1.0) -> gym.Env:
    """An env of an id or a Minari JSON spec: observations standardised by the dataset's statistics,
    actions in [-1, 1], seeded once here (later resets continue one random stream)."""
    warnings.filterwarnings("ignore", ".*is out of date", DeprecationWarning)  # v4, on purpose
    if env_spec.startswith("{"):
        env_spec = gym.envs.registration.EnvSpec.from_json(env_spec)
    try:
        env = gym.make(env_spec)
    except gym.error.Error:  # AntMaze, FrankaKitchen and Adroit ids live in gymnasium-robotics
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        env = gym.make(env_spec)
    env = gym.wrappers.FlattenObservation(env)
    space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    env = gym.wrappers.TransformObservation(
        env, lambda obs: ((obs - obs_mean) / obs_std).astype(np.float32), space
    )
    # RescaleAction's bounds in the space's own dtype: others make numpy warn
    bounds = np.array([-1, 1], env.action_space.dtype)
    env = Replayable(gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, *bounds)))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


class Replayable(gym.Wrapper):
    """Records how the episode in progress began and its actions: --resume replays them into a
    new env, which is then in the same state (the simulators here are deterministic)."""

    def reset(self, **kwargs):
        self.episode = dict(rng=copy.deepcopy(self.unwrapped.np_random), reset=kwargs, actions=[])
        return self.env.reset(**kwargs)

    def step(self, action):
        self.episode["actions"].append(np.array(action))
        return self.env.step(action)

    def replay(self, episode: dict) -> np.ndarray:
        """Rebuild `episode`, another copy's `self.episode`; returns its last observation."""
        self.unwrapped.np_random = copy.deepcopy(episode["rng"])
        obs, _ = self.reset(**episode["reset"])
        for action in episode["actions"]:
            obs = self.step(action)[0]
        return obs


@torch.no_grad()
def evaluate(policy, env: gym.Env, episodes: int, device: torch.device) -> tuple:
    """Returns and lengths of deterministic episodes of `policy` (observations -> actions in
    [-1, 1]). The env is not reseeded: each evaluation sees new start states."""
    returns = []
    lengths = []
    for _ in range(episodes):
        obs, info = env.reset()
        while "episode" not in info:  # RecordEpisodeStatistics adds it at the episode's end
            action = policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
            obs, _, _, _, info = env.step(action)
        returns.append(info["episode"]["r"])
        lengths.append(info["episode"]["l"])
    return np.array(returns), np.array(lengths)


class ReplayBuffer:
    """A circular buffer on the device, a row per transition: observation, action, reward, next
    observation, terminated (a true end: no bootstrap), truncated (a time limit: bootstrap).
    Batches are drawn on the device; updates read `terminated`, never `truncated`."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.widths = [obs_dim, action_dim, 1, obs_dim, 1, 1]
        self.rows = torch.zeros((capacity, sum(self.widths)), device=device)
        self.ptr = 0
        self.size = 0

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        """Append n transitions (arrays of n rows), overwriting the oldest once full."""
        rows = np.column_stack([obs, actions, rewards, next_obs, terminated, truncated])
        index = (self.ptr + np.arange(len(rows))) % len(self.rows)
        self.rows[index] = torch.as_tensor(rows, dtype=torch.float32, device=self.rows.device)
        self.ptr = (self.ptr + len(rows)) % len(self.rows)
        self.size = min(self.size + len(rows), len(self.rows))

    def sample(self, batch_size: int) -> tuple:
        """A batch drawn uniformly: obs, actions, rewards, next_obs, terminated."""
        index = torch.randint(0, self.size, (batch_size,), device=self.rows.device)
        obs, actions, rewards, next_obs, terminated, _ = self.rows[index].split(self.widths, dim=1)
        return obs, actions, rewards[:, 0], next_obs, terminated[:, 0]


class FP32Linear(nn.Linear):
    """A Linear layer that stays fp32 under bf16 autocast (--matmul-precision medium): the outputs
    (Q, V, actions) keep fp32's precision."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def crossed(step: int, num_envs: int, every: int) -> bool:
    """Did the last iteration (num_envs env steps, ending at `step`) pass a multiple of `every`?"""
    return every > 0 and step // every > (step - num_envs) // every


def log_progress(writer, values: dict, step: int, total: int, sps: float, last_eval: str) -> None:
    """TensorBoard scalars and `step N/M | SPS … | <losses> | last eval … | ETA h:mm:ss`."""
    for tag, value in {**values, "charts/SPS": sps}.items():
        writer.add_scalar(tag, value, step)
    losses = [f"{tag[7:]} {value:.4g}" for tag, value in values.items() if "losses/" in tag]
    eta = datetime.timedelta(seconds=round((total - step) / sps))
    line = " | ".join([f"step {step}/{total}", f"SPS {sps:.0f}", *losses])
    print(f"{line} | last eval {last_eval} | ETA {eta}")


def load_checkpoint(path: str | None) -> dict:
    """A checkpoint written by this script, loaded on the CPU, or a one-line error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["script"] == PROG and {"agent", "args", "step"} <= set(checkpoint)
    except Exception as error:  # noqa: BLE001 - a missing, truncated or foreign file: one mistake
        kind = type(error).__name__
        raise SystemExit(f"{PROG}: {path} is not a checkpoint of {PROG} --save-model ({kind}).")
    return checkpoint


def snapshot(agent: Agent, args: Args, step: int, values: dict) -> dict:
    """The parameters at a log interval whose losses were all finite: what a NaN stop saves."""
    parameters = {key: value.clone() for key, value in agent.state_dict().items()}
    return {"script": PROG, "agent": parameters, "args": vars(args), "step": step, "values": values}


def stop_on_nonfinite(run_dir: str, step: int, last_finite: dict) -> None:
    """App. D.6: X- variants occasionally blow up on outliers: stop rather than train on NaN."""
    atomic_save(last_finite, f"{run_dir}/last_finite_checkpoint.pt")
    values = [f"{tag.split('/')[1]}={value:.4g}" for tag, value in last_finite["values"].items()]
    finite = f"last finite values (step {last_finite['step']}): {', '.join(values) or 'none yet'}"
    saved = f"parameters of step {last_finite['step']} saved to {run_dir}/last_finite_checkpoint.pt"
    advice = "Try a larger --beta or a smaller --loss-clip."
    raise SystemExit(f"{PROG}: a loss became NaN/inf at step {step}; {finite}; {saved}. {advice}")


def atomic_save(contents: dict, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    torch.save(contents, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def normalized_score(episode_return: float, ref: tuple) -> float | None:
    """D4RL's normalised score 100 (R - random) / (expert - random); None without references."""
    if None in ref:
        return None
    return 100.0 * (episode_return - ref[0]) / (ref[1] - ref[0])


def make_eval_env(args: Args, data: dict) -> gym.Env | None:
    """The eval env (None if the data has none), checked against the data (the last user errors);
    prints the settings."""
    eval_env = None
    if data["env_spec"]:
        try:
            eval_env = make_env(
                data["env_spec"], args.seed + 10_000, data["obs_mean"], data["obs_std"]
            )
        except Exception as error:  # noqa: BLE001 - an unknown id or a missing package: the user's
            hint = "pass another --eval-env-id"
            raise SystemExit(
                f"{PROG}: cannot make the eval env {data['env_spec']}: {error}; {hint}."
            )
    n = len(data["rewards"])
    dims = (data["observations"].shape[1], data["actions"].shape[1])
    env_dims = dims
    if eval_env:
        env_dims = (eval_env.observation_space.shape[0], eval_env.action_space.shape[0])
    problems = []
    if args.batch_size > n:
        problems.append(
            f"--batch-size {args.batch_size} is larger than the dataset ({n} transitions)"
        )
    if env_dims != dims:
        problems.append(
            f"the dataset's observations/actions are {dims[0]}/{dims[1]}-d but the eval env "
            f"{eval_env.spec.id} has {env_dims[0]}/{env_dims[1]}-d; pass a matching --eval-env-id"
        )
    if args.online_steps and not eval_env:
        problems.append(f"--online-steps needs an environment: {data['no_eval_reason']}")
    if problems:
        raise SystemExit(f"{PROG}: {problems[0]}.")
    keys = ["value_loss", "beta", "loss_clip", "batch_size", "num_v_updates", "awr_temperature"]
    settings = ", ".join(
        f"{key}={getattr(args, key)}" for key in keys + ["expectile", "cosine_actor_lr"]
    )
    transform = f"rewards x {data['reward_scale']:.4g} + {data['reward_shift']:g}"
    env_name = eval_env.spec.id if eval_env else None
    print(f"{PROG}: {args.env_id}, {n} transitions, {transform}, eval env {env_name}, {settings}")
    if eval_env is None:
        print(f"{PROG}: evaluation skipped: {data['no_eval_reason']}")
    elif None in data["ref"]:
        print(f"{PROG}: no reference returns")
    return eval_env


def report(state: dict, data: dict, eval_env, args: Args) -> dict:
    """{run_dir}/results.json and the closing line: final and best returns (and normalised scores;
    the paper does not say which Table 1 shows), the dataset's, fine-tuning's before and after."""
    returns = [value for _, value, _ in state["evaluations"]]
    scores = [score for _, _, score in state["evaluations"] if score is not None]
    result = dict(env_id=args.env_id, exp_name=args.exp_name, seed=args.seed, run_dir=args.run_dir)
    result["evaluations"] = state["evaluations"]
    result["online_evaluations"] = state["online_evaluations"]
    result["final_return"] = returns[-1] if returns else None
    result["best_return"] = max(returns, default=None)
    result["final_normalized_score"] = scores[-1] if scores else None
    result["best_normalized_score"] = max(scores, default=None)
    result["dataset_return"] = float(data["returns"].mean())
    result["dataset_normalized_score"] = normalized_score(data["returns"].mean(), data["ref"])
    result["evaluation_skipped"] = None if eval_env else data["no_eval_reason"]
    if state["online_evaluations"] and scores:  # Table 2's "before -> after"
        result["finetune_before"] = scores[-1]
        result["finetune_after"] = state["online_evaluations"][-1][2]
        change = f"{scores[-1]:.1f} -> {result['finetune_after']:.1f}"
        print(f"{PROG}: fine-tuning {args.env_id}: normalised score {change}")
    with open(f"{args.run_dir}/results.json", "w") as f:
        json.dump(result, f, indent=1)
    summary = "no evaluation"
    if returns:
        summary = f"final return {returns[-1]:.2f}, best {max(returns):.2f}"
    if scores:
        summary = f"final normalised score {scores[-1]:.1f}, best {max(scores):.1f}"
    saved = (
        f"; checkpoint {args.run_dir}/checkpoint.pt"
        if args.save_model or args.checkpoint_freq
        else ""
    )
    print(f"{PROG}: done, {summary}; run folder {args.run_dir}{saved}")
    return result


def save_checkpoint(
    args: Args, state: dict, agent, optimizers, saved: dict, resumable=None
) -> None:
    """{run_dir}/checkpoint.pt: the model, its optimisers and settings, and what --eval-only needs
    of the data (`saved`); given `resumable` (buffer, dataset size, fine-tuning env, eval env) also
    what --resume needs to continue exactly (see `restore`)."""
    checkpoint = {"script": PROG, "args": vars(args), "step": state["step"], **saved}
    checkpoint["agent"] = agent.state_dict()
    checkpoint["optimizers"] = {name: opt.state_dict() for name, opt in optimizers.items()}
    if resumable:
        buffer, n, train_env, eval_env = resumable
        checkpoint["state"] = state
        checkpoint["online_rows"] = buffer.rows[n : buffer.size].cpu()  # the dataset: reloaded
        envs = [env for env in (train_env, eval_env) if env is not None]
        checkpoint["episodes"] = [env.get_wrapper_attr("episode") for env in envs]
        checkpoint["rng"] = [random.getstate(), np.random.get_state(), torch.get_rng_state()]
    atomic_save(checkpoint, f"{args.run_dir}/checkpoint.pt")


def restore(checkpoint, state, agent, optimizers, buffer, n, train_env, eval_env) -> np.ndarray:
    """Continue a run from its checkpoint: the model and optimisers, the counters, the online
    rows, the episodes in progress (replayed), every random state; returns the fine-tuning
    env's observation."""
    agent.load_state_dict(checkpoint["agent"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    state.update(checkpoint["state"])
    online_rows = checkpoint["online_rows"]
    buffer.rows[n : n + len(online_rows)] = online_rows
    buffer.size = n + len(online_rows)
    buffer.ptr = buffer.size % len(buffer.rows)
    envs = [env for env in (train_env, eval_env) if env is not None]
    observations = [
        env.get_wrapper_attr("replay")(e) for env, e in zip(envs, checkpoint["episodes"])
    ]
    python_rng, numpy_rng, torch_rng = checkpoint["rng"]
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    torch.set_rng_state(torch_rng)
    print(f"{PROG}: resumed {checkpoint['args']['run_dir']} at step {state['step']}")
    return observations[0] if train_env else None


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-only: rebuild the agent of --checkpoint and run deterministic episodes on its eval
    env, with the dataset's observation statistics."""
    checkpoint = load_checkpoint(args.checkpoint)
    trained = Args(**checkpoint["args"])
    spec = args.eval_env_id or checkpoint["env_spec"]
    if spec is None:
        raise SystemExit(f"{PROG}: no eval env is known for {trained.env_id}; pass --eval-env-id.")
    env = make_env(spec, args.seed + 10_000, checkpoint["obs_mean"], checkpoint["obs_std"])
    agent = Agent(env.observation_space.shape[0], env.action_space.shape[0], trained).eval()
    agent.load_state_dict(checkpoint["agent"])
    episodes = args.eval_episodes or trained.eval_episodes
    returns, _ = evaluate(agent.actor, env, episodes, torch.device("cpu"))
    score = normalized_score(returns.mean(), checkpoint["ref"])
    where = f"{args.checkpoint} (step {checkpoint['step']}) on {env.spec.id}"
    result = f"return {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes"
    print(
        f"{PROG}: {where}: {result}" + ("" if score is None else f", normalised score {score:.1f}")
    )
    return {"returns": returns.tolist(), "normalized_score": score}


def resolve_args(args: Args) -> tuple[Args, dict | None]:
    """User errors end here, one line each, before anything is written; then the per-domain (or
    --tuned) settings fill the fields left unset, once. With --resume, its checkpoint is returned
    too, if it can continue this run: resumable, the same settings but where it writes."""
    file_name = os.path.basename(args.dataset_path).rsplit(".", 1)[0] if args.dataset_path else None
    env_id = args.env_id or file_name or "hopper-medium-v2"
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))  # d4rl's
    path = args.dataset_path
    if env_id in D4RL and not path and not args.eval_only:
        path = os.path.join(folder, os.path.basename(D4RL[env_id]["url"]))
    problems = []
    if not (env_id in D4RL or "/" in env_id or args.dataset_path):
        close = ", ".join(difflib.get_close_matches(env_id, D4RL, 3) or ["hopper-medium-v2"])
        problems.append(
            f"unknown --env-id {env_id!r}: not a D4RL name (e.g. {close}) nor a Minari id (which "
            "has a '/'); pass --dataset-path for a file of your own"
        )
    elif args.dataset_path and not os.path.isfile(path):
        problems.append(f"--dataset-path {path!r} does not exist")
    elif path and not os.path.isfile(path):
        download = f"wget -P {folder} {D4RL[env_id]['url']}"
        problems.append(f"{path} (the file of {env_id}) not found; download it with `{download}`")
        problems[-1] += ", or pass --dataset-path"
    if args.tuned and env_id not in TUNED["paper"]:
        listed = ", ".join(TUNED["paper"])
        problems.append(f"--tuned: no tuned values for {env_id!r}; the tables list {listed}")
    if args.beta is not None and args.beta <= 0:
        problems.append("--beta must be > 0 (it divides Q - V in Eq. 11)")
    if args.expectile is not None and not 0 < args.expectile < 1:
        problems.append("--expectile must be in (0, 1)")
    at_least_one = [args.max_steps, args.log_freq, args.hidden_dim, args.batch_size]
    at_least_one += [args.num_v_updates, args.eval_episodes]
    if any(value is not None and value < 1 for value in at_least_one):
        problems.append(
            "--max-steps, --log-freq, --hidden-dim, --batch-size, --num-v-updates and "
            "--eval-episodes must be >= 1"
        )
    if min(args.online_steps, args.eval_freq, args.sample_random_times, args.checkpoint_freq) < 0:
        problems.append(
            "--online-steps, --eval-freq, --sample-random-times and --checkpoint-freq must be >= 0"
        )
    if not 0 <= (args.actor_dropout or 0) < 1 or not 0 <= args.value_dropout < 1:
        problems.append("dropout rates must be in [0, 1)")
    if args.track and not find_spec("wandb"):
        problems.append("--track needs wandb: pip install wandb")
    if args.eval_only and not args.checkpoint:
        problems.append("--eval-only needs --checkpoint PATH (a checkpoint.pt of --save-model)")
    if problems:
        raise SystemExit(f"{PROG}: {problems[0]}.")
    if args.eval_only:
        return args, None

    task = env_id.lower().split("-")[0]
    if "/" in env_id:
        task = env_id.lower().split("/")[1]  # `pen`, not `invertedpendulum`
    domain = "locomotion"  # also for datasets of no known domain
    if "antmaze" in env_id.lower():
        domain = "antmaze"
    if "kitchen" in env_id.lower():
        domain = "kitchen"
    if task in ("pen", "hammer", "door", "relocate"):
        domain = "adroit"
    table = DOMAINS[domain] | dict(num_v_updates=1)
    if args.tuned:
        tuned = TUNED[args.tuned_table][env_id]
        table |= tuned
        args = dataclasses.replace(args, noise=args.noise or tuned.get("noise", False))
        random_times = max(args.sample_random_times, tuned.get("sample_random_times", 0))
        args = dataclasses.replace(args, sample_random_times=random_times)
    # The actor's cosine: where the domain's config has it, on every domain for IQL, never when
    # fine-tuning (the authors' configs).
    cosine = table["cosine"] or args.value_loss == "expectile"
    cosine = cosine and args.cosine_actor_lr and not args.online_steps
    filled = {}
    for key in ("beta", "loss_clip", "batch_size", "awr_temperature", "expectile"):
        filled[key] = table[key] if getattr(args, key) is None else getattr(args, key)
    for key in ("actor_dropout", "eval_episodes", "num_v_updates"):
        filled[key] = table[key] if getattr(args, key) is None else getattr(args, key)
    run_name = f"{env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or f"{args.runs_dir}/{run_name}"
    if args.resume:
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    args = dataclasses.replace(
        args, **filled, env_id=env_id, dataset_path=path, cosine_actor_lr=cosine, run_dir=run_dir
    )
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    may_change = ("resume", "run_dir", "runs_dir", "checkpoint_freq", "save_model", "track")
    saved = checkpoint["args"]
    changed = [k for k, v in vars(args).items() if k not in may_change and saved.get(k) != v]
    if "online_rows" not in checkpoint:
        problem = "holds no training state (--save-model's); --checkpoint-freq N writes one"
    elif changed:
        flag = changed[0].replace("_", "-")
        problem = f"was trained with --{flag} {saved.get(changed[0])}: resume with its settings"
    else:
        return args, checkpoint
    raise SystemExit(f"{PROG}: --resume {args.resume} {problem}.")


if __name__ == "__main__":
    main(tyro.cli(Args))
