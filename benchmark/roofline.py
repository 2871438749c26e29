"""How near the machine's limit is the offline update? And why does torch's fp32 GEMM run at about
half of XLA's rate on this CPU? (issue 20, items 2 and 5)

    .venv/bin/python benchmark/roofline.py [--threads 1] [--jax PYTHON_WITH_JAX]

1. The matmul rate of (1024x256)(256x256) in fp32 (MKL through torch), under MKL's instruction
   switches (MKL_ENABLE_INSTRUCTIONS, MKL_DEBUG_CPU_TYPE: each in a fresh process, as MKL reads them
   at load), with torch's bf16 ("medium", oneDNN), through torch.compile, and with JAX/XLA when an
   interpreter that has JAX is given.
2. One offline update of xql_offline.py (Hopper shapes: 11-d observations, 3-d actions, 256 wide) at
   batch 256 and 1024: its FLOPs counted by torch.utils.flop_counter (forward and backward
   matmuls), its time eager and compiled (--compile --matmul-precision medium as main() builds it),
   and the fraction of the measured matmul rate that it reaches.
Run it alone: the figures are times.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL = """
import os, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
mode = sys.argv[2]
a, b = torch.randn(1024, 256), torch.randn(256, 256)
mm = torch.mm
if mode == "bf16":
    torch.set_float32_matmul_precision("medium")
if mode == "compile":
    mm = torch.compile(torch.mm, mode="max-autotune-no-cudagraphs")
for _ in range(50):
    mm(a, b)
rates = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(200):
        mm(a, b)
    rates.append(2 * 1024 * 256 * 256 * 200 / (time.perf_counter() - t) / 1e9)
print(sorted(rates)[3])
"""
JAX_MATMUL = """
import sys, time, jax, jax.numpy as jnp
a = jax.random.normal(jax.random.PRNGKey(0), (1024, 256))
b = jax.random.normal(jax.random.PRNGKey(1), (256, 256))
mm = jax.jit(jnp.matmul)
mm(a, b).block_until_ready()
rates = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(200):
        out = mm(a, b)
    out.block_until_ready()
    rates.append(2 * 1024 * 256 * 256 * 200 / (time.perf_counter() - t) / 1e9)
print(sorted(rates)[3])
"""


def matmul_rate(python: str, code: str, threads: int, env: dict | None = None, *args) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **(env or {}),
    }
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    command = [python, "-c", code, str(threads), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def offline_update(batch_size: int, fast: bool, steps: int):
    """(FLOPs of one update, its median time in seconds) for xql_offline.py's update."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    spec = importlib.util.spec_from_file_location("xql_offline", f"{ROOT}/xql_offline.py")
    xql = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xql)
    args = xql.Args(env_id="hopper-medium-v2", batch_size=batch_size, cuda=False, eval_episodes=1)
    fields = dict(beta=2.0, loss_clip=7.0, awr_temperature=3.0, expectile=0.7, actor_dropout=0.0)
    args = xql.dataclasses.replace(args, num_v_updates=1, **fields)
    torch.manual_seed(0)
    agent = xql.Agent(11, 3, args)
    lr = torch.tensor(args.learning_rate)
    groups = [{"params": m.parameters(), "lr": lr.clone()} for m in (agent.actor, agent.critic)]
    optimizers = {
        "value": torch.optim.Adam(agent.value.parameters(), lr.clone(), fused=True),
        "actor_critic": torch.optim.Adam(groups, fused=True),
    }
    buffer = xql.ReplayBuffer(20_000, 11, 3, torch.device("cpu"))
    n = 20_000
    buffer.add(
        torch.randn(n, 11),
        torch.rand(n, 3) * 2 - 1,
        torch.randn(n),
        torch.randn(n, 11),
        torch.zeros(n),
        torch.zeros(n),
    )
    update = xql.update
    if fast:
        update = torch.autocast("cpu", torch.bfloat16)(torch.compile(update))
    with FlopCounterMode(display=False) as counter:
        xql.update(agent, optimizers, buffer.sample(batch_size), args)
    for _ in range(20):  # warm-up (and compilation)
        update(agent, optimizers, buffer.sample(batch_size), args)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            update(agent, optimizers, buffer.sample(batch_size), args)
        times.append((time.perf_counter() - t) / steps)
    return counter.get_total_flops(), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jax", default="/tmp/peers/xql/venv/bin/python", help="a Python with JAX")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"## Matmul (1024x256)(256x256), {args.threads} thread(s), GFLOP/s (median of 7)")
    print("| path | GFLOP/s |")
    print("|---|---|")
    python = sys.executable
    rates = {}
    variants = [
        ("torch fp32 (MKL)", {}, "fp32"),
        (
            "torch fp32, MKL_ENABLE_INSTRUCTIONS=AVX512",
            {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
            "fp32",
        ),
        ("torch fp32, MKL_DEBUG_CPU_TYPE=5", {"MKL_DEBUG_CPU_TYPE": "5"}, "fp32"),
        ("torch fp32, torch.compile max-autotune", {}, "compile"),
        ('torch bf16 (set_float32_matmul_precision("medium"), oneDNN)', {}, "bf16"),
    ]
    for label, env, mode in variants:
        rates[label] = matmul_rate(python, MATMUL, args.threads, env, mode)
        print(f"| {label} | {rates[label]:.0f} |")
    if os.path.exists(args.jax):
        rates["jax"] = matmul_rate(args.jax, JAX_MATMUL, args.threads)
        print(f"| JAX/XLA ({args.jax}) | {rates['jax']:.0f} |")
    limit = rates["torch fp32 (MKL)"]
    print()
    print(
        f"## One offline update (xql_offline.py, Hopper shapes, 256 wide), {args.threads} thread(s)"
    )
    print(
        "| batch | mode | GFLOP per update | ms per update | GFLOP/s | fraction of the fp32 matmul rate |"
    )
    print("|---|---|---|---|---|---|")
    for batch_size, steps in ((256, 100), (1024, 30)):
        for fast in (False, True):
            flops, seconds = offline_update(batch_size, fast, steps)
            rate = flops / seconds / 1e9
            mode = "fast" if fast else "eager"
            print(
                f"| {batch_size} | {mode} | {flops / 1e9:.3f} | {seconds * 1e3:.2f} | {rate:.0f} | "
                f"{rate / limit:.2f} |"
            )


if __name__ == "__main__":
    main()
