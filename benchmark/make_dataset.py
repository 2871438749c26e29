"""Make an offline dataset, as D4RL made its own: roll out a policy trained by xsac_continuous.py or xtd3_continuous.py.

    python benchmark/make_dataset.py --checkpoint runs/<run>/checkpoint.pt --steps 100000 --out data/hopper-medium.hdf5

The checkpoint is one written by an online script's `--save-model`; the script (X-SAC or X-TD3) is recognised from
it. Actions come from `--policy sample` (the actor's own exploration: X-SAC's Gaussian sample, X-TD3's action noise;
D4RL's "medium" and "expert" sets were sampled from their SAC policy) or `--policy mean` (deterministic), plus
optional Gaussian noise `--noise STD`; all clipped to [-1, 1], the agent's action space (the env rescales them).
Episodes end at the env's own time limit. The file has D4RL's keys (what `xql_offline.py --dataset-path` reads) and
records in its attributes which checkpoint, training step, policy and noise made it, and the data's mean return.

A replay dataset (D4RL's "replay") is the training run's own buffer: `xsac_continuous.py --save-buffer PATH`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROG = "make_dataset"


def load_script(stem: str):
    """Import one of the repository's scripts (importing runs nothing: their loop sits in main)."""
    if stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(stem, ROOT / f"{stem}.py")
        sys.modules[stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[stem])
    return sys.modules[stem]


def make_dataset(
    checkpoint_path: str,
    steps: int,
    out: str,
    policy: str = "sample",
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Roll out the checkpoint's policy for `steps` env steps and write them to `out`; returns the file's attributes."""
    import torch

    try:
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        stem = "xtd3_continuous" if "critic_loss" in saved["args"] else "xsac_continuous"
    except Exception as error:  # noqa: BLE001 - a missing or foreign file: one line for the user
        raise SystemExit(
            f"{PROG}: {checkpoint_path} is not a checkpoint of xsac/xtd3_continuous.py --save-model ({type(error).__name__})."
        )
    script = load_script(stem)
    checkpoint = script.load_checkpoint(checkpoint_path)
    args = script.Args(**checkpoint["args"])
    env = script.make_env(args.env_id, seed)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = script.Agent(obs_dim, action_dim, args)
    agent.load_state_dict(checkpoint["agent"])
    if stem == "xsac_continuous":
        act = (
            (lambda o: agent.actor.sample(o)[0]) if policy == "sample" else agent.actor.mean_action
        )
    else:
        act = agent.actor.explore if policy == "sample" else agent.actor
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    buffer = script.ReplayBuffer(steps, obs_dim, action_dim, torch.device("cpu"))
    obs, _ = env.reset(seed=seed)
    returns = []
    with torch.no_grad():
        for _ in range(steps):
            action = act(torch.as_tensor(obs).unsqueeze(0))[0].numpy()
            action = np.clip(action + noise * rng.standard_normal(action_dim), -1.0, 1.0).astype(
                np.float32
            )
            next_obs, reward, terminated, truncated, info = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [terminated], [truncated])
            obs = next_obs
            if terminated or truncated:
                returns.append(float(info["episode"]["r"]))
                obs, _ = env.reset()
    env.close()
    attrs = {
        "env_id": args.env_id,
        "script": stem,
        "checkpoint": os.path.abspath(checkpoint_path),
        "checkpoint_step": int(checkpoint["step"]),
        "trained_seed": int(args.seed),
        "exp_name": args.exp_name,
        "policy": f"{policy} of the checkpoint's actor"
        + (f" + N(0, {noise}) noise" if noise else "")
        + ", clipped to [-1, 1]",
        "env_steps": steps,
        "rollout_seed": seed,
        "episodes": len(returns),
        "mean_episode_return": float(np.mean(returns)) if returns else float("nan"),
    }
    buffer.save_hdf5(out, **attrs)
    return attrs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.pt of xsac_continuous.py or xtd3_continuous.py --save-model",
    )
    parser.add_argument("--steps", type=int, required=True, help="env steps to record")
    parser.add_argument("--out", required=True, help="the HDF5 file to write (D4RL's layout)")
    parser.add_argument(
        "--policy",
        choices=("sample", "mean"),
        default="sample",
        help="the actor's exploration or its mean",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="std of extra Gaussian action noise (default: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the env and the noise")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.noise < 0:
        raise SystemExit(f"{PROG}: --steps must be >= 1 and --noise >= 0.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise SystemExit(f"{PROG}: the folder of --out {args.out} does not exist; create it first.")
    attrs = make_dataset(args.checkpoint, args.steps, args.out, args.policy, args.noise, args.seed)
    print(
        f"{PROG}: {args.out}: {args.steps} steps of {attrs['env_id']} from {attrs['script']} (step {attrs['checkpoint_step']}), "
        f"{attrs['policy']}; {attrs['episodes']} episodes, mean return {attrs['mean_episode_return']:.1f}"
    )
    return attrs


if __name__ == "__main__":
    main()
