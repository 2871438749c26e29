"""Learning-parity table of benchmark/parity.sh: eager against fast-path runs of the same arm and seeds.

    python benchmark/parity.py RUNS_DIR

Run folders are named `<env>__<arm>-<mode>__<seed>__<time>` (mode `eager` or `fast`). Each run's final return is
the last `eval/episodic_return` in its TensorBoard file (the mean over that evaluation's episodes). Per arm it
prints every seed's final return in both modes, the mean and standard deviation over seeds, the difference of the
means (fast - eager) and its standard error sqrt(s_e^2 / n_e + s_f^2 / n_f); a difference within 2 standard errors
is read as "within seed noise".
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys

NAME = re.compile(r"^(?P<env>.+?)__(?P<arm>.+)-(?P<mode>eager|fast)__(?P<seed>\d+)__\d+$")


def final_return(run_dir: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    if "eval/episodic_return" not in events.Tags()["scalars"]:
        return None
    return events.Scalars("eval/episodic_return")[-1].value


def collect(runs_dir: str) -> dict[tuple[str, str], dict[str, dict[int, float | None]]]:
    """{(env, arm): {mode: {seed: final return or None (no evaluation: the run failed or stopped)}}}"""
    found: dict = {}
    for name in sorted(os.listdir(runs_dir)):
        match = NAME.match(name)
        if match and os.path.isdir(os.path.join(runs_dir, name)):
            modes = found.setdefault((match["env"], match["arm"]), {"eager": {}, "fast": {}})
            modes[match["mode"]][int(match["seed"])] = final_return(os.path.join(runs_dir, name))
    return found


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"
        if len(values) > 1
        else f"{values[0]:.1f}"
    )


def table(found: dict) -> str:
    lines = ["| env | arm | seed | eager | fast |", "|---|---|---|---|---|"]
    verdicts = []
    for (env, arm), modes in found.items():
        for seed in sorted(set(modes["eager"]) | set(modes["fast"])):
            cells = [modes[mode].get(seed) for mode in ("eager", "fast")]
            lines.append(
                f"| {env} | {arm} | {seed} | "
                + " | ".join("failed" if c is None else f"{c:.1f}" for c in cells)
                + " |"
            )
        eager, fast = (
            [v for v in modes[mode].values() if v is not None] for mode in ("eager", "fast")
        )
        lines.append(f"| {env} | {arm} | mean +- std | {spread(eager)} | {spread(fast)} |")
        if len(eager) > 1 and len(fast) > 1:
            diff = statistics.mean(fast) - statistics.mean(eager)
            error = math.sqrt(
                statistics.variance(eager) / len(eager) + statistics.variance(fast) / len(fast)
            )
            within = abs(diff) <= 2 * error
            verdicts.append(
                f"- {arm} on {env}: fast - eager = {diff:+.1f}, standard error {error:.1f}: "
                + (
                    "within seed noise (|difference| <= 2 standard errors)."
                    if within
                    else "**outside seed noise** (|difference| > 2 standard errors)."
                )
            )
        else:
            verdicts.append(f"- {arm} on {env}: too few finished runs to compare.")
    return "\n".join(lines + [""] + verdicts)


def main() -> None:
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit(
            "parity.py: usage: parity.py RUNS_DIR (the runs folder of benchmark/parity.sh)"
        )
    found = collect(sys.argv[1])
    if not found:
        raise SystemExit(
            f"parity.py: no run folder named <env>__<arm>-<eager|fast>__<seed>__<time> in {sys.argv[1]}."
        )
    print(table(found))


if __name__ == "__main__":
    main()
