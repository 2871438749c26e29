"""benchmark/speed.py and benchmark/parity.py: the tables built from speed.sh's results and from run folders.

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


def write_results(path, rows):
    path.write_text("".join(f"{name}\t{steps}\t{wall}\t0.5\n" for name, steps, wall in rows))
    return path


def table_cells(path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "speed.py"), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()[2:]]
    return {(r[0].strip(), r[1].strip(), r[2].strip()): [c.strip() for c in r[3:]] for r in rows}


def test_speed_table_rates_ratios_and_goals(tmp_path):
    """steps / wall seconds, ratios against the peer of the same mode and repeat, the median and the
    range over repeats, and each goal met or not by the worst repeat (figures by hand)."""
    rows = [
        ("authors_offline_b256_eager_r1", 3000, 30.0),  # 100 steps/s
        ("ours_offline_b256_eager_r1", 3000, 25.0),  # 120: 1.20
        ("authors_offline_b256_eager_r2", 3000, 20.0),  # 150
        ("ours_offline_b256_eager_r2", 3000, 30.0),  # 100: 0.67
        ("authors_offline_b256_eager_r3", 3000, 30.0),  # 100
        ("ours_offline_b256_eager_r3", 3000, 27.0),  # 111.1: 1.11
        ("cleanrl_sac_fast_r1", 10000, 100.0),  # 100
        ("sbx_sac_fast_r1", 10000, 50.0),  # 200
        ("ours_sac_fast_r1", 10000, 62.5),  # 160: 1.60 and 0.80
    ]
    cells = table_cells(write_results(tmp_path / "results.tsv", rows))
    b256 = cells[("offline X-QL, batch 256", "authors' JAX", "eager")]
    assert b256 == [
        "100.0, 150.0, 100.0",
        "120.0, 100.0, 111.1",
        "1.11 (0.67-1.20)",
        ">= 1.0: NOT met",
    ]
    assert cells[("X-SAC, Pendulum-v1", "CleanRL SAC", "fast")] == [
        "100.0",
        "160.0",
        "1.60",
        ">= 1.5: met",
    ]
    assert cells[("X-SAC, Pendulum-v1", "SBX SAC", "fast")] == [
        "200.0",
        "160.0",
        "0.80",
        ">= 1.5: NOT met",
    ]
    assert len(cells) == 3  # pairs without both programs are left out


def test_speed_table_without_arguments_says_how_to_call_it():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "speed.py")], capture_output=True, text=True
    )
    assert done.returncode != 0 and "speed.py RESULTS_TSV" in done.stderr
    assert speed.summary([1.0, 2.0, 4.0]) == "2.00 (1.00-4.00)" and speed.summary([]) == "n/a"


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
