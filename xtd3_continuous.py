"""X-TD3: TD3 whose critic is trained with the Gumbel loss directly on Q (Extreme Q-Learning, online).

TD3 (Fujimoto et al., 2018: deterministic tanh actor, target policy smoothing with clipped noise,
clipped double-Q, delayed actor and target updates) where the critic regresses onto
r + gamma (1 - terminated) min_i Q'_i(s', pi'(s') + eps) with the Gumbel loss instead of MSE: under
deterministic dynamics this fits the soft-optimal Q without a value network or entropies
(Sec. 3.3 Eq. 9, Sec. 3.5 "TD3 ... changing the loss to train Q to directly follow Eq. 9",
App. C.1 Eq. 38-42 and Lemma C.1). `--no-double-q` is the paper's "X-TD3 - DQ" (one critic);
`--critic-loss mse` is plain TD3 from the same file (Figure 3's baseline). Defaults: Tables 5-6, App. D.6.

Usage: python xtd3_continuous.py --env-id dm_control/cheetah-run-v0 [--no-double-q] [--critic-loss mse]
       python xtd3_continuous.py --eval-only --checkpoint runs/<run>/checkpoint.pt

Deviations (from the paper or the authors' code, github.com/Div99/XQL online/):
- beta is used as given in the loss, as the authors' code does, not rescaled to gamma*beta: Eq. 42
  divides by gamma*beta, but beta' = gamma*beta is a reparametrisation (App. C.1) and Table 6's values
  were tuned with the authors' code, which passes beta straight to the loss.
- Gumbel loss clipped from above only (see `gumbel_loss`); the authors clamp to [-clip, clip].
- Layers start from PyTorch's nn.Linear initialisation (Fujimoto's TD3, CleanRL); the authors' config
  uses orthogonal init.
- Bootstrap through time-limit truncations via gymnasium's `terminated` flag (the authors read dm_control's
  discount); the same thing on these tasks, where episodes only end by the 1000-step limit.
- Total steps default 1M (the common DMC budget); the authors' config trains 2M. Exploration noise
  0.05 is picked for any env id containing "hopper" (Table 5 says "Hopper"), 0.1 otherwise.
"""
# dm_control picks its OpenGL backend once, when it is imported (by `import shimmy` below), so the
# headless default for --capture-video has to be in place before that import: egl where an NVIDIA GPU
# is present, osmesa otherwise (`apt-get install libosmesa6`). A MUJOCO_GL the user set is kept.
import os
import sys

PROG = os.path.splitext(os.path.basename(__file__))[0]

if "--capture-video" in sys.argv and "MUJOCO_GL" not in os.environ:
    _gl_backend = "egl" if os.path.exists("/dev/nvidiactl") else "osmesa"
    os.environ.update(MUJOCO_GL=_gl_backend, PYOPENGL_PLATFORM=_gl_backend)
    print(f"{PROG}: MUJOCO_GL was unset; using MUJOCO_GL={_gl_backend} for --capture-video.", flush=True)

import copy
import dataclasses
import difflib
import importlib.util
import random
import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import gymnasium as gym
import h5py
import numpy as np
import shimmy  # noqa: F401  importing it registers the dm_control/<domain>-<task>-v0 ids
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro



@dataclass
class Args:
    # ---- experiment ----
    exp_name: str = PROG
    """name of the experiment (the algorithm arm, e.g. xtd3, xtd3-dq, td3); part of the run folder name"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available (the CPU otherwise)"""
    compile: bool = False
    """torch.compile the update function and the policy (works on the CPU and on CUDA)"""
    cudagraphs: bool = False
    """CUDA only: compile with CUDA graphs (torch.compile mode "reduce-overhead"); implies --compile"""
    track: bool = False
    """log the run to Weights & Biases (wandb is imported only then)"""
    wandb_project_name: str = "xql"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""

    # ---- environment ----
    env_id: str = "dm_control/cheetah-run-v0"
    """gymnasium id with a continuous action space, e.g. dm_control/hopper-hop-v0 or Pendulum-v1"""
    total_timesteps: int = 1_000_000
    """environment steps of the run (the authors' config: 2M)"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (Table 5)"""
    learning_starts: int = 25_000
    """uniformly random actions and no updates for this many steps (authors' code: init_steps 25000)"""

    # ---- algorithm ----
    critic_loss: Literal["gumbel", "mse"] = "gumbel"
    """gumbel: X-TD3 (Eq. 9 / 42); mse: plain TD3, identical otherwise (Figure 3's baseline)"""
    double_q: bool = True
    """twin critics with the min in the target (X-TD3); --no-double-q: one critic ("X-TD3 - DQ")"""
    beta: float | None = None
    """Gumbel temperature; default: Table 6 for the task (X-TD3 or X-TD3 - DQ column), see BETA_TABLES"""
    loss_clip: float = 8.0
    """upper clip of z = (target - Q) / beta in the Gumbel loss ("exponential clip value of 8", App. D.6)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target networks (authors' code)"""
    batch_size: int = 256
    """replay batch size (Table 5)"""
    learning_rate: float = 1e-3
    """Adam learning rate of actor and critics (Table 5)"""
    hidden_dim: int = 256
    """width of the two hidden layers of actor and critics (Table 5: 256, 256)"""
    exploration_noise: float | None = None
    """std of the Gaussian action noise when acting; default 0.1, 0.05 on hopper (Table 5 "Actor Noise")"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (Table 5 "Target Noise")"""
    noise_clip: float = 0.5
    """the smoothing noise is clipped to [-noise_clip, noise_clip] (authors' code)"""
    policy_frequency: int = 2
    """actor and target networks are updated every this many critic updates (Table 5 "Actor Freq")"""

    # ---- logging / output ----
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_freq: int = 1000
    """env steps between loss logs, console progress lines and NaN/inf checks"""
    eval_freq: int = 10_000
    """env steps between deterministic evaluations (authors' config); also one at the end"""
    eval_episodes: int = 10
    """episodes per evaluation (authors' config)"""
    capture_video: bool = False
    """record the evaluation episodes to runs/{run_name}/videos (MUJOCO_GL: egl with a GPU, osmesa without)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt (actor, critics, targets, optimisers, args) at the end"""
    save_buffer: str | None = None
    """write the replay buffer to this path as a D4RL-format HDF5 file at the end"""
    log_bellman_errors: bool = False
    """save r + gamma Q1(s', pi(s')) - Q1(s, a) of a replay batch (App. D.2) to runs/{run_name}/bellman_errors/"""
    bellman_log_freq: int = 5000
    """env steps between Bellman-error snapshots (App. D.2: every 5,000 steps)"""
    eval_only: bool = False
    """only evaluate the actor of --checkpoint (its env id and width are read from the checkpoint)"""
    checkpoint: str | None = None
    """checkpoint written by --save-model, for --eval-only"""


# Table 6: beta per DM Control task, X-TD3 column (double-Q) and X-TD3 - DQ column (single critic).
BETA_TABLES = {
    True: {"cheetah-run": 5.0, "walker-run": 2.0, "hopper-hop": 2.0, "quadruped-run": 5.0},
    False: {"cheetah-run": 4.0, "walker-run": 4.0, "hopper-hop": 3.0, "quadruped-run": 20.0},
}
# Tasks outside Table 6: the value most tasks of the column use (X-TD3: 2, two of four tasks; X-TD3 - DQ:
# 4, two of four; App. D.6 swept [1, 2, 5] and [3, 4, 10, 20]). Tune beta for a new reward scale.
BETA_FALLBACK = {True: 2.0, False: 4.0}
# Table 5 "Actor Noise": 0.1, 0.05 on Hopper.
EXPLORATION_NOISE_DEFAULT, EXPLORATION_NOISE_HOPPER = 0.1, 0.05


def task_name(env_id: str) -> str:
    """'dm_control/cheetah-run-v0' -> 'cheetah-run' (other ids are returned lower-cased, version dropped)."""
    name = env_id.split("/")[-1].lower()
    return name.rsplit("-v", 1)[0] if "-v" in name else name


def resolve_beta(env_id: str, beta: float | None, double_q: bool) -> tuple[float, str]:
    """The temperature to use and where it came from: --beta, Table 6, or the documented fallback."""
    if beta is not None:
        return beta, "--beta"
    column = "X-TD3" if double_q else "X-TD3 - DQ"
    table = BETA_TABLES[double_q]
    if task_name(env_id) in table:
        return table[task_name(env_id)], f"Table 6, {column} column"
    return BETA_FALLBACK[double_q], f"fallback for tasks outside Table 6 ({column})"


def resolve_exploration_noise(env_id: str, noise: float | None) -> float:
    """Table 5: 0.05 on hopper, 0.1 elsewhere, unless --exploration-noise is given."""
    if noise is not None:
        return noise
    return EXPLORATION_NOISE_HOPPER if "hopper" in env_id.lower() else EXPLORATION_NOISE_DEFAULT


# ---- environment helpers ----
def check_env_id(env_id: str) -> None:
    """Fail with one line (and close matches) for an id gymnasium does not know, before anything is created."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `gymnasium.pprint_registry()` for the ids."
        raise SystemExit(f"{PROG}: unknown environment id '{env_id}'.{hint}")


def make_env(env_id: str, seed: int, video_folder: str | None = None) -> gym.Env:
    """A single continuous-control env: dict observations (dm_control) flattened to float32, actions in [-1, 1].

    The actor's tanh output lives in [-1, 1]; RescaleAction maps it to the env's own bounds.
    With `video_folder`, every episode of this env is recorded (used for the evaluation env only).
    """
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        env.close()
        raise SystemExit(f"{PROG}: '{env_id}' has action space {space}; this script needs a bounded continuous (Box) action space.")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    shape = env.observation_space.shape
    env = gym.wrappers.TransformObservation(
        env, lambda obs: np.asarray(obs, dtype=np.float32), gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
    )
    env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda episode: True, disable_logger=True)
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


@torch.no_grad()
def evaluate(policy: Callable[[torch.Tensor], torch.Tensor], env: gym.Env, episodes: int, seed: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Run `episodes` deterministic episodes of `policy` (obs batch -> action in [-1, 1]); returns (returns, lengths)."""
    returns, lengths = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episode_return, episode_length = False, 0.0, 0
        while not done:
            action = policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            episode_length += 1
            done = terminated or truncated
        returns.append(episode_return)
        lengths.append(episode_length)
    return np.array(returns), np.array(lengths)


# ---- checkpoint / file helpers ----
def save_atomically(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a truncated file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class FiniteGuard:
    """Notices the first update whose losses are inf/NaN without a host sync per step.

    App. D.6: the X- variants occasionally blow up on outliers. The flag lives on the device and is
    read only at log intervals; the run then stops with the step and the last finite values rather
    than training on NaN.
    """

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, losses: torch.Tensor) -> None:
        bad = ~torch.isfinite(losses).all()
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def first_bad(self) -> int | None:
        step = int(self.first_bad_step)  # host sync: call at log intervals only
        return None if step < 0 else step


# ---- losses ----
def gumbel_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, clip: float) -> torch.Tensor:
    """Gumbel regression loss (Eq. 7 / Eq. 11), in the numerically stable form of Appendix D.3.

    With z = (target - pred) / beta the loss is mean(e^z - z - 1) (Eq. 7); its minimiser over a
    constant pred is beta * log mean exp(target / beta) (Lemma 3.2), the soft maximum of the targets.

    Stabilisation (App. D.3): z is clipped from above at `clip`, and e^{max z} (detached, floored
    at -1) is factored out, i.e. the returned value is mean(e^{z - m} - z e^{-m} - e^{-m}) with
    m = max(max z, -1). This is the plain loss times e^{-m}: same minimiser, same gradient signs,
    gradients rescaled per batch.
    Deviation from the paper's snippet: it clamps z to [-clip, clip]; we clip only from above, as
    the authors' code does, so a prediction far above its target still gets a gradient (the
    linear branch cannot overflow). The max is floored with `clamp`, not with a CPU tensor in
    `torch.where`, so there is no host-device copy and no device mismatch on CUDA.
    """
    z = (target - pred) / beta
    z = torch.clamp(z, max=clip)
    max_z = torch.clamp(z.max(), min=-1.0).detach()
    return (torch.exp(z - max_z) - z * torch.exp(-max_z) - torch.exp(-max_z)).mean()


def critic_loss(q: torch.Tensor, target_q: torch.Tensor, kind: str, beta: float, clip: float) -> torch.Tensor:
    """Sum over the critics (q: [critics, batch]) of each critic's loss toward the shared target.

    gumbel: Eq. 9 / Eq. 42 per critic, so each critic gets its own max-normalisation (App. D.3), as in
    the authors' code; mse: TD3's loss.
    """
    if kind == "gumbel":
        return sum(gumbel_loss(q_i, target_q, beta, clip) for q_i in q.unbind(0))
    return sum(F.mse_loss(q_i, target_q) for q_i in q.unbind(0))


# ---- replay buffer ----
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """A circular buffer of preallocated tensors on the device; batches are drawn on the device.

    `terminated` (a true end: no bootstrap) and `truncated` (a time limit: bootstrap through it) are
    stored apart; the update uses only `terminated`, `save_hdf5` writes both (D4RL's terminals/timeouts).
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device):
        self.capacity, self.device, self.ptr, self.size = capacity, device, 0, 0
        self.obs = torch.zeros((capacity, obs_dim), dtype=torch.float32, device=device)
        self.next_obs = torch.zeros((capacity, obs_dim), dtype=torch.float32, device=device)
        self.actions = torch.zeros((capacity, action_dim), dtype=torch.float32, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.truncated = torch.zeros(capacity, dtype=torch.float32, device=device)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool, truncated: bool) -> None:
        i = self.ptr
        self.obs[i] = torch.as_tensor(obs, device=self.device)
        self.actions[i] = torch.as_tensor(action, device=self.device)
        self.rewards[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(next_obs, device=self.device)
        self.terminated[i] = float(terminated)
        self.truncated[i] = float(truncated)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx])

    def save_hdf5(self, path: str) -> None:
        """Write the buffer in time order as a D4RL-format HDF5 file (what `xql_offline.py --dataset-path` reads).

        Keys: observations, actions, rewards, terminals (true ends), timeouts (time-limit ends and the
        last stored step, since the episode is cut there), next_observations. Written atomically.
        """
        order = torch.arange(self.size, device=self.device)
        if self.size == self.capacity:
            order = (order + self.ptr) % self.capacity  # oldest first after wrap-around
        timeouts = self.truncated[order].clone()
        if self.size:
            timeouts[-1] = 1.0 - self.terminated[order][-1]  # the episode in progress ends here
        arrays = {
            "observations": self.obs[order],
            "actions": self.actions[order],
            "rewards": self.rewards[order],
            "terminals": self.terminated[order].bool(),
            "timeouts": timeouts.bool(),
            "next_observations": self.next_obs[order],
        }
        tmp = f"{path}.tmp"
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value.cpu().numpy(), compression="gzip")
        os.replace(tmp, path)


# ---- networks ----
class Actor(nn.Module):
    """Deterministic policy pi(s) in [-1, 1] (tanh output; the env rescales to its bounds)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, action_dim), nn.Tanh(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class EnsembleLinear(nn.Module):
    """`num` independent linear layers as one batched matmul: x [num, batch, in] -> [num, batch, out]."""

    def __init__(self, num: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / in_features**0.5  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(num, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class Critics(nn.Module):
    """`num` Q(s, a) networks (2: twin critics, 1: --no-double-q) evaluated in one batched pass -> [num, batch]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num: int):
        super().__init__()
        self.num = num
        self.layers = nn.ModuleList([
            EnsembleLinear(num, obs_dim + action_dim, hidden_dim),
            EnsembleLinear(num, hidden_dim, hidden_dim),
            EnsembleLinear(num, hidden_dim, 1),
        ])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1).expand(self.num, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)

    def first(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q_1(s, a) only -> [batch]. With `detach_params`, gradients reach the actions but not the critic
        (the actor update: no critic gradient is computed, since the critic optimiser would not use it)."""
        x = torch.cat([obs, actions], dim=-1)
        for i, layer in enumerate(self.layers):
            weight, bias = layer.weight[0], layer.bias[0]
            if detach_params:
                weight, bias = weight.detach(), bias.detach()
            x = torch.addmm(bias, x, weight)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


# ---- training ----
def make_update(args: Args, beta: float, actor: Actor, actor_target: Actor, critics: Critics, critics_target: Critics,
                actor_optimizer: torch.optim.Optimizer, critic_optimizer: torch.optim.Optimizer) -> Callable:
    """The TD3 / X-TD3 update of one step, as one function: `update(batch, update_actor)` ->
    (stacked [q_loss, mean Q] tensor, actor_loss tensor or None), all detached (no host sync)."""
    online_params = list(actor.parameters()) + list(critics.parameters())
    target_params = list(actor_target.parameters()) + list(critics_target.parameters())

    def update(batch: Batch, update_actor: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            # Target policy smoothing: clipped Gaussian noise on the target actor's action (TD3).
            noise = (torch.randn_like(batch.actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_actions = (actor_target(batch.next_obs) + noise).clamp(-1.0, 1.0)
            # Clipped double-Q: min over the target critics (one critic with --no-double-q).
            next_q = critics_target(batch.next_obs, next_actions).min(dim=0).values
            target_q = batch.rewards + args.gamma * (1.0 - batch.terminated) * next_q  # Eq. 41: r + gamma Q'(s', a')
        q = critics(batch.obs, batch.actions)
        q_loss = critic_loss(q, target_q, args.critic_loss, beta, args.loss_clip)  # Eq. 9 / 42 (gumbel) or TD3's MSE
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        critic_metrics = torch.stack([q_loss.detach(), q.detach().mean()])

        actor_loss = None
        if update_actor:  # delayed policy updates (TD3, Table 5 "Actor Freq 2")
            # Sec. 3.5: max_psi E[Q(s, pi(s))] without entropy; Q_1 only, as TD3 and the authors' code.
            actor_loss = -critics.first(batch.obs, actor(batch.obs), detach_params=True).mean()
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_optimizer.step()
            with torch.no_grad():  # delayed Polyak update of actor and critic targets, one fused call
                torch._foreach_lerp_(target_params, online_params, args.tau)
            actor_loss = actor_loss.detach()
        return critic_metrics, actor_loss

    return update


@torch.no_grad()
def bellman_errors(batch: Batch, actor: Actor, critics: Critics, gamma: float) -> torch.Tensor:
    """App. D.2: r + gamma Q_1(s', pi(s')) - Q_1(s, a) with the online first critic (no target network) and the
    deterministic policy action. (1 - terminated) masks true ends; dm_control tasks never terminate."""
    next_q = critics.first(batch.next_obs, actor(batch.next_obs))
    return batch.rewards + gamma * (1.0 - batch.terminated) * next_q - critics.first(batch.obs, batch.actions)


def make_optimizer(params, lr: float, device: torch.device, capturable: bool) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA in torch >= 2.4), else the foreach one."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, foreach=True, capturable=capturable)


def hyperparameter_table(settings: dict) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in settings.items())


def check_args(args: Args) -> None:
    """User errors: one line each, before anything is created."""
    if args.beta is not None and not args.beta > 0:
        raise SystemExit(f"{PROG}: --beta must be > 0 (got {args.beta}); it is the Gumbel temperature (Table 6 lists per-task values).")
    if not args.loss_clip > 0:
        raise SystemExit(f"{PROG}: --loss-clip must be > 0 (got {args.loss_clip}).")
    for name in ("total_timesteps", "buffer_size", "batch_size", "hidden_dim", "policy_frequency", "log_freq", "eval_freq", "bellman_log_freq"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"{PROG}: --{name.replace('_', '-')} must be > 0 (got {getattr(args, name)}).")
    if args.learning_starts < 0 or args.eval_episodes < 0:
        raise SystemExit(f"{PROG}: --learning-starts and --eval-episodes must be >= 0.")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise SystemExit(f"{PROG}: --cudagraphs needs a CUDA device (none is available here, or --no-cuda was given); use --compile on the CPU.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit(f"{PROG}: --track needs wandb: pip install wandb.")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise SystemExit(f"{PROG}: --capture-video needs moviepy: pip install moviepy.")
    if args.save_buffer is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_buffer))):
        raise SystemExit(f"{PROG}: the folder of --save-buffer {args.save_buffer} does not exist; create it first.")
    if args.eval_only and (args.checkpoint is None or not os.path.isfile(args.checkpoint)):
        raise SystemExit(f"{PROG}: --eval-only needs --checkpoint PATH to a file written by --save-model (got {args.checkpoint}).")


def set_mujoco_gl_default(args: Args) -> None:
    """In-process callers (main(args) without the CLI): a headless default for gymnasium's MuJoCo renderer,
    which reads MUJOCO_GL when it renders. dm_control chose its backend at import: see the top of this file."""
    if args.capture_video and "MUJOCO_GL" not in os.environ:
        backend = "egl" if os.path.exists("/dev/nvidiactl") else "osmesa"  # the same test as the top of this file
        os.environ.update(MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
        print(f"{PROG}: MUJOCO_GL was unset; using MUJOCO_GL={backend} for --capture-video.", flush=True)


def evaluate_checkpoint(args: Args, device: torch.device) -> np.ndarray:
    """--eval-only: load the actor of --checkpoint and run --eval-episodes deterministic episodes."""
    try:
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=False)
        saved = checkpoint["args"]
        assert isinstance(checkpoint["actor"], dict) and "env_id" in saved and "hidden_dim" in saved
    except Exception as error:  # a truncated or foreign file: a user error, not a traceback
        raise SystemExit(f"{PROG}: {args.checkpoint} is not a checkpoint written by {PROG} --save-model ({type(error).__name__}).")
    video_folder = None
    if args.capture_video:
        video_folder = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos_eval_only")
    env = make_env(saved["env_id"], args.seed, video_folder)
    actor = Actor(int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape)), saved["hidden_dim"]).to(device)
    actor.load_state_dict(checkpoint["actor"])
    actor.eval()
    returns, lengths = evaluate(actor, env, args.eval_episodes, args.seed, device)
    env.close()
    print(f"{PROG}: {args.checkpoint} on {saved['env_id']} (step {checkpoint.get('global_step')}): "
          f"return {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes (mean length {lengths.mean():.0f})", flush=True)
    return returns


def main(args: Args) -> str | np.ndarray:
    """Train (returns the run folder) or, with --eval-only, evaluate a checkpoint (returns the episode returns)."""
    if args.cudagraphs:
        args = dataclasses.replace(args, compile=True)
    check_args(args)
    set_mujoco_gl_default(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.eval_only:
        return evaluate_checkpoint(args, device)

    check_env_id(args.env_id)
    beta, beta_source = resolve_beta(args.env_id, args.beta, args.double_q)
    exploration_noise = resolve_exploration_noise(args.env_id, args.exploration_noise)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    env = make_env(args.env_id, args.seed)  # raises the one-line error for a discrete action space
    eval_env = make_env(args.env_id, args.seed + 10_000, os.path.join(run_dir, "videos") if args.capture_video else None)
    obs_dim, action_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))

    beta_line = f"beta={beta} ({beta_source})" if args.critic_loss == "gumbel" else "beta unused (--critic-loss mse: plain TD3)"
    print(f"{PROG}: {args.env_id}, {'twin critics' if args.double_q else 'one critic (--no-double-q)'}, critic loss {args.critic_loss}, "
          f"{beta_line}, exploration noise {exploration_noise}{'' if args.exploration_noise is not None else ' (Table 5)'}, device {device}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    resolved = {"beta": beta if args.critic_loss == "gumbel" else None, "beta_source": beta_source,
                "exploration_noise": exploration_noise, "num_critics": 2 if args.double_q else 1, "device": str(device)}
    writer.add_text("hyperparameters", hyperparameter_table({**vars(args), **{f"resolved/{k}": v for k, v in resolved.items()}}))

    actor = Actor(obs_dim, action_dim, args.hidden_dim).to(device)
    critics = Critics(obs_dim, action_dim, args.hidden_dim, 2 if args.double_q else 1).to(device)
    actor_target, critics_target = copy.deepcopy(actor), copy.deepcopy(critics)
    for param in list(actor_target.parameters()) + list(critics_target.parameters()):
        param.requires_grad_(False)
    actor_optimizer = make_optimizer(actor.parameters(), args.learning_rate, device, args.cudagraphs)
    critic_optimizer = make_optimizer(critics.parameters(), args.learning_rate, device, args.cudagraphs)
    update = make_update(args, beta, actor, actor_target, critics, critics_target, actor_optimizer, critic_optimizer)
    policy = actor
    if args.compile:
        mode = "reduce-overhead" if args.cudagraphs else None
        update = torch.compile(update, mode=mode)
        policy = torch.compile(actor, mode=mode)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, action_dim, device)
    guard = FiniteGuard(device)

    def finite_snapshot(global_step: int) -> dict:
        """Network parameters on the CPU, taken at a log interval whose losses were all finite: what a NaN stop saves."""
        snapshot = {name: {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
                    for name, module in (("actor", actor), ("critics", critics), ("actor_target", actor_target), ("critics_target", critics_target))}
        return {**snapshot, "args": vars(args), "resolved": resolved, "global_step": global_step}

    def checkpoint(global_step: int) -> dict:
        return {**finite_snapshot(global_step), "actor_optimizer": actor_optimizer.state_dict(),
                "critic_optimizer": critic_optimizer.state_dict()}

    def stop_if_nonfinite() -> None:
        """Host sync: read the device-side guard (at log intervals, evaluations and the end only)."""
        bad_step = guard.first_bad()
        if bad_step is not None:
            stop_on_nonfinite(args, bad_step, last_finite, run_dir, buffer, (env, eval_env, writer))

    obs, _ = env.reset(seed=args.seed)
    start_time, sps_time, sps_step = time.time(), time.time(), 0
    critic_metrics, last_actor_loss, num_updates = None, None, 0
    last_finite = {"step": 0, "values": {}, "checkpoint": finite_snapshot(0)}
    last_eval = float("nan")
    for global_step in range(1, args.total_timesteps + 1):
        if global_step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0]
                action = (action + exploration_noise * torch.randn_like(action)).clamp(-1.0, 1.0)  # Table 5 "Actor Noise"
            action = action.cpu().numpy()
            if not np.isfinite(action).all():  # the host copy above is a sync anyway: check before stepping
                stop_on_nonfinite(args, guard.first_bad() or global_step, last_finite, run_dir, buffer, (env, eval_env, writer))
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated, truncated)  # next_obs is the true last obs at an episode end
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", float(info["episode"]["r"]), global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:
            num_updates += 1
            if args.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the graph's output buffers are reused by the next call
            critic_metrics, actor_loss = update(buffer.sample(args.batch_size), num_updates % args.policy_frequency == 0)
            critic_metrics = critic_metrics.clone()
            guard.update(global_step, critic_metrics)
            if actor_loss is not None:
                last_actor_loss = actor_loss.clone()
                guard.update(global_step, last_actor_loss)
            if args.log_bellman_errors and global_step > args.learning_starts and global_step % args.bellman_log_freq == 0:
                errors = bellman_errors(buffer.sample(args.batch_size), actor, critics, args.gamma)
                os.makedirs(os.path.join(run_dir, "bellman_errors"), exist_ok=True)
                path = os.path.join(run_dir, "bellman_errors", f"step_{global_step:08d}.npy")
                np.save(f"{path}.tmp.npy", errors.float().cpu().numpy())
                os.replace(f"{path}.tmp.npy", path)

        if global_step % args.log_freq == 0 and critic_metrics is not None:
            stop_if_nonfinite()
            q_loss, q_mean = critic_metrics.tolist()
            values = {"losses/q_loss": q_loss, "values/q": q_mean}
            if last_actor_loss is not None:
                values["losses/actor_loss"] = float(last_actor_loss)
            sps = (global_step - sps_step) / max(time.time() - sps_time, 1e-9)
            sps_time, sps_step = time.time(), global_step
            for tag, value in {**values, "charts/SPS": sps}.items():
                writer.add_scalar(tag, value, global_step)
            last_finite = {"step": global_step, "values": values, "checkpoint": finite_snapshot(global_step)}
            print(f"{PROG} step {global_step}/{args.total_timesteps} SPS {sps:.0f} q_loss {q_loss:.4g} Q {q_mean:.4g} "
                  f"actor_loss {values.get('losses/actor_loss', float('nan')):.4g} last eval {last_eval:.1f}", flush=True)

        if (global_step % args.eval_freq == 0 or global_step == args.total_timesteps) and args.eval_episodes > 0:
            stop_if_nonfinite()
            returns, lengths = evaluate(policy, eval_env, args.eval_episodes, args.seed + 10_000, device)
            last_eval = float(returns.mean())
            writer.add_scalar("eval/episodic_return", last_eval, global_step)
            writer.add_scalar("eval/episodic_length", float(lengths.mean()), global_step)
            print(f"{PROG} eval at step {global_step}: return {returns.mean():.2f} +- {returns.std():.2f} ({len(returns)} episodes)", flush=True)

    stop_if_nonfinite()
    env.close()
    eval_env.close()
    if args.save_model:
        save_atomically(checkpoint(args.total_timesteps), os.path.join(run_dir, "checkpoint.pt"))
        print(f"{PROG}: checkpoint {os.path.join(run_dir, 'checkpoint.pt')} "
              f"(evaluate: python {PROG}.py --eval-only --checkpoint {os.path.join(run_dir, 'checkpoint.pt')})", flush=True)
    if args.save_buffer is not None:
        buffer.save_hdf5(args.save_buffer)
        print(f"{PROG}: replay buffer ({buffer.size} transitions) written to {args.save_buffer}", flush=True)
    writer.close()
    if args.track:
        wandb.finish()
    print(f"{PROG}: done in {time.time() - start_time:.0f}s; run folder {run_dir}", flush=True)
    return run_dir


def stop_on_nonfinite(args: Args, bad_step: int, last_finite: dict, run_dir: str, buffer: ReplayBuffer, to_close: tuple) -> None:
    """App. D.6 instability: stop rather than train on NaN, after saving the last finite parameters and the buffer."""
    path = os.path.join(run_dir, "last_finite_checkpoint.pt")
    save_atomically(last_finite["checkpoint"], path)
    saved = [f"parameters of step {last_finite['step']} to {path}"]
    if args.save_buffer is not None:
        buffer.save_hdf5(args.save_buffer)
        saved.append(f"the replay buffer to {args.save_buffer}")
    for resource in to_close:  # the envs and the TensorBoard writer
        resource.close()
    last = ", ".join(f"{k} {v:.4g}" for k, v in last_finite["values"].items()) or "none logged yet"
    raise SystemExit(f"{PROG}: a loss became NaN/inf at env step {bad_step}; last finite values (step {last_finite['step']}): {last}; "
                     f"saved {'; '.join(saved)}. "
                     f"Try a larger --beta or a smaller --loss-clip (App. D.6), or restart with another seed.")


if __name__ == "__main__":
    main(tyro.cli(Args))
