"""benchmark/against_authors.sh: the authors' code (Div99/XQL) against ours.

The table writer is tested on runs made up here (always). The whole pipeline runs in its QUICK=1
mode (a few minutes: their code built in the cache, every arm on both sides, the table) only where
their code is available: XQL_GIT_DIR names a bare copy of Div99/XQL, or the cache already holds the
exported source and both venvs. Elsewhere it is skipped with that reason.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT


def load_benchmark(stem: str):
    """Import benchmark/<stem>.py by path (its drivers are imported by it the same way)."""
    spec = importlib.util.spec_from_file_location(stem, ROOT / "benchmark" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


against_authors = load_benchmark("against_authors")

COMMIT = "dff09afb893fe782be259c2420903f8dfb50ef2c"
CACHE = Path(
    os.environ.get("CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xql" / "against_authors"
)
ARMS = ["offline/xql", "offline/iql", "online/xsac", "online/sac", "online/xtd3"]


def authors_code_available() -> str | None:
    """None if the pipeline can run here, else why not."""
    git_dir = os.environ.get("XQL_GIT_DIR")
    if git_dir:
        return None if os.path.isdir(git_dir) else f"XQL_GIT_DIR={git_dir} is not a folder"
    built = [CACHE / "src" / COMMIT / ".complete", CACHE / "venv-offline" / ".pins"]
    built.append(CACHE / "venv-online" / ".pins")
    if all(path.exists() for path in built):
        return None
    return (
        "the authors' code is not available: set XQL_GIT_DIR to a bare copy of github:Div99/XQL "
        f"(or build the cache {CACHE} once with benchmark/against_authors.sh)"
    )


def test_standard_errors_of_each_side_and_of_the_difference():
    result = against_authors.compare([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert result["authors_mean"] == 2.0 and result["ours_mean"] == 4.0
    assert math.isclose(result["authors_se"], 1 / math.sqrt(3))
    assert math.isclose(result["ours_se"], 2 / math.sqrt(3))
    assert math.isclose(result["diff"], 2.0)
    assert math.isclose(result["diff_se"], math.sqrt(5 / 3))
    assert result["verdict"] == "within 2 SE"
    far = against_authors.compare([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])
    assert far["verdict"] == "ours higher by more than 2 SE"
    assert against_authors.compare([1.0], [2.0])["verdict"] == "one seed: no error bar"
    assert against_authors.compare([], [2.0])["verdict"] == "missing runs"


def test_dataset_rewards_scaled_by_the_authors_rule(tmp_path):
    """Rows as d4rl.qlearning_dataset keeps them, episodes as IQL cuts them: x 1000 / (30 - 5)."""
    obs = np.arange(8, dtype=np.float32).reshape(8, 1)
    rewards = np.array([1, 4, 5, 0, 10, 10, 10, 0], dtype=np.float32)
    terminals = np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    timeouts = np.array([0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    src, dst = tmp_path / "in.hdf5", tmp_path / "out.hdf5"
    with h5py.File(src, "w") as f:
        columns = {"observations": obs, "actions": obs, "rewards": rewards}
        for key, value in (columns | {"terminals": terminals, "timeouts": timeouts}).items():
            f[key] = value
    # qlearning rows: 0, 1, 3, 4, 5, 6 (rows 2 and 7 end in a timeout); episodes {0, 1} (row 3
    # does not follow row 1's next observation, row 2) and {3, 4, 5, 6} (a terminal): returns 5, 30
    scale = against_authors.prepare_dataset(str(src), str(dst), "returns")
    assert math.isclose(scale, 1000 / 25)
    with h5py.File(dst) as f:
        assert np.allclose(f["rewards"][()], rewards * 1000 / 25)
        assert np.array_equal(f["observations"][()], obs)
    assert against_authors.prepare_dataset(str(src), str(dst), "none") == 1.0


def write_fake_run(run_dir: Path) -> None:
    """A run folder as against_authors.sh leaves it, with made-up evaluations for every arm."""
    settings = {
        "quick": True,
        "offline": {
            "steps": 600,
            "eval_freq": 300,
            "eval_episodes": 2,
            "batch": 256,
            "beta": 2.0,
            "clip": 7.0,
            "expectile": 0.7,
            "awr_temperature": 3.0,
            "eval_env": "Hopper-v4",
            "reward_norm": "returns",
            "reward_scale": 0.5,
            "dataset_name": "d.hdf5",
            "dataset_about": "made up",
            "dataset_recipe": "none",
            "seeds": "1 2",
        },
        "online": {
            "task": "cartpole-swingup",
            "steps": 2000,
            "random_steps": 1000,
            "eval_freq": 1000,
            "eval_episodes": 1,
            "hidden": 64,
            "batch": 64,
            "lr_sac": "1e-4",
            "lr_td3": "1e-3",
            "beta_sac": "1",
            "beta_td3": "1",
            "clip_sac": "10",
            "clip_td3": "8",
            "seeds": "1 2",
        },
    }
    meta = {
        "commit": COMMIT,
        "source": "made up",
        "ours_commit": "abc",
        "machine": "test",
        "jobs": 1,
        "load_before": "0 0 0",
        "load_after": "0 0 0",
        "wall_s": 60.0,
        "started": "then",
        "finished": "now",
        "command": "test",
        "venvs": {},
    }
    (run_dir / "jobs").mkdir(parents=True)
    (run_dir / "settings.json").write_text(json.dumps(settings))
    (run_dir / "meta.json").write_text(json.dumps(meta))
    for arm in ("xql", "iql"):
        for seed in (1, 2):
            theirs = run_dir / "jobs" / f"offline__{arm}__authors__{seed}"
            theirs.mkdir()
            evaluations = [[300, 10.0 + seed], [600, 20.0 + seed]]
            (theirs / "result.json").write_text(json.dumps({"evaluations": evaluations}))
            ours = run_dir / "jobs" / f"offline__{arm}__ours__{seed}" / "runs" / "r"
            ours.mkdir(parents=True)
            rows = [[300, 11.0, None], [600, 21.0 + seed, None]]
            (ours / "results.json").write_text(json.dumps({"evaluations": rows}))
    for arm in ("xsac", "sac", "xtd3"):
        for seed in (1, 2):
            theirs = run_dir / "jobs" / f"online__{arm}__authors__{seed}"
            theirs.mkdir()
            rows = [[1000, 3.0, 0.0], [2000, 4.0 + seed, 0.0]]
            (theirs / "result.json").write_text(json.dumps({"evaluations": rows}))
            ours = run_dir / "jobs" / f"online__{arm}__ours__{seed}"
            ours.mkdir()
            (ours / "log.txt").write_text(
                "step 1000/2000 | SPS 90 | q_loss 1 | last eval - | ETA 0:00:10\n"
                "step 1000/2000 | eval return 3.50 +- 0.00\n"
                f"step 2000/2000 | eval return {5.0 + seed:.2f} +- 0.00\n"
            )


def test_table_from_a_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir)
    out = tmp_path / "table.md"
    summary = against_authors.write_page(str(run_dir), str(out), None, str(tmp_path / "s.json"))
    assert sorted(summary["arms"]) == sorted(ARMS)
    offline = summary["arms"]["offline/xql"]
    assert offline["finals"] == {"authors": [21.0, 22.0], "ours": [22.0, 23.0]}
    assert math.isclose(offline["diff"], 1.0) and math.isclose(offline["diff_se"], math.sqrt(0.5))
    assert summary["arms"]["online/sac"]["finals"] == {"authors": [5.0, 6.0], "ours": [6.0, 7.0]}
    table = out.read_text()
    assert "| offline | xql |" in table and "| online | xtd3 |" in table
    assert "| xsac | 2 | ours | 3.5 | 7.0 |" in table  # the curve of one seed
    for name, _ in against_authors.offline_patches() + against_authors.online_patches():
        assert f"`{name}`" in table
    assert "Runs without an evaluation (failed): none." in table


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    why = authors_code_available()
    if why:
        pytest.skip(why)
    run_dir, out = tmp_path / "run", tmp_path / "against_authors.md"
    env = {
        **os.environ,
        "QUICK": "1",
        "RUN_DIR": str(run_dir),
        "OUT": str(out),
        "PYTHON": sys.executable,
        "JOBS": os.environ.get("JOBS", "2"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "against_authors.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for arm in ARMS:
        result = summary["arms"][arm]
        assert result["n_authors"] == 1 and result["n_ours"] == 1, arm
        assert result["authors_mean"] is not None and result["ours_mean"] is not None, arm
        assert all(math.isfinite(x) for x in (result["authors_mean"], result["ours_mean"])), arm
    table = out.read_text()
    assert "QUICK=1" in table and "Runs without an evaluation (failed): none." in table
    for arm in ARMS:
        for side in ("authors", "ours"):
            assert f"| {arm.split('/')[1]} | 1 | {side} |" in table, (arm, side)
