"""Run the authors' online code (github.com/Div99/XQL, online/, PyTorch) for one arm and seed.

Runs in a venv of its own (benchmark/against_authors.sh builds it: gym 0.23.1, dm_control, torch)
with their source on the path; nothing of theirs is copied into this repository, and nothing of
theirs is changed: their code runs as released. What this driver does around it:

- It loads their config (configs/xsac.yaml or configs/xtd3.yaml) and overrides, explicitly, the
  settings that the comparison fixes on both sides (steps, random steps, width, batch, lr, beta,
  clip, loss). Then it does what `research.utils.trainer.train` does (save the config, `get_model`,
  `model.train`), adding the seeding that `train` leaves out (trainer.py:93-96: `model.seed` is
  commented out): torch, numpy and random, and the dm_control task itself, whose
  `task_kwargs.random` their env registration leaves unset (a task seeded from the OS otherwise).
- The evaluation env gets task seed `seed + 10000` and one reset before training, as our scripts'
  `make_env(seed + 10000)` does, so both sides evaluate on the same stream of start states.
- One runtime patch, an observer: `research.algs.base.eval_policy` is wrapped to record each
  evaluation's mean and standard deviation with the step (their CSV log is rewritten from scratch
  whenever its set of keys grows, logger.py:56-69). The evaluation itself is theirs.

Writes --out: {"side": "authors", "arm", "seed", "evaluations": [[step, mean, std], ...],
"final_return", "settings", "wall_s"}.
"""

import argparse
import json
import os
import random
import sys
import time

# Every change made to their code at run time, with its reason (docs/against_authors.md lists them).
PATCHES = [
    (
        "research.algs.base.eval_policy",
        (
            "wrapped to record each evaluation's mean and std with the step (their CSV log is "
            "rewritten from scratch whenever its set of keys grows, logger.py:56-69); the "
            "evaluation itself is theirs"
        ),
    ),
]
ARMS = {
    # arm: (their config file, alg_kwargs that make the arm)
    "xsac": ("xsac.yaml", {"loss": "gumbel_rescale", "use_value_log_prob": False}),
    "sac": ("xsac.yaml", {"loss": "mse", "use_value_log_prob": True}),
    "xtd3": ("xtd3.yaml", {"loss": "gumbel_rescale"}),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="their online/ folder")
    parser.add_argument("--arm", choices=sorted(ARMS), required=True)
    parser.add_argument("--task", default="cartpole-swingup", help="dm_control domain-task")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--total-steps", type=int, required=True, help="env steps (= trainer steps)"
    )
    parser.add_argument("--init-steps", type=int, required=True, help="uniform random env steps")
    parser.add_argument("--eval-freq", type=int, required=True)
    parser.add_argument("--eval-episodes", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--hidden-dim", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--exp-clip", type=float, required=True)
    parser.add_argument("--work-dir", required=True, help="their run folder (must not exist)")
    parser.add_argument("--out", required=True, help="the result JSON to write")
    return parser.parse_args(argv)


def dm_control_id(task: str) -> str:
    """Their registration's id for a dm_control task (research/envs/__init__.py:19)."""
    domain, name = task.split("-", 1)
    return f"{domain.capitalize()}{name.capitalize()}-v0"


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, args.src)
    import numpy as np
    import research
    import torch
    from research.utils.trainer import Config, get_env, get_model

    config_file, arm_kwargs = ARMS[args.arm]
    config = Config.load(os.path.join(args.src, "configs", config_file))
    env_id = dm_control_id(args.task)
    config["env"] = env_id
    config["env_kwargs"] = {"task_kwargs": {"random": args.seed}}
    config["seed"] = args.seed
    config["alg_kwargs"].update(
        arm_kwargs, init_steps=args.init_steps, beta=args.beta, exp_clip=args.exp_clip
    )
    config["optim_kwargs"]["lr"] = args.lr
    config["dataset_kwargs"]["batch_size"] = args.batch_size
    network = config["network_kwargs"]
    for key in ("actor_kwargs", "critic_kwargs", "value_kwargs"):
        if key in network:
            network[key]["hidden_layers"] = [args.hidden_dim, args.hidden_dim]
    config["train_kwargs"].update(
        total_steps=args.total_steps,
        eval_freq=args.eval_freq,
        eval_ep=args.eval_episodes,
        log_freq=1000,
        workers=0,
    )

    # What trainer.train does, with the seeding it leaves out (trainer.py:93-96).
    os.makedirs(args.work_dir, exist_ok=False)
    config.save(args.work_dir)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model = get_model(config, device="cpu")
    eval_kwargs = {"task_kwargs": {"random": args.seed + 10_000}}
    model.eval_env = get_env(env_id, eval_kwargs, None, {})
    model.eval_env.reset()  # as our make_env: evaluations start from the second episode's state

    evaluations = []
    their_eval_policy = research.algs.base.eval_policy

    def recorded_eval_policy(env, model_, num_ep):
        metrics = their_eval_policy(env, model_, num_ep)
        step = model_.steps
        evaluations.append([step, float(metrics["reward"]), float(metrics["stddev"])])
        print(
            f"authors {args.arm} seed {args.seed}: step {step} | eval return "
            f"{metrics['reward']:.2f} +- {metrics['stddev']:.2f}",
            flush=True,
        )
        return metrics

    research.algs.base.eval_policy = recorded_eval_policy
    start = time.time()
    model.train(args.work_dir, schedule=None, use_wandb=False, **config["train_kwargs"])
    result = {
        "side": "authors",
        "arm": args.arm,
        "seed": args.seed,
        "env_id": env_id,
        "evaluations": evaluations,
        "final_return": evaluations[-1][1] if evaluations else None,
        "settings": {key: config[key] for key in ("alg_kwargs", "optim_kwargs", "dataset_kwargs")}
        | {"train_kwargs": config["train_kwargs"], "network_kwargs": network},
        "wall_s": time.time() - start,
        "threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
