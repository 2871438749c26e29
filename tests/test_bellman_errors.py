"""benchmark/bellman_errors.py: maximum-likelihood Gumbel vs Gaussian fits on files in the online scripts' layout.

Tolerance: with n = 20000 samples the MLE's standard errors are about 0.4% (location 1.5) and 0.6%
(scale 0.7) of the true values, so 3% is more than 5 standard errors: a correct fit never fails it.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import ROOT

LOC, SCALE, N = 1.5, 0.7, 20_000
TOLERANCE = 0.03


def load_tool():
    if "bellman_errors" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "bellman_errors", ROOT / "benchmark" / "bellman_errors.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["bellman_errors"] = module
        spec.loader.exec_module(module)
    return sys.modules["bellman_errors"]


def write_run(runs_dir, name, batches):
    """A run folder as the online scripts write it with --log-bellman-errors."""
    folder = runs_dir / name / "bellman_errors"
    folder.mkdir(parents=True)
    for step, errors in batches.items():
        np.save(folder / f"step_{step:08d}.npy", errors.astype(np.float32))
    return runs_dir / name


def test_gumbel_data_recovered_and_preferred(tmp_path, capsys):
    tool = load_tool()
    rng = np.random.default_rng(0)
    run = write_run(
        tmp_path,
        "dm_control-cheetah-run-v0__xsac__1__1700000000",
        {5000: rng.gumbel(LOC, SCALE, N), 10000: rng.gumbel(LOC, SCALE, N)},
    )
    out = tmp_path / "fig.png"
    results = tool.main([str(run), "--out", str(out)])
    assert [sample.step for sample, _ in results] == [5000, 10000]
    for sample, fit in results:
        assert fit.n == N
        assert fit.gumbel_side == "r"
        assert fit.gumbel_loc == pytest.approx(LOC, rel=TOLERANCE)
        assert fit.gumbel_scale == pytest.approx(SCALE, rel=TOLERANCE)
        assert fit.gumbel_ll > fit.gaussian_ll and fit.gumbel_ll > fit.other_side_ll
        # the reported likelihood is the mean log-pdf of the data under the fitted parameters
        expected_ll = np.mean(
            -np.log(fit.gumbel_scale)
            - (z := (sample.errors - fit.gumbel_loc) / fit.gumbel_scale)
            - np.exp(-z)
        )
        assert fit.gumbel_ll == pytest.approx(expected_ll, rel=1e-9)
        assert fit.gaussian_mean == pytest.approx(
            sample.errors.mean()
        ) and fit.gaussian_std == pytest.approx(sample.errors.std())
    table = capsys.readouterr().out
    assert "5,000" in table and "10,000" in table and table.count("Gumbel\n") == 2
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_left_tail_and_gaussian_data(tmp_path):
    tool = load_tool()
    rng = np.random.default_rng(1)
    left = tool.fit_errors(-rng.gumbel(LOC, SCALE, N))
    assert left.gumbel_side == "l" and left.winner == "Gumbel"
    assert left.gumbel_loc == pytest.approx(
        -LOC, rel=TOLERANCE
    ) and left.gumbel_scale == pytest.approx(SCALE, rel=TOLERANCE)
    gaussian = tool.fit_errors(rng.normal(0.3, 2.0, N))
    assert gaussian.winner == "Gaussian" and gaussian.gaussian_ll > gaussian.gumbel_ll
    assert gaussian.gaussian_mean == pytest.approx(
        0.3, abs=0.05
    ) and gaussian.gaussian_std == pytest.approx(2.0, rel=TOLERANCE)


def test_pool_clip_and_loose_files(tmp_path):
    tool = load_tool()
    rng = np.random.default_rng(2)
    batches = {step: rng.gumbel(LOC, SCALE, 4000) for step in (5000, 10000, 15000)}
    batches[5000][:10] = 1e6  # outliers, removed by --clip
    run = write_run(tmp_path, "Hopper-v4__xtd3__3__1700000000", batches)
    out = tmp_path / "pooled.png"
    [(sample, fit)] = tool.main([str(run), "--pool", "--clip", "-10", "10", "--out", str(out)])
    assert len(sample.errors) == 3 * 4000 - 10 and sample.errors.max() <= 10
    assert "3 batches pooled" in sample.label
    assert fit.gumbel_loc == pytest.approx(LOC, rel=0.05) and fit.gumbel_scale == pytest.approx(
        SCALE, rel=0.05
    )
    [(clamped, _)] = tool.main(
        [
            str(run / "bellman_errors" / "step_00005000.npy"),
            "--clip",
            "-10",
            "10",
            "--clip-mode",
            "clamp",
            "--out",
            str(out),
        ]
    )
    assert len(clamped.errors) == 4000 and np.sum(clamped.errors == 10) == 10
    assert out.stat().st_size > 10_000


def test_user_errors(tmp_path):
    tool = load_tool()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no step_.*npy files in .*--log-bellman-errors"):
        tool.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main([str(tmp_path / "missing")])
    bad = tmp_path / "bad" / "bellman_errors"
    bad.mkdir(parents=True)
    np.save(bad / "step_00000001.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(SystemExit, match="expected a 1-D float array"):
        tool.main([str(tmp_path / "bad")])
