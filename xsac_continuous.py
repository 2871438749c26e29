"""X-SAC: Soft Actor-Critic whose soft value V is fitted by Gumbel regression, with no entropy term.

V regresses min_i Q_i(s, a) at a ~ pi(.|s) with the Gumbel loss (Eq. 11), whose minimiser is the soft maximum
beta log E[exp(Q / beta)] (Lemma 3.5): the soft value without log-probabilities. Q regresses r + gamma V'(s')
(Eq. 14); the actor is SAC's (Eq. 13 with mu uniform). `--value-loss mse` is the paper's baseline, SAC with a
value network (V toward min Q - alpha log pi), identical otherwise (Figure 3). Paper: Sec. 3.4-3.5, App. D.3,
D.6, Tables 5-6. The line where X-SAC departs from SAC is marked "X-SAC:" in `update`.

Usage: python xsac_continuous.py --env-id dm_control/hopper-hop-v0 --beta 2 --save-model
       python xsac_continuous.py --eval-only --checkpoint runs/<run>/checkpoint.pt --eval-episodes 10

Deviations (from the paper, or from the authors' code github.com/Div99/XQL, online/):
- Defaults are Table 5 / App. D.6 (exp clip 8, actor every update) and 1M env steps. The authors' xsac.yaml runs
  `--loss-clip 10 --policy-frequency 2`, 2M steps and beta 1 on hopper-hop, 2 on walker-run (`--beta-table authors`).
- From pytorch_sac and the authors' code (the paper is silent): alpha starts at 0.1, V target tau 0.005 every 2nd
  update, log-std in [-5, 2], orthogonal init, 5000 random steps, 10 eval episodes every 10k steps; beta 2 outside
  Table 6. z is clamped to [-clip, clip] as in their online code (`--clip-mode upper`: as their offline code).
- Ours: two plain MLPs for the twin critics (they stack them: the same function); time limits bootstrap; off by
  default, `--value-loss taylor` (MXQL), `--num-envs`, `--compile`, `--matmul-precision`.
"""

import dataclasses
import datetime
import difflib
import importlib.util
import json
import math
import os
import random
import sys
import time
from functools import partial
from typing import Literal, NamedTuple

PROG = os.path.splitext(os.path.basename(__file__))[0]
# dm_control picks its OpenGL backend when `import shimmy` below imports it; without a display its default (GLFW)
# prints an X11 warning. Headless default: EGL with an NVIDIA GPU, else OSMesa for video (libosmesa6), else none.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    headless = "osmesa" if "--capture-video" in sys.argv else "disable"
    os.environ["MUJOCO_GL"] = "egl" if os.path.exists("/dev/nvidiactl") else headless
    if "--capture-video" in sys.argv:
        print(f"{PROG}: MUJOCO_GL was unset; using MUJOCO_GL={os.environ['MUJOCO_GL']} for headless video")

import gymnasium as gym  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import shimmy  # noqa: E402,F401  registers the dm_control/<domain>-<task>-v0 ids
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tyro  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


@dataclasses.dataclass
class Args:
    # ---- experiment ----
    exp_name: str = PROG  # the algorithm arm in benchmarks (`xsac`, `sac`); part of the run folder's name
    seed: int = 1  # seed of python, numpy, torch and the environments
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available (the CPU otherwise)
    compile: bool = False  # torch.compile the whole update (losses, backward, optimiser steps) and the policy
    cudagraphs: bool = False  # CUDA only: compile with CUDA graphs (mode "reduce-overhead"); implies --compile
    matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32 on CUDA; medium: bf16 autocast
    track: bool = False  # log the run to Weights & Biases (needs `pip install wandb`)
    wandb_project_name: str = "xql"  # the wandb project
    wandb_entity: str | None = None  # the wandb entity (team)
    # ---- environment ----
    env_id: str = "dm_control/cheetah-run-v0"  # a gymnasium id with a bounded Box action space, e.g. Pendulum-v1
    total_timesteps: int = 1_000_000  # env steps in total, summed over the --num-envs environments
    num_envs: int = 1  # envs stepped together; each iteration makes num_envs env steps and num_envs updates
    learning_starts: int = 5000  # uniformly random actions and no updates for this many env steps (init_steps)
    capture_video: bool = False  # record the evaluation episodes to runs/{run_name}/videos (needs moviepy)
    # ---- algorithm ----
    beta: float | None = None  # Gumbel temperature of Eq. 11; default: the task's --beta-table value, else 2
    beta_table: Literal["paper", "authors"] = "paper"  # default beta per task: Table 6 or the authors' sweep
    value_loss: Literal["gumbel", "mse", "taylor"] = "gumbel"  # X-SAC (Eq. 11), SAC with V, or MXQL's loss
    taylor_order: int = 4  # --value-loss taylor: the even order N of sum_{n=2..N} z^n / n! (MXQL's default)
    loss_clip: float = 8.0  # clip of z = (Q - V) / beta in the Gumbel loss (App. D.6: 8; authors' config: 10)
    clip_mode: Literal["both", "upper"] = "both"  # z to [-clip, clip] (authors' online code) or z <= clip only
    hidden_dim: int = 1024  # width of the two hidden layers of actor, critics and V (Table 5)
    batch_size: int = 1024  # replay batch size (Table 5)
    learning_rate: float = 1e-4  # Adam learning rate of actor, critics, V and alpha (Table 5)
    buffer_size: int = 1_000_000  # replay buffer capacity (Table 5)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the V target network (pytorch_sac, authors' code)
    policy_frequency: int = 1  # update actor and alpha every this many updates (Table 5: 1; authors' code: 2)
    target_network_frequency: int = 2  # Polyak-update the V target every this many updates (authors' code)
    alpha_init: float = 0.1  # initial entropy temperature alpha (pytorch_sac, authors' code)
    autotune: bool = True  # tune alpha toward the target entropy -|A| (Table 5); --no-autotune keeps it fixed
    log_std_min: float = -5.0  # lower bound of the actor's log standard deviation
    log_std_max: float = 2.0  # upper bound of the actor's log standard deviation
    # ---- logging / output ----
    runs_dir: str = "runs"  # parent folder of the run folders
    log_freq: int = 1000  # env steps between TensorBoard losses and console progress lines
    eval_freq: int = 10_000  # env steps between deterministic evaluations; 0: only the one at the end
    eval_episodes: int = 10  # episodes per evaluation
    save_model: bool = False  # write runs/{run_name}/checkpoint.pt at the end (for --eval-only --checkpoint)
    save_buffer: str | None = None  # write the replay buffer here at the end, a D4RL-format HDF5 file
    log_bellman_errors: bool = False  # save Bellman errors of a replay batch (App. D.2) to {run}/bellman_errors
    bellman_log_freq: int = 5000  # env steps between Bellman-error snapshots (App. D.2: 5000)
    eval_only: bool = False  # evaluate --checkpoint for --eval-episodes episodes on its env and exit
    checkpoint: str | None = None  # a checkpoint written by --save-model, for --eval-only


# Table 6: beta of X-SAC per DM Control task. The authors' sweep (online/configs/sac_experiments.json) swaps
# hopper and walker. Other tasks: 2, the most common X-SAC value of Table 6.
BETA_TABLES = {"paper": {"cheetah-run": 2.0, "walker-run": 1.0, "hopper-hop": 2.0, "quadruped-run": 5.0},
               "authors": {"cheetah-run": 2.0, "walker-run": 2.0, "hopper-hop": 1.0, "quadruped-run": 5.0}}
BETA_FALLBACK = 2.0


def resolve_args(args: Args) -> Args:
    """User errors end here, one line each, before anything is created; then the table fills --beta, once."""
    positive = ("total_timesteps num_envs learning_starts batch_size hidden_dim buffer_size log_freq eval_episodes "
                "bellman_log_freq policy_frequency target_network_frequency loss_clip learning_rate alpha_init").split()
    rules = [(not getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0") for name in positive] + [
        (args.beta is not None and not args.beta > 0, "--beta must be > 0 (it divides Q - V in Eq. 11)"),
        (not (0 < args.tau <= 1 and 0 <= args.gamma <= 1), "--tau must be in (0, 1] and --gamma in [0, 1]"),
        (args.eval_freq < 0, "--eval-freq must be >= 0 (0: evaluate only at the end)"),
        (args.taylor_order < 2 or args.taylor_order % 2, "--taylor-order must be even and >= 2 (odd: unbounded below)"),
        (args.cudagraphs and not (args.cuda and torch.cuda.is_available()), "--cudagraphs needs a CUDA device"),
        (args.track and not importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
        (args.eval_only and not args.checkpoint, "--eval-only needs --checkpoint PATH (a checkpoint.pt of --save-model)"),
        (args.capture_video and not importlib.util.find_spec("moviepy"), "--capture-video needs moviepy: pip install moviepy"),
        (args.save_buffer and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_buffer))),
         f"--save-buffer {args.save_buffer}: its folder does not exist"),
    ]
    for broken, message in rules:
        if broken:
            raise SystemExit(f"{PROG}: {message}.")
    if args.eval_only:
        return args
    if args.env_id not in gym.registry:
        close = difflib.get_close_matches(args.env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `gymnasium.pprint_registry()` for the ids."
        raise SystemExit(f"{PROG}: unknown environment id '{args.env_id}'.{hint}")
    task, table = args.env_id.removeprefix("dm_control/").removesuffix("-v0"), BETA_TABLES[args.beta_table]
    source = f"--beta-table {args.beta_table}" if task in table else "fallback for tasks outside Table 6"
    beta, source = (args.beta, "--beta") if args.beta is not None else (table.get(task, BETA_FALLBACK), source)
    print(f"{PROG}: {args.env_id}, value loss {args.value_loss}, beta = {beta} ({source}), {args.num_envs} env(s)")
    return dataclasses.replace(args, beta=beta, compile=args.compile or args.cudagraphs)


def make_env(env_id: str, seed: int, video_folder: str | None = None) -> gym.Env:
    """One env: dict observations flattened to float32, actions in [-1, 1] (the actor's tanh range), seeded once
    here (its first reset) so that later resets continue one random stream. With a video folder, it is recorded."""
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise SystemExit(f"{PROG}: '{env_id}' has action space {space}; this script needs a bounded continuous (Box) one.")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    float_space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    env = gym.wrappers.TransformObservation(env, lambda obs: np.asarray(obs, dtype=np.float32), float_space)
    bounds = np.array([-1, 1], env.action_space.dtype)  # in the space's dtype: other bounds made numpy warn (dm_control)
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, *bounds))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return gym.wrappers.RecordVideo(env, video_folder, lambda _: True, disable_logger=True) if video_folder else env


def final_observations(next_obs: np.ndarray, infos: dict) -> tuple[np.ndarray, list[tuple[float, int]]]:
    """Same-step autoreset: put back each finished episode's true last observation; also its (return, length)."""
    real_next_obs, finished = next_obs.copy(), []
    for i in np.flatnonzero(infos.get("_final_obs", [])):
        real_next_obs[i] = infos["final_obs"][i]
        finished.append((float(infos["final_info"]["episode"]["r"][i]), int(infos["final_info"]["episode"]["l"][i])))
    return real_next_obs, finished


@torch.no_grad()
def evaluate(policy, env: gym.Env, episodes: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Returns and lengths of deterministic episodes of `policy` (observations -> actions in [-1, 1]). The env is
    not reseeded, so each evaluation sees new start states from the env's own random stream."""
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=int)
    for episode in range(episodes):
        obs, done = env.reset()[0], False
        while not done:
            action = policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[episode] += reward
            lengths[episode] += 1
            done = terminated or truncated
    return returns, lengths


def gumbel_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float, clip_mode: str) -> torch.Tensor:
    """Gumbel regression (Eq. 7, 9, 11) in the stable form of App. D.3; unclipped, minimised by beta log mean exp(target /
    beta). z = (target - pred) / beta is clipped (`both`: to [-clip, clip]; `upper`: from above only), then e^m with
    m = max(max z, -1), detached, is factored out: e^{z-m} - z e^{-m} - e^{-m} is e^{-m} (e^z - z - 1), so the
    minimiser and the gradient signs are those of Eq. 7 and the gradient is rescaled per batch."""
    z = (target - pred) / beta
    z = z.clamp(-clip, clip) if clip_mode == "both" else z.clamp(max=clip)
    max_z = z.max().clamp(min=-1.0).detach()
    return (torch.exp(z - max_z) - z * torch.exp(-max_z) - torch.exp(-max_z)).mean()


def taylor_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, order: int) -> torch.Tensor:
    """MXQL (Omura et al., RLC 2024): e^z - z - 1 = sum_{n>=2} z^n / n! truncated at an even `order`, unclipped as in
    their online code. Order 2 is the MSE (minimiser: the mean); higher orders move toward the log-sum-exp."""
    z = (target - pred) / beta
    return sum(z**n / math.factorial(n) for n in range(2, order + 1)).mean()


def clip_fraction(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float, clip_mode: str) -> torch.Tensor:
    """Share of samples whose z = (target - pred) / beta hits the clip: the first thing to read when beta is wrong."""
    z = (target - pred).detach() / beta
    return ((z > clip) | ((z < -clip) & (clip_mode == "both"))).float().mean()


Batch = NamedTuple("Batch", [(name, torch.Tensor) for name in ("obs", "actions", "rewards", "next_obs", "terminated")])


class ReplayBuffer:
    """A circular buffer of preallocated tensors on the device; batches are drawn on the device. `terminated`
    (a true end: no bootstrap) and `truncated` (a time limit: bootstrap) are kept apart; updates read only the first."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device, self.ptr, self.size = capacity, device, 0, 0
        self.obs = torch.zeros((capacity, obs_dim), device=device)
        self.next_obs = torch.zeros((capacity, obs_dim), device=device)
        self.actions = torch.zeros((capacity, action_dim), device=device)
        self.rewards, self.terminated, self.truncated = (torch.zeros(capacity, device=device) for _ in range(3))

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        """Append n transitions (arrays with a leading dimension n), overwriting the oldest once full."""
        index = (self.ptr + torch.arange(len(rewards), device=self.device)) % self.capacity
        for store, value in zip((self.obs, self.actions, self.rewards, self.next_obs, self.terminated, self.truncated),
                                (obs, actions, rewards, next_obs, terminated, truncated)):
            store[index] = torch.as_tensor(np.asarray(value, dtype=np.float32), device=self.device)
        self.ptr, self.size = (self.ptr + len(rewards)) % self.capacity, min(self.size + len(rewards), self.capacity)

    def sample(self, batch_size: int) -> Batch:
        i = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i])

    def save_hdf5(self, path: str, num_envs: int = 1, **attrs) -> None:
        """The buffer as a D4RL-format HDF5 file with `attrs` as its attributes, oldest first and env after env (rows were
        added one per env and step): terminals are true ends, timeouts time limits and each env's last row (where its
        episode in progress is cut). The file appears only when complete."""
        oldest = self.ptr if self.size == self.capacity else 0
        order = ((oldest + torch.arange(self.size, device=self.device)) % self.capacity).view(-1, num_envs).T.reshape(-1)
        last = torch.arange(1, num_envs + 1, device=self.device) * (self.size // num_envs) - 1  # each env's last row
        timeouts = self.truncated[order]
        timeouts[last[: self.size]] = 1.0 - self.terminated[order][last[: self.size]]
        arrays = {"observations": self.obs[order], "actions": self.actions[order], "rewards": self.rewards[order],
                  "terminals": self.terminated[order].bool(), "timeouts": timeouts.bool(),
                  "next_observations": self.next_obs[order]}
        with h5py.File(f"{path}.tmp", "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value.cpu().numpy(), compression="gzip")
            f.attrs.update(attrs)
        os.replace(f"{path}.tmp", path)


class FP32Linear(nn.Linear):
    """A Linear layer run in fp32 under bf16 autocast (--matmul-precision medium): Q, V and actions keep fp32's precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Two ReLU hidden layers; orthogonal weights and zero biases (the authors' `ortho_init: true`)."""
    net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                        FP32Linear(hidden_dim, out_dim))
    for layer in net[::2]:
        nn.init.orthogonal_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


class Actor(nn.Module):
    """tanh-squashed diagonal Gaussian; its log-std is squashed into [log_std_min, log_std_max] (pytorch_sac)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, 2 * action_dim)
        self.log_std_min, self.log_std_max = args.log_std_min, args.log_std_max

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] and its log-probability (tanh change of variables)."""
        mean, log_std = self(obs)
        noise = torch.randn_like(mean)
        pre_tanh = mean + log_std.exp() * noise
        log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)  # log N(pre_tanh; mean, std)
        log_prob -= 2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))  # log(1 - tanh^2), in a stable form
        return torch.tanh(pre_tanh), log_prob.sum(-1)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action (evaluation, Bellman errors)."""
        return torch.tanh(self(obs)[0])


class TwinCritic(nn.Module):
    """`num_critics` independent Q(s, a) MLPs (2: clipped double-Q) -> Q of shape (num_critics, batch). Plain MLPs, as a
    stacked-weight `baddbmm` network ran at 0.78-0.94x their speed here (2-core CPU; forward, backward, Adam)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_critics: int = 2):
        super().__init__()
        self.nets = nn.ModuleList(mlp(obs_dim + action_dim, hidden_dim, 1) for _ in range(num_critics))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)
        return torch.stack([net(x).squeeze(-1) for net in self.nets])


class Value(nn.Module):
    def __init__(self, obs_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dim, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class Agent(nn.Module):
    """Every learned tensor in one module: its state_dict is the checkpoint and the NaN-stop snapshot."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args)
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim)
        self.value = Value(obs_dim, args.hidden_dim)
        self.value_target = Value(obs_dim, args.hidden_dim).requires_grad_(False)
        self.value_target.load_state_dict(self.value.state_dict())
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.alpha_init)), requires_grad=args.autotune)


LOSS_TAGS = ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "losses/alpha", "losses/alpha_loss", "values/v",
             "values/q", "values/clip_fraction", "charts/entropy")


def update(agent: Agent, optimizers: dict, batch: Batch, update_actor: bool, update_target: bool, args: Args):
    """One gradient step on Q, V and (if `update_actor`) actor and alpha. Returns the LOSS_TAGS values, detached."""
    with torch.no_grad():  # the single-sample soft Bellman backup r + gamma (1 - terminated) V'(s') (Eq. 10)
        target_q = batch.rewards + args.gamma * (1.0 - batch.terminated) * agent.value_target(batch.next_obs)
    q = agent.critic(batch.obs, batch.actions)
    q_loss = (q - target_q).pow(2).mean(dim=1).sum()  # Eq. 14, summed over the twin critics
    optimizers["critic"].zero_grad()
    q_loss.backward()
    optimizers["critic"].step()

    # One sample a ~ pi(.|s), at the critics just updated, serves the V target and the actor loss (authors' code).
    actions, log_prob = agent.actor.sample(batch.obs)
    q_policy = agent.critic(batch.obs, actions).min(dim=0).values
    alpha, v = agent.log_alpha.exp().detach(), agent.value(batch.obs)
    if args.value_loss == "gumbel":  # X-SAC: the one change from SAC-with-V. Eq. 11 fits V = beta log E[e^{Q/beta}]
        v_loss = gumbel_loss(v, q_policy.detach(), args.beta, args.loss_clip, args.clip_mode)  # without log pi
    elif args.value_loss == "taylor":  # MXQL: the same target, the Maclaurin-expanded loss
        v_loss = taylor_loss(v, q_policy.detach(), args.beta, args.taylor_order)
    else:  # SAC with a value network (Haarnoja et al. 2018, the paper's baseline): V toward min Q - alpha log pi
        v_loss = F.mse_loss(v, (q_policy - alpha * log_prob).detach())
    actor_loss = (alpha * log_prob - q_policy).mean()  # Eq. 13 with mu uniform: SAC's actor
    alpha_loss = -(agent.log_alpha.exp() * (log_prob.detach() - actions.shape[-1])).mean()  # toward entropy -|A|
    # One backward serves V, actor and alpha (disjoint parameters, detached cross terms); stray critic grads: zeroed next.
    optimizers["value"].zero_grad()
    optimizers["actor_alpha"].zero_grad()
    (v_loss + actor_loss + alpha_loss if update_actor else v_loss).backward()
    optimizers["value"].step()
    if update_actor:  # compiled, the actor's gradient is zero, not None, on other steps: Adam would still move it
        optimizers["actor_alpha"].step()
    if update_target:
        with torch.no_grad():  # Polyak averaging of the V target, one op over all its tensors
            torch._foreach_lerp_(list(agent.value_target.parameters()), list(agent.value.parameters()), args.tau)
    clipped = clip_fraction(v, q_policy, args.beta, args.loss_clip, args.clip_mode)
    return torch.stack([q_loss, v_loss, actor_loss, alpha, alpha_loss, v.mean(), q.mean(), clipped, -log_prob.mean()]).detach()


@torch.no_grad()
def bellman_errors(agent: Agent, batch: Batch, gamma: float) -> np.ndarray:
    """App. D.2: r + gamma Q1(s', mean pi(s')) - Q1(s, a): the first critic, no target network, no entropy term."""
    next_q = agent.critic(batch.next_obs, agent.actor.mean_action(batch.next_obs))[0]
    return (batch.rewards + gamma * (1 - batch.terminated) * next_q - agent.critic(batch.obs, batch.actions)[0]).cpu().numpy()


def log_progress(writer: SummaryWriter, values: dict, step: int, total: int, sps: float, last_eval: str) -> None:
    """TensorBoard scalars and the console line `step N/M | SPS … | <losses> | last eval … | ETA h:mm:ss`."""
    for tag, value in {**values, "charts/SPS": sps}.items():
        writer.add_scalar(tag, value, step)
    losses = " | ".join(f"{tag[7:]} {value:.4g}" for tag, value in values.items() if tag.startswith("losses/"))
    eta = datetime.timedelta(seconds=round((total - step) / sps))
    print(f"step {step}/{total} | SPS {sps:.0f} | {losses} | last eval {last_eval} | ETA {eta}")


def save_checkpoint(path: str, **contents) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(contents, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path: str | None) -> dict:
    """A checkpoint written by this script, loaded on the CPU, or a one-line error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert {"agent", "args", "step"} <= set(checkpoint)
    except Exception as error:  # noqa: BLE001 - a missing, truncated or foreign file is the same user mistake
        raise SystemExit(f"{PROG}: {path} is not a checkpoint of {PROG} --save-model ({type(error).__name__}).")
    return checkpoint


def snapshot(agent: nn.Module, args, step: int, values: dict, **extra) -> dict:
    """The parameters at a log interval whose losses were all finite, and `extra` to save with them: what a NaN stop saves."""
    state = {key: value.clone() for key, value in agent.state_dict().items()}
    return {"agent": state, "args": dataclasses.asdict(args), "step": step, "values": values, **extra}


def stop_on_nonfinite(run_dir: str, step: int, last_finite: dict) -> None:
    """App. D.6: X- variants occasionally blow up on outliers. Stop rather than train on NaN, keeping the
    parameters of the last log interval whose losses were all finite."""
    path = os.path.join(run_dir, "last_finite_checkpoint.pt")
    save_checkpoint(path, **{key: value for key, value in last_finite.items() if key != "values"})
    values = ", ".join(f"{tag.split('/')[1]}={value:.4g}" for tag, value in last_finite["values"].items()) or "none yet"
    raise SystemExit(f"{PROG}: a loss became NaN/inf at step {step}; last finite values (step {last_finite['step']}): "
                     f"{values}; parameters of step {last_finite['step']} saved to {path}. "
                     "Try a larger --beta or a smaller --loss-clip (App. D.6).")


def crossed(step: int, num_envs: int, every: int) -> bool:
    """Did the last iteration (num_envs env steps, ending at `step`) pass a multiple of `every`?"""
    return every > 0 and step // every > (step - num_envs) // every


def main(args: Args) -> dict:
    """Train, or with --eval-only evaluate a checkpoint; returns the evaluations."""
    args = resolve_args(args)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as they are printed
    if args.eval_only:  # rebuild the agent of --checkpoint and run deterministic episodes on its env
        checkpoint = load_checkpoint(args.checkpoint)
        trained = Args(**checkpoint["args"])
        videos = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos_eval_only")
        env = make_env(trained.env_id, args.seed + 10_000, videos if args.capture_video else None)
        agent = Agent(env.observation_space.shape[0], env.action_space.shape[0], trained)
        agent.load_state_dict(checkpoint["agent"])
        returns, lengths = evaluate(agent.actor.mean_action, env, args.eval_episodes, torch.device("cpu"))
        print(f"{PROG}: {args.checkpoint} (step {checkpoint['step']}) on {trained.env_id}: return {returns.mean():.2f} "
              f"+- {returns.std():.2f} over {len(returns)} episodes (mean length {lengths.mean():.0f})")
        return {"returns": returns.tolist(), "lengths": lengths.tolist()}
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    run_dir = os.path.join(args.runs_dir, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    envs = gym.vector.SyncVectorEnv([partial(make_env, args.env_id, args.seed + i) for i in range(args.num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    # ---- set-up ----
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_flush_denormal(True)  # CPU math on denormal floats (tiny values near 0) is slow; flushed to 0 they cost nothing
    torch.set_float32_matmul_precision("highest" if args.matmul_precision == "medium" else args.matmul_precision)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=dataclasses.asdict(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{key}|{value}|" for key, value in dataclasses.asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    eval_env = make_env(args.env_id, args.seed + 10_000, os.path.join(run_dir, "videos") if args.capture_video else None)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = Agent(obs_dim, action_dim, args).to(device)
    adam = partial(torch.optim.Adam, lr=args.learning_rate, capturable=args.cudagraphs, fused=True)  # one lr (Table 5)
    optimizers = {"critic": adam(agent.critic.parameters()), "value": adam(agent.value.parameters()),
                  "actor_alpha": adam([*agent.actor.parameters(), agent.log_alpha])}  # --no-autotune: alpha stays
    compiled = partial(torch.compile, mode="reduce-overhead" if args.cudagraphs else None) if args.compile else lambda fn: fn
    update_fn = torch.autocast(device.type, torch.bfloat16, enabled=args.matmul_precision == "medium")(compiled(update))
    policy = compiled(agent.actor.sample)
    capacity = min(args.buffer_size, args.total_timesteps) // args.num_envs * args.num_envs  # whole steps of every env
    buffer = ReplayBuffer(capacity, obs_dim, action_dim, device)
    envs.action_space.seed(args.seed)
    obs, _ = envs.reset(seed=args.seed)
    losses, last_finite, num_updates, evaluations = None, snapshot(agent, args, 0, {}), 0, []
    start_time, log_time, log_step, last_eval = time.time(), time.time(), 0, "-"

    # ---- the loop: act, store, update, log, evaluate ----
    try:
        for step in range(args.num_envs, args.total_timesteps + 1, args.num_envs):
            if step <= args.learning_starts:
                actions = envs.action_space.sample()
            else:
                with torch.no_grad():
                    actions = policy(torch.as_tensor(obs, device=device))[0].cpu().numpy()
                if not np.isfinite(actions).all():  # the copy to the CPU above syncs anyway: check before stepping
                    stop_on_nonfinite(run_dir, step, last_finite)
            next_obs, rewards, terminations, truncations, infos = envs.step(actions)
            real_next_obs, finished = final_observations(next_obs, infos)
            buffer.add(obs, actions, rewards, real_next_obs, terminations, truncations)
            obs = next_obs
            for episode_return, episode_length in finished:
                writer.add_scalar("charts/episodic_return", episode_return, step)
                writer.add_scalar("charts/episodic_length", episode_length, step)

            if step >= args.learning_starts:
                for _ in range(args.num_envs):  # one update per env step, whatever --num-envs
                    num_updates += 1
                    if args.cudagraphs:  # CUDA graphs reuse their output buffers: mark each step, clone what is kept
                        torch.compiler.cudagraph_mark_step_begin()
                    update_actor = num_updates % args.policy_frequency == 0
                    update_target = num_updates % args.target_network_frequency == 0
                    losses = update_fn(agent, optimizers, buffer.sample(args.batch_size), update_actor, update_target, args)
                    losses = losses.clone()
                    if not torch.isfinite(losses).all():  # a host sync; the next action waits for this update anyway
                        stop_on_nonfinite(run_dir, step, last_finite)
                bellman_step = step > args.learning_starts and crossed(step, args.num_envs, args.bellman_log_freq)
                if args.log_bellman_errors and bellman_step:
                    os.makedirs(os.path.join(run_dir, "bellman_errors"), exist_ok=True)
                    errors = bellman_errors(agent, buffer.sample(args.batch_size), args.gamma)
                    np.save(os.path.join(run_dir, "bellman_errors", f"step_{step:08d}.npy"), errors)

            if losses is not None and crossed(step, args.num_envs, args.log_freq):
                values = dict(zip(LOSS_TAGS, losses.tolist()))
                last_finite = snapshot(agent, args, step, values)
                sps, log_time, log_step = (step - log_step) / (time.time() - log_time), time.time(), step
                log_progress(writer, values, step, args.total_timesteps, sps, last_eval)

            if crossed(step, args.num_envs, args.eval_freq) or step + args.num_envs > args.total_timesteps:
                returns, lengths = evaluate(agent.actor.mean_action, eval_env, args.eval_episodes, device)
                evaluations.append((step, float(returns.mean())))
                last_eval = f"{returns.mean():.2f}"
                writer.add_scalar("eval/episodic_return", returns.mean(), step)
                writer.add_scalar("eval/episodic_length", lengths.mean(), step)
                print(f"step {step}/{args.total_timesteps} | eval return {returns.mean():.2f} +- {returns.std():.2f}")
    finally:  # after a NaN stop or Ctrl-C too: the buffer is what a user needs to look into it
        if args.save_buffer:
            policy_used = f"uniform random for {args.learning_starts} env steps, then the stochastic policy being trained"
            buffer.save_hdf5(args.save_buffer, args.num_envs, env_id=args.env_id, script=PROG, exp_name=args.exp_name,
                             seed=args.seed, env_steps=buffer.size, policy=policy_used)
            print(f"{PROG}: replay buffer ({buffer.size} transitions) written to {args.save_buffer}")

    # ---- final report and save ----
    envs.close()
    eval_env.close()
    writer.close()
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    if args.save_model:
        save_checkpoint(checkpoint, agent=agent.state_dict(), args=dataclasses.asdict(args), step=step,
                        optimizers={name: optimizer.state_dict() for name, optimizer in optimizers.items()})
    print(f"{PROG}: done in {datetime.timedelta(seconds=round(time.time() - start_time))}, final eval return "
          f"{evaluations[-1][1]:.2f}; run folder {run_dir}" + (f"; checkpoint {checkpoint}" if args.save_model else ""))
    return {"run_dir": run_dir, "evaluations": evaluations, "final_return": evaluations[-1][1],
            "best_return": max(value for _, value in evaluations)}


if __name__ == "__main__":
    main(tyro.cli(Args))
