"""X-TD3: TD3 whose critics are trained by Gumbel regression onto the Bellman backup (Eq. 9), with no value network.

Under deterministic dynamics the Gumbel loss fits the soft-optimal Q directly (Sec. 3.3 Eq. 9, 3.5, App. C.1, D.3, D.6,
Tables 5-6): the critics regress r + gamma min_i Q'_i(s', pi'(s') + eps) with it instead of TD3's MSE; the rest is TD3
(Fujimoto et al., 2018: deterministic actor, target smoothing, clipped double-Q, delayed updates). `--no-double-q` is
"X-TD3 - DQ" (one critic), `--critic-loss mse` TD3 (Figure 3). The line where X-TD3 departs from TD3 says "X-TD3:".

Usage: python xtd3_continuous.py --env-id dm_control/cheetah-run-v0 [--no-double-q] [--critic-loss mse]
       python xtd3_continuous.py --eval-only --checkpoint runs/<run>/checkpoint.pt --eval-episodes 10

Deviations (from the paper, or from the authors' code github.com/Div99/XQL, online/):
- beta is used as given, as in the authors' code, not as gamma beta: Eq. 42's gamma beta is a reparametrisation
  (App. C.1), and Table 6's values were tuned with beta passed straight to the loss.
- From their xtd3.yaml (the paper is silent): exp clip 8, z clamped to [-clip, clip] (`--clip-mode upper`: as their
  offline code), targets updated every 2nd update, 25000 random steps, 10 eval episodes every 10k steps; 2M env
  steps where our default is 1M. Exploration noise 0.05 for env ids with "hopper" (Table 5), else 0.1.
- Ours: PyTorch's default init where they use orthogonal; plain MLPs for the twin critics (they stack them); time limits
  bootstrap; off by default, `--critic-loss taylor` (MXQL), `--num-envs`, `--compile`, `--matmul-precision`.
"""

import copy
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
    exp_name: str = PROG  # the algorithm arm in benchmarks (`xtd3`, `xtd3-dq`, `td3`); part of the run folder name
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
    learning_starts: int = 25_000  # uniformly random actions and no updates for this many env steps (init_steps)
    capture_video: bool = False  # record the evaluation episodes to runs/{run_name}/videos (needs moviepy)
    # ---- algorithm ----
    beta: float | None = None  # Gumbel temperature of Eq. 9; default: Table 6 for the task and arm, else 2 (DQ: 4)
    critic_loss: Literal["gumbel", "mse", "taylor"] = "gumbel"  # X-TD3 (Eq. 9), TD3, or MXQL's loss
    double_q: bool = True  # twin critics, min in the target (X-TD3); --no-double-q: one critic ("X-TD3 - DQ")
    taylor_order: int = 4  # --critic-loss taylor: the even order N of sum_{n=2..N} z^n / n! (MXQL's default)
    loss_clip: float = 8.0  # clip of z = (target - Q) / beta in the Gumbel loss (App. D.6, authors' config: 8)
    clip_mode: Literal["both", "upper"] = "both"  # z to [-clip, clip] (authors' online code) or z <= clip only
    hidden_dim: int = 256  # width of the two hidden layers of actor and critics (Table 5)
    batch_size: int = 256  # replay batch size (Table 5)
    learning_rate: float = 1e-3  # Adam learning rate of actor and critics (Table 5)
    buffer_size: int = 1_000_000  # replay buffer capacity (Table 5)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target networks (authors' code)
    policy_frequency: int = 2  # update the actor every this many critic updates (Table 5 "Actor Freq")
    target_network_frequency: int = 2  # Polyak-update the targets every this many updates (authors' code)
    exploration_noise: float | None = None  # std of the acting noise; default 0.1, 0.05 on hopper (Table 5)
    policy_noise: float = 0.2  # std of the target policy smoothing noise (Table 5 "Target Noise")
    noise_clip: float = 0.5  # the smoothing noise is clipped to [-noise_clip, noise_clip] (authors' code)
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


# Table 6 (as the authors' td3_{2q,1q}_experiments.json): X-TD3 (twin critics) and X-TD3 - DQ (one critic); others: mode.
BETA_TABLES = {True: {"cheetah-run": 5.0, "walker-run": 2.0, "hopper-hop": 2.0, "quadruped-run": 5.0},
               False: {"cheetah-run": 4.0, "walker-run": 4.0, "hopper-hop": 3.0, "quadruped-run": 20.0}}
BETA_FALLBACK = {True: 2.0, False: 4.0}


def resolve_args(args: Args) -> Args:
    """User errors end here, one line each, before anything is created; then the table fills --beta, once."""
    positive = ("total_timesteps num_envs learning_starts batch_size hidden_dim buffer_size log_freq eval_episodes "
                "bellman_log_freq policy_frequency target_network_frequency loss_clip learning_rate policy_noise").split()
    rules = [(not getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0") for name in positive] + [
        (args.beta is not None and not args.beta > 0, "--beta must be > 0 (it divides the TD error in Eq. 9)"),
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
    task, table = args.env_id.removeprefix("dm_control/").removesuffix("-v0"), BETA_TABLES[args.double_q]
    source = f"Table 6, {'X-TD3' if args.double_q else 'X-TD3 - DQ'} column" if task in table else "fallback outside Table 6"
    beta, source = (args.beta, "--beta") if args.beta is not None else (table.get(task, BETA_FALLBACK[args.double_q]), source)
    noise = args.exploration_noise if args.exploration_noise is not None else 0.05 if "hopper" in args.env_id.lower() else 0.1
    print(f"{PROG}: {args.env_id}, critic loss {args.critic_loss}, {'twin critics' if args.double_q else 'one critic'}, "
          f"beta = {beta} ({source}), exploration noise {noise}, {args.num_envs} env(s)")
    return dataclasses.replace(args, beta=beta, exploration_noise=noise, compile=args.compile or args.cudagraphs)


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
    """Two ReLU hidden layers, PyTorch's default initialisation (Fujimoto's TD3, CleanRL)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         FP32Linear(hidden_dim, out_dim))


class Actor(nn.Module):
    """Deterministic policy pi(s) in [-1, 1] (tanh output; the env rescales it to its bounds)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, action_dim)
        self.exploration_noise = args.exploration_noise

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) plus Gaussian noise, clipped to [-1, 1] (Table 5 "Actor Noise")."""
        action = self(obs)
        return (action + self.exploration_noise * torch.randn_like(action)).clamp(-1.0, 1.0)


class TwinCritic(nn.Module):
    """`num_critics` independent Q(s, a) MLPs (2: clipped double-Q) -> Q of shape (num_critics, batch). Plain MLPs, as a
    stacked-weight `baddbmm` network ran at 0.78-0.94x their speed here (2-core CPU; forward, backward, Adam)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_critics: int = 2):
        super().__init__()
        self.nets = nn.ModuleList(mlp(obs_dim + action_dim, hidden_dim, 1) for _ in range(num_critics))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)
        return torch.stack([net(x).squeeze(-1) for net in self.nets])


class Agent(nn.Module):
    """Every learned tensor in one module: its state_dict is the checkpoint and the NaN-stop snapshot."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args)
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, num_critics=2 if args.double_q else 1)
        self.actor_target, self.critic_target = (copy.deepcopy(net).requires_grad_(False) for net in (self.actor, self.critic))
        self.register_buffer("last_actor_loss", torch.zeros(()))  # the actor is updated every 2nd step: log its last loss


LOSS_TAGS = ("losses/q_loss", "losses/actor_loss", "values/q", "values/clip_fraction")


def update(agent: Agent, optimizers: dict, batch: Batch, update_actor: bool, update_target: bool, args: Args):
    """One gradient step on the critics and (if `update_actor`) the actor. Returns the LOSS_TAGS values, detached."""
    with torch.no_grad():  # target policy smoothing and clipped double-Q (TD3); one critic with --no-double-q
        noise = (torch.randn_like(batch.actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_actions = (agent.actor_target(batch.next_obs) + noise).clamp(-1.0, 1.0)
        next_q = agent.critic_target(batch.next_obs, next_actions).min(dim=0).values
        target_q = batch.rewards + args.gamma * (1.0 - batch.terminated) * next_q  # r + gamma Q'(s', a') (Eq. 41)
    q = agent.critic(batch.obs, batch.actions)
    if args.critic_loss == "gumbel":  # X-TD3: the one change from TD3. Eq. 9: each critic by Gumbel regression
        q_loss = sum(gumbel_loss(q_i, target_q, args.beta, args.loss_clip, args.clip_mode) for q_i in q)
    elif args.critic_loss == "taylor":  # MXQL: the same target, the Maclaurin-expanded loss
        q_loss = sum(taylor_loss(q_i, target_q, args.beta, args.taylor_order) for q_i in q)
    else:  # TD3's squared error, summed over the critics
        q_loss = (q - target_q).pow(2).mean(dim=1).sum()
    optimizers["critic"].zero_grad()
    q_loss.backward()
    optimizers["critic"].step()

    if update_actor:  # delayed policy update: max E[Q_1(s, pi(s))], no entropy (Sec. 3.5; TD3, authors' code)
        actor_loss = -agent.critic.nets[0](torch.cat([batch.obs, agent.actor(batch.obs)], -1)).mean()  # Q_1 only
        optimizers["actor"].zero_grad()
        actor_loss.backward()  # the critics receive gradients too; the next critic step zeroes them
        optimizers["actor"].step()
        agent.last_actor_loss.copy_(actor_loss.detach())
    if update_target:
        with torch.no_grad():  # Polyak averaging of both targets, one op over all their tensors
            targets = [*agent.actor_target.parameters(), *agent.critic_target.parameters()]
            torch._foreach_lerp_(targets, [*agent.actor.parameters(), *agent.critic.parameters()], args.tau)
    fraction = clip_fraction(q, target_q.expand_as(q), args.beta, args.loss_clip, args.clip_mode)
    return torch.stack([q_loss, agent.last_actor_loss, q.mean(), fraction]).detach()


@torch.no_grad()
def bellman_errors(agent: Agent, batch: Batch, gamma: float) -> np.ndarray:
    """App. D.2: r + gamma Q1(s', pi(s')) - Q1(s, a): the first critic, no target network."""
    next_q = agent.critic(batch.next_obs, agent.actor(batch.next_obs))[0]
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
        returns, lengths = evaluate(agent.actor, env, args.eval_episodes, torch.device("cpu"))
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
    optimizers = {name: adam(getattr(agent, name).parameters()) for name in ("critic", "actor")}
    compiled = partial(torch.compile, mode="reduce-overhead" if args.cudagraphs else None) if args.compile else lambda fn: fn
    update_fn = torch.autocast(device.type, torch.bfloat16, enabled=args.matmul_precision == "medium")(compiled(update))
    policy = compiled(agent.actor.explore)
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
                    actions = policy(torch.as_tensor(obs, device=device)).cpu().numpy()
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
                returns, lengths = evaluate(agent.actor, eval_env, args.eval_episodes, device)
                evaluations.append((step, float(returns.mean())))
                last_eval = f"{returns.mean():.2f}"
                writer.add_scalar("eval/episodic_return", returns.mean(), step)
                writer.add_scalar("eval/episodic_length", lengths.mean(), step)
                print(f"step {step}/{args.total_timesteps} | eval return {returns.mean():.2f} +- {returns.std():.2f}")
    finally:  # after a NaN stop or Ctrl-C too: the buffer is what a user needs to look into it
        if args.save_buffer:
            policy_used = f"uniform random for {args.learning_starts} env steps, then the policy being trained plus noise"
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
