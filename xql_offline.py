"""Offline X-QL: the soft value fitted by Gumbel regression on a dataset (D4RL, Minari or your own), and IQL beside it.

V(s) regresses min_i Q'_i(s, a) at dataset actions with the Gumbel loss (Eq. 11), whose minimiser is the soft value
beta log E_{a~data}[exp(Q / beta)] (Lemma 3.5): no action is sampled from the policy, none is out of distribution. Q
regresses r + gamma V(s') (Eq. 14); the policy is extracted by advantage-weighted regression (Eq. 12), in IQL's style
as the authors' code. `--value-loss expectile` is IQL (Table 1's baseline); `--online-steps` fine-tunes (Table 2).
Paper: Sec. 3.2-3.5, App. D.3-D.4, Tables 1-4. The line where X-QL departs from IQL is marked "X-QL:" in `update_value`.

Usage: python xql_offline.py --env-id hopper-medium-v2 [--tuned] [--value-loss expectile --exp-name iql]
       python xql_offline.py --dataset-path buffer.hdf5 --eval-env-id Pendulum-v1   # a dataset of your own
       python xql_offline.py --eval-only --checkpoint runs/<run>/checkpoint.pt

Deviations (from the paper, or from the authors' code github.com/Div99/XQL, offline/):
- From their configs (the paper is silent): AWR weights exp(temperature (Q - V)) capped at 100, temperature 3 / 10 / 0.5
  on locomotion / antmaze / kitchen (adroit: kitchen's), LayerNorm in V everywhere, a cosine actor-lr decay but on
  antmaze, kitchen actor dropout 0.1, 100 AntMaze eval episodes (the text: 1000). Their antmaze V dropout never ran (no
  `training` flag reaches it): off. Q's loss is Eq. 14's squared error (theirs: Huber, delta 20).
- Table 4's "Grad Clip" clips z in the Gumbel loss, from above only as their offline code (`--clip-mode both`: App. D.3).
  `--tuned-table authors`: their released scripts, which differ from Table 4 on 11 of 18 datasets and add `--noise` or
  `--sample-random-times`, V-fitting augmentations the paper does not mention.
- The IQL arm is IQL's own config: V without LayerNorm, the cosine on every domain, expectile 0.7 (antmaze 0.9).
- Final and best scores are both reported: their code logs every evaluation and a running best; the paper does not say
  which Table 1 shows. Fine-tuning follows their configs (no lr decay, one update per env step); their
  train_finetune.py does not run as released (missing ConfigArgs fields; gumbel_log_loss given an unknown `args`).
- Ours: online rewards get the dataset's scaling (theirs did not); data that is not D4RL's gets no reward transform
  unless `--reward-norm` asks, and raw returns without `--ref-min-score`/`--ref-max-score`; actions live in [-1, 1].
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
import warnings
from functools import partial
from typing import Literal, NamedTuple

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
    # ---- experiment ----
    exp_name: str = PROG  # the algorithm arm in benchmarks (`xql`, `iql`); part of the run folder's name
    seed: int = 1  # seed of python, numpy, torch and the environments
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available (the CPU otherwise)
    compile: bool = False  # torch.compile the update's two steps (losses, backward, optimiser steps) and the policy
    cudagraphs: bool = False  # CUDA only: compile with CUDA graphs (mode "reduce-overhead"); implies --compile
    matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32 on CUDA; medium: bf16 autocast
    track: bool = False  # log the run to Weights & Biases (needs `pip install wandb`)
    wandb_project_name: str = "xql"  # the wandb project
    wandb_entity: str | None = None  # the wandb entity (team)
    # ---- data / environment ----
    env_id: str | None = None  # a D4RL name or a Minari id (has a `/`); default: hopper-medium-v2, or the file's name
    dataset_path: str | None = None  # a D4RL-format HDF5 file: a D4RL dataset's, or your own (e.g. from --save-buffer)
    eval_env_id: str | None = None  # gymnasium env to evaluate on (default: the dataset's, see `load_dataset`)
    normalize_states: bool = False  # standardise observations with the dataset's mean and std (the eval env's too)
    reward_norm: Literal["auto", "none", "returns", "antmaze"] = "auto"  # auto: the authors' rule on D4RL data, else none
    ref_min_score: float | None = None  # a random policy's return, for normalised scores (default: D4RL's)
    ref_max_score: float | None = None  # an expert policy's return, for normalised scores (default: D4RL's)
    # ---- algorithm ----
    value_loss: Literal["gumbel", "expectile", "taylor"] = "gumbel"  # X-QL (Eq. 11), IQL, or MXQL's loss
    tuned: bool = False  # per-dataset values of --tuned-table (X-QL-T) instead of the per-domain ones
    tuned_table: Literal["paper", "authors"] = "paper"  # Table 4's X-QL-T values or the authors' released scripts
    beta: float | None = None  # Gumbel temperature of Eq. 11 (default: Table 4)
    loss_clip: float | None = None  # clip of z = (Q - V) / beta in the Gumbel loss (default: Table 4 "Grad Clip")
    clip_mode: Literal["both", "upper"] = "upper"  # z <= clip (authors' offline code) or z to [-clip, clip]
    taylor_order: int = 4  # --value-loss taylor: the even order N of sum_{n=2..N} z^n / n! (MXQL's default)
    expectile: float | None = None  # IQL's expectile (default: 0.7, antmaze 0.9)
    batch_size: int | None = None  # batch size (default: Table 4)
    num_v_updates: int | None = None  # V updates per Q update, on the same batch (default: Table 4 "v_updates")
    noise: bool = False  # fit V at the dataset actions plus clipped Gaussian noise (the authors' --noise)
    sample_random_times: int = 0  # also fit V at this many uniform random actions per state (the authors' flag)
    awr_temperature: float | None = None  # AWR weights exp(temperature (Q - V)) (default: 3, antmaze 10, kitchen 0.5)
    max_exp_advantage: float = 100.0  # cap on the AWR weight (the authors' code, IQL)
    actor_dropout: float | None = None  # dropout in the actor's hidden layers (default: 0.1 kitchen and adroit, else 0)
    value_dropout: float = 0.0  # dropout in V's hidden layers (the authors' antmaze 0.5 never took effect)
    cosine_actor_lr: bool = True  # decay the actor's lr by a cosine where the source config does; --no-...: never
    max_steps: int = 1_000_000  # offline gradient steps
    learning_rate: float = 3e-4  # Adam learning rate of actor, critics and V
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    hidden_dim: int = 256  # width of the two hidden layers of every network
    online_steps: int = 0  # then fine-tune for this many env steps, one update each (Table 2: 1M)
    # ---- logging / output ----
    runs_dir: str = "runs"  # parent folder of the run folders
    log_freq: int = 1000  # gradient steps between TensorBoard losses and console progress lines
    eval_freq: int = 5000  # gradient (fine-tuning: env) steps between evaluations; 0: only at the end of each phase
    eval_episodes: int | None = None  # episodes per evaluation (default: 10, antmaze 100)
    save_model: bool = False  # write runs/{run_name}/checkpoint.pt at each evaluation and at the end
    eval_only: bool = False  # evaluate --checkpoint and exit
    checkpoint: str | None = None  # a checkpoint written by --save-model, for --eval-only
    resume: str | None = None  # continue the run of this checkpoint (same --env-id) in a new run folder


# Per domain: beta, loss clip, batch size (Table 4, X-QL column); AWR temperature, expectile, actor dropout, cosine
# actor lr, eval episodes (the authors' offline/configs: IQL's, but for no lr decay on antmaze). Adroit: kitchen's.
DOMAIN_KEYS = ("beta", "loss_clip", "batch_size", "awr_temperature", "expectile", "actor_dropout", "cosine", "eval_episodes")
DOMAINS = {"locomotion": (2.0, 7.0, 256, 3.0, 0.7, 0.0, True, 10), "antmaze": (0.6, 7.0, 256, 10.0, 0.9, 0.0, False, 100),
           "kitchen": (5.0, 7.0, 256, 0.5, 0.7, 0.1, True, 10), "adroit": (5.0, 7.0, 256, 0.5, 0.7, 0.1, True, 10)}
# Per dataset: Table 4's X-QL-T (beta, clip, batch, v-updates); the authors' reproduce/*.sh (also --noise, random times).
TUNED = {
    "halfcheetah-medium-v2": ((1, 7, 256, 1), (1, 7, 1024, 1, True, 0)),
    "hopper-medium-v2": ((5, 7, 256, 1), (5, 7, 1024, 1, False, 0)),
    "walker2d-medium-v2": ((10, 7, 256, 1), (10, 7, 1024, 1, False, 0)),
    "halfcheetah-medium-replay-v2": ((1, 5, 256, 1), (1, 5, 256, 1, False, 0)),
    "hopper-medium-replay-v2": ((2, 7, 256, 1), (2, 7, 256, 1, False, 0)),
    "walker2d-medium-replay-v2": ((5, 7, 256, 1), (5, 5, 1024, 1, False, 0)),
    "halfcheetah-medium-expert-v2": ((1, 5, 1024, 1), (1, 5, 1024, 1, False, 0)),
    "hopper-medium-expert-v2": ((2, 7, 1024, 1), (2, 7, 1024, 1, False, 1)),
    "walker2d-medium-expert-v2": ((2, 5, 1024, 1), (2, 5, 256, 1, False, 0)),
    "antmaze-umaze-v0": ((1, 7, 256, 4), (2, 7, 256, 1, False, 0)),
    "antmaze-umaze-diverse-v0": ((2, 7, 1024, 1), (5, 7, 256, 1, False, 1)),
    "antmaze-medium-play-v0": ((0.8, 7, 1024, 2), (0.8, 5, 256, 1, False, 0)),
    "antmaze-medium-diverse-v0": ((0.6, 7, 256, 4), (0.6, 7, 256, 4, False, 0)),
    "antmaze-large-play-v0": ((0.8, 5, 1024, 1), (0.6, 5, 1024, 1, False, 0)),
    "antmaze-large-diverse-v0": ((0.6, 5, 1024, 1), (0.55, 5, 1024, 1, False, 0)),
    "kitchen-complete-v0": ((2, 7, 1024, 1), (2, 7, 1024, 1, False, 0)),
    "kitchen-partial-v0": ((5, 7, 1024, 1), (5, 7, 1024, 1, False, 0)),
    "kitchen-mixed-v0": ((8, 7, 1024, 1), (8, 7, 1024, 1, False, 0)),
}


def d4rl_datasets() -> dict[str, dict]:
    """D4RL name -> download URL (its file name: d4rl's), reference returns (d4rl/infos.py), max episode steps."""
    refs = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
    kinds = ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert")
    table = {f"{robot}-{kind}-{v}": (f"gym_mujoco_{v}/{robot}_{kind.replace('-', '_')}-{v}", ref, 1000)
             for robot, ref in refs.items() for v in ("v1", "v2") for kind in kinds}
    mazes = {"umaze": ("u", False, False), "umaze-diverse": ("u", True, True), "medium-play": ("big", True, False),
             "medium-diverse": ("big", True, True), "large-play": ("hardest", True, False),
             "large-diverse": ("hardest", True, True)}
    for kind, (maze, multistart, multigoal) in mazes.items():
        stem = f"Ant_maze_{maze}-maze_noisy_multistart_{multistart}_multigoal_{multigoal}_sparse"
        steps = 700 if "umaze" in kind else 1000
        table[f"antmaze-{kind}-v0"] = (f"ant_maze_new/{stem}", (0.0, 1.0), steps)
        table[f"antmaze-{kind}-v2"] = (f"ant_maze_v2/{stem}_fixed", (0.0, 1.0), steps)
    kitchens = {"complete": "mini_kitchen_microwave_kettle_light_slider", "partial": "kitchen_microwave_kettle_light_slider",
                "mixed": "kitchen_microwave_kettle_bottomburner_light"}
    table |= {f"kitchen-{kind}-v0": (f"kitchen/{stem}-v0", (0.0, 4.0), 280) for kind, stem in kitchens.items()}
    for task, ref in {"pen": (96.262799, 3076.8331017826877), "hammer": (-274.856578, 12794.134825156867),
                      "relocate": (-6.425911, 4233.877797728884), "door": (-56.512833, 2880.5693087298737)}.items():
        for kind, stem in (("human", "v0_demos_clipped"), ("cloned", "demos-v0-bc-combined"), ("expert", "v0_expert_clipped")):
            table[f"{task}-{kind}-v0"] = (f"hand_dapg/{task}-{stem}", ref, 100 if task == "pen" else 200)
            table[f"{task}-{kind}-v1"] = (f"hand_dapg_v1/{task}-{kind}-v1", ref, 100 if task == "pen" else 200)
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    return {name: dict(url=f"{base}/{path}.hdf5", ref=ref, max_episode_steps=steps)
            for name, (path, ref, steps) in table.items()}


D4RL = d4rl_datasets()
# D4RL locomotion came from gym's v2 envs, whose observation layout gymnasium's v4 keeps; antmaze, kitchen, adroit: none.
D4RL_EVAL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}


def resolve_args(args: Args) -> Args:
    """User errors end here, one line each, before anything is created; then the tables fill the unset fields, once."""
    file_name = os.path.basename(args.dataset_path).rsplit(".", 1)[0] if args.dataset_path else None
    env_id = args.env_id or file_name or "hopper-medium-v2"
    close = ", ".join(difflib.get_close_matches(env_id, D4RL, 3) or ["hopper-medium-v2"])
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))  # where d4rl keeps its downloads
    url = D4RL[env_id]["url"] if env_id in D4RL else None
    path = args.dataset_path or (os.path.join(folder, os.path.basename(url)) if url and not args.eval_only else None)
    rules = [
        (not (env_id in D4RL or "/" in env_id or args.dataset_path), f"unknown --env-id {env_id!r}: not a D4RL name "
         f"(e.g. {close}) nor a Minari id (which has a '/'); pass --dataset-path for a file of your own"),
        (path and not os.path.isfile(path), f"--dataset-path {path!r} does not exist" if args.dataset_path else
         f"{path} (the file of {env_id}) not found; download it with `wget -P {folder} {url}`, or pass --dataset-path"),
        (args.tuned and env_id not in TUNED, f"--tuned: no tuned values for {env_id!r}; the tables list {', '.join(TUNED)}"),
        (args.beta is not None and not args.beta > 0, "--beta must be > 0 (it divides Q - V in Eq. 11)"),
        (args.expectile is not None and not 0 < args.expectile < 1, "--expectile must be in (0, 1)"),
        (args.taylor_order < 2 or args.taylor_order % 2, "--taylor-order must be even and >= 2 (odd: unbounded below)"),
        (any(value is not None and value < 1 for value in (args.max_steps, args.log_freq, args.hidden_dim, args.batch_size,
                                                          args.num_v_updates, args.eval_episodes)),
         "--max-steps, --log-freq, --hidden-dim, --batch-size, --num-v-updates and --eval-episodes must be >= 1"),
        (min(args.online_steps, args.eval_freq, args.sample_random_times) < 0,
         "--online-steps, --eval-freq and --sample-random-times must be >= 0"),
        (not 0 <= (args.actor_dropout or 0) < 1 or not 0 <= args.value_dropout < 1, "dropout rates must be in [0, 1)"),
        (args.cudagraphs and not (args.cuda and torch.cuda.is_available()), "--cudagraphs needs a CUDA device"),
        (args.track and not importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
        (args.eval_only and not args.checkpoint, "--eval-only needs --checkpoint PATH (a checkpoint.pt of --save-model)"),
    ]
    for broken, message in rules:
        if broken:
            raise SystemExit(f"{PROG}: {message}.")
    if args.eval_only:
        return args
    task = env_id.lower().split("/")[1] if "/" in env_id else env_id.lower().split("-")[0]  # `pen`, not `invertedpendulum`
    domain = next((name for name in ("antmaze", "kitchen") if name in env_id.lower()), "locomotion")
    domain = "adroit" if task in ("pen", "hammer", "door", "relocate") else domain  # other datasets: locomotion's settings
    table = dict(zip(DOMAIN_KEYS, DOMAINS[domain]), num_v_updates=1)
    if args.tuned:
        paper, authors = TUNED[env_id]
        beta, clip, batch, v_updates, noise, random_times = (*paper, False, 0) if args.tuned_table == "paper" else authors
        table.update(beta=beta, loss_clip=clip, batch_size=batch, num_v_updates=v_updates)
        random_times = max(args.sample_random_times, random_times)
        args = dataclasses.replace(args, noise=args.noise or noise, sample_random_times=random_times)
    # The cosine: where the domain's config has it, on every domain for IQL, never when fine-tuning (their configs).
    cosine = (table.pop("cosine") or args.value_loss == "expectile") and args.cosine_actor_lr and not args.online_steps
    filled = {key: value if getattr(args, key) is None else getattr(args, key) for key, value in table.items()}
    return dataclasses.replace(args, **filled, env_id=env_id, dataset_path=path, cosine_actor_lr=cosine,
                               compile=args.compile or args.cudagraphs)


def read_hdf5(path: str) -> dict[str, np.ndarray]:
    """A D4RL-format HDF5 file, read with h5py and checked as `d4rl.OfflineEnv.get_dataset` does, and its attributes."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            data = {key: f[key][()] if key in f else None for key in keys} | {"attrs": dict(f.attrs)}
    except OSError as error:
        raise SystemExit(f"{PROG}: {path}: not a readable HDF5 file ({error}).")
    missing = [key for key in keys[:4] if data[key] is None]
    if missing:
        raise SystemExit(f"{PROG}: {path}: the file lacks {missing}; a D4RL file has {', '.join(keys[:4])}.")
    for key in [key for key in keys[1:] if data[key] is not None and len(data[key]) != len(data["observations"])]:
        raise SystemExit(f"{PROG}: {path}: {key} has {len(data[key])} rows but observations has {len(data['observations'])}.")
    return data | {key: data[key].reshape(len(data[key]), -1)[:, 0] for key in keys[2:] if data[key] is not None}


def qlearning_dataset(data: dict, max_episode_steps: int) -> dict[str, np.ndarray]:
    """Exactly `d4rl.qlearning_dataset(env)`, as the published numbers used: row i's next observation is row i+1; rows
    ending in a timeout are dropped (row i+1 starts another episode), and so is the last; without timeouts d4rl counts."""
    if data["timeouts"] is not None:
        keep = ~data["timeouts"][:-1].astype(bool)
    else:
        keep, episode_step = np.zeros(len(data["rewards"]) - 1, dtype=bool), 0
        for i in range(len(keep)):
            keep[i] = episode_step != max_episode_steps - 1
            episode_step = 0 if not keep[i] else 1 if data["terminals"][i] else episode_step + 1  # d4rl's count
    index = np.flatnonzero(keep)
    return dict(observations=data["observations"][index], actions=data["actions"][index], rewards=data["rewards"][index],
                next_observations=data["observations"][index + 1], terminals=data["terminals"][index].astype(bool))


def episode_returns(data: dict[str, np.ndarray]) -> np.ndarray:
    """Episode returns, cut as IQL's `split_into_trajectories`: at obs[i+1] != next_obs[i], at terminals, at the end."""
    obs, next_obs = data["observations"], data["next_observations"]
    ends = np.append((np.abs(obs[1:] - next_obs[:-1]).max(1) > 1e-6) | data["terminals"][:-1], True)
    return np.bincount(np.append(0, np.cumsum(ends[:-1])), weights=data["rewards"].astype(np.float64))


def flatten(space: gym.Space, observations) -> np.ndarray:
    """(T, ...) observations, or a dict of them, as (T, D) in gymnasium's FlattenObservation order (the eval env's)."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten(space[key], observations[key]) for key in space.spaces], axis=1)
    return np.asarray(observations, dtype=np.float32).reshape(len(observations), -1)


def load_minari(args: Args) -> tuple[dict, object, tuple]:
    """A Minari dataset from the local store -> all transitions (actions mapped into [-1, 1]), eval env, reference returns."""
    try:
        import minari
        dataset = minari.load_dataset(args.env_id)
    except ImportError:
        raise SystemExit(f"{PROG}: {args.env_id!r} is a Minari id, but minari is missing: pip install minari==0.5.4 pillow.")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{PROG}: Minari dataset {args.env_id!r} not found ({error}); run `minari download {args.env_id}`.")
    space = dataset.action_space
    if not isinstance(space, gym.spaces.Box):
        raise SystemExit(f"{PROG}: {args.env_id}: action space {space} is not continuous (Box); the AWR actor needs one.")
    columns = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for episode in dataset.iterate_episodes():
        obs = flatten(dataset.observation_space, episode.observations)
        for key, value in zip(columns, (obs[:-1], episode.actions, episode.rewards, obs[1:], episode.terminations)):
            columns[key].append(np.asarray(value, dtype=bool if key == "terminals" else np.float32).reshape(len(obs) - 1, -1))
    data = {key: np.concatenate(value) for key, value in columns.items()}
    data["rewards"], data["terminals"] = data["rewards"][:, 0], data["terminals"][:, 0]
    data["actions"] = 2 * (data["actions"] - space.low) / (space.high - space.low) - 1
    spec = args.eval_env_id or (dataset.recover_environment(eval_env=True).spec.to_json() if dataset.env_spec else None)
    return data, spec, (dataset.storage.metadata.get("ref_min_score"), dataset.storage.metadata.get("ref_max_score"))


def load_dataset(args: Args) -> dict:
    """The transitions of --env-id or --dataset-path, preprocessed; their eval env (or why none), returns and transforms."""
    info = D4RL.get(args.env_id)
    if "/" in args.env_id and not args.dataset_path:
        data, spec, ref = load_minari(args)
        why = None if spec else "the Minari dataset records no environment (pass --eval-env-id)"
    else:
        raw = read_hdf5(args.dataset_path)  # a D4RL name's: where d4rl keeps its downloads (`resolve_args`)
        data, robot = qlearning_dataset(raw, info["max_episode_steps"] if info else 0), args.env_id.split("-")[0]
        spec = args.eval_env_id or (D4RL_EVAL_ENVS.get(robot) if info else raw["attrs"].get("env_id"))
        ref, why = info["ref"] if info else (None, None), "pass --eval-env-id to evaluate"
        if info and not spec:
            why = f"D4RL's {robot} observations match no gymnasium env (use Minari's D4RL datasets, or --eval-env-id)"
    for key in [key for key, value in data.items() if not np.isfinite(value.astype(np.float64)).all()]:
        raise SystemExit(f"{PROG}: {args.env_id}: the dataset's {key} contain NaN or inf values.")
    returns = episode_returns(data)
    # The authors' (IQL's) preprocessing: halfcheetah/hopper/walker2d rewards x 1000 / (max - min return), antmaze - 1.
    norm, name = args.reward_norm, args.env_id.lower()
    if norm == "auto":
        locomotion = (info or "/" in name) and any(robot in name for robot in D4RL_EVAL_ENVS)
        norm = "antmaze" if (info or "/" in name) and "antmaze" in name else "returns" if locomotion else "none"
    data["reward_scale"] = 1000.0 / max(returns.max() - returns.min(), 1e-8) if norm == "returns" else 1.0
    data["reward_shift"] = -1.0 if norm == "antmaze" else 0.0  # online rewards get the same transform
    data["rewards"] = data["rewards"] * data["reward_scale"] + data["reward_shift"]
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)  # a finite log-likelihood for the AWR actor (IQL)
    mu, sd = (data["observations"].mean(0), data["observations"].std(0) + 1e-3) if args.normalize_states else (0.0, 1.0)
    for key in ("observations", "next_observations"):
        data[key] = (data[key] - mu) / sd
    ref = tuple(mine if mine is not None else theirs for mine, theirs in zip((args.ref_min_score, args.ref_max_score), ref))
    return data | dict(obs_mean=mu, obs_std=sd, env_spec=spec, ref=ref, returns=returns, no_eval_reason=None if spec else why)


def make_env(env_spec, seed: int, obs_mean: np.ndarray | float = 0.0, obs_std: np.ndarray | float = 1.0) -> gym.Env:
    """An env of an id or a Minari JSON spec: the dataset's observation statistics, actions in [-1, 1] (its dtype); seeded."""
    warnings.filterwarnings("ignore", ".*is out of date", DeprecationWarning)  # v4: the D4RL layout, on purpose
    env_spec = gym.envs.registration.EnvSpec.from_json(env_spec) if env_spec.startswith("{") else env_spec
    try:
        env = gym.make(env_spec)
    except gym.error.Error:  # AntMaze, FrankaKitchen and Adroit ids live in gymnasium-robotics
        import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
        env = gym.make(env_spec)
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    env = gym.wrappers.TransformObservation(env, lambda obs: ((obs - obs_mean) / obs_std).astype(np.float32), space)
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, *np.array([-1, 1], env.action_space.dtype)))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


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


class FP32Linear(nn.Linear):
    """A Linear layer run in fp32 under bf16 autocast (--matmul-precision medium): Q, V and actions keep fp32's precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layer_norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Two ReLU hidden layers, optionally LayerNorm before and dropout after each ReLU (the authors' MLP); orthogonal
    weights with gain sqrt(2), zero biases (IQL's `default_init`, which they use)."""
    layers = []
    for n_in in (in_dim, hidden_dim):
        layers += [nn.Linear(n_in, hidden_dim), *[nn.LayerNorm(hidden_dim, eps=1e-6)][:layer_norm], nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
    net = nn.Sequential(*layers, FP32Linear(hidden_dim, out_dim))  # the output layer in fp32 (--matmul-precision medium)
    for layer in [layer for layer in net if isinstance(layer, nn.Linear)]:
        nn.init.orthogonal_(layer.weight, math.sqrt(2))
        nn.init.zeros_(layer.bias)
    return net


class Actor(nn.Module):
    """IQL's policy: a Gaussian, its mean tanh(mu(s)) (the action of evaluations), a state-independent log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, action_dim, dropout=args.actor_dropout)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        """AWR's likelihood (Eq. 12); its samples clipped to [-1, 1] explore while fine-tuning (the authors', IQL's)."""
        return torch.distributions.Normal(self(obs), self.log_std.clamp(-5.0, 2.0).exp())


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
    """V(s); X-QL puts LayerNorm before each ReLU (App. D.4: the authors do on every domain), IQL does not."""

    def __init__(self, obs_dim: int, args: Args):
        super().__init__()
        self.net = mlp(obs_dim, args.hidden_dim, 1, layer_norm=args.value_loss != "expectile", dropout=args.value_dropout)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class Agent(nn.Module):
    """Every learned tensor in one module: its state_dict is the checkpoint and the NaN-stop snapshot."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor, self.value = Actor(obs_dim, action_dim, args), Value(obs_dim, args)
        self.critic = TwinCritic(obs_dim, action_dim, args.hidden_dim)
        self.critic_target = TwinCritic(obs_dim, action_dim, args.hidden_dim).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())


LOSS_TAGS = ("losses/v_loss", "values/v", "values/clip_fraction", "losses/q_loss", "losses/actor_loss", "values/q",
             "values/advantage")


def update_value(agent: Agent, optimizer: torch.optim.Optimizer, v_obs: torch.Tensor, v_target: torch.Tensor, args: Args):
    """One V step toward a fixed target (see `update`). Returns [v_loss, mean V, clip fraction], detached."""
    v = agent.value(v_obs)
    if args.value_loss == "gumbel":  # X-QL: the one change from IQL. Eq. 11 fits V = beta log E_data[e^{Q/beta}]
        v_loss = gumbel_loss(v, v_target, args.beta, args.loss_clip, args.clip_mode)
    elif args.value_loss == "taylor":  # MXQL: the same target, the Maclaurin-expanded loss
        v_loss = taylor_loss(v, v_target, args.beta, args.taylor_order)
    else:  # IQL: the expectile loss |tau - 1(Q < V)| (Q - V)^2, an upper expectile of Q
        v_loss = (torch.where(v_target > v, args.expectile, 1 - args.expectile) * (v_target - v).square()).mean()
    optimizer.zero_grad()
    v_loss.backward()
    optimizer.step()
    return torch.stack([v_loss, v.mean(), clip_fraction(v, v_target, args.beta, args.loss_clip, args.clip_mode)]).detach()


def update_actor_critic(agent: Agent, optimizers: dict, batch: Batch, q_data: torch.Tensor, args: Args) -> torch.Tensor:
    """The actor (Eq. 12) and Q (Eq. 14) from the updated V, then the target critics. Returns the rest of LOSS_TAGS."""
    with torch.no_grad():  # the updated V at s and s' in one pass, for the actor's advantage and Q's target
        v_now, v_next = agent.value(torch.cat([batch.obs, batch.next_obs])).chunk(2)
        advantage = q_data - v_now
        weights = torch.exp(advantage * args.awr_temperature).clamp(max=args.max_exp_advantage)  # Eq. 12, capped
        target_q = batch.rewards + args.gamma * (1.0 - batch.terminated) * v_next  # Eq. 14's target
    actor_loss = -(weights * agent.actor.dist(batch.obs).log_prob(batch.actions).sum(-1)).mean()  # Eq. 12: AWR
    q = agent.critic(batch.obs, batch.actions)
    q_loss = (q - target_q).pow(2).mean(dim=1).sum()  # Eq. 14, summed over the twin critics (IQL)
    optimizers["actor_critic"].zero_grad()
    (actor_loss + q_loss).backward()  # disjoint parameters, detached targets: one backward and one Adam serve both
    optimizers["actor_critic"].step()
    with torch.no_grad():  # Polyak averaging of the target critics, one op over all their tensors
        torch._foreach_lerp_(list(agent.critic_target.parameters()), list(agent.critic.parameters()), args.tau)
    return torch.stack([q_loss, actor_loss, q.mean(), advantage.mean()]).detach()


def update(agent: Agent, optimizers: dict, batch: Batch, args: Args, value_step=update_value,
           actor_critic_step=update_actor_critic) -> torch.Tensor:
    """One gradient step in IQL's order: V (Table 4 "v_updates" steps on one batch and target, as the authors' code), the
    actor, Q, the target critics; returns LOSS_TAGS' values. --compile compiles each step (Dynamo runs this loop eagerly)."""
    with torch.no_grad():  # V's target: min_i Q'_i(s, a) of the twin target critics at the dataset actions (Eq. 11, IQL)
        v_obs, v_actions, times = batch.obs, batch.actions, args.sample_random_times  # and the authors' augmentations:
        if args.noise:  # N(0, 0.1) clipped to +-0.5 on the dataset actions (offline/critic.py `update_v`)
            v_actions = (v_actions + (0.1 * torch.randn_like(v_actions)).clamp(-0.5, 0.5)).clamp(-1.0, 1.0)
        if times:  # and `times` uniform actions per state (their code fails with both on: a shape error)
            v_obs = torch.cat([batch.obs, batch.obs.repeat_interleave(times, 0)])
            v_actions = torch.cat([v_actions, 2 * torch.rand_like(v_actions.repeat(times, 1)) - 1])
        v_target = agent.critic_target(v_obs, v_actions).min(dim=0).values
        q_data = agent.critic_target(batch.obs, batch.actions).min(dim=0).values if args.noise else v_target[: len(batch.obs)]
    for _ in range(args.num_v_updates):
        v_values = value_step(agent, optimizers["value"], v_obs, v_target, args)
    return torch.cat([v_values, actor_critic_step(agent, optimizers, batch, q_data, args)])


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


def normalized_score(episode_return: float, ref: tuple) -> float | None:
    """D4RL's normalised score 100 (R - random) / (expert - random); None without reference returns."""
    return None if None in ref else 100.0 * (episode_return - ref[0]) / (ref[1] - ref[0])


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-only: rebuild the agent of --checkpoint and run deterministic episodes on its eval env."""
    checkpoint = load_checkpoint(args.checkpoint)
    trained, spec = Args(**checkpoint["args"]), args.eval_env_id or checkpoint["env_spec"]
    if spec is None:
        raise SystemExit(f"{PROG}: no eval env is known for {trained.env_id}; pass --eval-env-id.")
    env = make_env(spec, args.seed + 10_000, checkpoint["obs_mean"], checkpoint["obs_std"])
    agent = Agent(env.observation_space.shape[0], env.action_space.shape[0], trained).eval()
    agent.load_state_dict(checkpoint["agent"])
    returns, _ = evaluate(agent.actor, env, args.eval_episodes or trained.eval_episodes, torch.device("cpu"))
    score = normalized_score(returns.mean(), checkpoint["ref"])
    print(f"{PROG}: {args.checkpoint} (step {checkpoint['step']}) on {env.spec.id}: return {returns.mean():.2f} +- "
          f"{returns.std():.2f} over {len(returns)} episodes" + ("" if score is None else f", normalised score {score:.1f}"))
    return {"returns": returns.tolist(), "normalized_score": score}


def make_eval_env(args: Args, data: dict, resume: dict | None) -> gym.Env | None:
    """The eval env (None if the data has none), checked against the data (the last user errors); prints the settings."""
    n, obs_dim, action_dim = len(data["rewards"]), data["observations"].shape[1], data["actions"].shape[1]
    try:
        eval_env = data["env_spec"] and make_env(data["env_spec"], args.seed + 10_000, data["obs_mean"], data["obs_std"])
    except Exception as error:  # noqa: BLE001 - an unregistered id or a missing package: the user's to fix
        raise SystemExit(f"{PROG}: cannot make the eval env {data['env_spec']}: {error}; pass another --eval-env-id.")
    dims = (eval_env.observation_space.shape[0], eval_env.action_space.shape[0]) if eval_env else (obs_dim, action_dim)
    for broken, message in [
        (args.batch_size > n, f"--batch-size {args.batch_size} is larger than the dataset ({n} transitions)"),
        (dims != (obs_dim, action_dim), f"the dataset's observations/actions are {obs_dim}/{action_dim}-d but the eval "
         f"env {eval_env and eval_env.spec.id} has {dims[0]}/{dims[1]}-d; pass a matching --eval-env-id"),
        (args.online_steps and not eval_env, f"--online-steps needs an environment: {data['no_eval_reason']}"),
        (resume and resume["args"]["env_id"] != args.env_id, f"--resume {args.resume} was trained on another dataset"),
    ]:
        if broken:
            raise SystemExit(f"{PROG}: {message}.")
    keys = ("value_loss", "beta", "loss_clip", "batch_size", "num_v_updates", "awr_temperature", "expectile")
    settings = ", ".join(f"{key}={getattr(args, key)}" for key in keys + ("cosine_actor_lr",))
    print(f"{PROG}: {args.env_id}, {n} transitions, rewards x {data['reward_scale']:.4g} + {data['reward_shift']:g}, "
          f"eval env {eval_env and eval_env.spec.id}, {settings}")
    if eval_env is None or None in data["ref"]:  # said once
        print(f"{PROG}: evaluation skipped: {data['no_eval_reason']}" if eval_env is None else f"{PROG}: no reference returns")
    return eval_env


def main(args: Args) -> dict:
    """Train offline (then fine-tune with --online-steps), or with --eval-only evaluate a checkpoint; returns the results."""
    args = resolve_args(args)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files as they are printed
    if args.eval_only:
        return evaluate_checkpoint(args)
    resume = load_checkpoint(args.resume) if args.resume else None
    data = load_dataset(args)
    eval_env, ref = make_eval_env(args, data, resume), data["ref"]
    n, obs_dim, action_dim = len(data["rewards"]), data["observations"].shape[1], data["actions"].shape[1]

    # ---- set-up ----
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_flush_denormal(True)  # CPU math on denormal floats (tiny values near 0) is slow; flushed to 0 they cost nothing
    torch.set_float32_matmul_precision("highest" if args.matmul_precision == "medium" else args.matmul_precision)
    run_dir = os.path.join(args.runs_dir, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=dataclasses.asdict(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{key}|{value}|" for key, value in dataclasses.asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    buffer = ReplayBuffer(n + args.online_steps, obs_dim, action_dim, device)  # the dataset, then online data
    buffer.add(*(data[key] for key in ("observations", "actions", "rewards", "next_observations", "terminals")), np.zeros(n))
    agent = Agent(obs_dim, action_dim, args).to(device)
    # Adams for V and for actor + critics (a group each), every lr its own tensor: the actor's cosine decay to 0 over
    # --max-steps (optax.cosine_decay_schedule in the authors' code) changes it in place, recompiling no --compile graph.
    adam = lambda *nets: torch.optim.Adam([{"params": m.parameters(), "lr": torch.tensor(args.learning_rate)} for m in nets],
                                          capturable=args.cudagraphs, fused=True)  # noqa: E731
    optimizers = {"value": adam(agent.value), "actor_critic": adam(agent.actor, agent.critic)}
    cosine = lambda t: 0.5 + 0.5 * math.cos(math.pi * min(t / args.max_steps, 1)) if args.cosine_actor_lr else 1  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizers["actor_critic"], [cosine, lambda t: 1.0])  # actor, critics
    evaluations, online_evaluations, start = [], [], 0
    if resume:  # the random state and an episode in progress are not restored
        agent.load_state_dict(resume["agent"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(resume["optimizers"][name])
        schedule.load_state_dict(resume["schedule"])
        buffer.add(*resume["online_rows"])
        evaluations, online_evaluations, start = resume["evaluations"], resume["online_evaluations"], resume["step"]
        print(f"{PROG}: resumed {args.resume} at step {start}")
    compiled = partial(torch.compile, mode="reduce-overhead" if args.cudagraphs else None) if args.compile else lambda fn: fn
    update_fn = partial(update, value_step=compiled(update_value), actor_critic_step=compiled(update_actor_critic))
    update_fn = torch.autocast(device.type, torch.bfloat16, enabled=args.matmul_precision == "medium")(update_fn)
    policy = compiled(agent.actor)
    train_env = make_env(data["env_spec"], args.seed, data["obs_mean"], data["obs_std"]) if args.online_steps else None
    obs, total = train_env.reset()[0] if train_env else None, args.max_steps + args.online_steps
    saved = {key: data[key] for key in ("obs_mean", "obs_std", "env_spec", "ref")}  # what --eval-only needs of the data
    first_bad, last_finite = torch.zeros((), dtype=torch.long, device=device), snapshot(agent, args, start, {}, **saved)
    start_time, log_time, log_step, last_eval = time.time(), time.time(), start, "-"

    # ---- the loop: (when fine-tuning: act, store), update, log, evaluate ----
    for step in range(start + 1, total + 1):
        online_step = step - args.max_steps  # > 0 while fine-tuning (Table 2): one env step per update
        if online_step > 0:
            action = agent.actor.dist(torch.as_tensor(obs, device=device).unsqueeze(0)).sample()[0].clamp(-1, 1).cpu().numpy()
            next_obs, reward, terminated, truncated, info = train_env.step(action)
            reward = reward * data["reward_scale"] + data["reward_shift"]  # the dataset's transform
            buffer.add([obs], [action], [reward], [next_obs], [terminated], [truncated])
            obs = train_env.reset()[0] if terminated or truncated else next_obs
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], online_step)
        if args.cudagraphs:  # CUDA graphs reuse their output buffers: mark each step, clone what is kept
            torch.compiler.cudagraph_mark_step_begin()
        losses = update_fn(agent, optimizers, buffer.sample(args.batch_size), args).clone()
        schedule.step()
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(losses).all(), step, first_bad)  # no host sync

        phase_step, prefix = (step, "eval") if online_step <= 0 else (online_step, "finetune")  # fine-tuning: env steps
        evaluate_now = step in (args.max_steps, total) or (args.eval_freq and phase_step % args.eval_freq == 0)
        if step % args.log_freq == 0 or evaluate_now:
            if first_bad.item():  # the host sync of a log interval
                stop_on_nonfinite(run_dir, int(first_bad), last_finite)
            values = dict(zip(LOSS_TAGS, losses.tolist()))
            values["charts/actor_lr"] = float(optimizers["actor_critic"].param_groups[0]["lr"])
            last_finite = snapshot(agent, args, step, values, **saved)
            sps, log_time, log_step = (step - log_step) / (time.time() - log_time), time.time(), step
            log_progress(writer, values, step, total, sps, last_eval)
        if evaluate_now and eval_env is not None:
            agent.eval()  # no dropout in the deterministic policy
            returns, _ = evaluate(policy, eval_env, args.eval_episodes, device)
            agent.train()
            score = normalized_score(returns.mean(), ref)
            (evaluations if prefix == "eval" else online_evaluations).append((phase_step, float(returns.mean()), score))
            writer.add_scalar(f"{prefix}/episodic_return", returns.mean(), phase_step)
            if score is not None:
                writer.add_scalar(f"{prefix}/normalized_score", score, phase_step)
            last_eval = f"{returns.mean():.2f}" if score is None else f"{score:.1f} (normalised)"
            print(f"step {step}/{total} | {prefix} return {returns.mean():.2f} +- {returns.std():.2f}"
                  + ("" if score is None else f" | normalised score {score:.1f}"))
        if args.save_model and evaluate_now:
            online_rows = [x[n: buffer.size].cpu() for x in (buffer.obs, buffer.actions, buffer.rewards, buffer.next_obs,
                                                              buffer.terminated, buffer.truncated)]
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent=agent.state_dict(), args=dataclasses.asdict(args),
                            step=step, optimizers={name: opt.state_dict() for name, opt in optimizers.items()},
                            schedule=schedule.state_dict(), online_rows=online_rows, evaluations=evaluations,
                            online_evaluations=online_evaluations, **saved)

    # ---- final report ----
    writer.close()
    returns, scores = [r for _, r, _ in evaluations], [s for _, _, s in evaluations if s is not None]
    result = {"env_id": args.env_id, "exp_name": args.exp_name, "seed": args.seed, "run_dir": run_dir,
              "evaluations": evaluations, "online_evaluations": online_evaluations,
              "final_return": returns[-1] if returns else None, "best_return": max(returns, default=None),
              "final_normalized_score": scores[-1] if scores else None, "best_normalized_score": max(scores, default=None),
              "dataset_return": float(data["returns"].mean()),
              "dataset_normalized_score": normalized_score(data["returns"].mean(), ref),
              "evaluation_skipped": None if eval_env else data["no_eval_reason"]}
    if online_evaluations and scores:  # Table 2's "before -> after"
        result["finetune_before"], result["finetune_after"] = scores[-1], online_evaluations[-1][2]
        print(f"{PROG}: fine-tuning {args.env_id}: normalised score {scores[-1]:.1f} -> {online_evaluations[-1][2]:.1f}")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    summary = f"final return {returns[-1]:.2f}, best {max(returns):.2f}" if returns else "no evaluation"
    summary = f"final normalised score {scores[-1]:.1f}, best {max(scores):.1f}" if scores else summary
    print(f"{PROG}: done in {datetime.timedelta(seconds=round(time.time() - start_time))}, {summary}; run folder {run_dir}"
          + (f"; checkpoint {os.path.join(run_dir, 'checkpoint.pt')}" if args.save_model else ""))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
