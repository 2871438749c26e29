"""Helper of benchmark/speed.sh: reads the output of ../shared/peers/side_by_side.sh and prints one table.

    python benchmark/speed.py table MODE=FILE [MODE=FILE ...]   markdown table of ratios ours/peer (a mode may repeat)
    python benchmark/speed.py parse LOGFILE                     per-interval steps/s of one of our runs

side_by_side.sh times a peer right before our script on the same inputs and prints `RESULT` lines (the peer's
figure; ours: offline the best of our last 3 log intervals, online the median interval) and `ratio ours/peer`.
The table keeps those figures and adds, from our run's log in side_by_side's work folder, the median of our
log intervals (the first left out: warm-up and compilation), so that both rules can be read. A mode given several
times (repeats) is summarised by the median of its ratios and their range: figures on this machine swing by 20%
and more between runs minutes apart.
"""

import os
import re
import statistics
import sys

PAIRS = [  # (row label, peer's RESULT pattern, our RESULT pattern, our log in side_by_side's work folder)
    (
        "offline, batch 256: authors' JAX X-QL vs xql_offline.py",
        r"authors-jax offline batch=256 steps/s=([\d.]+)",
        r"xql_offline\.py batch=256 steps/s=([\d.]+)",
        "off_256.log",
    ),
    (
        "offline, batch 1024: authors' JAX X-QL vs xql_offline.py",
        r"authors-jax offline batch=1024 steps/s=([\d.]+)",
        r"xql_offline\.py batch=1024 steps/s=([\d.]+)",
        "off_1024.log",
    ),
    (
        "online, Pendulum-v1: CleanRL SAC vs xsac_continuous.py",
        r"cleanrl algo=sac .*? sps=([\d.]+)",
        r"xsac_continuous\.py SPS\(median\)=([\d.]+)",
        "sac.log",
    ),
    (
        "online, Pendulum-v1: CleanRL TD3 vs xtd3_continuous.py",
        r"cleanrl algo=td3 .*? sps=([\d.]+)",
        r"xtd3_continuous\.py SPS\(median\)=([\d.]+)",
        "td3.log",
    ),
]


def interval_rates(text: str) -> list[float]:
    """Per-log-interval steps/s from a script's progress lines `step N/M | SPS x | ...`, the first left out."""
    return [
        float(sps) for sps in re.findall(r"^step \d+/\d+ \| SPS ([\d.]+)", text, flags=re.M)[1:]
    ]


def read_run(path: str) -> dict:
    """One side_by_side.sh output: header (date, load, work folder) and, per pair, peer, ours and our median."""
    with open(path) as f:
        text = f.read()
    header = re.search(r"^# (\S+) (\d+) cores, load ([\d. ]+), work dir (\S+)", text, flags=re.M)
    if header is None:
        raise SystemExit(
            f"speed.py: {path} is not an output of side_by_side.sh (no '# <date> N cores' header)."
        )
    date, cores, load, work = header.groups()
    rows = {}
    for label, peer_pattern, ours_pattern, log in PAIRS:
        peer, ours = re.search(peer_pattern, text), re.search(ours_pattern, text)
        log_path = os.path.join(work, log)
        rates = interval_rates(open(log_path).read()) if os.path.exists(log_path) else []
        rows[label] = (
            float(peer.group(1)) if peer else None,
            float(ours.group(1)) if ours else None,
            statistics.median(rates) if rates else None,
        )
    return {"date": date, "cores": cores, "load": load.strip(), "rows": rows}


def ratio(ours: float | None, peer: float | None) -> str:
    return f"{ours / peer:.2f}" if ours and peer else "n/a"


def summary(ratios: list[float]) -> str:
    """Median of the repeats' ratios, and their range when there are several."""
    if not ratios:
        return "n/a"
    text = f"**{statistics.median(ratios):.2f}**"
    return text + f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else text


def table(runs: list[tuple[str, dict]]) -> str:
    """Markdown: the summary (per pair and mode, the median ratio over repeats, with side_by_side's figure for ours
    and with our median interval), then every run: peer, ours, ratio, our median interval, ratio."""
    lines = [
        f"- `{mode}` run {i}: side_by_side.sh at {run['date']}, {run['cores']} cores, load average {run['load']}"
        for i, (mode, run) in enumerate(runs, 1)
    ]
    modes = list(dict.fromkeys(mode for mode, _ in runs))
    lines += [
        "",
        "| pair | mode | runs | ours / peer (median, range) | median interval / peer |",
        "|---|---|---|---|---|",
    ]
    for label, *_ in PAIRS:
        for mode in modes:
            rows = [run["rows"][label] for m, run in runs if m == mode]
            by_rule = [ours / peer for peer, ours, _ in rows if ours and peer]
            by_median = [median / peer for peer, _, median in rows if median and peer]
            lines.append(
                f"| {label} | {mode} | {len(rows)} | {summary(by_rule)} | {summary(by_median)} |"
            )
    lines += [
        "",
        "Every run (steps/s):",
        "",
        "| pair | mode, run | peer | ours | ours / peer | ours, median interval | median / peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, *_ in PAIRS:
        for i, (mode, run) in enumerate(runs, 1):
            peer, ours, median = run["rows"][label]
            cells = [
                f"{peer:.1f}" if peer else "failed",
                f"{ours:.1f}" if ours else "failed",
                ratio(ours, peer),
                f"{median:.1f}" if median else "n/a",
                ratio(median, peer),
            ]
            lines.append(f"| {label} | {mode}, {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "table" and all("=" in arg for arg in sys.argv[2:]):
        print(
            table(
                [
                    (mode, read_run(path))
                    for mode, path in (arg.split("=", 1) for arg in sys.argv[2:])
                ]
            )
        )
    elif len(sys.argv) == 3 and sys.argv[1] == "parse":
        rates = interval_rates(open(sys.argv[2]).read())
        print(
            f"median {statistics.median(rates):.1f}, best {max(rates):.1f} over {len(rates)} intervals"
            if rates
            else "no progress lines"
        )
    else:
        raise SystemExit(
            "speed.py: usage: speed.py table MODE=FILE [MODE=FILE ...] | speed.py parse LOGFILE"
        )


if __name__ == "__main__":
    main()
