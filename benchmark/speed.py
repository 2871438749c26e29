"""Helper of benchmark/speed.sh: writes the synthetic dataset and reads the scripts' own SPS lines.

    python benchmark/speed.py dataset PATH [N]      synthetic D4RL-format HDF5, Hopper shapes (obs 11, act 3)
    python benchmark/speed.py parse SCRIPT LOGFILE  steps/s of one run, from its console progress lines

`parse` prints a markdown fragment `| median | best | intervals |` of the per-interval rates (every script
prints the rate of its last log interval), leaving out the first interval (warm-up and, with --compile,
the compilation).
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


def interval_rates(text: str) -> list[float]:
    """Per-log-interval steps/s read from the progress lines of one run (the first interval left out)."""
    return [float(sps) for sps in re.findall(r"step\s+\d+\S*\s+\|?\s*SPS\s+([\d.]+)", text)[1:]]


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "dataset":
        write_dataset(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 100_000)
    elif len(sys.argv) >= 4 and sys.argv[1] == "parse":
        with open(sys.argv[3]) as f:
            text = f.read()
        rates = interval_rates(text)
        print(f"| {statistics.median(rates):.1f} | {max(rates):.1f} | {len(rates)} |" if rates else "| n/a | n/a | 0 |")
    else:
        raise SystemExit("speed.py: usage: speed.py dataset PATH [N] | speed.py parse SCRIPT LOGFILE")


if __name__ == "__main__":
    main()
