"""Offline Extreme Q-Learning (X-QL) on D4RL and Minari datasets, and the IQL baseline from the same file.

X-QL fits the soft value V*(s) = beta log E_{a~data} exp(Q(s,a)/beta) with Gumbel regression (Eq. 11),
regresses Q onto r + gamma V(s') with a squared loss (Eq. 14), and extracts a policy with advantage-
weighted regression (Eq. 12). Paper: "Extreme Q-Learning: MaxEnt RL without Entropy", Sec. 3.2-3.5,
App. D.3-D.4, Tables 1, 3, 4; training style of IQL (Kostrikov et al., 2021), as the authors' code.

    python xql_offline.py --env-id hopper-medium-v2              # X-QL, Table 4 domain defaults
    python xql_offline.py --env-id hopper-medium-v2 --value-loss expectile --exp-name iql   # IQL arm
    python xql_offline.py --eval-only --checkpoint runs/<run>/checkpoint.pt                # evaluate
    python xql_offline.py --env-id D4RL/antmaze/umaze-v1 --online-steps 1000000   # + online fine-tuning

Deviations (from the paper's text, or from the authors' code `Div99/XQL/offline`, and why):
- AWR weights are exp(temperature * (Q - V)), capped at 100, as in the authors' and IQL's code: their
  `temperature` multiplies the advantage (it is 1/beta of Eq. 12), and it is a separate constant per
  domain (3 locomotion, 10 antmaze, 0.5 kitchen/adroit), not the Gumbel beta.
- The Gumbel loss clips z only from above (as the authors' `gumbel_rescale_loss`), not to [-clip, clip]
  as the App. D.3 snippet; Table 4's "Grad Clip" column is this loss clip (`--loss-clip`).
- Q loss is the squared error of Eq. 14 (as IQL); the authors' released code uses a Huber loss with
  delta 20, which equals half the squared error for TD errors below 20.
- Value dropout is off on antmaze: the authors' antmaze config sets 0.5, but their value network never
  applies dropout (no `training` flag reaches it), so their numbers were obtained without it.
- Adroit has no released configuration (the authors' adroit script is a copy of the kitchen one); we
  use the kitchen settings (temperature 0.5, dropout 0.1) with beta 5.
- Evaluation runs on gymnasium's Hopper/HalfCheetah/Walker2d-v4 (same observation layout as the gym
  v2 envs the D4RL data came from). D4RL antmaze/kitchen/adroit-v0 have no faithful gymnasium env
  (different observation layouts), so those runs train and say that evaluation is skipped.
- Final AND best normalised scores are reported (the authors report only the best, an overestimate).
- Minari datasets keep every transition (their episodes store the final observation); D4RL files are
  converted exactly as `d4rl.qlearning_dataset` does.
- Fine-tuning (`--online-steps`, Table 2): as the authors' `train_finetune.py` (one update per env step,
  policy-sampled exploration, buffer = dataset + online data, mask 1 on time-limit truncation), but the
  online reward gets the same preprocessing as the dataset (their code skipped the locomotion scaling
  online) and the actor lr is constant online (their fine-tuning config has no decay).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment (the algorithm arm: `xql`, `iql`); part of the run folder's name"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random, eval env)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available (the CPU otherwise)"""
    compile: bool = False
    """torch.compile the update step and the evaluation policy (CPU and CUDA)"""
    cudagraphs: bool = False
    """capture the compiled update in CUDA graphs (CUDA only; implies --compile)"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "xql"
    """W&B project name"""
    wandb_entity: Optional[str] = None
    """W&B entity (team)"""

    # --- environment / data ---
    env_id: str = "hopper-medium-v2"
    """dataset: a D4RL name (`hopper-medium-v2`, `antmaze-umaze-v0`, `kitchen-partial-v0`, `pen-human-v0`)
    or a Minari id (contains `/`, e.g. `mujoco/hopper/medium-v0`)"""
    dataset_path: Optional[str] = None
    """D4RL HDF5 file to read instead of `$D4RL_DATASET_DIR` / `~/.d4rl/datasets/<d4rl's file name>`"""
    eval_env_id: Optional[str] = None
    """gymnasium env to evaluate on (default: Hopper/HalfCheetah/Walker2d-v4 for D4RL locomotion, the
    recorded eval env for Minari)"""
    normalize_states: bool = False
    """standardise observations with the dataset's mean/std (applied to the eval env too)"""

    # --- algorithm ---
    value_loss: Literal["gumbel", "expectile"] = "gumbel"
    """`gumbel`: X-QL (Eq. 11); `expectile`: IQL's expectile regression (the Table 1 baseline)"""
    tuned: bool = False
    """use the per-dataset X-QL-T values of Table 4 (beta, loss clip, batch size, v-updates)"""
    beta: Optional[float] = None
    """Gumbel temperature beta of Eq. 11 (default: Table 4 per domain: 2 locomotion, 0.6 antmaze, 5 kitchen)"""
    loss_clip: Optional[float] = None
    """upper clip of z = (Q - V)/beta in the Gumbel loss (App. D.3; Table 4 "Grad Clip"; default 7)"""
    expectile: Optional[float] = None
    """expectile of the IQL arm (default: 0.7, antmaze 0.9, as IQL)"""
    batch_size: Optional[int] = None
    """batch size (default: 256, Table 4)"""
    num_v_updates: Optional[int] = None
    """value updates per Q update (Table 4 "v_updates"; default 1)"""
    awr_temperature: Optional[float] = None
    """AWR inverse temperature: weights exp(temperature * (Q - V)) (default: 3 locomotion, 10 antmaze,
    0.5 kitchen/adroit, the authors' configs)"""
    max_exp_advantage: float = 100.0
    """cap on the AWR weight exp(temperature * advantage) (authors' code, IQL)"""
    actor_dropout: Optional[float] = None
    """dropout in the actor's hidden layers (default: 0.1 kitchen/adroit, else 0)"""
    value_dropout: Optional[float] = None
    """dropout in the value network's hidden layers (default 0: the authors' antmaze config sets 0.5, but their
    value network never applies it, so the published numbers were obtained without it)"""
    cosine_actor_lr: Optional[bool] = None
    """cosine decay of the actor learning rate over --max-steps (default: on, off for antmaze)"""
    max_steps: int = 1_000_000
    """gradient steps"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor, critics and value"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    online_steps: int = 0
    """after the offline phase, fine-tune for this many environment steps (one gradient step each;
    issue 7, Table 2; the authors ran 1M); needs an environment (D4RL locomotion or a Minari eval env)"""

    # --- logging / output ---
    eval_freq: int = 5000
    """evaluate every this many gradient steps (0: only at the end)"""
    eval_episodes: Optional[int] = None
    """episodes per evaluation (default: 10, antmaze 100)"""
    log_freq: int = 1000
    """log losses and print the progress line every this many gradient steps"""
    runs_dir: str = "runs"
    """parent folder of the run folders"""
    save_model: bool = False
    """write `checkpoint.pt` (atomically) at each evaluation and at the end"""
    eval_only: bool = False
    """evaluate --checkpoint and exit (no training, no run folder)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    resume: Optional[str] = None
    """checkpoint of an unfinished run to continue (offline or online phase) with the same --env-id;
    writes a new run folder"""


# Per-domain defaults. beta, loss clip, batch, v-updates: Table 4 (X-QL column); AWR temperature,
# expectile, dropouts, lr schedule, eval episodes: the authors' configs (`offline/configs/*.py`) and
# reproduce scripts, which follow IQL.
DOMAIN_DEFAULTS = {
    "locomotion": dict(beta=2.0, loss_clip=7.0, batch_size=256, num_v_updates=1, awr_temperature=3.0,
                       expectile=0.7, actor_dropout=0.0, value_dropout=0.0, cosine_actor_lr=True,
                       eval_episodes=10),
    "antmaze": dict(beta=0.6, loss_clip=7.0, batch_size=256, num_v_updates=1, awr_temperature=10.0,
                    expectile=0.9, actor_dropout=0.0, value_dropout=0.0, cosine_actor_lr=False,
                    eval_episodes=100),
    "kitchen": dict(beta=5.0, loss_clip=7.0, batch_size=256, num_v_updates=1, awr_temperature=0.5,
                    expectile=0.7, actor_dropout=0.1, value_dropout=0.0, cosine_actor_lr=True,
                    eval_episodes=10),
    # No released adroit config: kitchen settings (see Deviations).
    "adroit": dict(beta=5.0, loss_clip=7.0, batch_size=256, num_v_updates=1, awr_temperature=0.5,
                   expectile=0.7, actor_dropout=0.1, value_dropout=0.0, cosine_actor_lr=True,
                   eval_episodes=10),
}

# Table 4, values in parentheses (X-QL-T): (beta, loss clip, batch size, v-updates).
TUNED_SETTINGS = {
    "halfcheetah-medium-v2": (1.0, 7.0, 256, 1),
    "hopper-medium-v2": (5.0, 7.0, 256, 1),
    "walker2d-medium-v2": (10.0, 7.0, 256, 1),
    "halfcheetah-medium-replay-v2": (1.0, 5.0, 256, 1),
    "hopper-medium-replay-v2": (2.0, 7.0, 256, 1),
    "walker2d-medium-replay-v2": (5.0, 7.0, 256, 1),
    "halfcheetah-medium-expert-v2": (1.0, 5.0, 1024, 1),
    "hopper-medium-expert-v2": (2.0, 7.0, 1024, 1),
    "walker2d-medium-expert-v2": (2.0, 5.0, 1024, 1),
    "antmaze-umaze-v0": (1.0, 7.0, 256, 4),
    "antmaze-umaze-diverse-v0": (2.0, 7.0, 1024, 1),
    "antmaze-medium-play-v0": (0.8, 7.0, 1024, 2),
    "antmaze-medium-diverse-v0": (0.6, 7.0, 256, 4),
    "antmaze-large-play-v0": (0.8, 5.0, 1024, 1),
    "antmaze-large-diverse-v0": (0.6, 5.0, 1024, 1),
    "kitchen-complete-v0": (2.0, 7.0, 1024, 1),
    "kitchen-partial-v0": (5.0, 7.0, 1024, 1),
    "kitchen-mixed-v0": (8.0, 7.0, 1024, 1),
}


def domain_of(env_id: str) -> str:
    """Which per-domain default block applies to a D4RL name or a Minari id."""
    name = env_id.lower()
    if "antmaze" in name:
        return "antmaze"
    if "kitchen" in name:
        return "kitchen"
    task = name.split("/")[1] if "/" in name else name.split("-")[0]  # `pen` must not match `invertedpendulum`
    if task in ("pen", "hammer", "door", "relocate"):
        return "adroit"
    return "locomotion"


def _d4rl_table() -> dict[str, dict]:
    """D4RL dataset name -> file name (the basename of d4rl's URL, which is what d4rl stores under
    ~/.d4rl/datasets), download URL, reference scores (d4rl/infos.py), domain, max episode steps."""
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    table = {}
    locomotion_ref = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                      "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}
    v0_files = {"random": "random", "medium": "medium", "expert": "expert", "medium-replay": "mixed",
                "medium-expert": "medium_expert"}
    for robot, (ref_min, ref_max) in locomotion_ref.items():
        for kind, v0_name in v0_files.items():
            v0_robot = "walker" if (robot == "walker2d" and kind == "medium-replay") else robot
            table[f"{robot}-{kind}-v0"] = (f"{base}/gym_mujoco/{v0_robot}_{v0_name}.hdf5", ref_min, ref_max)
        for kind in ["random", "medium", "expert", "medium-replay", "full-replay", "medium-expert"]:
            for version in ("v1", "v2"):
                stem = f"{robot}_{kind.replace('-', '_')}-{version}"
                table[f"{robot}-{kind}-{version}"] = (f"{base}/gym_mujoco_{version}/{stem}.hdf5", ref_min, ref_max)
    maze_files = {"umaze": "u-maze_noisy_multistart_False_multigoal_False",
                  "umaze-diverse": "u-maze_noisy_multistart_True_multigoal_True",
                  "medium-play": "big-maze_noisy_multistart_True_multigoal_False",
                  "medium-diverse": "big-maze_noisy_multistart_True_multigoal_True",
                  "large-play": "hardest-maze_noisy_multistart_True_multigoal_False",
                  "large-diverse": "hardest-maze_noisy_multistart_True_multigoal_True"}
    for kind, stem in maze_files.items():
        table[f"antmaze-{kind}-v0"] = (f"{base}/ant_maze_new/Ant_maze_{stem}_sparse.hdf5", 0.0, 1.0)
        table[f"antmaze-{kind}-v2"] = (f"{base}/ant_maze_v2/Ant_maze_{stem}_sparse_fixed.hdf5", 0.0, 1.0)
    kitchen_files = {"complete": "mini_kitchen_microwave_kettle_light_slider-v0",
                     "partial": "kitchen_microwave_kettle_light_slider-v0",
                     "mixed": "kitchen_microwave_kettle_bottomburner_light-v0"}
    for kind, stem in kitchen_files.items():
        table[f"kitchen-{kind}-v0"] = (f"{base}/kitchen/{stem}.hdf5", 0.0, 4.0)
    adroit_ref = {"pen": (96.262799, 3076.8331017826877), "hammer": (-274.856578, 12794.134825156867),
                  "relocate": (-6.425911, 4233.877797728884), "door": (-56.512833, 2880.5693087298737)}
    for task, (ref_min, ref_max) in adroit_ref.items():
        table[f"{task}-human-v0"] = (f"{base}/hand_dapg/{task}-v0_demos_clipped.hdf5", ref_min, ref_max)
        table[f"{task}-cloned-v0"] = (f"{base}/hand_dapg/{task}-demos-v0-bc-combined.hdf5", ref_min, ref_max)
        table[f"{task}-expert-v0"] = (f"{base}/hand_dapg/{task}-v0_expert_clipped.hdf5", ref_min, ref_max)
        for kind in ("human", "cloned", "expert"):
            table[f"{task}-{kind}-v1"] = (f"{base}/hand_dapg_v1/{task}-{kind}-v1.hdf5", ref_min, ref_max)
    out = {}
    for name, (url, ref_min, ref_max) in table.items():
        robot, domain = name.split("-")[0], domain_of(name)
        max_steps = {"antmaze": 1000, "kitchen": 280, "pen": 100}.get(robot, 200 if domain == "adroit" else 1000)
        if name.startswith("antmaze-umaze"):
            max_steps = 700
        out[name] = dict(url=url, file=url.rsplit("/", 1)[1], ref_min=ref_min, ref_max=ref_max,
                         max_episode_steps=max_steps)
    return out


D4RL_DATASETS = _d4rl_table()

# D4RL locomotion -> gymnasium eval env with the same observation layout (the v2 envs the data came from).
D4RL_EVAL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
D4RL_NO_EVAL_REASON = {
    "antmaze": "D4RL antmaze observations (29-d, goal-less ant) differ from gymnasium-robotics AntMaze "
               "(dict with goals); use the Minari D4RL/antmaze datasets to evaluate",
    "kitchen": "D4RL kitchen-v0 observations (60-d) differ from gymnasium-robotics FrankaKitchen-v1; "
               "use the Minari D4RL/kitchen datasets to evaluate",
    "adroit": "D4RL adroit-v0/v1 reference scores were measured on the mujoco-py envs; pass "
              "--eval-env-id AdroitHand<Task>-v1 to evaluate on gymnasium-robotics anyway",
    "ant": "D4RL ant observations (111-d) differ from gymnasium Ant-v4 (27-d by default)",
}


def fail(message: str) -> SystemExit:
    """A user error: one line, non-zero exit."""
    return SystemExit(f"xql_offline: {message}")


def resolve_settings(args: Args) -> dict:
    """Per-domain defaults (Table 4 / authors' configs), then --tuned (Table 4 X-QL-T), then the user's flags."""
    domain = domain_of(args.env_id)
    settings = dict(DOMAIN_DEFAULTS[domain])
    if args.tuned:
        if args.env_id not in TUNED_SETTINGS:
            raise fail(f"--tuned: Table 4 has no tuned values for {args.env_id!r}; it lists "
                       f"{', '.join(TUNED_SETTINGS)}")
        beta, clip, batch, v_updates = TUNED_SETTINGS[args.env_id]
        settings.update(beta=beta, loss_clip=clip, batch_size=batch, num_v_updates=v_updates)
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings["domain"] = domain
    return settings


def validate(args: Args, settings: dict) -> None:
    if settings["beta"] <= 0:
        raise fail(f"--beta must be > 0 (got {settings['beta']}); Table 4 uses 0.6 to 10")
    if settings["loss_clip"] <= 0:
        raise fail(f"--loss-clip must be > 0 (got {settings['loss_clip']})")
    if not 0 < settings["expectile"] < 1:
        raise fail(f"--expectile must be in (0, 1) (got {settings['expectile']})")
    if settings["batch_size"] < 1 or settings["num_v_updates"] < 1 or args.max_steps < 1:
        raise fail("--batch-size, --num-v-updates and --max-steps must be >= 1")
    for key in ("actor_dropout", "value_dropout"):
        if not 0 <= settings[key] < 1:
            raise fail(f"--{key.replace('_', '-')} must be in [0, 1) (got {settings[key]})")
    if settings["eval_episodes"] < 1 or args.eval_freq < 0 or args.log_freq < 1:
        raise fail("--eval-episodes and --log-freq must be >= 1, --eval-freq >= 0")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise fail("--cudagraphs needs a CUDA device (none available here); use --compile on the CPU")


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def d4rl_file(args: Args) -> str:
    """The D4RL HDF5 file for --env-id: --dataset-path, else where d4rl itself would have stored it."""
    if args.dataset_path is not None:
        if not os.path.isfile(args.dataset_path):
            raise fail(f"--dataset-path {args.dataset_path!r} does not exist")
        return args.dataset_path
    info = D4RL_DATASETS[args.env_id]
    searched = []
    if os.environ.get("D4RL_DATASET_DIR"):
        searched.append(os.environ["D4RL_DATASET_DIR"])
    searched.append(os.path.expanduser("~/.d4rl/datasets"))
    for folder in searched:
        path = os.path.join(folder, info["file"])
        if os.path.isfile(path):
            return path
    raise fail(f"dataset file {info['file']!r} for {args.env_id} not found in {' or '.join(searched)}; "
               f"download it with `wget -P ~/.d4rl/datasets {info['url']}` or pass --dataset-path")


def read_d4rl_hdf5(path: str) -> dict[str, np.ndarray]:
    """Read a D4RL HDF5 file with h5py and check it as `d4rl.OfflineEnv.get_dataset` does."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise fail(f"{path}: HDF5 file lacks key(s) {missing} (has {sorted(f.keys())}); "
                           "a D4RL file needs observations, actions, rewards, terminals")
            data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k in f}
    except OSError as error:
        raise fail(f"{path}: not a readable HDF5 file ({error})")
    n = len(data["observations"])
    for key in ("rewards", "terminals", "timeouts"):
        if key in data and data[key].ndim == 2 and data[key].shape[1] == 1:
            data[key] = data[key][:, 0]
    for key, value in data.items():
        if len(value) != n:
            raise fail(f"{path}: {key} has {len(value)} rows but observations has {n}")
    if data["observations"].ndim != 2 or data["actions"].ndim != 2:
        raise fail(f"{path}: observations and actions must be 2-d arrays (got shapes "
                   f"{data['observations'].shape}, {data['actions'].shape})")
    if n < 2:
        raise fail(f"{path}: needs at least 2 rows (has {n})")
    return data


def qlearning_dataset(data: dict[str, np.ndarray], max_episode_steps: int) -> dict[str, np.ndarray]:
    """Exactly `d4rl.qlearning_dataset(env, terminate_on_end=False)`: the next observation is row i+1,
    rows flagged as timeouts are dropped (their row i+1 starts a new episode), the last row is dropped.

    The files' own `next_observations` key is not used: the published X-QL and IQL numbers were trained on
    this conversion, and the v0 antmaze/kitchen/adroit files have no such key."""
    n = len(data["rewards"])
    if "timeouts" in data:
        keep = ~data["timeouts"][: n - 1].astype(bool)
    else:  # old files: d4rl counts steps and treats step `max_episode_steps - 1` as the timeout
        keep = np.zeros(n - 1, dtype=bool)
        episode_step = 0
        for i in range(n - 1):
            final_timestep = episode_step == max_episode_steps - 1
            if final_timestep:
                episode_step = 0
                continue
            if bool(data["terminals"][i]):
                episode_step = 0
            keep[i] = True
            episode_step += 1
    index = np.nonzero(keep)[0]
    return dict(observations=data["observations"][index].astype(np.float32),
                actions=data["actions"][index].astype(np.float32),
                next_observations=data["observations"][index + 1].astype(np.float32),
                rewards=data["rewards"][index].astype(np.float32),
                terminals=data["terminals"][index].astype(bool))


def episode_returns_d4rl(dataset: dict[str, np.ndarray]) -> np.ndarray:
    """Returns of the trajectories as IQL's `split_into_trajectories` cuts them: a trajectory ends where
    the next row does not continue it (obs[i+1] != next_obs[i]) or on a terminal, and at the last row."""
    obs, next_obs = dataset["observations"], dataset["next_observations"]
    ends = np.zeros(len(obs), dtype=bool)
    ends[:-1] = (np.linalg.norm(obs[1:] - next_obs[:-1], axis=1) > 1e-6) | dataset["terminals"][:-1]
    ends[-1] = True
    episode_id = np.concatenate([[0], np.cumsum(ends[:-1])])
    return np.bincount(episode_id, weights=dataset["rewards"].astype(np.float64))


def flatten_observations(space: gym.Space, observations) -> np.ndarray:
    """(T, ...) observations (or a dict of them) -> (T, D), in the order `gym.spaces.flatten` uses,
    so that the eval env's FlattenObservation wrapper produces the same layout."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(space[k], observations[k]) for k in space.spaces], axis=1)
    observations = np.asarray(observations)
    return observations.reshape(len(observations), -1).astype(np.float32)


def load_minari(args: Args):
    """A Minari dataset from the local store -> transitions, episode returns, eval env factory, ref scores."""
    try:
        import minari
    except ImportError:
        raise fail(f"{args.env_id!r} looks like a Minari id but minari is not installed; "
                   "pip install 'minari==0.5.4' pillow")
    try:
        dataset = minari.load_dataset(args.env_id)
    except (FileNotFoundError, ValueError) as error:
        root = os.environ.get("MINARI_DATASETS_PATH", os.path.expanduser("~/.minari/datasets"))
        raise fail(f"Minari dataset {args.env_id!r} not found in {root} ({error}); download it with "
                   f"`minari download {args.env_id}` or check MINARI_DATASETS_PATH")
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise fail(f"{args.env_id}: action space {dataset.action_space} is not continuous (Box); "
                   "X-QL's AWR actor needs continuous actions")
    columns = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    returns = []
    for episode in dataset.iterate_episodes():
        obs = flatten_observations(dataset.observation_space, episode.observations)
        steps = len(episode.rewards)
        columns["observations"].append(obs[:steps])
        columns["next_observations"].append(obs[1: steps + 1])
        columns["actions"].append(np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1))
        columns["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        columns["terminals"].append(np.asarray(episode.terminations, dtype=bool))
        returns.append(float(np.sum(episode.rewards)))
    data = {k: np.concatenate(v) for k, v in columns.items()}
    metadata = dataset.storage.metadata
    ref = (metadata.get("ref_min_score"), metadata.get("ref_max_score"))

    def make_eval_env():
        if args.eval_env_id is not None:
            return gym_make(args.eval_env_id)
        return dataset.recover_environment(eval_env=True)

    if args.eval_env_id is None and dataset.env_spec is None and getattr(dataset, "_eval_env_spec", None) is None:
        make_eval_env = None  # the dataset records no environment: train, skip evaluation
    return data, np.asarray(returns), make_eval_env, ref


def load_dataset(args: Args, settings: dict):
    """--env-id -> (transitions dict, eval-env factory or None, reason if None, (ref_min, ref_max))."""
    domain = settings["domain"]
    if "/" in args.env_id:
        data, returns, make_eval_env, ref = load_minari(args)
        no_eval_reason = None if make_eval_env else "the Minari dataset records no environment (pass --eval-env-id)"
    elif args.env_id in D4RL_DATASETS:
        info = D4RL_DATASETS[args.env_id]
        data = qlearning_dataset(read_d4rl_hdf5(d4rl_file(args)), info["max_episode_steps"])
        returns = episode_returns_d4rl(data)
        ref = (info["ref_min"], info["ref_max"])
        robot = args.env_id.split("-")[0]
        eval_id = args.eval_env_id or D4RL_EVAL_ENVS.get(robot)
        make_eval_env = (lambda: gym_make(eval_id)) if eval_id else None
        no_eval_reason = None if eval_id else D4RL_NO_EVAL_REASON.get(robot, D4RL_NO_EVAL_REASON.get(domain))
    else:
        close = [k for k in D4RL_DATASETS if k.split("-")[0] == args.env_id.split("-")[0]][:6]
        raise fail(f"unknown --env-id {args.env_id!r}: not a D4RL dataset name (e.g. "
                   f"{', '.join(close or ['hopper-medium-v2', 'antmaze-umaze-v0', 'kitchen-partial-v0'])}) "
                   "and not a Minari id (which contains '/', e.g. mujoco/hopper/medium-v0)")
    for key, value in data.items():
        if value.dtype != bool and not np.all(np.isfinite(value)):
            raise fail(f"{args.env_id}: dataset {key} contain NaN or inf values")
    # Preprocessing as IQL / the authors (train_offline.py): actions clipped to +-(1 - 1e-5) so that
    # their log-likelihood stays finite; antmaze reward - 1; halfcheetah/hopper/walker2d rewards scaled
    # by 1000 / (max - min trajectory return) (the authors scale only these three); others unchanged.
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    reward_scale, reward_shift = 1.0, 0.0
    if domain == "antmaze":
        reward_shift = -1.0
    elif any(robot in args.env_id.lower() for robot in ("halfcheetah", "hopper", "walker2d")):
        spread = float(returns.max() - returns.min())
        reward_scale = 1000.0 / spread if spread > 0 else 1.0
    data["rewards"] = data["rewards"] * reward_scale + reward_shift  # same transform for online data
    data["masks"] = 1.0 - data.pop("terminals").astype(np.float32)
    return data, make_eval_env, no_eval_reason, ref, (reward_scale, reward_shift)


def gym_make(env_id: str) -> gym.Env:
    """gym.make, registering gymnasium-robotics (AntMaze, FrankaKitchen, Adroit) when the id needs it."""
    try:
        return gym.make(env_id)
    except gym.error.Error:
        try:
            import gymnasium_robotics
        except ImportError:
            raise
        gym.register_envs(gymnasium_robotics)
        return gym.make(env_id)


def make_eval_env(factory, seed: int):
    """The eval env, with dict observations flattened like the dataset's."""
    env = factory()
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    env.action_space.seed(seed)
    return env


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------
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


def expectile_loss(pred: torch.Tensor, target: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric squared loss |tau - 1(target < pred)| (target - pred)^2 (the baseline arm)."""
    diff = target - pred
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff.square()).mean()


# ----------------------------------------------------------------------------------------------------
# Networks (orthogonal init with gain sqrt(2) and zero biases, as IQL's `default_init`)
# ----------------------------------------------------------------------------------------------------
def orthogonal_linear(in_dim: int, out_dim: int, gain: float = math.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class TwinCritic(nn.Module):
    """Both Q networks of the double-Q trick as one batched network: weights stacked on a leading
    dim of 2 and applied with one `baddbmm` per layer (issue 6), output (2, batch)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_critics: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim, hidden_dim, hidden_dim, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for in_dim, out_dim in zip(dims[:-1], dims[1:]):
            weight = torch.empty(num_critics, in_dim, out_dim)
            for w in weight:
                nn.init.orthogonal_(w, math.sqrt(2))
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_critics, 1, out_dim)))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], -1)
        x = x.unsqueeze(0).expand(self.weights[0].shape[0], *x.shape)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


class ValueNetwork(nn.Module):
    """V(s): LayerNorm before each hidden activation (App. D.4, authors' `layernorm=True`), optional dropout."""

    def __init__(self, obs_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = orthogonal_linear(obs_dim, hidden_dim), orthogonal_linear(hidden_dim, hidden_dim)
        self.ln1, self.ln2 = nn.LayerNorm(hidden_dim, eps=1e-6), nn.LayerNorm(hidden_dim, eps=1e-6)  # flax eps
        self.out = orthogonal_linear(hidden_dim, 1)
        self.dropout = dropout

    def forward(self, obs: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = F.dropout(F.relu(self.ln1(self.fc1(obs))), self.dropout, train)
        x = F.dropout(F.relu(self.ln2(self.fc2(x))), self.dropout, train)
        return self.out(x).squeeze(-1)


class Actor(nn.Module):
    """Gaussian policy with mean tanh(mu(s)) and a state-independent log std clipped to [-5, 2]
    (IQL's NormalTanhPolicy with tanh_squash_distribution=False); dropout in the hidden layers."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = orthogonal_linear(obs_dim, hidden_dim), orthogonal_linear(hidden_dim, hidden_dim)
        self.mean = orthogonal_linear(hidden_dim, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.dropout = dropout

    def forward(self, obs: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = F.dropout(F.relu(self.fc1(obs)), self.dropout, train)
        x = F.dropout(F.relu(self.fc2(x)), self.dropout, train)
        return torch.tanh(self.mean(x))

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """A sample of the Gaussian (temperature 1), clipped to [-1, 1]: online exploration (authors)."""
        mean = self(obs)
        return (mean + self.log_std.clamp(-5.0, 2.0).exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean = self(obs, train=True)
        log_std = self.log_std.clamp(-5.0, 2.0)
        return (-0.5 * ((actions - mean) / log_std.exp()).square() - log_std
                - 0.5 * math.log(2 * math.pi)).sum(-1)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch supports it on the device, else foreach. The lr is a
    tensor so that the cosine schedule changes it in place (no recompilation under --compile)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), foreach=True, capturable=True)


class Agent(nn.Module):
    """All networks of one run (one state_dict for the checkpoint)."""

    def __init__(self, obs_dim: int, act_dim: int, settings: dict, hidden_dim: int):
        super().__init__()
        self.actor = Actor(obs_dim, act_dim, hidden_dim, settings["actor_dropout"])
        self.critic = TwinCritic(obs_dim, act_dim, hidden_dim)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = ValueNetwork(obs_dim, hidden_dim, settings["value_dropout"])


def make_update_fn(agent: Agent, optimizers: dict, settings: dict, args: Args, compile_mode: Optional[str] = None):
    """One gradient step of X-QL (or IQL) on a batch; returns detached statistics, never syncs the host.

    Order as the authors' `_update_jit` (and IQL): V (Eq. 11, toward the min of the twin TARGET Q at
    dataset actions), then the actor (Eq. 12, advantage from the target Q and the updated V), then Q
    (Eq. 14, toward r + gamma * mask * V_updated(s')), then the Polyak step of the target critic.
    Actor and Q losses share one backward pass (their parameters are disjoint, their targets detached).
    With `compile_mode` the three loss functions are torch.compile'd (forward and backward graphs);
    backward calls and the fused optimiser steps stay outside, where Dynamo would break the graph."""
    beta, clip, expectile = settings["beta"], settings["loss_clip"], settings["expectile"]
    awr_temperature, num_v_updates = settings["awr_temperature"], settings["num_v_updates"]
    use_gumbel = args.value_loss == "gumbel"
    critic_params = list(agent.critic.parameters())
    target_params = list(agent.target_critic.parameters())

    def target_q_fn(obs, actions):
        with torch.no_grad():
            return agent.target_critic(obs, actions).min(0).values  # double-Q: min of the twin targets

    def value_loss_fn(obs, target_q):
        v = agent.value(obs, train=True)
        if use_gumbel:
            v_loss = gumbel_loss(v, target_q, beta, clip)  # Eq. 11, stable form of App. D.3
        else:
            v_loss = expectile_loss(v, target_q, expectile)  # IQL baseline
        return v_loss, v.detach().mean()

    def actor_critic_loss_fn(obs, actions, rewards, masks, next_obs, target_q):
        with torch.no_grad():  # updated V at s and s' in one pass; reused by actor and Q targets
            v_both = agent.value(torch.cat([obs, next_obs]))
            v_obs, v_next = v_both[: obs.shape[0]], v_both[obs.shape[0]:]
            advantage = target_q - v_obs
            # Eq. 12: AWR weights; the temperature multiplies the advantage (authors/IQL), capped at 100.
            weights = torch.exp(advantage * awr_temperature).clamp(max=args.max_exp_advantage)
            q_target = rewards + args.gamma * masks * v_next  # Eq. 14 target
        actor_loss = -(weights * agent.actor.log_prob(obs, actions)).mean()  # Eq. 12
        q = agent.critic(obs, actions)
        q_loss = (q - q_target).square().mean(1).sum()  # Eq. 14, summed over the twins (IQL)
        return actor_loss + q_loss, actor_loss.detach(), q_loss.detach(), q.detach().mean(), advantage.mean()

    if compile_mode is not None:
        mode = None if compile_mode == "default" else compile_mode
        target_q_fn = torch.compile(target_q_fn, mode=mode)
        value_loss_fn = torch.compile(value_loss_fn, mode=mode)
        actor_critic_loss_fn = torch.compile(actor_critic_loss_fn, mode=mode)

    def update(obs, actions, rewards, masks, next_obs):
        target_q = target_q_fn(obs, actions)
        for _ in range(num_v_updates):  # Table 4 "v_updates", on the same batch (as the authors)
            v_loss, v_mean = value_loss_fn(obs, target_q)
            optimizers["value"].zero_grad(set_to_none=True)
            v_loss.backward()
            optimizers["value"].step()
        total, actor_loss, q_loss, q_mean, advantage = actor_critic_loss_fn(obs, actions, rewards, masks,
                                                                             next_obs, target_q)
        optimizers["actor"].zero_grad(set_to_none=True)
        optimizers["critic"].zero_grad(set_to_none=True)
        total.backward()
        optimizers["actor"].step()
        optimizers["critic"].step()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, args.tau)  # Polyak, one fused call
        return torch.stack([v_loss.detach(), q_loss, actor_loss, v_mean, q_mean, advantage])

    return update


STAT_NAMES = ["losses/v_loss", "losses/q_loss", "losses/actor_loss", "values/v", "values/q", "values/advantage"]


class DeviceDataset:
    """All transitions in one (capacity, D) tensor on the device; a batch is one gather at indices drawn
    with torch.randint on the device (no host round trip). With `extra_capacity` it is also the replay
    buffer of the online phase: the dataset first, online transitions appended (never overwritten)."""

    def __init__(self, data: dict[str, np.ndarray], device: torch.device, extra_capacity: int = 0):
        self.obs_dim, self.act_dim = data["observations"].shape[1], data["actions"].shape[1]
        packed = np.concatenate([data["observations"], data["actions"], data["rewards"][:, None],
                                 data["masks"][:, None], data["next_observations"]], axis=1)
        self.storage = torch.zeros(len(packed) + extra_capacity, packed.shape[1], device=device)
        self.storage[: len(packed)] = torch.as_tensor(packed, dtype=torch.float32)
        self.size = self.dataset_size = len(packed)
        self.splits = [self.obs_dim, self.act_dim, 1, 1, self.obs_dim]

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, mask: float, next_obs: np.ndarray) -> None:
        row = np.concatenate([obs, action, [reward, mask], next_obs]).astype(np.float32)
        self.storage[self.size] = torch.as_tensor(row).to(self.storage.device, non_blocking=True)
        self.size += 1

    def sample(self, batch_size: int):
        index = torch.randint(self.size, (batch_size,), device=self.storage.device)
        obs, actions, rewards, masks, next_obs = self.storage[index].split(self.splits, dim=1)
        return obs, actions, rewards.squeeze(1), masks.squeeze(1), next_obs


def evaluate(actor_fn, env, episodes: int, seed: int, obs_mean: np.ndarray, obs_std: np.ndarray,
             device: torch.device) -> np.ndarray:
    """Undiscounted returns of the deterministic policy: the mean tanh(mu(s)), clipped to [-1, 1] (IQL)."""
    returns = []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        done, total = False, 0.0
        while not done:
            state = torch.as_tensor((np.asarray(obs, dtype=np.float32) - obs_mean) / obs_std, device=device)
            with torch.no_grad():
                action = actor_fn(state.unsqueeze(0))[0].clamp(-1.0, 1.0).cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        obs, _ = env.reset()
    return np.asarray(returns)


def normalized_score(episode_return: float, ref) -> Optional[float]:
    """D4RL's normalised score 100 (R - min) / (max - min); None without reference scores."""
    if ref[0] is None or ref[1] is None:
        return None
    return 100.0 * (episode_return - ref[0]) / (ref[1] - ref[0])


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, then os.replace: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run_eval_only(args: Args) -> dict:
    """--eval-only --checkpoint PATH: rebuild the actor from the checkpoint and evaluate it."""
    if args.checkpoint is None or not os.path.isfile(args.checkpoint):
        raise fail(f"--eval-only needs --checkpoint PATH of an existing file (got {args.checkpoint!r})")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        saved, settings = ckpt["args"], ckpt["settings"]
    except Exception as error:  # noqa: BLE001 (not a checkpoint: one line for the user)
        raise fail(f"--checkpoint {args.checkpoint}: not a checkpoint of this script ({error})")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    eval_id = args.eval_env_id or ckpt.get("eval_env_id")
    if args.eval_env_id is None and "/" in saved["env_id"]:  # the Minari dataset's recorded eval env
        _, _, factory, _ = load_minari(Args(**saved))
    elif eval_id is None:
        raise fail(f"no eval env is known for {saved['env_id']}; pass --eval-env-id")
    else:
        factory = lambda: gym_make(eval_id)  # noqa: E731
    if factory is None:
        raise fail(f"no eval env is known for {saved['env_id']}; pass --eval-env-id")
    env = make_eval_env(factory, args.seed)
    actor = Actor(ckpt["obs_dim"], ckpt["act_dim"], saved["hidden_dim"], settings["actor_dropout"]).to(device)
    actor.load_state_dict({k[len("actor."):]: v for k, v in ckpt["agent"].items() if k.startswith("actor.")})
    episodes = args.eval_episodes or settings["eval_episodes"]
    returns = evaluate(actor, env, episodes, args.seed, ckpt["obs_mean"], ckpt["obs_std"], device)
    score = normalized_score(float(returns.mean()), ckpt["ref_scores"])
    print(f"xql_offline: {args.checkpoint} (step {ckpt['step']}) on {eval_id or 'the dataset eval env'}: "
          f"return {returns.mean():.1f} +- {returns.std():.1f} over {episodes} episodes"
          + (f", normalised score {score:.1f}" if score is not None else ""), flush=True)
    return dict(returns=returns.tolist(), normalized_score=score)


def main(args: Args) -> dict:
    if args.eval_only:
        return run_eval_only(args)
    settings = resolve_settings(args)
    validate(args, settings)
    if args.online_steps < 0:
        raise fail(f"--online-steps must be >= 0 (got {args.online_steps})")
    resume = None
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            raise fail(f"--resume {args.resume!r} does not exist")
        try:
            resume = torch.load(args.resume, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 (not a checkpoint: one line for the user)
            raise fail(f"--resume {args.resume}: not a checkpoint of this script ({error})")
        if resume["args"]["env_id"] != args.env_id:
            raise fail(f"--resume {args.resume} was trained on {resume['args']['env_id']}, not {args.env_id}")

    # Everything that can be wrong with the user's input is checked before the run folder exists.
    data, eval_env_factory, no_eval_reason, ref_scores, reward_transform = load_dataset(args, settings)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    if settings["batch_size"] > len(data["rewards"]):
        raise fail(f"--batch-size {settings['batch_size']} is larger than the dataset "
                   f"({len(data['rewards'])} transitions)")
    eval_env = None
    if eval_env_factory is not None:
        try:
            eval_env = make_eval_env(eval_env_factory, args.seed)
        except Exception as error:  # noqa: BLE001 (unregistered env, missing package: one line for the user)
            raise fail(f"cannot build the eval env for {args.env_id}: {error}; pass --eval-env-id")
        if not isinstance(eval_env.action_space, gym.spaces.Box):
            raise fail(f"eval env action space {eval_env.action_space} is not continuous (Box)")
        env_obs_dim = int(np.prod(eval_env.observation_space.shape))
        if env_obs_dim != obs_dim or eval_env.action_space.shape != (act_dim,):
            raise fail(f"dataset observations/actions are {obs_dim}/{act_dim}-d but the eval env "
                       f"{eval_env.spec.id if eval_env.spec else ''} has {env_obs_dim}/"
                       f"{eval_env.action_space.shape[0]}-d; pass a matching --eval-env-id")
    if args.online_steps > 0 and eval_env is None:
        raise fail(f"--online-steps needs an environment to interact with and {args.env_id} has none "
                   f"({no_eval_reason})")
    if resume is not None and (resume["obs_dim"], resume["act_dim"]) != (obs_dim, act_dim):
        raise fail(f"--resume {args.resume} has {resume['obs_dim']}/{resume['act_dim']}-d observations/actions, "
                   f"the dataset {obs_dim}/{act_dim}-d")

    if args.normalize_states:
        obs_mean = data["observations"].mean(0)
        obs_std = data["observations"].std(0) + 1e-3
        data["observations"] = (data["observations"] - obs_mean) / obs_std
        data["next_observations"] = (data["next_observations"] - obs_mean) / obs_std
    else:
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    obs_mean, obs_std = obs_mean.astype(np.float32), obs_std.astype(np.float32)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    resolved = {**settings, "value_loss": args.value_loss, "dataset_transitions": len(data["rewards"]),
                "obs_dim": obs_dim, "act_dim": act_dim, "ref_scores": list(ref_scores),
                "reward_scale": reward_transform[0], "reward_shift": reward_transform[1],
                "eval_env": (eval_env.spec.id if eval_env is not None and eval_env.spec else None)}
    print(f"xql_offline: {args.env_id} ({settings['domain']}), resolved settings: "
          + ", ".join(f"{k}={v}" for k, v in resolved.items()), flush=True)
    if eval_env is None:
        print(f"xql_offline: evaluation skipped for {args.env_id}: {no_eval_reason}", flush=True)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config={**vars(args), **resolved}, name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n"
                    + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    writer.add_text("resolved_settings", "|setting|value|\n|-|-|\n"
                    + "\n".join(f"|{k}|{v}|" for k, v in resolved.items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    dataset = DeviceDataset(data, device, extra_capacity=args.online_steps)
    agent = Agent(obs_dim, act_dim, settings, args.hidden_dim).to(device)
    optimizers = {
        "actor": make_optimizer(agent.actor.parameters(), args.learning_rate, device),
        "critic": make_optimizer(agent.critic.parameters(), args.learning_rate, device),
        "value": make_optimizer(agent.value.parameters(), args.learning_rate, device),
    }
    eval_history = []  # offline: (gradient step, mean return, normalised score)
    online_history = []  # online: (env step, mean return, normalised score)
    start_step, start_online_step = 0, 0
    if resume is not None:
        agent.load_state_dict(resume["agent"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(resume["optimizers"][name])
        rows = resume.get("online_rows")
        if rows is not None and len(rows):
            dataset.storage[dataset.size: dataset.size + len(rows)] = rows.to(device)
            dataset.size += len(rows)
        start_step, start_online_step = resume["step"], resume.get("online_step", 0)
        eval_history, online_history = list(resume["eval_history"]), list(resume.get("online_history", []))
        print(f"xql_offline: resumed {args.resume} at gradient step {start_step}, online step {start_online_step}",
              flush=True)
    compile_mode = "reduce-overhead" if args.cudagraphs else ("default" if args.compile else None)
    update = make_update_fn(agent, optimizers, settings, args, compile_mode)
    policy = torch.compile(agent.actor) if compile_mode else agent.actor

    def actor_lr(step: int) -> float:
        """Cosine decay of the actor's lr to 0 over max_steps (optax.cosine_decay_schedule, authors/IQL)."""
        if not settings["cosine_actor_lr"]:
            return args.learning_rate
        return args.learning_rate * 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))

    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    def checkpoint(step: int, online_step: int = 0) -> dict:
        return dict(agent=agent.state_dict(), optimizers={k: o.state_dict() for k, o in optimizers.items()},
                    args=asdict(args), settings=settings, step=step, online_step=online_step,
                    obs_dim=obs_dim, act_dim=act_dim, obs_mean=obs_mean, obs_std=obs_std, ref_scores=ref_scores,
                    eval_history=eval_history, online_history=online_history,
                    online_rows=dataset.storage[dataset.dataset_size: dataset.size].cpu(),
                    eval_env_id=(eval_env.spec.id if eval_env is not None and eval_env.spec else None))

    last_finite = torch.zeros(len(STAT_NAMES), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    step_counter = torch.full((), start_step + start_online_step, dtype=torch.long, device=device)
    start_time = time.time()
    timing = dict(time=time.time(), step=start_step + start_online_step)

    def train_step() -> torch.Tensor:
        """One update; remembers the last finite statistics and the first non-finite step, on the device."""
        nonlocal last_finite, first_bad_step
        stats = update(*dataset.sample(settings["batch_size"]))
        finite = torch.isfinite(stats).all()
        step_counter.add_(1)
        last_finite = torch.where(finite, stats, last_finite)
        first_bad_step = torch.where((first_bad_step < 0) & ~finite, step_counter, first_bad_step)
        return stats

    def log_and_check(stats: torch.Tensor, gradient_step: int, label: str, last_eval: str) -> None:
        """At log intervals only: the host sync, the NaN/inf stop, scalars and the progress line."""
        bad_step = int(first_bad_step)
        if bad_step >= 0:
            writer.flush()
            if args.save_model:
                save_atomic(checkpoint(gradient_step), os.path.join(run_dir, "checkpoint_nonfinite.pt"))
            last = ", ".join(f"{n.split('/')[1]}={v:.4g}" for n, v in zip(STAT_NAMES, last_finite.tolist()))
            raise SystemExit(f"xql_offline: a loss became NaN/inf at gradient step {bad_step}; last finite "
                             f"values: {last}. Try a larger --beta or a smaller --loss-clip / --learning-rate. "
                             f"Run folder: {run_dir}")
        values = stats.tolist()
        now = time.time()
        sps = (gradient_step - timing["step"]) / max(now - timing["time"], 1e-9)
        timing.update(time=now, step=gradient_step)
        for name, value in zip(STAT_NAMES, values):
            writer.add_scalar(name, value, gradient_step)
        writer.add_scalar("charts/SPS", sps, gradient_step)
        print(f"{label} | SPS {sps:.0f} | v_loss {values[0]:.4f} | q_loss {values[1]:.4f} "
              f"| actor_loss {values[2]:.4f} | V {values[3]:.2f} | last eval {last_eval}", flush=True)

    def run_evaluation(step: int, history: list, prefix: str) -> None:
        returns = evaluate(policy, eval_env, settings["eval_episodes"], args.seed, obs_mean, obs_std, device)
        mean_return = float(returns.mean())
        score = normalized_score(mean_return, ref_scores)
        history.append((step, mean_return, score))
        writer.add_scalar(f"{prefix}/episodic_return", mean_return, step)
        if score is not None:
            writer.add_scalar(f"{prefix}/normalized_score", score, step)
            if prefix == "charts":
                writer.add_scalar("eval/best_normalized_score", max(s for _, _, s in history), step)
        print(f"xql_offline: {'online ' if prefix == 'online' else ''}eval at step {step}: return {mean_return:.1f}"
              + (f", normalised score {score:.1f}" if score is not None else ""), flush=True)

    def last_eval_text(history: list) -> str:
        return f"{history[-1][2]:.1f}" if history and history[-1][2] is not None else "-"

    # ---- offline phase ----
    eval_steps = set(range(args.eval_freq, args.max_steps + 1, args.eval_freq)) if args.eval_freq else set()
    eval_steps.add(args.max_steps)
    for step in range(start_step + 1, args.max_steps + 1):
        if settings["cosine_actor_lr"]:
            optimizers["actor"].param_groups[0]["lr"].fill_(actor_lr(step - 1))
        stats = train_step()
        if step % args.log_freq == 0 or step in eval_steps:
            log_and_check(stats, step, f"step {step}/{args.max_steps}", last_eval_text(eval_history))
            writer.add_scalar("charts/actor_lr", actor_lr(step - 1), step)
        if step in eval_steps:
            if eval_env is not None:
                run_evaluation(step, eval_history, "charts")
            if args.save_model:
                save_atomic(checkpoint(step), checkpoint_path)
    offline_seconds = time.time() - start_time

    # ---- online fine-tuning (issue 7) ----
    if args.online_steps > start_online_step:
        # The authors' fine-tuning config (antmaze_finetune_config.py) has no lr decay: the online phase
        # uses the constant --learning-rate (a continued cosine schedule would sit at 0).
        optimizers["actor"].param_groups[0]["lr"].fill_(args.learning_rate)
        train_env = make_eval_env(eval_env_factory, args.seed + 1)
        obs, _ = train_env.reset(seed=args.seed + 1)
        episode_return, (reward_scale, reward_shift) = 0.0, reward_transform
        online_eval_steps = set(range(args.eval_freq, args.online_steps + 1, args.eval_freq)) if args.eval_freq else set()
        online_eval_steps.add(args.online_steps)
        for online_step in range(start_online_step + 1, args.online_steps + 1):
            state = (np.asarray(obs, dtype=np.float32) - obs_mean) / obs_std
            with torch.no_grad():
                action = agent.actor.explore(torch.as_tensor(state, device=device).unsqueeze(0))[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = train_env.step(action)
            episode_return += float(reward)
            # Same preprocessing as the dataset (antmaze r - 1, locomotion scale, action clip, state
            # normalisation); a time-limit truncation keeps mask 1 (the authors' TimeLimit.truncated rule).
            dataset.add(state, np.clip(action, -1 + 1e-5, 1 - 1e-5), float(reward) * reward_scale + reward_shift,
                        0.0 if terminated else 1.0, (np.asarray(obs, dtype=np.float32) - obs_mean) / obs_std)
            if terminated or truncated:
                writer.add_scalar("online/train_episodic_return", episode_return, online_step)
                obs, _ = train_env.reset()
                episode_return = 0.0
            stats = train_step()
            gradient_step = args.max_steps + online_step
            if online_step % args.log_freq == 0 or online_step in online_eval_steps:
                log_and_check(stats, gradient_step, f"online step {online_step}/{args.online_steps}",
                              last_eval_text(online_history))
            if online_step in online_eval_steps:
                run_evaluation(online_step, online_history, "online")
                if args.save_model:
                    save_atomic(checkpoint(args.max_steps, online_step), checkpoint_path)
        train_env.close()

    writer.add_scalar("charts/SPS_overall", (args.max_steps - start_step) / max(offline_seconds, 1e-9), args.max_steps)
    scores = [s for _, _, s in eval_history if s is not None]
    result = dict(env_id=args.env_id, exp_name=args.exp_name, seed=args.seed, run_dir=run_dir,
                  evaluations=eval_history,
                  final_normalized_score=scores[-1] if scores else None,
                  best_normalized_score=max(scores) if scores else None,
                  final_return=eval_history[-1][1] if eval_history else None,
                  evaluation_skipped=no_eval_reason if eval_env is None else None)
    if scores:
        writer.add_scalar("eval/final_normalized_score", result["final_normalized_score"], args.max_steps)
    if args.online_steps > 0:
        online_scores = [s for _, _, s in online_history if s is not None]
        before, after = result["final_normalized_score"], online_scores[-1] if online_scores else None
        result.update(online_evaluations=online_history, finetune_before=before, finetune_after=after)
        if before is not None and after is not None:
            line = f"{args.env_id}: {before:.1f} -> {after:.1f} (final offline -> final online normalised score)"
            writer.add_text("finetune", line)
            writer.add_scalar("online/score_before", before, args.online_steps)
            writer.add_scalar("online/score_after", after, args.online_steps)
            print(f"xql_offline: fine-tuning (Table 2 form) {line}", flush=True)
    write_json_atomic(result, os.path.join(run_dir, "results.json"))
    writer.close()
    if eval_env is not None:
        eval_env.close()
    summary = (f"final normalised score {result['final_normalized_score']:.1f}, best {result['best_normalized_score']:.1f}"
               if scores else ("final return " + f"{result['final_return']:.1f}" if eval_history else "no evaluation"))
    print(f"xql_offline: done ({summary}); run folder {run_dir}"
          + (f", checkpoint {checkpoint_path}" if args.save_model else ""), flush=True)
    if args.track:
        import wandb

        wandb.finish()
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
