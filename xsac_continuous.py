"""X-SAC: Soft Actor-Critic whose soft value is fitted by Gumbel regression instead of with entropies.

A value network V is trained with the Gumbel loss (Eq. 11) toward min of the twin Q at actions drawn
from the current policy, with no log-probability term: its minimiser is the soft maximum (LogSumExp,
Lemma 3.5) of Q. Q regresses r + gamma * V_target(s') with MSE (Eq. 14) and the actor follows SAC
(Eq. 13 with mu uniform). `--value-loss mse` is the paper's baseline: SAC with a value network
(V toward min Q - alpha log pi, MSE), identical otherwise (Figure 3). Paper: Sec. 3.4-3.5, App. D.6,
Tables 5-6. Single file, CleanRL style; gymnasium and dm_control (through shimmy) tasks.

Usage: python xsac_continuous.py --env-id dm_control/hopper-hop-v0 --beta 2 --save-model
       python xsac_continuous.py --eval-only --checkpoint runs/<run_name>/checkpoint.pt --eval-episodes 10

Deviations:
- Defaults follow Table 5 / App. D.6 (exp clip 8, actor update every step). The authors' online code
  differs: exp clip 10 (`--loss-clip 10`), actor and alpha updated every 2nd step
  (`--policy-frequency 2`), beta 1 for hopper-hop and 2 for walker-run (`--beta-table authors`).
- Not given by the paper (Table 5 is silent), taken from pytorch_sac and the authors' code, which
  agree: alpha starts at 0.1 (`--alpha-init`), V target Polyak tau 0.005 every 2nd step
  (`--target-network-frequency`), log-std bounded to [-5, 2] through tanh, orthogonal init, 5000
  random steps, evaluation every 10k steps over 10 episodes.
- V is fitted with the critics just updated in the same step and one policy sample shared with the
  actor loss, as in the authors' code; the "previous policy" of Sec. 3.5 is the policy before this
  step's actor update.
- Tasks outside Table 6 fall back to beta = 2 (printed): the most common X-SAC value of Table 6 and
  the offline default of Table 4.
- Targets mask true terminations only; time-limit truncations are bootstrapped through.
"""

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROG = os.path.splitext(os.path.basename(__file__))[0]

# dm_control picks its OpenGL backend once, when shimmy imports it below, so a headless default for
# --capture-video has to be in place before that import: EGL on a GPU machine, OSMesa (software,
# `apt-get install libosmesa6`) on CPU-only machines. A MUJOCO_GL set by the user always wins.
if "--capture-video" in sys.argv and "MUJOCO_GL" not in os.environ:
    os.environ["MUJOCO_GL"] = "egl" if torch.cuda.is_available() else "osmesa"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    print(f"{PROG}: MUJOCO_GL was unset; using MUJOCO_GL={os.environ['MUJOCO_GL']} for headless video", flush=True)

import gymnasium as gym  # noqa: E402
import h5py  # noqa: E402
import shimmy  # noqa: E402,F401  importing it registers the dm_control/<domain>-<task>-v0 ids
import tyro  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402



@dataclass
class Args:
    # ---- experiment ----
    exp_name: str = PROG
    """name of this experiment (the algorithm arm in benchmarks: `xsac`, `sac`)"""
    seed: int = 1
    """seed of the experiment (networks, replay sampling, environments)"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available (CPU otherwise)"""
    compile: bool = False
    """wrap the update function and the policy in `torch.compile` (issue 6)"""
    cudagraphs: bool = False
    """also capture the compiled update in CUDA graphs (`mode="reduce-overhead"`; CUDA only)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "xql"
    """wandb project name"""
    wandb_entity: str | None = None
    """wandb entity (team)"""

    # ---- environment ----
    env_id: str = "dm_control/cheetah-run-v0"
    """gymnasium id with a bounded continuous action space, e.g. `dm_control/hopper-hop-v0`, `Pendulum-v1`"""
    total_timesteps: int = 1_000_000
    """environment steps in total"""
    learning_starts: int = 5000
    """uniformly random actions (and no updates) for this many environment steps (authors' init_steps)"""
    capture_video: bool = False
    """record the evaluation episodes into runs/{run_name}/videos (needs moviepy; headless rendering: MUJOCO_GL=osmesa on CPU-only machines, egl on GPUs, set so when MUJOCO_GL is unset)"""

    # ---- algorithm ----
    beta: float | None = None
    """Gumbel temperature beta of Eq. 11; None: the per-task value of Table 6 (BETA_TABLE6), else 2"""
    beta_table: Literal["paper", "authors"] = "paper"
    """per-task beta when `--beta` is not given: Table 6 (`paper`) or the authors' sweep config (`authors`)"""
    value_loss: Literal["gumbel", "mse"] = "gumbel"
    """`gumbel`: X-SAC (V by Eq. 11, no entropy term); `mse`: the SAC-with-V baseline (V toward min Q - alpha log pi)"""
    loss_clip: float = 8.0
    """upper clip of z = (Q - V) / beta inside the Gumbel loss (App. D.6: 8; authors' code: 10)"""
    hidden_dim: int = 1024
    """width of the two hidden layers of actor, critics and V (Table 5: 1024, 1024)"""
    batch_size: int = 1024
    """replay batch size (Table 5)"""
    learning_rate: float = 1e-4
    """Adam learning rate of actor, critics, V and alpha (Table 5)"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (Table 5)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the V target network (pytorch_sac / authors' code)"""
    policy_frequency: int = 1
    """update the actor and alpha every this many steps (Table 5: 1; authors' code: 2)"""
    target_network_frequency: int = 2
    """Polyak-update the V target every this many steps (pytorch_sac and authors' code: 2)"""
    alpha_init: float = 0.1
    """initial entropy temperature alpha (pytorch_sac and authors' code: 0.1)"""
    autotune: bool = True
    """tune alpha toward the target entropy -|A| (Table 5: auto-tuned); `--no-autotune` keeps alpha fixed"""
    log_std_min: float = -5.0
    """lower bound of the actor's log standard deviation"""
    log_std_max: float = 2.0
    """upper bound of the actor's log standard deviation"""

    # ---- logging / output ----
    runs_dir: str = "runs"
    """parent folder of the run folders"""
    eval_freq: int = 10_000
    """evaluate the deterministic policy every this many environment steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_freq: int = 1000
    """write losses, check them for NaN/inf and snapshot the parameters every this many steps"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt at the end (load with `--eval-only --checkpoint PATH`)"""
    save_buffer: str | None = None
    """write the replay buffer to this path as a D4RL-format HDF5 file at the end"""
    log_bellman_errors: bool = False
    """save r + gamma Q1(s', mean pi(s')) - Q1(s, a) of a replay batch (App. D.2) to runs/{run_name}/bellman_errors"""
    bellman_log_freq: int = 5000
    """with `--log-bellman-errors`: every this many environment steps once learning has started"""
    eval_only: bool = False
    """evaluate `--checkpoint` for `--eval-episodes` episodes on its environment and exit (no training)"""
    checkpoint: str | None = None
    """checkpoint written by `--save-model`, for `--eval-only`"""


# Table 6: beta of X-SAC per DM Control task.
BETA_TABLE6 = {
    "dm_control/cheetah-run-v0": 2.0,
    "dm_control/walker-run-v0": 1.0,
    "dm_control/hopper-hop-v0": 2.0,
    "dm_control/quadruped-run-v0": 5.0,
}
# The authors' online sweep (online/configs/sac_experiments.json) swaps hopper and walker.
BETA_AUTHORS = {**BETA_TABLE6, "dm_control/walker-run-v0": 2.0, "dm_control/hopper-hop-v0": 1.0}
# Outside the tables: the most common X-SAC value of Table 6 (and the offline default of Table 4).
BETA_FALLBACK = 2.0


def resolve_beta(args: Args) -> float:
    if args.beta is not None:
        return args.beta
    table = BETA_TABLE6 if args.beta_table == "paper" else BETA_AUTHORS
    return table.get(args.env_id, BETA_FALLBACK)


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
def orthogonal_init(module: nn.Module) -> None:
    """Orthogonal weights, zero biases (the authors' `ortho_init: true`)."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight)
        nn.init.zeros_(module.bias)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
    net.apply(orthogonal_init)
    return net


class Actor(nn.Module):
    """tanh-squashed diagonal Gaussian; log-std squashed into [log_std_min, log_std_max] (pytorch_sac)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, log_std_min: float, log_std_max: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dim, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_log_std = self.net(obs).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw_log_std) + 1)
        return mean, log_std

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] and its log-probability (tanh change of variables)."""
        mean, log_std = self(obs)
        noise = torch.randn_like(mean)
        pre_tanh = mean + log_std.exp() * noise
        action = torch.tanh(pre_tanh)
        # log N(pre_tanh; mean, std) - log(1 - tanh^2), the latter as 2 (log 2 - u - softplus(-2u)) for stability
        log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - 2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))
        return action, log_prob.sum(-1)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action (evaluation, Bellman-error logging)."""
        return torch.tanh(self(obs)[0])


class TwinCritic(nn.Module):
    """Both Q networks as one (issue 6): weights stacked on a leading dim of size 2, one `baddbmm` per layer."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, num_critics: int = 2):
        super().__init__()
        sizes = [obs_dim + action_dim, hidden_dim, hidden_dim, 1]
        self.num_critics = num_critics
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(num_critics, n_in, n_out)) for n_in, n_out in zip(sizes[:-1], sizes[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_critics, 1, n_out)) for n_out in sizes[1:]])
        with torch.no_grad():
            for weight in self.weights:
                for member in weight:
                    nn.init.orthogonal_(member)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q values of shape (2, batch). `detach_params`: gradients flow to the action only (actor and V targets)."""
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                weight, bias = weight.detach(), bias.detach()
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = F.relu(x)
        return x.squeeze(-1)


class Value(nn.Module):
    def __init__(self, obs_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dim, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class Agent(nn.Module):
    """All learned parameters in one module, so one state_dict is the checkpoint and the NaN snapshot."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args.hidden_dim, args.log_std_min, args.log_std_max)
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim)
        self.value = Value(obs_dim, args.hidden_dim)
        self.value_target = Value(obs_dim, args.hidden_dim)
        self.value_target.load_state_dict(self.value.state_dict())
        self.value_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.alpha_init)), requires_grad=args.autotune)


def make_optimizers(agent: Agent, args: Args) -> dict[str, torch.optim.Optimizer]:
    """Adam per network (Table 5: one learning rate); fused kernels where the device has them, else foreach."""

    def adam(params) -> torch.optim.Optimizer:
        params = list(params)
        if args.cudagraphs:
            return torch.optim.Adam(params, lr=args.learning_rate, foreach=True, capturable=True)
        try:
            return torch.optim.Adam(params, lr=args.learning_rate, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.Adam(params, lr=args.learning_rate, foreach=True)

    optimizers = {"critic": adam(agent.critic.parameters()), "value": adam(agent.value.parameters()), "actor": adam(agent.actor.parameters())}
    if args.autotune:
        optimizers["alpha"] = adam([agent.log_alpha])
    return optimizers


# ---- update ----
LOSS_NAMES = ("q_loss", "v_loss", "actor_loss", "alpha", "alpha_loss", "v", "q", "entropy")


def make_update(agent: Agent, optimizers: dict, args: Args, beta: float, target_entropy: float) -> Callable[[Batch, bool], torch.Tensor]:
    """One gradient step on Q, V and (if `update_actor`) actor and alpha; returns the detached LOSS_NAMES values.

    Nothing leaves the device: no `.item()`, no Python branch on a tensor, so the step queues
    asynchronously on a GPU and `torch.compile` traces the losses and their backward passes (the
    optimizer steps run as eager fused kernels between the compiled pieces).
    """
    actor, critic, value, value_target, log_alpha = agent.actor, agent.critic, agent.value, agent.value_target, agent.log_alpha

    @torch.compiler.disable(recursive=True)
    def optimizer_step(names: list[str]) -> None:
        # Kept out of torch.compile: the fused Adam kernels are already one call per optimizer, and
        # tracing Adam on the CPU costs recompiles (its state appears after the first step) for no gain.
        for name in names:
            optimizers[name].step()

    def update(batch: Batch, update_actor: bool) -> torch.Tensor:
        # Q toward the single-sample soft Bellman backup r + gamma (1 - terminated) V_target(s') (Eq. 10, 14)
        with torch.no_grad():
            target_q = batch.rewards + args.gamma * (1.0 - batch.terminated) * value_target(batch.next_obs)
        q_pred = critic(batch.obs, batch.actions)
        q_loss = (q_pred - target_q).pow(2).mean(dim=1).sum()  # Eq. 14, summed over the twin critics
        optimizers["critic"].zero_grad(set_to_none=True)
        q_loss.backward()
        optimizer_step(["critic"])

        # One sample a ~ pi(.|s) serves both the V target and the actor loss (as in the authors' code).
        alpha = log_alpha.exp().detach()
        with torch.set_grad_enabled(update_actor):
            policy_action, log_prob = actor.sample(batch.obs)
            q_policy = critic(batch.obs, policy_action, detach_params=True).min(dim=0).values

        # V: Gumbel regression toward min Q at a ~ pi without any entropy term (Eq. 11, Sec. 3.5);
        # the SAC baseline regresses min Q - alpha log pi with MSE (Haarnoja et al. 2017).
        v_pred = value(batch.obs)
        if args.value_loss == "gumbel":
            v_loss = gumbel_loss(v_pred, q_policy.detach(), beta, args.loss_clip)  # Eq. 11
        else:
            v_loss = F.mse_loss(v_pred, (q_policy - alpha * log_prob).detach())

        # Actor: max E[min Q(s, a) - alpha log pi(a|s)] (Eq. 13 with mu uniform: SAC); alpha toward entropy -|A|.
        actor_loss = (alpha * log_prob - q_policy).mean()
        alpha_loss = -(log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()

        # V, actor and alpha losses touch disjoint parameters (every cross term is detached), so one
        # backward of their sum gives each its own gradient: one pass instead of three.
        stepped = ["value"]
        if update_actor:
            stepped += ["actor", "alpha"] if args.autotune else ["actor"]
        for name in stepped:
            optimizers[name].zero_grad(set_to_none=True)
        (v_loss + actor_loss + alpha_loss if update_actor else v_loss).backward()
        optimizer_step(stepped)
        return torch.stack(
            [q_loss, v_loss, actor_loss, alpha, alpha_loss, v_pred.mean(), q_pred.mean(), -log_prob.mean()]
        ).detach()

    return update


def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- target + tau (online - target), one fused call over all tensors."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


@torch.no_grad()
def bellman_errors(agent: Agent, batch: Batch, gamma: float) -> torch.Tensor:
    """App. D.2: r + gamma Q1(s', mean pi(s')) - Q1(s, a): first critic, no target network, no entropy term.

    True terminations are masked as in the Q target (the DMC tasks of the paper never terminate).
    """
    next_q = agent.critic(batch.next_obs, agent.actor.mean_action(batch.next_obs))[0]
    return batch.rewards + gamma * (1.0 - batch.terminated) * next_q - agent.critic(batch.obs, batch.actions)[0]


# ---- main ----
def check_args(args: Args) -> None:
    """User mistakes end here with one line, before any folder or file is created."""
    positive = ["total_timesteps", "batch_size", "hidden_dim", "buffer_size", "eval_freq", "eval_episodes",
                "log_freq", "bellman_log_freq", "policy_frequency", "target_network_frequency"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"{PROG}: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.beta is not None and not args.beta > 0:
        raise SystemExit(f"{PROG}: --beta must be > 0 (it divides Q - V in Eq. 11), got {args.beta}.")
    if not args.loss_clip > 0 or not args.learning_rate > 0 or not args.alpha_init > 0:
        raise SystemExit(f"{PROG}: --loss-clip, --learning-rate and --alpha-init must be > 0.")
    if not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise SystemExit(f"{PROG}: --tau must be in (0, 1] and --gamma in [0, 1].")
    if args.learning_starts < 1:
        raise SystemExit(f"{PROG}: --learning-starts must be at least 1 (the buffer must hold a transition before an update).")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise SystemExit(f"{PROG}: --cudagraphs needs a CUDA device (none available, or --no-cuda); use --compile on the CPU.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit(f"{PROG}: --track needs wandb: pip install wandb.")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise SystemExit(f"{PROG}: --capture-video needs moviepy: pip install moviepy.")
    if args.save_buffer and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_buffer))):
        raise SystemExit(f"{PROG}: --save-buffer folder does not exist: {os.path.dirname(os.path.abspath(args.save_buffer))}")


def load_checkpoint(path: str | None, device: torch.device) -> dict:
    if not path:
        raise SystemExit(f"{PROG}: --eval-only needs --checkpoint PATH (a checkpoint.pt written by --save-model).")
    if not os.path.isfile(path):
        raise SystemExit(f"{PROG}: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        assert isinstance(checkpoint, dict) and "agent" in checkpoint and "args" in checkpoint
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise SystemExit(f"{PROG}: {path} is not a checkpoint written by {PROG} --save-model ({type(error).__name__}).")
    return checkpoint


def evaluate_checkpoint(args: Args, device: torch.device) -> np.ndarray:
    """`--eval-only`: rebuild the actor from the checkpoint and run deterministic episodes on its env."""
    checkpoint = load_checkpoint(args.checkpoint, device)
    trained = Args(**{k: v for k, v in checkpoint["args"].items() if k in {f.name for f in dataclasses.fields(Args)}})
    check_env_id(trained.env_id)
    video_folder = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos_eval_only") if args.capture_video else None
    env = make_env(trained.env_id, args.seed, video_folder)
    agent = Agent(checkpoint["obs_dim"], checkpoint["action_dim"], trained).to(device)
    agent.load_state_dict(checkpoint["agent"])
    returns, lengths = evaluate(agent.actor.mean_action, env, args.eval_episodes, args.seed, device)
    env.close()
    print(f"{PROG}: {args.checkpoint} (step {checkpoint['global_step']}) on {trained.env_id}: "
          f"return {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes (length {lengths.mean():.0f})", flush=True)
    return returns


def main(args: Args) -> str:
    """Train (or, with --eval-only, evaluate a checkpoint); returns the run folder."""
    check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.eval_only:
        evaluate_checkpoint(args, device)
        return ""
    check_env_id(args.env_id)
    env = make_env(args.env_id, args.seed)  # fails with one line for a discrete action space
    beta = resolve_beta(args)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    source = "--beta" if args.beta is not None else ("Table 6" if args.beta_table == "paper" else "authors' config")
    if args.env_id not in BETA_TABLE6 and args.beta is None:
        source = "fallback for tasks outside Table 6"
    print(f"{PROG}: {args.env_id}, value loss {args.value_loss}, beta = {beta} ({source}){'' if args.value_loss == 'gumbel' else ' (unused by --value-loss mse)'}, device {device}", flush=True)

    # ---- set-up ----
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config={**vars(args), "resolved_beta": beta}, name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    settings = {**vars(args), "resolved_beta": beta, "device": str(device)}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    eval_env = make_env(args.env_id, args.seed + 10_000, os.path.join(run_dir, "videos") if args.capture_video else None)

    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = Agent(obs_dim, action_dim, args).to(device)
    optimizers = make_optimizers(agent, args)
    update = make_update(agent, optimizers, args, beta, target_entropy=-float(action_dim))
    sample_policy = lambda obs: agent.actor.sample(obs)[0]  # noqa: E731
    eval_policy = agent.actor.mean_action
    if args.compile or args.cudagraphs:
        update = torch.compile(update, mode="reduce-overhead" if args.cudagraphs else None)
        sample_policy, eval_policy = torch.compile(sample_policy), torch.compile(eval_policy)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, action_dim, device)
    guard = FiniteGuard(device)

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in agent.state_dict().items()}

    def checkpoint(state: dict, global_step: int, with_optimizers: bool) -> dict:
        saved = {"agent": state, "args": vars(args), "resolved_beta": beta, "obs_dim": obs_dim,
                 "action_dim": action_dim, "env_id": args.env_id, "global_step": global_step}
        if with_optimizers:
            saved["optimizers"] = {name: opt.state_dict() for name, opt in optimizers.items()}
        return saved

    def stop_on_non_finite(bad_step: int, global_step: int) -> None:
        path = os.path.join(run_dir, "last_finite_checkpoint.pt")
        save_atomically(checkpoint(last_finite_state, last_finite_step, with_optimizers=False), path)
        if args.save_buffer:
            buffer.save_hdf5(args.save_buffer)
        writer.close()
        env.close()
        eval_env.close()
        values = ", ".join(f"{k}={v:.4g}" for k, v in last_finite_values.items()) or "none logged yet"
        raise SystemExit(f"{PROG}: a loss became NaN/inf at step {bad_step} (noticed at step {global_step}); "
                         f"last finite values (step {last_finite_step}): {values}; parameters of step {last_finite_step} "
                         f"saved to {path}{' and buffer to ' + args.save_buffer if args.save_buffer else ''}. "
                         f"Try a larger --beta or a smaller --loss-clip (App. D.6).")

    def check_finite(global_step: int) -> None:
        """Host sync: read the device-side guard (at log intervals and evaluations only)."""
        bad_step = guard.first_bad()
        if bad_step is not None:
            stop_on_non_finite(bad_step, global_step)

    last_finite_state, last_finite_step, last_finite_values = snapshot(), 0, {}
    last_eval, losses = float("nan"), None
    sps_time, sps_step = time.time(), 0
    obs, _ = env.reset(seed=args.seed)

    # ---- the loop: act, store, update, log, evaluate ----
    for global_step in range(1, args.total_timesteps + 1):
        if global_step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = sample_policy(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
            if not np.isfinite(action).all():  # the host copy above is a sync anyway: check before stepping
                stop_on_non_finite(guard.first_bad() or global_step, global_step)
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs
        if terminated or truncated:
            episode_return, episode_length = float(info["episode"]["r"]), int(info["episode"]["l"])
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_length, global_step)
            obs, _ = env.reset()

        if global_step >= args.learning_starts:
            update_step = global_step - args.learning_starts + 1
            losses = update(buffer.sample(args.batch_size), update_step % args.policy_frequency == 0)
            guard.update(global_step, losses)
            if update_step % args.target_network_frequency == 0:
                polyak_update(agent.value_target, agent.value, args.tau)

            if args.log_bellman_errors and global_step > args.learning_starts and global_step % args.bellman_log_freq == 0:
                folder = os.path.join(run_dir, "bellman_errors")
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f"step_{global_step:08d}.npy")
                errors = bellman_errors(agent, buffer.sample(args.batch_size), args.gamma).float().cpu().numpy()
                with open(f"{path}.tmp", "wb") as f:
                    np.save(f, errors)
                os.replace(f"{path}.tmp", path)

        if losses is not None and global_step % args.log_freq == 0:
            check_finite(global_step)
            values = dict(zip(LOSS_NAMES, losses.tolist()))
            last_finite_state, last_finite_step, last_finite_values = snapshot(), global_step, values
            for name in ("q_loss", "v_loss", "actor_loss", "alpha", "alpha_loss"):
                writer.add_scalar(f"losses/{name}", values[name], global_step)
            writer.add_scalar("values/v", values["v"], global_step)
            writer.add_scalar("values/q", values["q"], global_step)
            writer.add_scalar("charts/entropy", values["entropy"], global_step)
            sps = int((global_step - sps_step) / max(time.time() - sps_time, 1e-9))  # env steps/s over the last log interval
            sps_time, sps_step = time.time(), global_step
            writer.add_scalar("charts/SPS", sps, global_step)
            print(f"step {global_step:>8d} | SPS {sps:>5d} | q_loss {values['q_loss']:9.4f} | v_loss {values['v_loss']:9.4f} | "
                  f"actor_loss {values['actor_loss']:9.4f} | alpha {values['alpha']:.4f} | last eval {last_eval:9.2f}", flush=True)

        if global_step % args.eval_freq == 0 or global_step == args.total_timesteps:
            check_finite(global_step)  # the last step always evaluates, so this is also the final check
            returns, lengths = evaluate(eval_policy, eval_env, args.eval_episodes, args.seed + 10_000, device)
            last_eval = float(returns.mean())
            writer.add_scalar("eval/episodic_return", last_eval, global_step)
            writer.add_scalar("eval/episodic_length", float(lengths.mean()), global_step)
            print(f"step {global_step:>8d} | eval return {last_eval:.2f} +- {returns.std():.2f} over {len(returns)} episodes", flush=True)

    # ---- final report and save ----
    if args.save_model:
        path = os.path.join(run_dir, "checkpoint.pt")
        save_atomically(checkpoint(agent.state_dict(), args.total_timesteps, with_optimizers=True), path)
        print(f"{PROG}: checkpoint saved to {path} (evaluate: python {PROG}.py --eval-only --checkpoint {path} --eval-episodes 10)", flush=True)
    if args.save_buffer:
        buffer.save_hdf5(args.save_buffer)
        print(f"{PROG}: replay buffer ({buffer.size} transitions) saved to {args.save_buffer}", flush=True)
    env.close()
    eval_env.close()
    writer.close()
    if args.track:
        wandb.finish()
    print(f"{PROG}: done; run folder {run_dir} (tensorboard --logdir {args.runs_dir})", flush=True)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
