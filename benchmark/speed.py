"""Helper of benchmark/speed.sh: the table of steps/s and ratios ours/peer from its results.tsv.

    python benchmark/speed.py RESULTS_TSV

Each row of results.tsv is `NAME  STEPS  WALL_SECONDS  LOAD`, NAME as speed.sh writes it:
`{program}_{pair}_{mode}_r{repeat}`, e.g. `authors_offline_b256_eager_r1`, `sbx_td3_fast_r2`,
`ours_sac_eager_r1`. Rates are steps / wall seconds. A ratio compares ours with the peer run right
before it (same mode, same repeat); over repeats the table gives the median ratio and its range.
Goals (issue 20): eager >= 1.0 against the authors' code and CleanRL; fast >= 1.5 against every
peer, SBX included.
"""

import statistics
import sys

# pair -> (label, [(peer, peer's label)], our program's label)
PAIRS = {
    "offline_b256": ("offline X-QL, batch 256", [("authors", "authors' JAX")], "xql_offline.py"),
    "offline_b1024": ("offline X-QL, batch 1024", [("authors", "authors' JAX")], "xql_offline.py"),
    "sac": ("X-SAC, Pendulum-v1", [("cleanrl", "CleanRL SAC"), ("sbx", "SBX SAC")], "xsac"),
    "td3": ("X-TD3, Pendulum-v1", [("cleanrl", "CleanRL TD3"), ("sbx", "SBX TD3")], "xtd3"),
}
GOALS = {"eager": {"authors": 1.0, "cleanrl": 1.0}, "fast": {"authors": 1.5, "cleanrl": 1.5}}
GOALS["fast"]["sbx"] = 1.5


def read(path: str) -> dict:
    """{(program, pair, mode, repeat): (steps/s, load)}."""
    rates = {}
    for line in open(path):
        if not line.strip():
            continue
        name, steps, wall, load = line.split("\t")
        program, rest = name.split("_", 1)
        pair, mode, repeat = rest.rsplit("_", 2)
        rates[(program, pair, mode, repeat)] = (int(steps) / float(wall), float(load))
    return rates


def summary(ratios: list[float]) -> str:
    if not ratios:
        return "n/a"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def table(rates: dict) -> str:
    modes = sorted({key[2] for key in rates}, key=["eager", "fast"].index)
    repeats = sorted({key[3] for key in rates})
    lines = ["| pair | peer | mode | peer steps/s | ours steps/s | ratio ours/peer | goal |"]
    lines.append("|---|---|---|---|---|---|---|")
    for pair, (label, peers, _) in PAIRS.items():
        for peer, peer_label in peers:
            for mode in modes:
                rows = [
                    (rates.get((peer, pair, mode, r)), rates.get(("ours", pair, mode, r)))
                    for r in repeats
                ]
                rows = [(p, o) for p, o in rows if p and o]
                if not rows:
                    continue
                ratios = [o[0] / p[0] for p, o in rows]
                goal = GOALS.get(mode, {}).get(peer)
                met = (
                    ""
                    if goal is None
                    else f">= {goal}: {'met' if min(ratios) >= goal else 'NOT met'}"
                )
                peer_rates = ", ".join(f"{p[0]:.1f}" for p, _ in rows)
                our_rates = ", ".join(f"{o[0]:.1f}" for _, o in rows)
                lines.append(
                    f"| {label} | {peer_label} | {mode} | {peer_rates} | {our_rates} | {summary(ratios)} | {met} |"
                )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().split("\n\n")[1].strip())
    print(table(read(sys.argv[1])))


if __name__ == "__main__":
    main()
