"""Helper of benchmark/speed.sh: writes the synthetic dataset and reads the scripts' own SPS lines.

    python benchmark/speed.py dataset PATH [N]      synthetic D4RL-format HDF5, Hopper shapes (obs 11, act 3)
    python benchmark/speed.py parse SCRIPT LOGFILE  steps/s of one run, from its console progress lines

`parse` prints a markdown fragment `| median | best | intervals |` of the per-interval rates, leaving out
the first interval (warm-up and, with --compile, the compilation). xql_offline.py and xtd3_continuous.py print the rate of the last interval;
xsac_continuous.py prints the rate since updates began, so the interval rates are recovered from
consecutive lines (elapsed = (step - learning_starts) / SPS).
"""
import os
import re
import statistics
import sys

import numpy as np


def write_dataset(path: str, n: int = 100_000) -> None:
    """Random transitions in D4RL's layout: episodes of 1000 steps ending in a timeout, no terminals."""
    import h5py

    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[999::1000] = True
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, dtype=bool)
        f["timeouts"] = timeouts
    os.replace(tmp, path)


def interval_rates(script: str, text: str, learning_starts: int) -> list[float]:
    """Per-log-interval steps/s read from the progress lines of one run (the first interval left out)."""
    points = [(int(step), float(sps)) for step, sps in re.findall(r"step\s+(\d+)\S*\s+\|?\s*SPS\s+([\d.]+)", text)]
    if script.startswith("xsac"):
        elapsed = [(step, (step - learning_starts) / sps) for step, sps in points if sps > 0 and step > learning_starts]
        rates = [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in zip(elapsed, elapsed[1:]) if t1 > t0]
        return rates  # the first point (cumulative since updates began) is the warm-up interval, already left out
    return [sps for _, sps in points[1:]]


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "dataset":
        write_dataset(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 100_000)
    elif len(sys.argv) >= 4 and sys.argv[1] == "parse":
        with open(sys.argv[3]) as f:
            text = f.read()
        learning_starts = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        rates = interval_rates(sys.argv[2], text, learning_starts)
        print(f"| {statistics.median(rates):.1f} | {max(rates):.1f} | {len(rates)} |" if rates else "| n/a | n/a | 0 |")
    else:
        raise SystemExit("speed.py: usage: speed.py dataset PATH [N] | speed.py parse SCRIPT LOGFILE [LEARNING_STARTS]")


if __name__ == "__main__":
    main()
