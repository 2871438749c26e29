"""The table of benchmark/against_authors.sh: the authors' code (Div99/XQL) against ours, per arm.

    python benchmark/against_authors.py prepare-dataset IN.hdf5 OUT.hdf5 [--reward-norm returns]
    python benchmark/against_authors.py table --run-dir DIR --out docs/against_authors.md [--json F]

`prepare-dataset` copies a D4RL-format file with its rewards scaled once, by the authors' locomotion
rule (train_offline.py:70-87: x 1000 / (max - min episode return), episodes cut as IQL's
`split_into_trajectories`), so that both sides train on the same numbers with their own reward
preprocessing off. `table` reads the run folder that against_authors.sh filled (jobs/,
settings.json, meta.json) and writes the Markdown page: per arm the mean final return of each side
with its standard error and the difference with its standard error, the evaluation curves per seed,
the settings side by side, what could not be matched, every runtime patch applied to their code, the
versions, the machine and the wall time. Only the standard library is needed (and h5py/numpy for
prepare-dataset).
"""

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = {  # part: {arm: (what the authors run, what we run)}
    "offline": {
        "xql": ("train_offline.py, Learner(vanilla=False): Gumbel loss for V", "xql_offline.py"),
        "iql": (
            "train_offline.py, Learner(vanilla=True): expectile loss for V",
            "xql_offline.py --value-loss expectile",
        ),
    },
    "online": {
        "xsac": ("GumbelSAC, loss=gumbel_rescale", "xsac_continuous.py"),
        "sac": (
            "GumbelSAC, loss=mse, use_value_log_prob=True (SAC with V)",
            "xsac_continuous.py --value-loss mse",
        ),
        "xtd3": ("GumbelTD3, loss=gumbel_rescale", "xtd3_continuous.py"),
    },
}
SIDES = ("authors", "ours")
EVAL_LINE = re.compile(r"^step (\d+)/\d+ \| eval return (\S+) \+- (\S+)")


# ---- prepare-dataset ----


def prepare_dataset(src: str, dst: str, reward_norm: str) -> float:
    """Copy `src` to `dst`, rewards x the authors' locomotion scale (or x 1); returns the scale."""
    import h5py
    import numpy as np

    with h5py.File(src, "r") as f:
        data = {key: f[key][()] for key in f if isinstance(f[key], h5py.Dataset)}
        attrs = dict(f.attrs)
    scale = 1.0
    if reward_norm == "returns":
        n = len(data["rewards"])
        rewards = data["rewards"].reshape(n).astype(np.float64)
        terminals = data["terminals"].reshape(n).astype(bool)
        timeouts = data["timeouts"].reshape(n).astype(bool) if "timeouts" in data else None
        # d4rl.qlearning_dataset's rows (obs[i+1] is the next observation; timeout rows dropped) ...
        keep = ~timeouts[: n - 1] if timeouts is not None else np.ones(n - 1, dtype=bool)
        index = np.flatnonzero(keep)
        obs = data["observations"]
        next_obs = obs[index + 1]
        # ... cut into episodes as split_into_trajectories: obs[i+1] != next_obs[i], or a terminal
        jumps = np.linalg.norm(obs[index[1:]] - next_obs[:-1], axis=1) > 1e-6
        ends = np.append(jumps | terminals[index][:-1], True)
        episode = np.append(0, np.cumsum(ends[:-1]))
        returns = np.bincount(episode, weights=rewards[index])
        scale = 1000.0 / (returns.max() - returns.min())
    data["rewards"] = (data["rewards"] * scale).astype(data["rewards"].dtype)
    with h5py.File(dst + ".tmp", "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value, compression="gzip")
        f.attrs.update(attrs)
        f.attrs["against_authors_source"] = os.path.abspath(src)
        f.attrs["against_authors_reward_scale"] = scale
    os.replace(dst + ".tmp", dst)
    return scale


# ---- reading the runs ----


def read_job(job_dir: str) -> dict:
    """One run's evaluations [[step, mean], ...] and wall time, whichever side wrote it."""
    wall = read_number(os.path.join(job_dir, "wall_s"))
    result = os.path.join(job_dir, "result.json")
    ours_offline = sorted(glob.glob(os.path.join(job_dir, "runs", "*", "results.json")))
    log = os.path.join(job_dir, "log.txt")
    evaluations = []
    if os.path.isfile(result):  # the authors' drivers
        with open(result) as f:
            evaluations = [row[:2] for row in json.load(f)["evaluations"]]
    elif ours_offline:  # xql_offline.py's results.json: [step, return, normalised score]
        with open(ours_offline[-1]) as f:
            evaluations = [row[:2] for row in json.load(f)["evaluations"]]
    elif os.path.isfile(log):  # xsac/xtd3_continuous.py's console: `step N/M | eval return X +- Y`
        with open(log, errors="replace") as f:
            for line in f:
                match = EVAL_LINE.match(line.strip())
                if match:
                    evaluations.append([int(match[1]), float(match[2])])
    evaluations = [[int(step), float(value)] for step, value in evaluations]
    return {
        "evaluations": evaluations,
        "final": evaluations[-1][1] if evaluations else None,
        "wall_s": wall,
        "log": log,
    }


def read_number(path: str):
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def collect(run_dir: str) -> dict:
    """{part: {arm: {side: {seed: job}}}} from run_dir/jobs/<part>__<arm>__<side>__<seed>/."""
    runs = {}
    for job_dir in sorted(glob.glob(os.path.join(run_dir, "jobs", "*__*__*__*"))):
        part, arm, side, seed = os.path.basename(job_dir).split("__")
        job = read_job(job_dir)
        runs.setdefault(part, {}).setdefault(arm, {}).setdefault(side, {})[int(seed)] = job
    return runs


# ---- statistics ----


def mean_se(values: list) -> tuple:
    """Mean and standard error (sample sd / sqrt(n)); the error is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def compare(authors: list, ours: list) -> dict:
    """Means, standard errors, and ours - authors with the error of a difference of two means."""
    mean_a, se_a = mean_se(authors)
    mean_o, se_o = mean_se(ours)
    diff = se_diff = None
    if mean_a is not None and mean_o is not None:
        diff = mean_o - mean_a
        se_diff = math.hypot(se_a, se_o) if se_a is not None and se_o is not None else None
    if diff is None:
        verdict = "missing runs"
    elif se_diff is None:
        verdict = "one seed: no error bar"
    elif abs(diff) <= 2 * se_diff:
        verdict = "within 2 SE"
    else:
        verdict = f"ours {'higher' if diff > 0 else 'lower'} by more than 2 SE"
    return {
        "authors_mean": mean_a,
        "authors_se": se_a,
        "ours_mean": mean_o,
        "ours_se": se_o,
        "diff": diff,
        "diff_se": se_diff,
        "verdict": verdict,
        "n_authors": len(authors),
        "n_ours": len(ours),
    }


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_pm(mean, se) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" + (f" ± {se:.1f}" if se is not None else "")


# ---- the page ----


def versions(venv: str, packages: list) -> dict:
    """Installed versions of `packages` in a venv (its python, importlib.metadata)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))"
    )
    python = os.path.join(venv, "bin", "python")
    try:
        done = subprocess.run(
            [python, "-c", code, *packages], capture_output=True, text=True, timeout=120, check=True
        )
        return json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


PACKAGES = [
    "torch",
    "numpy",
    "gymnasium",
    "gym",
    "mujoco",
    "dm_control",
    "shimmy",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "tensorflow-probability",
    "ml_collections",
    "absl-py",
    "h5py",
    "tensorboardX",
    "PyYAML",
]


def settings_tables(s: dict) -> list:
    """The settings of each part, side by side: what each side was given, and where it came from."""
    off, on = s["offline"], s["online"]
    lines = [
        "### Offline (X-QL and IQL)",
        "",
        "| setting | ours: `xql_offline.py` | authors: `offline/train_offline.py` | source |",
        "|---|---|---|---|",
    ]
    rows = [
        (
            "dataset",
            f"`--dataset-path` {off['dataset_name']}",
            "the same file (d4rl stand-in)",
            off["dataset_about"]
            + (f"; made by {off['dataset_recipe']}" if off["dataset_recipe"] else ""),
        ),
        (
            "rewards",
            (
                f"x {off['reward_scale']:.5g}, scaled once in the file; ours adds none "
                "(not a D4RL name)"
            ),
            "the same; their rule off (`--env_name` without a robot name)",
            f"REWARD_NORM={off['reward_norm']}: their locomotion rule, train_offline.py:70-87",
        ),
        (
            "eval env",
            f"`--eval-env-id {off['eval_env']}`",
            f"`gym.make` stand-in: {off['eval_env']}",
            "both: reset(seed=seed+10000) once, then unseeded resets",
        ),
        (
            "gradient steps",
            f"`--max-steps {off['steps']}`",
            f"`--max_steps={off['steps']}`",
            "issue 19",
        ),
        (
            "evaluation",
            f"`--eval-freq {off['eval_freq']} --eval-episodes {off['eval_episodes']}`",
            f"`--eval_interval={off['eval_freq']} --eval_episodes={off['eval_episodes']}`",
            "deterministic policy (evaluation.py, temperature 0)",
        ),
        (
            "batch",
            f"`--batch-size {off['batch']}`",
            f"`--batch_size={off['batch']}`",
            "Table 4, reproduce/mujoco/*.sh",
        ),
        ("beta (X-QL)", f"`--beta {off['beta']}`", f"`--temp={off['beta']}`", "Table 4 locomotion"),
        (
            "loss clip (X-QL)",
            f"`--loss-clip {off['clip']} --clip-mode upper`",
            f"`--max_clip={off['clip']}` (z <= clip, critic.py:16)",
            "Table 4",
        ),
        (
            "expectile (IQL)",
            f"`--expectile {off['expectile']}`",
            f"`--config.expectile={off['expectile']}`",
            "mujoco_config.py",
        ),
        (
            "AWR temperature",
            f"`--awr-temperature {off['awr_temperature']}`",
            f"`--config.temperature={off['awr_temperature']}`",
            "mujoco_config.py",
        ),
        (
            "V LayerNorm",
            "X-QL yes, IQL no (fixed in our script)",
            "X-QL yes; IQL `--config.layernorm=False`",
            "mujoco_config.py (True); IQL's config",
        ),
        (
            "lr, width, gamma, tau",
            "3e-4, 256, 0.99, 0.005 (defaults)",
            "3e-4, (256, 256), 0.99, 0.005 (mujoco_config.py)",
            "equal defaults",
        ),
        (
            "actor lr",
            "cosine decay to 0 over the steps",
            "optax.cosine_decay_schedule (learner.py:102)",
            "equal",
        ),
        (
            "double Q, V updates",
            "min of 2 target critics, 1",
            "`--double=True`, `num_v_updates=1`",
            "equal",
        ),
        ("seed", "`--seed N`", "`--seed=N`, numpy seeded by the driver", "seeds " + off["seeds"]),
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += [
        "",
        f"### Online (dm_control {on['task']})",
        "",
        (
            "| setting | ours: `xsac_continuous.py` / `xtd3_continuous.py` | authors: "
            "`online/` trainer, configs/xsac.yaml / xtd3.yaml | source |"
        ),
        "|---|---|---|---|",
    ]
    rows = [
        (
            "env",
            f"`--env-id dm_control/{on['task']}-v0` (shimmy)",
            "their registration, task seed via `env_kwargs.task_kwargs.random`",
            "same dm_control task",
        ),
        (
            "env steps",
            f"`--total-timesteps {on['steps']}`",
            f"`train_kwargs.total_steps={on['steps']}`",
            "CPU budget (theirs: 2M)",
        ),
        (
            "random steps",
            f"`--learning-starts {on['random_steps']}`",
            f"`alg_kwargs.init_steps={on['random_steps']}`",
            "xsac.yaml: 5000; xtd3.yaml: 25000",
        ),
        (
            "evaluation",
            f"`--eval-freq {on['eval_freq']} --eval-episodes {on['eval_episodes']}`",
            f"`eval_freq={on['eval_freq']}`, `eval_ep={on['eval_episodes']}`",
            "deterministic mean action; eval task seed+10000, one reset first, both sides",
        ),
        (
            "width, batch",
            f"`--hidden-dim {on['hidden']} --batch-size {on['batch']}`",
            (
                f"`hidden_layers=[{on['hidden']}, {on['hidden']}]`, "
                f"`dataset_kwargs.batch_size={on['batch']}`"
            ),
            "CPU budget (xsac.yaml: 1024, 1024; xtd3.yaml: 256, 256)",
        ),
        (
            "lr (SAC arms / TD3)",
            f"`--learning-rate {on['lr_sac']}` / `{on['lr_td3']}`",
            f"`optim_kwargs.lr={on['lr_sac']}` / `{on['lr_td3']}`",
            "xsac.yaml / xtd3.yaml",
        ),
        (
            "beta (X-SAC / X-TD3)",
            f"`--beta {on['beta_sac']}` / `{on['beta_td3']}`",
            f"`alg_kwargs.beta={on['beta_sac']}` / `{on['beta_td3']}`",
            "xsac.yaml / xtd3.yaml",
        ),
        (
            "loss clip (X-SAC / X-TD3)",
            f"`--loss-clip {on['clip_sac']}` / `{on['clip_td3']}`, `--clip-mode both`",
            f"`exp_clip={on['clip_sac']}` / `{on['clip_td3']}` (z to [-clip, clip])",
            "xsac.yaml / xtd3.yaml",
        ),
        (
            "actor frequency",
            "`--policy-frequency 2`",
            "`actor_freq=2` (GumbelSAC and TD3 defaults)",
            "their code (Table 5 says 1 for SAC)",
        ),
        (
            "target update",
            "every 2nd update, tau 0.005 (defaults)",
            "`target_freq=2`, `tau=0.005`",
            "equal",
        ),
        (
            "alpha (SAC arms)",
            "init 0.1, tuned to entropy −dim(A) (defaults)",
            "`init_temperature=0.1`, `alpha=null` (tuned)",
            "equal",
        ),
        (
            "TD3 noise",
            "acting 0.1, target 0.2 clipped 0.5 (defaults)",
            "`policy_noise=0.1`, `target_noise=0.2`, `noise_clip=0.5`",
            "equal",
        ),
        ("buffer, gamma", "1M, 0.99 (defaults)", "`capacity=1000000`, `discount=0.99`", "equal"),
        (
            "seed",
            "`--seed N`",
            "torch/numpy/random and the task seeded by the driver",
            "seeds " + on["seeds"],
        ),
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines


NOT_MATCHED = [
    (
        "**Online width and batch.** xsac.yaml trains 1024-wide networks on batches of 1024 (Table "
        "5). On one CPU thread one such update took 0.23 s here (three processes on two cores), "
        "so a 30k-step run would take over an hour; both sides run 256 wide on batches of 256 "
        "instead, with their learning rates."
    ),
    (
        "**TD3's random steps.** xtd3.yaml starts with 25000 random steps, most of a CPU-scale "
        "budget; both sides take the SAC arms' number."
    ),
    (
        "**X-TD3's initialisation.** Their networks are orthogonally initialised (`ortho_init: "
        "true`); xtd3_continuous.py keeps PyTorch's default initialisation and has no flag to "
        "change it."
    ),
    (
        "**Offline Q loss.** Theirs is a Huber loss with delta 20 on 0.5 x^2 (critic.py:126), ours "
        "the squared error of Eq. 14. They agree up to a factor 2 (which Adam cancels) until a TD "
        "error passes 20; on rewards scaled to 1000 / (max - min return) that is rare."
    ),
    (
        "**Their IQL arm's V.** mujoco_config.py has `layernorm = True`, so `vanilla=True` alone "
        "would be IQL with a LayerNorm V. Our IQL arm has none (IQL's own config) and no flag for "
        "it, so their arm runs with `--config.layernorm=False`."
    ),
    (
        "**Random streams.** The same seed number goes to both sides, but JAX's PRNG and torch's, "
        "numpy's batch sampler and torch's, draw different numbers: initial weights, batches and "
        "exploration differ run by run, which is what the standard errors are for. What can be the "
        "same is: the evaluation start states (same env, same seed, same reset sequence; checked "
        "on cartpole-swingup: the first three evaluation episodes start from the same observation "
        "on both sides, in the same order of its entries) and the training env's task seed."
    ),
]

DRIVER_NOTES = [
    (
        "Their code is not copied into this repository: against_authors.sh exports `offline/` and "
        "`online/` of the pinned commit into the cache folder, and the drivers put them on "
        "`sys.path`."
    ),
    (
        "Offline, their `train_offline.py` runs as released (`main` under absl flags: their loop, "
        "their `evaluate`, `EpisodeMonitor`, `SinglePrecision`, their `<seed>.txt` of evaluations, "
        "read back). The driver seeds numpy first: their batches come from numpy's global state, "
        "which train_offline.py never seeds."
    ),
    (
        "Online, the driver loads their yaml, overrides the settings above, seeds "
        "torch/numpy/random (trainer.py:93-96 leaves `model.seed` commented out) and the "
        "dm_control task (`task_kwargs.random`; left unset, the task draws its seed from the OS "
        "and every run's action space gets seed 1, dm_control.py:283), then does what "
        "`research.utils.trainer.train` does: save the config, `get_model`, `model.train`. The "
        "evaluation env is replaced by one with task seed + 10000 reset once, as our `make_env` "
        "does."
    ),
    (
        "Their `loss: gumbel` (the plain Gumbel loss) is not run: GumbelSAC reads a missing "
        "`self.clip` there (gumbel_sac.py:222) and crashes; their xsac.yaml uses `gumbel_rescale`, "
        "as do we."
    ),
]


def online_patches() -> list:
    sys.path.insert(0, HERE)
    import against_authors_online

    return against_authors_online.PATCHES


def offline_patches() -> list:
    sys.path.insert(0, HERE)
    import against_authors_offline

    return against_authors_offline.PATCHES


def write_page(run_dir: str, out: str, notes: str | None, json_out: str | None) -> dict:
    with open(os.path.join(run_dir, "settings.json")) as f:
        settings = json.load(f)
    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    runs = collect(run_dir)
    summary = {"settings": settings, "meta": meta, "arms": {}}
    quick = settings.get("quick")
    title = "benchmark/against_authors.sh" + (", QUICK=1" if quick else "")
    lines = [f"# The authors' code against ours ({title})", ""]
    if quick:
        lines += ["**QUICK=1: tiny settings that check the pipeline, not the science.**", ""]
    commit, task = meta["commit"], settings["online"]["task"]
    lines += [
        (
            f"Each arm runs twice per seed with the same settings: once as the authors' released "
            f"code (github.com/Div99/XQL at `{commit}`, in venvs of its own, patched only at run "
            f"time as listed below) and once as ours. What it shows: whether `xql_offline.py`, "
            f"`xsac_continuous.py` and `xtd3_continuous.py` learn what their code learns, at CPU "
            f"scale, on one Hopper-v4 dataset made here and one dm_control task ({task}). What it "
            f"does not show: Table 1's D4RL datasets, the paper's 1M/2M-step budgets, 1024-wide "
            f"online networks."
        ),
        "",
        (
            f"Machine: {meta['machine']}. Jobs at a time: {meta['jobs']}, one thread each. "
            f"Load average before: {meta['load_before']}; after: {meta['load_after']}. "
            f"Wall time of the runs: {meta['wall_s'] / 60:.1f} min ({meta['started']} to "
            f"{meta['finished']}; building their code before: {meta.get('build_s', 0):.0f} s). "
            f"Their code: {meta['source']}."
        ),
        "",
        "## Final returns",
        "",
        (
            "Final return: the last evaluation of a run (mean over its episodes). Per side: the "
            "mean over seeds ± its standard error (sd / sqrt(n)); ours − authors ± the standard "
            "error of that difference (independent runs: sqrt(SE_ours² + SE_authors²))."
        ),
        "",
        "| part | arm | authors run | we run | seeds | authors | ours | ours − authors | verdict |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    curves = []
    for part, arms in ARMS.items():
        for arm, (theirs, ours) in arms.items():
            sides = runs.get(part, {}).get(arm, {})
            finals = {
                side: [
                    job["final"]
                    for _, job in sorted(sides.get(side, {}).items())
                    if job["final"] is not None
                ]
                for side in SIDES
            }
            result = compare(finals["authors"], finals["ours"])
            result["finals"] = finals
            result["per_seed"] = {
                side: {
                    seed: job["evaluations"] for seed, job in sorted(sides.get(side, {}).items())
                }
                for side in SIDES
            }
            summary["arms"][f"{part}/{arm}"] = result
            seeds = f"{result['n_authors']} / {result['n_ours']}"
            lines.append(
                f"| {part} | {arm} | {theirs} | `{ours}` | {seeds} | "
                f"{fmt_pm(result['authors_mean'], result['authors_se'])} | "
                f"{fmt_pm(result['ours_mean'], result['ours_se'])} | "
                f"{fmt_pm(result['diff'], result['diff_se'])} | {result['verdict']} |"
            )
            curves.append((part, arm, sides))
    lines += ["", "## Notes", ""]
    if notes and os.path.isfile(notes):
        with open(notes) as f:
            lines += [f.read().strip(), ""]
    flagged = [
        key for key, value in summary["arms"].items() if "more than 2 SE" in value["verdict"]
    ]
    lines.append(
        "Arms where the sides differ by more than two standard errors: "
        + (", ".join(flagged) if flagged else "none")
        + "."
    )
    failed = [
        f"{part}/{arm}/{side}/seed {seed}"
        for part, arm, sides in curves
        for side, jobs in sides.items()
        for seed, job in jobs.items()
        if job["final"] is None
    ]
    lines += ["", "Runs without an evaluation (failed): " + (", ".join(failed) or "none") + ".", ""]

    lines += [
        "## Evaluation curves",
        "",
        "Mean return of each evaluation, by env step (online) or gradient step (offline).",
        "",
    ]
    for part in ARMS:
        part_curves = [(arm, sides) for p, arm, sides in curves if p == part]
        steps = sorted(
            {
                step
                for _, sides in part_curves
                for jobs in sides.values()
                for job in jobs.values()
                for step, _ in job["evaluations"]
            }
        )
        lines += [
            f"### {part.capitalize()}",
            "",
            "| arm | seed | side | " + " | ".join(f"{s:,}" for s in steps) + " |",
            "|---|---:|---|" + "---:|" * len(steps),
        ]
        for arm, sides in part_curves:
            seeds = sorted({seed for jobs in sides.values() for seed in jobs})
            for seed in seeds:
                for side in SIDES:
                    job = sides.get(side, {}).get(seed)
                    values = dict(map(tuple, job["evaluations"])) if job else {}
                    cells = " | ".join(fmt(values.get(step)) for step in steps)
                    lines.append(f"| {arm} | {seed} | {side} | {cells} |")
        lines.append("")

    lines += ["## Settings, side by side", ""] + settings_tables(settings) + [""]
    lines += ["## What could not be matched", ""] + [f"- {item}" for item in NOT_MATCHED] + [""]
    lines += [
        "## Runtime patches to their code",
        "",
        "Applied by the drivers in memory, each for the reason given; their files are unchanged.",
        "",
        "| code | patch | reason |",
        "|---|---|---|",
    ]
    lines += [f"| offline (JAX) | `{name}` | {why} |" for name, why in offline_patches()]
    lines += [f"| online (PyTorch) | `{name}` | {why} |" for name, why in online_patches()]
    lines += ["", "How the drivers run their code (not patches):", ""]
    lines += [f"- {item}" for item in DRIVER_NOTES] + [""]

    venvs = meta.get("venvs", {})
    found = {name: versions(path, PACKAGES) for name, path in venvs.items()}
    lines += [
        "## Versions",
        "",
        "| package | " + " | ".join(found) + " |",
        "|---|" + "---|" * len(found),
    ]
    for package in ["python"] + PACKAGES:
        cells = [found[name].get(package) or "—" for name in found]
        if any(cell != "—" for cell in cells):
            lines.append(f"| {package} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Our code: {meta.get('ours_commit', '?')}. Their code: Div99/XQL `{meta['commit']}`.",
        "",
        f"Made by `{meta['command']}`; the runs are in `{run_dir}`.",
        "",
    ]
    summary["versions"] = found
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare-dataset", help="copy a D4RL file with rewards scaled once"
    )
    prepare.add_argument("src")
    prepare.add_argument("dst")
    prepare.add_argument("--reward-norm", choices=("returns", "none"), default="returns")
    table = commands.add_parser("table", help="write the Markdown page from a run folder")
    table.add_argument("--run-dir", required=True)
    table.add_argument("--out", required=True)
    table.add_argument("--notes", help="Markdown to put under Notes (what was found on a look)")
    table.add_argument("--json", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.command == "prepare-dataset":
        scale = prepare_dataset(args.src, args.dst, args.reward_norm)
        print(f"against_authors: {args.dst}: rewards x {scale:.6g}")
    else:
        summary = write_page(args.run_dir, args.out, args.notes, args.json)
        for key, value in summary["arms"].items():
            authors = fmt_pm(value["authors_mean"], value["authors_se"])
            ours = fmt_pm(value["ours_mean"], value["ours_se"])
            print(f"against_authors: {key}: authors {authors}, ours {ours}: {value['verdict']}")
        print(f"against_authors: table {args.out}")


if __name__ == "__main__":
    main()
