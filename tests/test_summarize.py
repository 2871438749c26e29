"""benchmark/summarize.py on event files written by real TensorBoard writers.

The numbers in the table are checked against values computed here, independently, from the values
the test itself logged (numpy means, scipy's trimmed mean for the IQM).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from conftest import ROOT
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

TASKS = ("hopper-medium-v2", "walker2d-medium-v0")  # a Table 1 name, and another version of one
ARMS = ("iql", "xql")
SEEDS = (1, 2, 3)
EVAL_EVERY = 500


def load_summarize():
    if "summarize" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "summarize", ROOT / "benchmark" / "summarize.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["summarize"] = module
        spec.loader.exec_module(module)
    return sys.modules["summarize"]


def write_run(runs_dir, task, arm, seed, unix_time, steps, values, tag="eval/normalized_score"):
    run_dir = runs_dir / f"{task}__{arm}__{seed}__{unix_time}"
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n|seed|%d|" % seed)
    for step, value in zip(steps, values):
        writer.add_scalar("losses/q_loss", 1.0 / (step + 1), step)
        if tag is not None:
            writer.add_scalar(tag, value, step)
    writer.close()
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 tasks x 2 arms x 3 seeds, plus a run with no evaluation, a restart, and a badly named folder."""
    runs_dir = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    logged = {}
    for t, task in enumerate(TASKS):
        for a, arm in enumerate(ARMS):
            for seed in SEEDS:
                # iql / seed 3 / walker is shorter: the runs have different lengths
                n_evals = 3 if (task, arm, seed) == (TASKS[1], "iql", 3) else 5
                steps = [EVAL_EVERY * (i + 1) for i in range(n_evals)]
                # float32 on purpose: TensorBoard stores float32, so these are exactly the stored values
                values = (10 * t + 20 * a + 5 * seed + rng.uniform(0, 30, n_evals)).astype(
                    np.float32
                )
                write_run(runs_dir, task, arm, seed, 1_700_000_000, steps, values)
                logged[(task, arm, seed)] = values.astype(np.float64)
    # an older attempt of the same (task, arm, seed): the newer run above must win
    write_run(runs_dir, TASKS[0], "xql", 1, 1_600_000_000, [500, 1000], [999.0, 999.0])
    write_run(
        runs_dir, TASKS[0], "td3", 1, 1_700_000_000, [100, 200], [0.0, 0.0], tag=None
    )  # no eval yet
    write_run(runs_dir, "not-a-run-folder", "x", 0, 1, [1], [1.0]).rename(runs_dir / "scratch")
    return runs_dir, logged


@pytest.fixture(scope="module")
def summary(sweep, tmp_path_factory):
    runs_dir, logged = sweep
    out = tmp_path_factory.mktemp("out")
    summarize = load_summarize()
    args = [
        str(runs_dir),
        "--out",
        str(out / "table.md"),
        "--plot",
        str(out / "curves.png"),
        "--json",
        str(out / "numbers.json"),
        "--bootstrap-reps",
        "500",
        "--seed",
        "3",
    ]
    summarize.main(args)
    return out, logged, args


def test_table_numbers_match_independent_computation(summary):
    out, logged, _ = summary
    table = (out / "table.md").read_text()
    for task in TASKS:
        for arm in ARMS:
            final = np.array([logged[(task, arm, s)][-1] for s in SEEDS])
            best = np.array([logged[(task, arm, s)].max() for s in SEEDS])
            cells = (
                f"| {task} | {arm} | 3 | ",
                f" | {final.mean():.1f} ± {np.std(final):.1f} | {best.mean():.1f} ± {np.std(best):.1f} | ",
            )
            row = [line for line in table.splitlines() if line.startswith(cells[0])]
            assert len(row) == 1, (cells[0], table)
            assert cells[1] in row[0], (cells[1], row[0])
    # the restart's 999 and the eval-less td3 run are not in the table
    assert "999" not in table and "| td3 |" not in table
    # paper numbers: exact for the D4RL name the paper uses, approximate for another version
    assert "| X-QL 71.1 · X-QL-T 74.2 (Table 1) |" in table and "| IQL 66.3 (Table 1) |" in table
    assert (
        "| ≈ X-QL 81.5 · X-QL-T 84.2 (Table 1) |" in table and "| ≈ IQL 78.3 (Table 1) |" in table
    )
    assert "overestimates" in table  # the note about best-over-training
    assert "| 1.5k–2.5k |" in table  # walker/iql: runs of different lengths


def test_iqm_matches_scipy_trimmed_mean_and_ci_is_sane(summary):
    out, logged, _ = summary
    numbers = json.loads((out / "numbers.json").read_text())
    assert [bench["benchmark"] for bench in numbers] == ["D4RL Gym locomotion (Table 1)"]
    table = (out / "table.md").read_text()
    for entry in numbers[0]["iqm"]:
        arm = entry["arm"]
        # IQM over all 6 runs (2 tasks x 3 seeds) of the arm
        final = np.array([logged[(task, arm, s)][-1] for task in TASKS for s in SEEDS])
        best = np.array([logged[(task, arm, s)].max() for task in TASKS for s in SEEDS])
        for which, scores in (("final", final), ("best", best)):
            expected = stats.trim_mean(scores, 0.25)
            assert entry[which]["iqm"] == pytest.approx(expected, rel=1e-12)
            assert scores.min() <= entry[which]["ci_low"] <= entry[which]["ci_high"] <= scores.max()
        expected = stats.trim_mean(final, 0.25)
        ci = f"{entry['final']['ci_low']:.1f}, {entry['final']['ci_high']:.1f}"
        assert f"| {arm} | 2 | 6 | {expected:.1f} [{ci}] |" in table


def test_iqm_pools_tasks_and_bootstrap_is_stratified():
    summarize = load_summarize()
    rng = np.random.default_rng(1)
    tasks = [rng.normal(loc, 1.0, size=n) for loc, n in ((0.0, 4), (3.0, 7), (10.0, 5))]
    point, low, high = summarize.stratified_bootstrap_iqm(tasks, 4000, np.random.default_rng(0))
    assert point == pytest.approx(stats.trim_mean(np.concatenate(tasks), 0.25), rel=1e-12)
    # an independent, loop-based stratified bootstrap with another seed gives the same interval
    other = np.random.default_rng(123)
    replicates = [
        stats.trim_mean(np.concatenate([t[other.integers(0, len(t), len(t))] for t in tasks]), 0.25)
        for _ in range(4000)
    ]
    ref_low, ref_high = np.quantile(replicates, [0.025, 0.975])
    width = ref_high - ref_low
    assert abs(low - ref_low) < 0.15 * width and abs(high - ref_high) < 0.15 * width
    # stratified: tasks whose runs all agree leave nothing to resample, so the interval collapses
    constant = [np.full(3, 1.0), np.full(3, 5.0), np.full(2, 9.0)]
    point, low, high = summarize.stratified_bootstrap_iqm(constant, 200, np.random.default_rng(0))
    assert low == high == point == pytest.approx(stats.trim_mean(np.concatenate(constant), 0.25))


def test_bootstrap_seed_makes_table_reproducible(summary, sweep, tmp_path):
    out, _, args = summary
    summarize = load_summarize()
    again = tmp_path / "again.md"
    summarize.main(
        [sweep[0].as_posix(), "--out", str(again), "--bootstrap-reps", "500", "--seed", "3"]
    )
    assert again.read_text() == (out / "table.md").read_text()


def test_curves_png_written(summary):
    out, _, _ = summary
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_warnings_for_skipped_runs(sweep, tmp_path, capsys):
    summarize = load_summarize()
    summarize.main([str(sweep[0]), "--bootstrap-reps", "10"])
    err = capsys.readouterr().err
    assert "hopper-medium-v2__td3__1__1700000000: no evaluation yet" in err
    assert "keeping hopper-medium-v2__xql__1__1700000000" in err
    assert "scratch" in err and "is not {env_id}__{exp_name}__{seed}__{unix_time}" in err


def test_online_runs_use_eval_return(tmp_path):
    summarize = load_summarize()
    for seed in (1, 2):
        write_run(
            tmp_path,
            "dm_control-cheetah-run-v0",
            "xsac",
            seed,
            1_700_000_000,
            [5000, 10000],
            [100.0 * seed, 300.0 * seed],
            tag="eval/episodic_return",
        )
    benchmarks = summarize.main([str(tmp_path), "--bootstrap-reps", "10"])
    assert benchmarks[0]["benchmark"].startswith("DeepMind Control")
    assert (
        benchmarks[0]["rows"][0]["final_mean"] == 450.0
        and benchmarks[0]["rows"][0]["best_std"] == 150.0
    )


def test_user_errors_are_one_line(tmp_path):
    summarize = load_summarize()
    with pytest.raises(SystemExit, match="no TensorBoard event files under"):
        summarize.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        summarize.main([str(tmp_path / "missing")])
    write_run(tmp_path, "hopper-medium-v2", "xql", 0, 1, [1, 2], [0.0, 1.0], tag=None)
    with pytest.raises(SystemExit, match="has an evaluation yet"):
        summarize.main([str(tmp_path)])


def test_paper_name_matching():
    summarize = load_summarize()
    paper = sys.modules["paper_results"]
    assert paper.lookup("hopper-medium-v2") == ("hopper-medium-v2", True)
    assert paper.lookup("D4RL/pen/human-v2") == ("pen-human-v0", False)  # Minari port
    assert paper.lookup("D4RL-antmaze-medium-play-v1") == ("antmaze-medium-play-v0", False)
    assert paper.lookup("mujoco-hopper-medium-v0") is None  # Minari's own data, not D4RL's
    assert paper.lookup("dm_control-cheetah-run-v0") is None
    assert [
        (p.method, p.value, p.source)
        for p in paper.paper_scores("antmaze-large-diverse-v0", "xql-finetune")
    ] == [("X-QL-T", "49 → 82.1", "Table 2")]
    assert [p.value for p in paper.paper_scores("antmaze-umaze-diverse-v0", "xql")] == [
        "57.75",
        "82",
    ]
    assert paper.paper_scores("hopper-medium-v2", "xsac") == []
    assert summarize.benchmark_of("D4RL-kitchen-mixed-v2", summarize.OFFLINE_TAG).startswith(
        "D4RL Franka Kitchen"
    )


def test_finetuning_runs_get_their_own_rows(tmp_path):
    """xql_offline.py --online-steps logs finetune/normalized_score: a Table 2 row beside the offline one."""
    summarize = load_summarize()
    for seed in (1, 2):
        run_dir = write_run(
            tmp_path,
            "antmaze-umaze-v0",
            "xql-t",
            seed,
            1_700_000_000,
            [1000, 2000],
            [80.0 + seed, 90.0 + seed],
        )
        writer = SummaryWriter(str(run_dir))
        for step, value in ((500, 95.0), (1000, 97.0 + seed)):
            writer.add_scalar("finetune/normalized_score", value, step)
        writer.close()
    out = tmp_path / "out"
    benchmarks = summarize.main(
        [
            str(tmp_path),
            "--out",
            str(out / "t.md"),
            "--plot",
            str(out / "c.png"),
            "--bootstrap-reps",
            "10",
        ]
    )
    by_name = {b["benchmark"]: b for b in benchmarks}
    offline = by_name["D4RL AntMaze (Tables 1, 2)"]["rows"][0]
    finetune = by_name["D4RL AntMaze, online fine-tuning (Table 2)"]["rows"][0]
    assert (offline["arm"], offline["final_mean"]) == ("xql-t", 91.5)
    assert (finetune["arm"], finetune["final_mean"], finetune["final_step_max"]) == (
        "xql-t-finetune",
        98.5,
        1000,
    )
    table = (out / "t.md").read_text()
    assert "| X-QL-T 93.8 (Table 1) |" in table and "| X-QL-T 93.8 → 99.6 (Table 2) |" in table
    assert (out / "c.png").stat().st_size > 20_000


def test_offline_runs_without_reference_scores_and_dataset_column(tmp_path):
    """An xql_offline.py run on data of one's own logs raw eval returns and charts/actor_lr: it is grouped as offline
    (x axis: gradient steps) and its results.json's dataset_return fills the Dataset column."""
    summarize = load_summarize()
    for seed in (1, 2):
        run_dir = write_run(
            tmp_path,
            "hopper-replay",
            "xql",
            seed,
            1_700_000_000,
            [500, 1000],
            [100.0 * seed, 200.0 * seed],
            tag="eval/episodic_return",
        )
        writer = SummaryWriter(str(run_dir))
        writer.add_scalar("charts/actor_lr", 3e-4, 500)
        writer.close()
        (run_dir / "results.json").write_text(
            json.dumps({"dataset_return": 50.0 + seed, "dataset_normalized_score": None})
        )
    out = tmp_path / "out"
    benchmarks = summarize.main(
        [str(tmp_path), "--out", str(out / "t.md"), "--bootstrap-reps", "10"]
    )
    assert [b["benchmark"] for b in benchmarks] == ["Other offline tasks (returns)"]
    row = benchmarks[0]["rows"][0]
    assert (row["final_mean"], row["dataset"]) == (300.0, 51.5)
    table = (out / "t.md").read_text()
    assert "| Task | Arm | Seeds | Steps | Final | Best | Dataset | Paper |" in table
    assert "| hopper-replay | xql | 2 | 1k | 300.0 ± 100.0 | 300.0 ± 100.0 | 51.5 | — |" in table


def test_plot_draws_runs_with_a_single_evaluation(tmp_path):
    """One evaluation per run is one point per line: the panel must still show it (markers, not only lines)."""
    from matplotlib.image import imread

    summarize = load_summarize()
    for seed in (1, 2, 3):
        write_run(
            tmp_path,
            "Pendulum-v1",
            "xtd3",
            seed,
            1_700_000_000,
            [10_000],
            [-150.0 - seed],
            tag="eval/episodic_return",
        )
    summarize.main([str(tmp_path), "--plot", str(tmp_path / "c.png"), "--bootstrap-reps", "10"])
    pixels = imread(tmp_path / "c.png")[..., :3]
    panel = pixels[: int(0.75 * len(pixels))]  # above the legend, which sits below the panel
    blue = np.array([31, 119, 180]) / 255  # tab10's first colour, the only arm
    assert (np.abs(panel - blue).max(axis=-1) < 0.05).sum() > 10  # the point is drawn
