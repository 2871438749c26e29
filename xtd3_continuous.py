"""X-TD3: TD3 whose critics are trained by Gumbel regression onto the Bellman backup (Eq. 9).

Under deterministic dynamics the Gumbel loss fits the soft-optimal Q directly (Sec. 3.3, Eq. 9):
the critics regress r + gamma min_i Q'_i(s', pi'(s') + eps) with it instead of TD3's squared error;
the rest is TD3 (Fujimoto et al., 2018: deterministic actor, target smoothing, clipped double-Q,
delayed updates), with no value network. `--no-double-q` is "X-TD3 - DQ" (one critic),
`--critic-loss mse` TD3 (Figure 3); the one line where X-TD3 departs from TD3 says "X-TD3:".
Paper: Sec. 3.3, 3.5, App. C.1, D.3, D.6, Tables 5-6. Deviations: docs/deviations.md.

Usage: python xtd3_continuous.py --env-id dm_control/cheetah-run-v0 [--no-double-q]
       python xtd3_continuous.py --eval-only --checkpoint runs/<run>/checkpoint.pt
"""

import copy
import dataclasses
import datetime
import os
import random
import signal
import sys
import time
from functools import partial
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
    exp_name: str = PROG  # the arm in benchmarks (`xtd3`, `xtd3-dq`, `td3`); part of the run folder
    seed: int = 1  # seed of python, numpy, torch and the environments
    cuda: bool = True  # use CUDA when it is available, else the CPU
    compile: bool = False  # torch.compile the update and the acting policy
    matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16
    track: bool = False  # log to Weights & Biases (pip install wandb)
    wandb_project_name: str = "xql"  # the wandb project
    wandb_entity: str | None = None  # the wandb entity (team)
    env_id: str = "dm_control/cheetah-run-v0"  # a gymnasium id with a bounded Box action space
    total_timesteps: int = 1_000_000  # env steps in total, summed over the envs
    num_envs: int = 1  # envs stepped together; one update per env step
    learning_starts: int = 25_000  # random actions and no updates for this many env steps
    capture_video: bool = False  # record the evaluation episodes (needs moviepy)
    critic_loss: Literal["gumbel", "mse"] = "gumbel"  # X-TD3 (Eq. 9) or TD3 (the baseline)
    double_q: bool = True  # twin critics (X-TD3); --no-double-q: one critic, "X-TD3 - DQ"
    beta: float | None = None  # Gumbel temperature of Eq. 9; default: Table 6, else 2 (DQ: 4)
    loss_clip: float = 8.0  # clip of z = (target - Q) / beta (App. D.6 and the authors' yaml: 8)
    clip_mode: Literal["both", "upper"] = "both"  # z to [-clip, clip] (authors' code) or z <= clip
    hidden_dim: int = 256  # width of the two hidden layers of actor and critics (Table 5)
    batch_size: int = 256  # replay batch size (Table 5)
    learning_rate: float = 1e-3  # Adam lr of actor and critics (Table 5)
    buffer_size: int = 1_000_000  # replay buffer capacity (Table 5)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target networks (the authors' code)
    policy_frequency: int = 2  # actor every this many critic updates (Table 5 "Actor Freq")
    target_network_frequency: int = 2  # targets every this many updates (the authors' code)
    exploration_noise: float | None = None  # acting noise std; default 0.1, hopper 0.05 (Table 5)
    policy_noise: float = 0.2  # std of the target policy smoothing noise (Table 5)
    noise_clip: float = 0.5  # the smoothing noise is clipped to +-noise_clip (the authors' code)
    runs_dir: str = "runs"  # parent folder of the run folders
    run_dir: str | None = None  # this run's folder; default {runs_dir}/{env}__{exp}__{seed}__{time}
    log_freq: int = 1000  # env steps between logged losses (TensorBoard, console)
    eval_freq: int = 10_000  # env steps between evaluations; 0: only at the end
    eval_episodes: int = 10  # episodes per evaluation, deterministic policy
    save_model: bool = False  # write {run_dir}/checkpoint.pt at the end
    checkpoint_freq: int = 0  # env steps between resumable checkpoints (buffer included); 0: none
    resume: str | None = None  # continue the run of this resumable checkpoint, in its folder
    save_buffer: str | None = None  # write the replay buffer to this D4RL-format HDF5 file
    log_bellman_errors: bool = False  # save Bellman errors of a replay batch (App. D.2)
    bellman_log_freq: int = 5000  # env steps between Bellman-error snapshots (App. D.2)
    eval_only: bool = False  # evaluate --checkpoint on its env and exit
    checkpoint: str | None = None  # a checkpoint.pt, for --eval-only


# Table 6 (as the authors' td3_{2q,1q}_experiments.json): beta of X-TD3 (twin critics) and of
# X-TD3 - DQ (one critic) per DM Control task; other tasks: each column's most common value.
BETA = {
    True: {"cheetah-run": 5.0, "walker-run": 2.0, "hopper-hop": 2.0, "quadruped-run": 5.0},
    False: {"cheetah-run": 4.0, "walker-run": 4.0, "hopper-hop": 3.0, "quadruped-run": 20.0},
}
BETA_FALLBACK = {True: 2.0, False: 4.0}


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


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Two ReLU hidden layers, PyTorch's default initialisation (Fujimoto's TD3, CleanRL)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        FP32Linear(hidden_dim, out_dim),
    )


class Actor(nn.Module):
    """A deterministic policy pi(s) in [-1, 1] (tanh; the env rescales it to its bounds)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, action_dim)
        self.exploration_noise = args.exploration_noise

    def forward(self, obs):
        return torch.tanh(self.net(obs))

    def explore(self, obs):
        """pi(s) plus Gaussian noise, clipped to [-1, 1] (Table 5 "Actor Noise")."""
        action = self(obs)
        return (action + self.exploration_noise * torch.randn_like(action)).clamp(-1.0, 1.0)


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


class Agent(nn.Module):
    """Every learned tensor in one module: its state_dict is what a checkpoint keeps."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, action_dim, args)
        num_critics = 2 if args.double_q else 1  # X-TD3 - DQ: one critic
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim, num_critics)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)


def update(agent: Agent, optimizers: dict, batch, update_actor: bool, update_target: bool, args):
    """One gradient step on the critics and, if `update_actor`, on the actor."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():  # target policy smoothing and clipped double-Q (TD3)
        noise = (torch.randn_like(actions) * args.policy_noise).clamp(
            -args.noise_clip, args.noise_clip
        )
        next_actions = (agent.actor_target(next_obs) + noise).clamp(-1.0, 1.0)
        next_q = agent.critic_target(next_obs, next_actions).min(dim=0).values
        target_q = (
            rewards + args.gamma * (1.0 - terminated) * next_q
        )  # r + gamma Q'(s', a') (Eq. 41)
    q = agent.critic(obs, actions)
    if args.critic_loss == "gumbel":
        # X-TD3: the one change from TD3. Eq. 9: each critic fitted by Gumbel regression.
        q_loss = sum(
            gumbel_loss(q_i, target_q, args.beta, args.loss_clip, args.clip_mode) for q_i in q
        )
    else:  # TD3's squared error, summed over the critics
        q_loss = (q - target_q).pow(2).mean(dim=1).sum()
    optimizers["critic"].zero_grad()
    q_loss.backward()
    optimizers["critic"].step()
    q = q.detach()  # compiled, a q.mean() needing grad would join the actor's backward and fail
    clipped = clip_fraction(q, target_q.expand_as(q), args.beta, args.loss_clip, args.clip_mode)
    losses = {"losses/q_loss": q_loss, "values/q": q.mean(), "values/clip_fraction": clipped}

    if update_actor:  # the delayed policy update: max E[Q_1(s, pi(s))], no entropy (TD3, Sec. 3.5)
        agent.critic.requires_grad_(False)  # the gradient flows through Q's input, not its weights
        actor_loss = -agent.critic.q1(obs, agent.actor(obs)).mean()
        agent.critic.requires_grad_(True)
        optimizers["actor"].zero_grad()
        actor_loss.backward()
        optimizers["actor"].step()
        losses["losses/actor_loss"] = actor_loss
    if update_target:  # Polyak averaging of both targets
        with torch.no_grad():
            targets = [*agent.actor_target.parameters(), *agent.critic_target.parameters()]
            for target, online in zip(
                targets, [*agent.actor.parameters(), *agent.critic.parameters()]
            ):
                target.lerp_(online, args.tau)
    return {tag: value.detach() for tag, value in losses.items()}


def main(args: Args) -> dict:
    """Train, or with --eval-only evaluate a checkpoint; returns the evaluations."""
    args, resume = resolve_args(args)  # resume: None, or the checkpoint of --resume
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as printed
    if args.eval_only:
        return evaluate_checkpoint(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    videos = args.run_dir if args.capture_video else None
    eval_env = make_env(args.env_id, args.seed + 10_000, videos)  # first: it may set MUJOCO_GL
    envs = gym.vector.SyncVectorEnv(
        [partial(make_env, args.env_id, args.seed + i) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.DISABLED,  # the loop resets finished episodes
    )

    # ---- set-up ----
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
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0]
    agent = Agent(obs_dim, action_dim, args).to(device)
    optimizers = {  # one learning rate (Table 5)
        "critic": torch.optim.Adam(agent.critic.parameters(), args.learning_rate, fused=True),
        "actor": torch.optim.Adam(agent.actor.parameters(), args.learning_rate, fused=True),
    }
    update_fn = update
    policy = agent.actor.explore
    if args.compile:
        update_fn = torch.compile(update_fn)
        policy = torch.compile(policy)
    if args.matmul_precision == "medium":  # bf16 autocast (torch's CPU "medium" measured slower)
        update_fn = torch.autocast(device.type, torch.bfloat16)(update_fn)
    else:  # high: TF32 on CUDA
        torch.set_float32_matmul_precision(args.matmul_precision)
    capacity = min(args.buffer_size, args.total_timesteps) // args.num_envs * args.num_envs
    buffer = ReplayBuffer(capacity, obs_dim, action_dim, device)
    envs.action_space.seed(args.seed)
    obs, _ = envs.reset(seed=args.seed)
    state = {"step": 0, "num_updates": 0, "evaluations": []}  # what a resumed run continues
    if resume:
        obs = restore(resume, state, agent, optimizers, buffer, envs, eval_env)
    last_finite = snapshot(agent, args, state["step"], {})
    log_time = time.time()
    log_step = state["step"]
    last_eval = "-"
    losses = {}
    stop_requests = []  # SIGTERM, SIGUSR1 (Slurm's notice before it stops or requeues a job)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, lambda number, frame: stop_requests.append(number))

    # ---- the loop: act, store, update, log, evaluate, checkpoint ----
    try:
        for step in range(state["step"] + args.num_envs, args.total_timesteps + 1, args.num_envs):
            if step <= args.learning_starts:
                actions = envs.action_space.sample()
            else:
                with torch.no_grad():
                    actions = policy(torch.as_tensor(obs, device=device)).cpu().numpy()
            next_obs, rewards, terminations, truncations, infos = envs.step(actions)
            buffer.add(obs, actions, rewards, next_obs, terminations, truncations)
            obs = next_obs
            done = terminations | truncations
            for i in np.flatnonzero(done):
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], step)
            if done.any():
                obs, _ = envs.reset(options={"reset_mask": done})

            if step >= args.learning_starts:
                for _ in range(args.num_envs):  # one update per env step, whatever --num-envs
                    state["num_updates"] += 1
                    batch = buffer.sample(args.batch_size)
                    update_actor = state["num_updates"] % args.policy_frequency == 0
                    update_target = state["num_updates"] % args.target_network_frequency == 0
                    new = update_fn(agent, optimizers, batch, update_actor, update_target, args)
                    losses.update(new)
                    if not torch.isfinite(torch.stack(list(new.values()))).all():  # host sync
                        stop_on_nonfinite(args.run_dir, step, last_finite)
            if args.log_bellman_errors and step > args.learning_starts:
                if crossed(step, args.num_envs, args.bellman_log_freq):
                    save_bellman_errors(agent, buffer.sample(args.batch_size), step, args)

            if losses and crossed(step, args.num_envs, args.log_freq):
                values = {tag: value.item() for tag, value in losses.items()}
                last_finite = snapshot(agent, args, step, values)
                sps = (step - log_step) / (time.time() - log_time)
                log_time = time.time()
                log_step = step
                log_progress(writer, values, step, args.total_timesteps, sps, last_eval)

            last_step = step + args.num_envs > args.total_timesteps
            if crossed(step, args.num_envs, args.eval_freq) or last_step:
                deterministic = agent.actor
                returns, lengths = evaluate(deterministic, eval_env, args.eval_episodes, device)
                state["evaluations"].append((step, float(returns.mean())))
                last_eval = f"{returns.mean():.2f} +- {returns.std():.2f}"
                writer.add_scalar("eval/episodic_return", returns.mean(), step)
                writer.add_scalar("eval/episodic_length", lengths.mean(), step)
                print(f"step {step}/{args.total_timesteps} | eval return {last_eval}")

            state["step"] = step
            if stop_requests or crossed(step, args.num_envs, args.checkpoint_freq):
                save_checkpoint(args, state, agent, optimizers, (buffer, envs, eval_env))
            if stop_requests:
                path = f"{args.run_dir}/checkpoint.pt"
                raise SystemExit(f"{PROG}: stopped by a signal at step {step}; --resume {path}")
    finally:  # after a NaN stop, a signal or Ctrl-C too: the buffer is what a user looks into
        for number in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, signal.SIG_DFL)
        if args.save_buffer:
            save_buffer(buffer, args, "the policy being trained plus noise")

    # ---- the end ----
    envs.close()
    eval_env.close()
    writer.close()
    if args.save_model or args.checkpoint_freq:
        resumable = (buffer, envs, eval_env) if args.checkpoint_freq else None
        save_checkpoint(args, state, agent, optimizers, resumable)
    returns = [value for _, value in state["evaluations"]]
    saved = (
        f"; checkpoint {args.run_dir}/checkpoint.pt"
        if args.save_model or args.checkpoint_freq
        else ""
    )
    print(f"{PROG}: done, final eval return {returns[-1]:.2f}; run folder {args.run_dir}{saved}")
    result = {"final_return": returns[-1], "best_return": max(returns)}
    return {"run_dir": args.run_dir, "evaluations": state["evaluations"], **result}


# ---- plumbing: environments, buffer, checkpoints, logging, input checks ----


def make_env(env_id: str, seed: int, run_dir: str | None = None) -> gym.Env:
    """Observations flat float32, actions in [-1, 1] (the actor's tanh range), seeded once here
    (later resets continue one random stream); with `run_dir`, episodes recorded to video."""
    if not os.environ.get("DISPLAY") and "MUJOCO_GL" not in os.environ:  # headless
        gl = "egl" if os.path.exists("/dev/nvidiactl") else "osmesa" if run_dir else "disable"
        os.environ["MUJOCO_GL"] = gl  # dm_control reads it when shimmy imports it, below
        if run_dir:
            print(f"{PROG}: MUJOCO_GL was unset; using MUJOCO_GL={gl} for headless video")
    import shimmy  # noqa: F401  registers the dm_control/<domain>-<task>-v0 ids

    try:
        env = gym.make(env_id, render_mode="rgb_array" if run_dir else None)
    except gym.error.Error as error:  # an unknown id: gymnasium's message suggests close ones
        raise SystemExit(f"{PROG}: --env-id {env_id}: {error}")
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or not np.isfinite([space.low, space.high]).all():
        need = "this script needs a bounded continuous (Box) one."
        raise SystemExit(f"{PROG}: '{env_id}' has action space {space}; {need}")
    env = gym.wrappers.FlattenObservation(env)  # not DtypeObservation: float64 bounds make it warn
    space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    env = gym.wrappers.TransformObservation(env, partial(np.asarray, dtype=np.float32), space)
    # RescaleAction's bounds in the space's own dtype: others make numpy warn
    bounds = np.array([-1, 1], env.action_space.dtype)
    env = Replayable(gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, *bounds)))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    if run_dir:
        videos = f"{run_dir}/videos"
        env = gym.wrappers.RecordVideo(env, videos, lambda _: True, disable_logger=True)
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

    def save_hdf5(self, path: str, num_envs: int = 1, **attrs) -> None:
        """The buffer as a D4RL-format HDF5 file with `attrs` as its attributes: oldest first, env
        after env (rows were added one per env and step). Terminals are true ends; timeouts are
        time limits and each env's last row (its episode in progress is cut). Written to a
        temporary file, then renamed."""
        oldest = self.ptr if self.size == len(self.rows) else 0
        order = (oldest + torch.arange(self.size)) % len(self.rows)
        rows = self.rows[order.view(-1, num_envs).T.reshape(-1)].cpu()
        obs, actions, rewards, next_obs, terminals, timeouts = rows.split(self.widths, dim=1)
        last_rows = slice(self.size // num_envs - 1, None, self.size // num_envs)  # of each env
        timeouts[last_rows] = 1 - terminals[last_rows]
        columns = [obs, actions, rewards[:, 0], terminals[:, 0] > 0, timeouts[:, 0] > 0, next_obs]
        keys = ["observations", "actions", "rewards", "terminals", "timeouts", "next_observations"]
        with h5py.File(f"{path}.tmp", "w") as f:
            for key, column in zip(keys, columns):
                f[key] = column.numpy()
            f.attrs.update(attrs)
        os.replace(f"{path}.tmp", path)


def save_buffer(buffer: ReplayBuffer, args: Args, policy: str) -> None:
    origin = dict(env_id=args.env_id, script=PROG, exp_name=args.exp_name, seed=args.seed)
    origin["policy"] = f"uniform random for {args.learning_starts} env steps, then {policy}"
    buffer.save_hdf5(args.save_buffer, args.num_envs, **origin, env_steps=buffer.size)
    print(f"{PROG}: replay buffer ({buffer.size} transitions) written to {args.save_buffer}")


class FP32Linear(nn.Linear):
    """A Linear layer that stays fp32 under bf16 autocast (--matmul-precision medium): the outputs
    (Q, V, actions) keep fp32's precision."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


@torch.no_grad()
def save_bellman_errors(agent: Agent, batch: tuple, step: int, args: Args) -> None:
    """App. D.2: r + gamma Q1(s', pi(s')) - Q1(s, a) of a replay batch, by the first critic, with
    no target network, to {run_dir}/bellman_errors/step_N.npy."""
    obs, actions, rewards, next_obs, terminated = batch
    next_q = agent.critic.q1(next_obs, agent.actor(next_obs))
    errors = rewards + args.gamma * (1 - terminated) * next_q - agent.critic.q1(obs, actions)
    os.makedirs(f"{args.run_dir}/bellman_errors", exist_ok=True)
    np.save(f"{args.run_dir}/bellman_errors/step_{step:08d}.npy", errors.cpu().numpy())


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


def save_checkpoint(args: Args, state: dict, agent, optimizers: dict, resumable=None) -> None:
    """{run_dir}/checkpoint.pt: the model, its optimisers and settings; given `resumable` (buffer,
    envs, eval env) also what --resume needs to continue exactly (see `restore`)."""
    checkpoint = {"script": PROG, "args": vars(args), "step": state["step"]}
    checkpoint["agent"] = agent.state_dict()
    checkpoint["optimizers"] = {name: opt.state_dict() for name, opt in optimizers.items()}
    if resumable:
        buffer, envs, eval_env = resumable
        checkpoint["state"] = state
        checkpoint["rows"] = buffer.rows[: buffer.size].cpu()
        checkpoint["ptr"] = buffer.ptr
        checkpoint["episodes"] = [env.get_wrapper_attr("episode") for env in [*envs.envs, eval_env]]
        checkpoint["rng"] = [random.getstate(), np.random.get_state(), torch.get_rng_state()]
        checkpoint["rng"].append(envs.action_space.np_random.bit_generator.state)  # random phase
    atomic_save(checkpoint, f"{args.run_dir}/checkpoint.pt")


def load_checkpoint(path: str | None) -> dict:
    """A checkpoint written by this script, loaded on the CPU, or a one-line error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["script"] == PROG and {"agent", "args", "step"} <= set(checkpoint)
    except Exception as error:  # noqa: BLE001 - a missing, truncated or foreign file: one mistake
        kind = type(error).__name__
        raise SystemExit(f"{PROG}: {path} is not a checkpoint of {PROG} --save-model ({kind}).")
    return checkpoint


def restore(checkpoint, state, agent, optimizers, buffer, envs, eval_env) -> np.ndarray:
    """Continue a run from its checkpoint: the model and optimisers, the counters, the buffer's
    rows, the episodes in progress (replayed), every random state; returns the observations."""
    agent.load_state_dict(checkpoint["agent"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    state.update(checkpoint["state"])
    buffer.size = len(checkpoint["rows"])
    buffer.rows[: buffer.size] = checkpoint["rows"]
    buffer.ptr = checkpoint["ptr"]
    *episodes, eval_episode = checkpoint["episodes"]
    obs = np.stack([env.replay(episode) for env, episode in zip(envs.envs, episodes)])
    eval_env.get_wrapper_attr("replay")(eval_episode)
    python_rng, numpy_rng, torch_rng, action_rng = checkpoint["rng"]
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    torch.set_rng_state(torch_rng)
    envs.action_space.np_random.bit_generator.state = action_rng
    print(f"{PROG}: resumed {checkpoint['args']['run_dir']} at step {state['step']}")
    return obs


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


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-only: rebuild the agent of --checkpoint, run deterministic episodes on its env."""
    checkpoint = load_checkpoint(args.checkpoint)
    trained = Args(**checkpoint["args"])
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    env = make_env(trained.env_id, args.seed + 10_000, folder if args.capture_video else None)
    agent = Agent(env.observation_space.shape[0], env.action_space.shape[0], trained)
    agent.load_state_dict(checkpoint["agent"])
    deterministic = agent.actor
    returns, lengths = evaluate(deterministic, env, args.eval_episodes, torch.device("cpu"))
    result = f"return {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes"
    where = f"{args.checkpoint} (step {checkpoint['step']}) on {trained.env_id}"
    print(f"{PROG}: {where}: {result} (mean length {lengths.mean():.0f})")
    return {"returns": returns.tolist(), "lengths": lengths.tolist()}


def resolve_args(args: Args) -> tuple[Args, dict | None]:
    """User errors end here, one line each, before anything is written; then the defaults that
    depend on the task (beta, the run folder) are filled in, once. With --resume, its checkpoint
    is returned too, if it can continue this run: resumable, with the same settings but where it
    writes and how often it checkpoints."""
    positive = ["total_timesteps", "num_envs", "learning_starts", "batch_size", "hidden_dim"]
    positive += ["buffer_size", "log_freq", "eval_episodes", "bellman_log_freq", "loss_clip"]
    positive += ["policy_frequency", "target_network_frequency", "learning_rate", "policy_noise"]
    problems = [
        f"--{name.replace('_', '-')} must be > 0" for name in positive if getattr(args, name) <= 0
    ]
    if args.beta is not None and args.beta <= 0:
        problems.append("--beta must be > 0 (it divides the TD error in Eq. 9)")
    if not (0 < args.tau <= 1 and 0 <= args.gamma <= 1):
        problems.append("--tau must be in (0, 1] and --gamma in [0, 1]")
    if min(args.eval_freq, args.checkpoint_freq) < 0:
        problems.append("--eval-freq and --checkpoint-freq must be >= 0")
    for flag, package in [("track", "wandb"), ("capture_video", "moviepy")]:
        if getattr(args, flag) and not find_spec(package):
            problems.append(f"--{flag.replace('_', '-')} needs {package}: pip install {package}")
    if args.eval_only and not args.checkpoint:
        problems.append("--eval-only needs --checkpoint PATH (a checkpoint.pt of --save-model)")
    if args.save_buffer and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_buffer))):
        problems.append(f"--save-buffer {args.save_buffer}: its folder does not exist")
    if problems:
        raise SystemExit(f"{PROG}: {problems[0]}.")
    if args.eval_only:
        return args, None
    task = args.env_id.removeprefix("dm_control/").removesuffix("-v0")
    arm = "X-TD3" if args.double_q else "X-TD3 - DQ"
    beta = args.beta
    source = "--beta"
    if beta is None:
        beta = BETA[args.double_q].get(task, BETA_FALLBACK[args.double_q])
        source = (
            f"Table 6, {arm} column" if task in BETA[args.double_q] else "fallback outside Table 6"
        )
    noise = args.exploration_noise
    if noise is None:
        noise = 0.05 if "hopper" in args.env_id.lower() else 0.1  # Table 5
    critics = "twin critics" if args.double_q else "one critic"
    settings = f"critic loss {args.critic_loss}, {critics}, beta = {beta} ({source})"
    print(f"{PROG}: {args.env_id}, {settings}, exploration noise {noise}, {args.num_envs} env(s)")
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or f"{args.runs_dir}/{run_name}"
    args = dataclasses.replace(args, beta=beta, exploration_noise=noise, run_dir=run_dir)
    if not args.resume:
        return args, None
    args.run_dir = os.path.dirname(os.path.abspath(args.resume))
    checkpoint = load_checkpoint(args.resume)
    may_change = ("resume", "run_dir", "runs_dir", "checkpoint_freq", "save_model", "track")
    saved = checkpoint["args"]
    changed = [k for k, v in vars(args).items() if k not in may_change and saved.get(k) != v]
    if "rows" not in checkpoint:
        problem = "holds no training state (--save-model's); --checkpoint-freq N writes one"
    elif changed:
        flag = changed[0].replace("_", "-")
        problem = f"was trained with --{flag} {saved.get(changed[0])}: resume with its settings"
    else:
        return args, checkpoint
    raise SystemExit(f"{PROG}: --resume {args.resume} {problem}.")


if __name__ == "__main__":
    main(tyro.cli(Args))
