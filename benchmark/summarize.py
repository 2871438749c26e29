"""Turn a folder of runs into a results table (markdown) and learning curves (PNG).

Reads the TensorBoard event files under RUNS_DIR (any depth). A run folder is named
`{env_id with '/' replaced by '-'}__{exp_name}__{seed}__{unix_time}`; the task is the env id and the
*arm* is the experiment name (xql, iql, xsac, sac, xtd3, xtd3-dq, td3, ...). The evaluation metric is
`eval/normalized_score` for offline runs with reference returns (step = gradient steps) and
`eval/episodic_return` otherwise (online runs: step = env steps; offline runs on datasets without
reference returns, recognised by their `charts/actor_lr`: gradient steps), detected per run unless
`--metric TAG` is given. An offline run fine-tuned online (`xql_offline.py --online-steps`, Table 2)
also logs `finetune/normalized_score` (or `finetune/episodic_return`); its online phase becomes a row
of its own, arm `<exp_name>-finetune`, in a fine-tuning table.

The table, one per benchmark (D4RL locomotion, AntMaze, Kitchen, Adroit, DM Control, other), gives
per task and arm: the number of seeds, mean ± std over seeds of the **final** and of the **best**
evaluation, and the paper's number beside ours where it has one (`paper_results.py`). Under it, per
arm, the interquartile mean (IQM) over all runs of all tasks with a stratified-bootstrap 95%
confidence interval (Agarwal et al., 2021: seeds are resampled with replacement within each task).

Conventions: std is numpy's population std over seeds (ddof=0; 0 for one seed). Runs of different
lengths: "final" is each run's own last evaluation (the Steps column shows the range of those
steps); curves are aligned on the union of evaluation steps, each run interpolated linearly inside
its own range and never extrapolated (past the end of a shorter run, the line averages the seeds
that got there; each panel's title gives the number of seeds). A second run with the same task, arm and seed (a restart)
replaces the older one, with a warning. Runs without any evaluation yet are skipped with a warning.

Usage:
    python benchmark/summarize.py runs/ --out benchmark/results/table.md --plot benchmark/results/curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # paper_results.py sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_results import paper_scores  # noqa: E402

PROG = "summarize"
OFFLINE_TAG = "eval/normalized_score"
ONLINE_TAG = "eval/episodic_return"  # also offline runs on data without reference returns (they log charts/actor_lr)
FINETUNE_TAG = (
    "finetune/normalized_score"  # xql_offline.py --online-steps: evaluations while fine-tuning
)
FINETUNE_RETURN_TAG = "finetune/episodic_return"  # the same without reference returns
RUN_NAME = re.compile(r"(?P<task>.+?)__(?P<arm>.+)__(?P<seed>-?\d+)__(?P<time>\d+)")
BEST_NOTE = (
    "*Best* is the highest evaluation over training, averaged over seeds; *Final* is the last evaluation of "
    "each run, the number to compare methods on. The authors' code logs every evaluation and a running best, "
    "and the paper does not say which of the two its tables report. Best overestimates what a run delivers: it "
    "picks the checkpoint on the very episodes it reports."
)


@dataclass
class Run:
    task: str
    arm: str
    seed: int
    start_time: int
    tag: str
    steps: np.ndarray
    values: np.ndarray
    path: Path
    offline: bool = False  # an xql_offline.py run (x axis: gradient steps, or online env steps when fine-tuning)
    dataset: float | None = (
        None  # offline: the dataset's own mean episode return (normalised like the metric)
    )


def dataset_value(run_dir: Path, tag: str) -> float | None:
    """The dataset's own mean episode return from an offline run's results.json, on the scale of `tag`."""
    try:
        result = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    value = result.get("dataset_normalized_score" if tag == OFFLINE_TAG else "dataset_return")
    return None if value is None else float(value)


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------
def find_run_dirs(runs_dir: Path) -> list[Path]:
    """Folders under runs_dir (runs_dir included) that hold at least one TensorBoard event file."""
    return sorted({p.parent for p in runs_dir.rglob("events.out.tfevents.*") if p.is_file()})


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar series of the event files in run_dir: tag -> (steps, values), sorted by step."""
    from tensorboard.backend.event_processing import event_accumulator

    # size_guidance 0 keeps every scalar (the default keeps a 10k sample); the rest is not needed.
    guidance = {
        event_accumulator.SCALARS: 0,
        event_accumulator.TENSORS: 1,
        event_accumulator.IMAGES: 1,
        event_accumulator.HISTOGRAMS: 1,
        event_accumulator.AUDIO: 1,
        event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    }
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance=guidance)
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=np.float64)
        # A step logged twice (a resumed run) keeps its last value.
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        last = np.append(steps[1:] != steps[:-1], True)
        series[tag] = (steps[last], values[last])
    return series


def load_runs(runs_dir: Path, metric: str | None) -> list[Run]:
    """Every run with at least one evaluation; restarts of the same (task, arm, seed) keep the newest."""
    if not runs_dir.is_dir():
        raise SystemExit(
            f"{PROG}: runs folder {runs_dir} does not exist (pass the folder your sweep wrote, e.g. runs/)"
        )
    run_dirs = find_run_dirs(runs_dir)
    if not run_dirs:
        raise SystemExit(
            f"{PROG}: no TensorBoard event files under {runs_dir} (run a sweep first, or pass the folder that holds the run folders)"
        )
    runs: dict[tuple[str, str, int], Run] = {}
    for run_dir in run_dirs:
        match = RUN_NAME.fullmatch(run_dir.name)
        if match is None:
            warn(
                f"skipping {run_dir}: its name is not {{env_id}}__{{exp_name}}__{{seed}}__{{unix_time}}"
            )
            continue
        series = read_scalars(run_dir)
        if metric is not None:
            tag = metric
        else:
            tag = OFFLINE_TAG if OFFLINE_TAG in series else ONLINE_TAG
        offline = OFFLINE_TAG in series or "charts/actor_lr" in series
        if tag not in series or len(series[tag][0]) == 0:
            wanted = f"'{metric}'" if metric is not None else f"'{OFFLINE_TAG}' or '{ONLINE_TAG}'"
            warn(
                f"skipping {run_dir}: no evaluation yet (no {wanted} logged: the run has not reached its first evaluation, or it does not evaluate)"
            )
            continue
        found = [
            Run(
                match["task"],
                match["arm"],
                int(match["seed"]),
                int(match["time"]),
                tag,
                *series[tag],
                run_dir,
                offline,
                dataset_value(run_dir, tag),
            )
        ]
        finetune_tag = FINETUNE_TAG if FINETUNE_TAG in series else FINETUNE_RETURN_TAG
        if metric is None and len(series.get(finetune_tag, ((),))[0]) > 0:
            # an offline run fine-tuned online (Table 2): its online phase is a row of its own, arm "<arm>-finetune"
            found.append(
                Run(
                    match["task"],
                    f"{match['arm']}-finetune",
                    int(match["seed"]),
                    int(match["time"]),
                    finetune_tag,
                    *series[finetune_tag],
                    run_dir,
                    True,
                )
            )
        for run in found:
            key = (run.task, run.arm, run.seed)
            if key in runs:
                old, new = sorted([runs[key], run], key=lambda r: r.start_time)
                warn(
                    f"two runs of {run.task} / {run.arm} / seed {run.seed}: keeping {new.path.name}, ignoring {old.path.name}"
                )
                run = new
            runs[key] = run
    if not runs:
        raise SystemExit(
            f"{PROG}: none of the {len(run_dirs)} run folders under {runs_dir} has an evaluation yet (wait for the first --eval-freq, or pick the tag with --metric)"
        )
    return sorted(runs.values(), key=lambda r: (r.task, r.arm, r.seed))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def interquartile_mean(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of the middle 50%: drops floor(n/4) lowest and highest values (as scipy.stats.trim_mean(x, 0.25))."""
    scores = np.sort(scores, axis=axis)
    n = scores.shape[axis]
    cut = int(math.floor(0.25 * n))
    return np.take(scores, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def stratified_bootstrap_iqm(
    scores_per_task: list[np.ndarray], reps: int, rng: np.random.Generator, confidence: float = 0.95
) -> tuple[float, float, float]:
    """IQM of all runs of all tasks, with a percentile confidence interval from a stratified bootstrap.

    Each replicate resamples, within every task separately, as many runs as that task has (with
    replacement), pools them and takes the IQM; the strata keep every task's weight fixed.
    """
    point = float(interquartile_mean(np.concatenate(scores_per_task)))
    resampled = [
        task_scores[rng.integers(0, len(task_scores), size=(reps, len(task_scores)))]
        for task_scores in scores_per_task
    ]
    replicates = interquartile_mean(np.concatenate(resampled, axis=1), axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return point, float(low), float(high)


def benchmark_of(task: str, tag: str, offline: bool = False) -> str:
    """Which table a task belongs in (the paper's grouping)."""
    if tag in (FINETUNE_TAG, FINETUNE_RETURN_TAG):
        return (
            "D4RL AntMaze, online fine-tuning (Table 2)"
            if "antmaze" in task
            else "Online fine-tuning"
        )
    name = task.removeprefix("D4RL-")
    if task.startswith("dm_control-"):
        return "DeepMind Control, online (Figure 3)"
    if re.match(
        r"(halfcheetah|hopper|walker2d|ant)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v\d+$",
        name,
    ):
        return "D4RL Gym locomotion (Table 1)"
    if name.startswith("antmaze"):
        return "D4RL AntMaze (Tables 1, 2)"
    if name.startswith("kitchen"):
        return "D4RL Franka Kitchen (Table 1)"
    if re.match(r"(pen|hammer|door|relocate)-", name):
        return "D4RL Adroit (Table 3)"
    if tag == OFFLINE_TAG or offline:
        return "Other offline tasks" + ("" if tag == OFFLINE_TAG else " (returns)")
    return "Other online tasks"


def summarise(runs: list[Run], reps: int, seed: int) -> list[dict]:
    """Per benchmark: rows (task x arm) and per-arm IQM; plain dicts, also written as JSON."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(benchmark_of(run.task, run.tag, run.offline), run.tag)].append(run)
    rng = np.random.default_rng(seed)
    benchmarks = []
    for (benchmark, tag), bench_runs in sorted(groups.items()):
        cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
        for run in bench_runs:
            cells[(run.task, run.arm)].append(run)
        rows = []
        for (task, arm), cell in sorted(cells.items()):
            final = np.array([r.values[-1] for r in cell])
            best = np.array([r.values.max() for r in cell])
            final_steps = [int(r.steps[-1]) for r in cell]
            rows.append(
                {
                    "task": task,
                    "arm": arm,
                    "seeds": sorted(r.seed for r in cell),
                    "final_mean": float(final.mean()),
                    "final_std": float(final.std()),
                    "best_mean": float(best.mean()),
                    "best_std": float(best.std()),
                    "final": final.tolist(),
                    "best": best.tolist(),
                    "final_step_min": min(final_steps),
                    "final_step_max": max(final_steps),
                    "paper": [vars(p) for p in paper_scores(task, arm)],
                    "dataset": float(np.mean(data))
                    if (data := [r.dataset for r in cell if r.dataset is not None])
                    else None,
                }
            )
        iqm = []
        for arm in sorted({r["arm"] for r in rows}):
            arm_rows = [r for r in rows if r["arm"] == arm]
            entry = {
                "arm": arm,
                "tasks": len(arm_rows),
                "runs": sum(len(r["seeds"]) for r in arm_rows),
            }
            for which in ("final", "best"):
                point, low, high = stratified_bootstrap_iqm(
                    [np.array(r[which]) for r in arm_rows], reps, rng
                )
                entry[which] = {"iqm": point, "ci_low": low, "ci_high": high}
            iqm.append(entry)
        benchmarks.append({"benchmark": benchmark, "metric": tag, "rows": rows, "iqm": iqm})
    return benchmarks


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_steps(step: int) -> str:
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if step >= size:
            return f"{step / size:.3g}{suffix}"
    return str(step)


def mean_std(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def render_markdown(benchmarks: list[dict], reps: int, seed: int) -> str:
    lines = ["# Results", ""]
    for bench in benchmarks:
        metric = {
            OFFLINE_TAG: "normalised score ",
            ONLINE_TAG: "evaluation return ",
            FINETUNE_RETURN_TAG: "return during online fine-tuning ",
            FINETUNE_TAG: "normalised score during online fine-tuning ",
        }.get(bench["metric"], "")
        lines += [
            f"## {bench['benchmark']}",
            "",
            f"Metric: {metric}`{bench['metric']}`, mean ± std over seeds.",
            "",
        ]
        with_data = any(row["dataset"] is not None for row in bench["rows"])
        lines += [
            "| Task | Arm | Seeds | Steps | Final | Best |"
            + (" Dataset |" if with_data else "")
            + " Paper |",
            "|---|---|---:|---:|---:|---:|" + ("---:|" if with_data else "") + "---|",
        ]
        approximate = False
        for row in bench["rows"]:
            steps = format_steps(row["final_step_min"])
            if row["final_step_max"] != row["final_step_min"]:
                steps += f"–{format_steps(row['final_step_max'])}"
            paper = "—"
            if row["paper"]:
                approximate |= not row["paper"][0]["exact"]
                mark = "" if row["paper"][0]["exact"] else "≈ "
                paper = (
                    mark
                    + " · ".join(f"{p['method']} {p['value']}" for p in row["paper"])
                    + f" ({row['paper'][0]['source']})"
                )
            data = (
                (" —" if row["dataset"] is None else f" {row['dataset']:.1f}") + " |"
                if with_data
                else ""
            )
            lines.append(
                f"| {row['task']} | {row['arm']} | {len(row['seeds'])} | {steps} | "
                f"{mean_std(row['final_mean'], row['final_std'])} | {mean_std(row['best_mean'], row['best_std'])} |{data} {paper} |"
            )
        lines += ["", BEST_NOTE]
        if with_data:
            lines += [
                "",
                "Dataset: the mean return of the dataset's own episodes (normalised like the metric): an offline "
                "method that does not beat its data has not shown anything.",
            ]
        if bench["metric"] in (FINETUNE_TAG, FINETUNE_RETURN_TAG):
            lines += [
                "",
                "Fine-tuning rows: Final is the score after online fine-tuning; the score before it (the "
                "run's final offline evaluation) is in the offline table, row of the arm without -finetune.",
            ]
        if any(row["final_step_min"] != row["final_step_max"] for row in bench["rows"]):
            lines += [
                "",
                "Runs of different lengths: Steps gives the range of the runs' last evaluations.",
            ]
        if approximate:
            lines += [
                "",
                "≈: the paper's number is for the D4RL dataset it names; this run used another version or the Minari port of it.",
            ]
        if (
            bench["metric"] == ONLINE_TAG
            and not bench["benchmark"].startswith("DeepMind")
            and len({r["task"] for r in bench["rows"]}) > 1
        ):
            lines += [
                "",
                "Returns of different tasks are on different scales: read the IQM below with care.",
            ]
        lines += [
            "",
            f"Interquartile mean over all runs of all tasks, 95% stratified-bootstrap CI ({reps} replicates, seed {seed}):",
            "",
        ]
        lines += [
            "| Arm | Tasks | Runs | IQM final [95% CI] | IQM best [95% CI] |",
            "|---|---:|---:|---:|---:|",
        ]
        for entry in bench["iqm"]:
            cis = [
                f"{entry[w]['iqm']:.1f} [{entry[w]['ci_low']:.1f}, {entry[w]['ci_high']:.1f}]"
                for w in ("final", "best")
            ]
            lines.append(
                f"| {entry['arm']} | {entry['tasks']} | {entry['runs']} | {cis[0]} | {cis[1]} |"
            )
        if len({entry["tasks"] for entry in bench["iqm"]}) > 1:
            lines += [
                "",
                "The arms ran different sets of tasks: their IQMs are not directly comparable.",
            ]
        lines.append("")
    return "\n".join(lines)


def aligned_curves(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """(union of the runs' eval steps, values[run, step]) with NaN outside each run's own range."""
    steps = np.unique(np.concatenate([r.steps for r in runs]))
    values = np.full((len(runs), len(steps)), np.nan)
    for i, run in enumerate(runs):
        inside = (steps >= run.steps[0]) & (steps <= run.steps[-1])
        values[i, inside] = np.interp(steps[inside], run.steps, run.values)
    return steps, values


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    tasks = sorted({(benchmark_of(r.task, r.tag, r.offline), r.task) for r in runs})
    arms = sorted({r.arm for r in runs})
    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(5.0 * ncols, 6.0), 3.4 * nrows + 0.9),
        squeeze=False,
        layout="constrained",
    )
    handles = {}
    for ax, (benchmark, task) in zip(axes.flat, tasks):
        task_runs = [
            r
            for r in runs
            if r.task == task and benchmark_of(r.task, r.tag, r.offline) == benchmark
        ]
        for arm in arms:
            arm_runs = [r for r in task_runs if r.arm == arm]
            if not arm_runs:
                continue
            steps, values = aligned_curves(arm_runs)
            with np.errstate(invalid="ignore"):
                mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            # markers too: a run with a single evaluation would otherwise draw nothing
            (line,) = ax.plot(
                steps, mean, color=colors[arm], lw=1.8, marker="o", markersize=3, label=arm
            )
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.2, lw=0)
            handles[arm] = line
        tag, offline = task_runs[0].tag, task_runs[0].offline
        phase = ", fine-tuning" if tag in (FINETUNE_TAG, FINETUNE_RETURN_TAG) else ""
        ax.set_title(f"{task}{phase}  ({len({r.seed for r in task_runs})} seeds)", fontsize=10)
        xlabel = (
            "online fine-tuning env steps"
            if phase
            else "gradient steps"
            if offline
            else "env steps"
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            {
                OFFLINE_TAG: "normalised score",
                FINETUNE_TAG: "normalised score",
                ONLINE_TAG: "eval return",
                FINETUNE_RETURN_TAG: "eval return",
            }.get(tag, tag)
        )
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Evaluation during training\nline: mean over seeds; shaded: ± 1 std over seeds", fontsize=11
    )
    fig.legend(
        [handles[a] for a in arms if a in handles],
        [a for a in arms if a in handles],
        loc="outside lower center",
        ncol=min(len(handles), 7),
        frameon=False,
    )
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_atomically(path: Path, write) -> None:
    """write(tmp_path) into a temp file next to path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.tmp"
    )  # not mkstemp: that would make the file private (0600)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs_dir", type=Path, help="folder holding the run folders (searched recursively)"
    )
    parser.add_argument(
        "--out", type=Path, help="write the markdown table here (it is always printed)"
    )
    parser.add_argument("--plot", type=Path, help="write the learning curves here (PNG)")
    parser.add_argument(
        "--json", type=Path, help="write every number (per-seed scores, IQM, CIs) here as JSON"
    )
    parser.add_argument(
        "--metric",
        help=f"scalar tag to evaluate on (default: {OFFLINE_TAG} if logged, else {ONLINE_TAG})",
    )
    parser.add_argument(
        "--bootstrap-reps",
        type=int,
        default=2000,
        help="bootstrap replicates for the IQM confidence intervals",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = parser.parse_args(argv)
    if args.bootstrap_reps < 1:
        parser.exit(2, f"{PROG}: --bootstrap-reps must be at least 1, got {args.bootstrap_reps}\n")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.exit(
            2, f"{PROG}: --plot writes a PNG; give a file name ending in .png, got {args.plot}\n"
        )
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    runs = load_runs(args.runs_dir, args.metric)
    benchmarks = summarise(runs, args.bootstrap_reps, args.seed)
    markdown = render_markdown(benchmarks, args.bootstrap_reps, args.seed)
    print(markdown)
    if args.out is not None:
        write_text(args.out, markdown)
        print(f"{PROG}: table written to {args.out}")
    if args.json is not None:
        write_text(args.json, json.dumps(benchmarks, indent=1))
        print(f"{PROG}: numbers written to {args.json}")
    if args.plot is not None:
        plot_curves(runs, args.plot)
        print(f"{PROG}: learning curves written to {args.plot}")
    return benchmarks


if __name__ == "__main__":
    main()
