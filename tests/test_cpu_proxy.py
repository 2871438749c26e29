"""benchmark/cpu_proxy.sh end to end in its QUICK=1 mode (tiny settings, a few minutes): every stage runs for real
(datasets made by X-SAC runs and rollouts, offline X-QL / IQL, five online arms on two DM Control tasks, the summary),
and the table, the plot and the datasets' provenance come out."""

import json
import os
import subprocess
import sys

import h5py
import pytest
from conftest import ROOT


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    out = tmp_path / "proxy"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, "WORKERS": "2"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "cpu_proxy.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "docs" / "cpu_proxy.md").read_text()
    assert (out / "docs" / "cpu_proxy.png").stat().st_size > 20_000
    assert (
        "Runs stopped by a NaN/inf loss: none." in table
        and "Runs that failed otherwise: none." in table
    )
    for section in ("## DeepMind Control, online (Figure 3)", "## Other offline tasks"):
        assert section in table
    for task in ("dm_control-cheetah-run-v0", "dm_control-cartpole-swingup-v0"):
        for arm in ("xsac", "sac", "xtd3", "xtd3-dq", "td3"):
            assert f"| {task} | {arm} | 2 | 1.2k |" in table, (task, arm)
    for dataset in ("hopper-replay", "hopper-medium", "hopper-expert"):
        for arm in ("xql", "iql"):
            assert f"| {dataset} | {arm} | 2 | 300 |" in table, (dataset, arm)
        with h5py.File(out / "data" / f"{dataset}.hdf5") as f:
            assert (
                f.attrs["env_id"] == "Hopper-v4" and "policy" in f.attrs and len(f["rewards"]) > 0
            )
    numbers = json.loads((out / "cpu_proxy.json").read_text())
    iqm_arms = {entry["arm"] for bench in numbers for entry in bench["iqm"]}
    assert {"xql", "iql", "xsac", "sac", "xtd3", "xtd3-dq", "td3"} <= iqm_arms
