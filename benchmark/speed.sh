#!/usr/bin/env bash
# Speed against the peers, side by side in one run on one machine (issue 12).
#
#   bash benchmark/speed.sh                       # ~45 minutes on a quiet 2-core CPU (3 repeats)
#   REPEATS=1 MODES="eager" bash benchmark/speed.sh   # one run of one mode (~7 minutes)
#   OUT=/tmp/speed PEERS_DIR=/tmp/peers bash benchmark/speed.sh
#
# Needs `make setup` and the peers built outside the repository (../shared/peers/README.md: the authors' JAX
# X-QL and CleanRL's SAC/TD3, under $PEERS_DIR, default /tmp/peers). For each mode it runs
# ../shared/peers/side_by_side.sh all, which times a peer right before our script on the same inputs:
#   offline: the authors' Learner.update vs xql_offline.py, synthetic Hopper-shaped data, batch 256 and 1024;
#   online:  CleanRL SAC / TD3 vs xsac / xtd3_continuous.py, Pendulum-v1, 10k env steps, 256 wide, batch 256.
# Modes: eager = the default (fp32, no compile); fast = --compile --matmul-precision medium. Our runs log every
# 100 steps (--log-freq 100) so that a median over intervals exists. Modes alternate, REPEATS times (default 3):
# peers and ours swing by 20% and more between runs minutes apart, so one run decides nothing. The table (stdout
# and $OUT/speed.md) gives per pair and mode the median ratio over the repeats and its range, then every run:
# side_by_side's figures and ratio, our median interval and its ratio, the load. Run it alone.
set -euo pipefail

cd "$(dirname "$0")/.."
PEERS=${PEERS_DIR:-/tmp/peers}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-../shared/peers/side_by_side.sh}
OUT=${OUT:-$(mktemp -d /tmp/xql_speed.XXXXXX)}
MODES=${MODES:-"eager fast"}
REPEATS=${REPEATS:-3}
PYTHON=.venv/bin/python

[ -x "$PYTHON" ] || { echo "speed.sh: no .venv here; run \`make setup\` first." >&2; exit 1; }
[ -f "$SIDE_BY_SIDE" ] || { echo "speed.sh: $SIDE_BY_SIDE not found; set SIDE_BY_SIDE to the peers' side_by_side.sh." >&2; exit 1; }
if [ ! -x "$PEERS/xql/venv/bin/python" ] || [ ! -d "$PEERS/cleanrl/venv" ]; then
  echo "speed.sh: the peers are not built in $PEERS; build them as ../shared/peers/README.md says (setup.sh)." >&2
  exit 1
fi
mkdir -p "$OUT"

tables=()
for repeat in $(seq "$REPEATS"); do
  for mode in $MODES; do
    case $mode in
      eager) flags=() ;;
      fast) flags=(--compile --matmul-precision medium) ;;
      *) echo "speed.sh: unknown mode '$mode' (eager, fast)." >&2; exit 1 ;;
    esac
    echo "speed.sh: run $repeat/$REPEATS, $mode: side_by_side.sh all --log-freq 100 ${flags[*]} ..." >&2
    out="$OUT/side_by_side_${mode}_$repeat.txt"
    PEERS_DIR=$PEERS bash "$SIDE_BY_SIDE" all --log-freq 100 "${flags[@]}" | tee "$out" >&2
    tables+=("$mode=$out")
  done
done

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
{
  echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores, no GPU; torch $("$PYTHON" -c 'import torch; print(torch.__version__)')."
  echo "Ours: offline the best of our last 3 log intervals, online the median (side_by_side.sh's rules); also the"
  echo "median of our log intervals, the first (warm-up, compilation) left out. Peers: the authors' code, steps over"
  echo "time after its first (compiled) step; CleanRL, its last charts/SPS (global step / time, random phase included)."
  echo
  "$PYTHON" benchmark/speed.py table "${tables[@]}"
} | tee "$OUT/speed.md"
echo "speed.sh: table in $OUT/speed.md, side_by_side.sh outputs in $OUT" >&2
