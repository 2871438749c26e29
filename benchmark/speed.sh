#!/usr/bin/env bash
# Steps per second of the three scripts, eager and --compile, at 256x256 networks (issue 6).
#
#   bash benchmark/speed.sh                 # ~4-6 minutes on a 2-core CPU (more while torch.compile is cold); prints a markdown table
#   QUICK=1 bash benchmark/speed.sh         # fewer steps (~2-3 minutes), noisier numbers
#   PYTHON=python OUT=/tmp/speed bash benchmark/speed.sh
#
# Offline (xql_offline.py): gradient steps/s on a fixed synthetic D4RL-format HDF5 file (Hopper shapes,
# obs 11 / act 3, 100k transitions, written by benchmark/speed.py), batch 256 and 1024.
# Online (xsac_continuous.py, xtd3_continuous.py): env steps/s on Pendulum-v1 after --learning-starts,
# one update per env step (the actor of X-TD3 every 2nd), batch 256. This includes the env step.
# The rates are the scripts' own SPS progress lines: median over log intervals, the first left out
# (warm-up, compilation); the best interval is shown too, as other processes on the machine slow some.
# The table goes to stdout and to $OUT/speed.md; the run logs stay in $OUT.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/tmp/venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT=${OUT:-$(mktemp -d /tmp/xql_speed.XXXXXX)}
mkdir -p "$OUT"
MODES=${MODES:-"eager compile"}

if [ "${QUICK:-0}" = "1" ]; then
  OFF256=1200; OFF1024=360; ONLINE=2900
else
  OFF256=4200; OFF1024=1200; ONLINE=6500
fi
STARTS=500  # --learning-starts of the online runs (random actions, no updates)

DATASET="$OUT/hopper-synthetic.hdf5"
[ -f "$DATASET" ] || "$PYTHON" benchmark/speed.py dataset "$DATASET"

rows=()
run() {  # run SCRIPT MODE BATCH ARGS...
  local script=$1 mode=$2 batch=$3
  shift 3
  local log="$OUT/${script%.py}_${mode}_b${batch}.log" flag=""
  [ "$mode" = "compile" ] && flag="--compile"
  echo "speed.sh: $script $mode batch $batch ..." >&2
  local t0=$SECONDS
  if "$PYTHON" "$script" $flag --no-cuda --runs-dir "$OUT/runs" --batch-size "$batch" --hidden-dim 256 "$@" >"$log" 2>&1; then
    local sps
    sps=$("$PYTHON" benchmark/speed.py parse "$script" "$log")
  else
    sps="| failed, see $log | | |"
  fi
  echo "speed.sh:   $sps median | best | intervals, steps/s ($((SECONDS - t0)) s wall)" >&2
  rows+=("| \`$script\` | $mode | $batch $sps")
}

load_before=$(uptime | sed 's/.*load average: //')
for mode in $MODES; do
  run xql_offline.py "$mode" 256 --env-id hopper-medium-v2 --dataset-path "$DATASET" \
    --max-steps "$OFF256" --log-freq $((OFF256 / 6)) --eval-freq 0 --eval-episodes 1
  run xql_offline.py "$mode" 1024 --env-id hopper-medium-v2 --dataset-path "$DATASET" \
    --max-steps "$OFF1024" --log-freq $((OFF1024 / 6)) --eval-freq 0 --eval-episodes 1
  run xsac_continuous.py "$mode" 256 --env-id Pendulum-v1 --total-timesteps "$ONLINE" \
    --learning-starts "$STARTS" --log-freq $(((ONLINE - STARTS) / 6)) --eval-freq 1000000 --eval-episodes 1
  run xtd3_continuous.py "$mode" 256 --env-id Pendulum-v1 --total-timesteps "$ONLINE" \
    --learning-starts "$STARTS" --log-freq $(((ONLINE - STARTS) / 6)) --eval-freq 1000000 --eval-episodes 1
done
load_after=$(uptime | sed 's/.*load average: //')

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
threads=$("$PYTHON" -c "import torch; print(torch.get_num_threads(), torch.__version__)")
{
  echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores, no GPU used (\`--no-cuda\`); torch ${threads#* } with ${threads%% *} threads."
  echo "Load average (1/5/15 min) before: $load_before; after: $load_after. $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "Offline: gradient steps/s on a synthetic Hopper-shaped HDF5 file ($OFF256 / $OFF1024 steps)."
  echo "Online: env steps/s on Pendulum-v1 with one update per env step ($ONLINE steps, updates from $STARTS)."
  echo
  echo "| script | mode | batch | steps/s (median) | best interval | intervals |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT/speed.md"
echo "speed.sh: table in $OUT/speed.md, logs in $OUT" >&2
