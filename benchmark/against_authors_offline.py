"""Run the authors' offline code (github.com/Div99/XQL, offline/, JAX) for one arm and seed.

Runs in a venv of its own (benchmark/against_authors.sh builds it: jax 0.4.30, flax 0.8.5, gym
0.23.1, gymnasium for the eval env) with their source on the path; nothing of theirs is copied into
this repository. Their own `train_offline.py` runs (`main` under absl flags, their loop, their
`evaluate`, their `EpisodeMonitor` and `SinglePrecision` wrappers, their per-seed `<seed>.txt` of
evaluations), after the runtime patches in PATCHES below, each with its reason. Around it, the
driver:

- seeds numpy (their `Dataset.sample` draws batches from numpy's global state, which
  train_offline.py never seeds) and passes the seed to their Learner as train_offline.py does;
- gives their `gym.make(env_name)` a gymnasium env (default Hopper-v4) behind the old gym API,
  seeded as our scripts seed their eval env (`reset(seed=seed + 10000)` once, then unseeded resets),
  so both sides evaluate on the same stream of start states;
- passes every setting that the comparison fixes as their own flags (--temp, --max_clip,
  --batch_size, --max_steps, --eval_interval, --eval_episodes) and config fields
  (--config.expectile, ...).

Writes --out: {"side": "authors", "arm", "seed", "evaluations": [[step, mean], ...],
"final_return", "settings", "patches", "wall_s"}.
"""

import argparse
import glob
import json
import os
import sys
import time
import types

# Every change made to their code at run time, with its reason (docs/against_authors.md lists them).
PATCHES = [
    (
        "jax.config module",
        (
            "train_offline.py:1 imports `from jax.config import config`; jax 0.4.30 has no such "
            "module: a stand-in module exposes `jax.config` under that name"
        ),
    ),
    (
        "jax.tree_multimap",
        (
            "learner.py:22 calls it; removed in jax 0.3.16: aliased to "
            "jax.tree_util.tree_map (same function)"
        ),
    ),
    (
        "flax_return_frozendict",
        (
            "common.py:94 unpacks `variables.pop('params')` as a FrozenDict's "
            "(rest, value); flax 0.8.5 returns plain dicts unless this flag is set"
        ),
    ),
    (
        "jax.jit static_argnames",
        (
            "policy.py:66 names a static argument 'distribution' that the function lacks; jax "
            "0.4.30 raises ValueError: the name is dropped while policy.py is imported"
        ),
    ),
    (
        "d4rl.qlearning_dataset",
        (
            "d4rl needs mujoco-py and the old gym MuJoCo envs: a stand-in reads the D4RL-format "
            "HDF5 file with h5py and does d4rl's conversion (obs[i+1] as next observation, rows "
            "ending in a timeout dropped, the last row dropped)"
        ),
    ),
    (
        "gym.make",
        (
            "their eval env is `gym.make(d4rl name)`: the stand-in returns gymnasium's env (e.g. "
            "Hopper-v4) behind the old 4-tuple API, actions rescaled from [-1, 1] to its bounds"
        ),
    ),
    (
        "wandb",
        (
            "train_offline.py:117 calls wandb.init unconditionally: a no-op stand-in module "
            "(logging only)"
        ),
    ),
    (
        "train_offline.Learner (IQL arm only)",
        (
            "train_offline.py:155 passes vanilla=False always; their IQL "
            "arm is the same Learner with vanilla=True (expectile loss for V, critic.py:94)"
        ),
    ),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="their offline/ folder")
    parser.add_argument("--arm", choices=("xql", "iql"), required=True)
    parser.add_argument("--dataset", required=True, help="a D4RL-format HDF5 file")
    parser.add_argument("--eval-env-id", default="Hopper-v4", help="gymnasium env to evaluate on")
    parser.add_argument(
        "--env-name",
        default="against-authors",
        help="their --env_name; it picks their "
        "reward preprocessing: names with hopper/walker2d/halfcheetah/antmaze get it",
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--eval-interval", type=int, required=True)
    parser.add_argument("--eval-episodes", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--temp", type=float, required=True, help="beta of the Gumbel loss")
    parser.add_argument("--max-clip", type=float, required=True)
    parser.add_argument("--expectile", type=float, required=True)
    parser.add_argument("--awr-temperature", type=float, required=True)
    parser.add_argument("--value-layernorm", type=int, choices=(0, 1), required=True)
    parser.add_argument("--work-dir", required=True, help="their --save_dir")
    parser.add_argument("--out", required=True, help="the result JSON to write")
    return parser.parse_args(argv)


def qlearning_dataset(env) -> dict:
    """d4rl.qlearning_dataset(env) on a D4RL-format HDF5 file (its terminate_on_end=False)."""
    import h5py
    import numpy as np

    with h5py.File(env.h5_path, "r") as f:
        data = {key: f[key][()] for key in ("observations", "actions", "rewards", "terminals")}
        timeouts = f["timeouts"][()] if "timeouts" in f else None
    n = len(data["rewards"])
    rewards, terminals = data["rewards"].reshape(n), data["terminals"].reshape(n).astype(bool)
    if timeouts is not None:
        keep = ~timeouts.reshape(n)[: n - 1].astype(bool)
    else:  # d4rl counts steps against the env's time limit
        keep, episode_step = np.zeros(n - 1, dtype=bool), 0
        for i in range(n - 1):
            keep[i] = episode_step != env.max_episode_steps - 1
            episode_step = 0 if not keep[i] else 1 if terminals[i] else episode_step + 1
    index = np.flatnonzero(keep)
    return {
        "observations": data["observations"][index],
        "actions": data["actions"][index],
        "next_observations": data["observations"][index + 1],
        "rewards": rewards[index],
        "terminals": terminals[index],
    }


def install_patches(args) -> None:
    """The runtime patches of PATCHES, in that order."""
    import flax
    import gym
    import gymnasium
    import jax
    import numpy as np

    jax_config = types.ModuleType("jax.config")
    jax_config.config = jax.config
    sys.modules["jax.config"] = jax_config
    jax.tree_multimap = jax.tree_util.tree_map
    flax.config.update("flax_return_frozendict", True)
    d4rl = types.ModuleType("d4rl")
    d4rl.qlearning_dataset = qlearning_dataset
    sys.modules["d4rl"] = d4rl

    class OldGymApi(gym.Env):
        """A gymnasium env behind gym 0.23's API; `seed(s)` seeds it as our make_env(s + 10000)."""

        def __init__(self, env_id: str, h5_path: str):
            self._env = gymnasium.make(env_id)
            self.h5_path = h5_path
            self.max_episode_steps = self._env.spec.max_episode_steps
            space = self._env.action_space
            self._low, self._high = space.low, space.high
            shape = self._env.observation_space.shape
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
            self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)

        def seed(self, seed=None):
            self._env.action_space.seed(seed + 10_000)
            self._env.reset(seed=seed + 10_000)
            return [seed]

        def reset(self, **kwargs):
            return self._env.reset()[0]

        def step(self, action):
            action = self._low + 0.5 * (np.asarray(action) + 1.0) * (self._high - self._low)
            obs, reward, terminated, truncated, info = self._env.step(action)
            return obs, float(reward), terminated or truncated, info

    gym.make = lambda env_name, **kwargs: OldGymApi(args.eval_env_id, args.dataset)
    wandb = types.ModuleType("wandb")
    wandb.init = lambda *a, **k: None
    wandb.finish = lambda *a, **k: None
    wandb.Settings = lambda *a, **k: None
    wandb.config = types.SimpleNamespace(update=lambda *a, **k: None)
    wandb.run = types.SimpleNamespace(summary={})
    sys.modules["wandb"] = wandb

    their_jit = jax.jit

    def lenient_jit(fun=None, **kwargs):
        names = kwargs.get("static_argnames", ())
        kwargs["static_argnames"] = tuple(name for name in names if name != "distribution")
        return their_jit(fun, **kwargs) if fun is not None else lambda f: their_jit(f, **kwargs)

    jax.jit = lenient_jit
    import policy  # noqa: F401  policy.py:66, imported (and jitted) under the lenient jit

    jax.jit = their_jit


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in ("src", "dataset", "work_dir", "out"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    sys.path.insert(0, args.src)
    os.chdir(args.src)  # their --config path and imports are relative to offline/
    install_patches(args)
    import learner
    import numpy as np
    import train_offline
    from absl import flags

    if args.arm == "iql":
        their_learner = learner.Learner
        train_offline.Learner = lambda *a, **kw: their_learner(*a, **{**kw, "vanilla": True})
    np.random.seed(args.seed)
    flag_values = {
        "env_name": args.env_name,
        "config": "configs/mujoco_config.py",
        "config.expectile": args.expectile,
        "config.temperature": args.awr_temperature,
        "config.layernorm": bool(args.value_layernorm),
        "seed": args.seed,
        "max_steps": args.max_steps,
        "eval_interval": args.eval_interval,
        "log_interval": args.eval_interval,
        "eval_episodes": args.eval_episodes,
        "batch_size": args.batch_size,
        "temp": args.temp,
        "max_clip": args.max_clip,
        "double": True,
        "save_dir": args.work_dir,
        "tqdm": False,
    }
    argv_flags = ["train_offline.py"] + [f"--{key}={value}" for key, value in flag_values.items()]
    sys.argv = argv_flags  # ml_collections defines the --config.<field> flags from sys.argv
    flags.FLAGS(argv_flags)
    start = time.time()
    try:
        train_offline.main(None)
    except SystemExit as stop:  # train_offline.py:198 ends with sys.exit(0)
        if stop.code not in (0, None):
            raise
    wall = time.time() - start
    (log,) = glob.glob(os.path.join(args.work_dir, "*", f"{args.seed}.txt"))
    evaluations = np.loadtxt(log, ndmin=2).tolist()
    result = {
        "side": "authors",
        "arm": args.arm,
        "seed": args.seed,
        "evaluations": [[int(step), value] for step, value in evaluations],
        "final_return": evaluations[-1][1] if evaluations else None,
        "settings": {key: str(value) for key, value in flag_values.items()},
        "their_config": {key: str(value) for key, value in dict(flags.FLAGS.config).items()},
        "patches": PATCHES[:-1] + (PATCHES[-1:] if args.arm == "iql" else []),
        "wall_s": wall,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
