"""benchmark/speed.py and benchmark/parity.py: the tables built from side_by_side.sh's output and from run folders.

No timing here (speed targets live in benchmark/): the inputs are written by the tests, the figures are known.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "benchmark"))
import parity  # noqa: E402
import speed  # noqa: E402


def progress(rates):
    """Progress lines of one of our runs, one per log interval."""
    return "".join(
        f"step {100 * (i + 1)}/1000 | SPS {rate} | q_loss 0.1 | last eval - | ETA 0:00:01\n"
        for i, rate in enumerate(rates)
    )


def side_by_side_output(tmp_path, name, peer, ours, logs):
    work = tmp_path / f"work_{name}"
    work.mkdir()
    for log, rates in logs.items():
        (work / log).write_text(progress(rates) + "step 1000/1000 | eval return -150.00 +- 10.00\n")
    text = (
        f"# 2026-11-24T19:09:31Z 2 cores, load 0.51 0.84 0.87, work dir {work}\n"
        f"RESULT authors-jax offline batch=256 steps/s={peer[0]}\nRESULT xql_offline.py batch=256 steps/s={ours[0]}\n"
        f"ratio ours/peer = 0.00\n"
        f"RESULT authors-jax offline batch=1024 steps/s={peer[1]}\nRESULT xql_offline.py batch=1024 steps/s={ours[1]}\n"
        f"RESULT cleanrl algo=sac env=Pendulum-v1 seed=1 steps=10000 return_last5=-160.00 sps={peer[2]} wall_s=60\n"
        f"RESULT xsac_continuous.py SPS(median)={ours[2]} final eval: step 10000/10000 | eval return -150.0\n"
        f"RESULT cleanrl algo=td3 env=Pendulum-v1 seed=1 steps=10000 return_last5=-160.00 sps={peer[3]} wall_s=60\n"
        f"RESULT xtd3_continuous.py SPS(median)=failed final eval:\n"
    )
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    return path


def test_speed_table_ratios_and_medians(tmp_path):
    """Per run: ratios ours/peer by side_by_side's figures and by our median log interval (the first interval left out);
    a failed run reads `failed`, a missing log `n/a`. Per mode: the median ratio over the repeats and its range."""
    eager = side_by_side_output(
        tmp_path,
        "eager",
        (100, 50, 200, 300),
        (120, 55, 180, "failed"),
        {"off_256.log": [10, 110, 130, 120], "sac.log": [999, 150, 170]},
    )
    fast = side_by_side_output(
        tmp_path, "fast", (110, 40, 190, 310), (165, 60, 285, 400), {"off_256.log": [5, 160, 170]}
    )
    fast2 = side_by_side_output(tmp_path, "fast2", (100, 40, 190, 310), (130, 60, 285, 400), {})
    fast3 = side_by_side_output(tmp_path, "fast3", (100, 40, 190, 310), (140, 60, 285, 400), {})
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmark" / "speed.py"),
            "table",
            f"eager={eager}",
            f"fast={fast}",
            f"fast={fast2}",
            f"fast={fast3}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cells = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| offline") or line.startswith("| online")
    ]
    summary = {(c[0], c[1]): c[2:] for c in cells if len(c) == 5}
    runs = {(c[0], c[1]): c[2:] for c in cells if len(c) == 7}
    b256 = "offline, batch 256: authors' JAX X-QL vs xql_offline.py"
    assert runs[(b256, "eager, 1")] == [
        "100.0",
        "120.0",
        "1.20",
        "120.0",
        "1.20",
    ]  # median of 110, 130, 120
    assert runs[(b256, "fast, 2")] == ["110.0", "165.0", "1.50", "165.0", "1.50"]
    assert runs[("offline, batch 1024: authors' JAX X-QL vs xql_offline.py", "fast, 2")] == [
        "40.0",
        "60.0",
        "1.50",
        "n/a",
        "n/a",
    ]
    assert runs[("online, Pendulum-v1: CleanRL SAC vs xsac_continuous.py", "eager, 1")] == [
        "200.0",
        "180.0",
        "0.90",
        "160.0",
        "0.80",
    ]
    assert runs[("online, Pendulum-v1: CleanRL TD3 vs xtd3_continuous.py", "eager, 1")][:3] == [
        "300.0",
        "failed",
        "n/a",
    ]
    assert summary[(b256, "fast")] == [
        "3",
        "**1.40** (1.30–1.50)",
        "**1.50**",
    ]  # ratios 1.50, 1.30, 1.40; one median interval
    assert summary[(b256, "eager")] == ["1", "**1.20**", "**1.20**"]
    assert summary[("online, Pendulum-v1: CleanRL TD3 vs xtd3_continuous.py", "eager")] == [
        "1",
        "n/a",
        "n/a",
    ]
    assert "load average 0.51 0.84 0.87" in done.stdout and len(runs) == 16 and len(summary) == 8


def test_speed_table_refuses_other_files(tmp_path):
    other = tmp_path / "x.txt"
    other.write_text("hello\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "speed.py"), "table", f"eager={other}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "not an output of side_by_side.sh" in done.stderr
    assert speed.interval_rates(progress([1, 2, 3])) == [2.0, 3.0]


def write_run(runs, name, returns):
    writer = SummaryWriter(str(runs / name))
    for step, value in enumerate(returns):
        writer.add_scalar("eval/episodic_return", value, 1000 * (step + 1))
    writer.close()


def test_parity_table_and_verdicts(tmp_path):
    """Final returns per seed and mode, mean +- std, and the difference of means against its standard error."""
    runs = tmp_path / "runs"
    finals = {"eager": [-150.0, -170.0, -160.0], "fast": [-155.0, -165.0, -175.0]}
    for mode, values in finals.items():
        for seed, value in zip((1, 2, 3), values):
            write_run(runs, f"Pendulum-v1__xsac-{mode}__{seed}__17000000{seed}", [-1200.0, value])
            write_run(
                runs,
                f"pendulum-replay__xql-{mode}__{seed}__17000000{seed}",
                [-900.0 if mode == "eager" else -300.0],
            )
    write_run(
        runs, "Pendulum-v1__xsac-extra__1__1700000001", [0.0]
    )  # not an eager/fast run: ignored
    text = parity.table(parity.collect(str(runs)))
    assert "| Pendulum-v1 | xsac | 2 | -170.0 | -165.0 |" in text
    assert "| Pendulum-v1 | xsac | mean +- std | -160.0 +- 10.0 | -165.0 +- 10.0 |" in text
    assert (
        "- xsac on Pendulum-v1: fast - eager = -5.0, standard error 8.2: within seed noise" in text
    )
    assert (
        "- xql on pendulum-replay: fast - eager = +600.0, standard error 0.0: **outside seed noise**"
        in text
    )
    assert "extra" not in text
    with pytest.raises(SystemExit, match="no run folder named"):
        sys.argv = ["parity.py", str(tmp_path)]
        parity.main()
