#!/usr/bin/env bash
# Learning parity of the fast path (issue 12): does `--compile --matmul-precision medium` (bf16 autocast) learn
# what the eager fp32 default learns? Real runs, the same seeds in both modes:
#   online:  X-SAC and X-TD3 on Pendulum-v1, 15k env steps (1000 random first), 256 wide, batch 256;
#   offline: X-QL on a Pendulum-v1 dataset made here by `xtd3_continuous.py --save-buffer` (the whole 15k-step
#            buffer of one X-TD3 run), 20k gradient steps, evaluated on Pendulum-v1 (the file's env_id).
#
#   bash benchmark/parity.sh             # ~1.5 h on a 2-core CPU (8 seeds, 2 runs at a time, 1 thread each)
#   QUICK=1 bash benchmark/parity.sh     # tiny settings: checks the pipeline, not parity
#
# Environment: PYTHON (default .venv/bin/python), OUT (runs/parity), SEEDS ("1 2 ... 8": 3 seeds cannot tell
# a drop of 100 in return), WORKERS (2), ONLINE_ARMS ("xsac xtd3").
# Writes $OUT/parity.md: each run's final return (mean of 10 evaluation episodes), the mean and spread over seeds
# per mode, and the difference of the means against its standard error.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT=${OUT:-runs/parity}
SEEDS=${SEEDS:-"1 2 3 4 5 6 7 8"}
ONLINE_ARMS=${ONLINE_ARMS:-"xsac xtd3"}
WORKERS=${WORKERS:-2}
if [ "${QUICK:-0}" = 1 ]; then
  ONLINE=(--total-timesteps 600 --learning-starts 300 --hidden-dim 32 --batch-size 32 --eval-freq 600 --eval-episodes 1 --log-freq 300)
  DATA=(--total-timesteps 800 --learning-starts 300 --hidden-dim 32 --batch-size 32 --eval-freq 800 --eval-episodes 1)
  OFFLINE=(--max-steps 300 --hidden-dim 32 --batch-size 32 --eval-freq 300 --eval-episodes 1 --log-freq 150)
else
  ONLINE=(--total-timesteps 15000 --learning-starts 1000 --hidden-dim 256 --batch-size 256 --eval-freq 5000 --eval-episodes 10 --log-freq 1000)
  DATA=(--total-timesteps 15000 --learning-starts 1000 --hidden-dim 256 --batch-size 256 --eval-freq 15000 --eval-episodes 10)
  OFFLINE=(--max-steps 20000 --hidden-dim 256 --batch-size 256 --eval-freq 5000 --eval-episodes 10 --log-freq 2500)
fi
FAST=(--compile --matmul-precision medium)
RUNS=$OUT/runs; LOGS=$OUT/logs
mkdir -p "$RUNS" "$LOGS"
export OMP_NUM_THREADS=1
start=$SECONDS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
sweep() {  # sweep NAME SCRIPT -- FLAGS...: every seed, local workers; a failed run does not stop the benchmark
  local name=$1 script=$2; shift 2
  # shellcheck disable=SC2086  # SEEDS is a word list
  "$PYTHON" benchmark/run_sweep.py --script "$script" --env-ids Pendulum-v1 --seeds $SEEDS --workers "$WORKERS" \
    --threads-per-run 1 --status-interval 300 --sweep-name "$name" --log-dir "$LOGS/$name" "$@" \
    || echo "parity: $name: some runs failed (see $LOGS/$name)"
}

echo "parity: 1/3 online, X-SAC and X-TD3 on Pendulum-v1, eager and fast"
for mode in eager fast; do
  flags=(); [ $mode = fast ] && flags=("${FAST[@]}")
  if [[ " $ONLINE_ARMS " == *" xsac "* ]]; then
    sweep "xsac-$mode" xsac_continuous.py -- --exp-name "xsac-$mode" --learning-rate 3e-4 --runs-dir "$RUNS" \
      "${ONLINE[@]}" "${flags[@]}"
  fi
  if [[ " $ONLINE_ARMS " == *" xtd3 "* ]]; then
    sweep "xtd3-$mode" xtd3_continuous.py -- --exp-name "xtd3-$mode" --runs-dir "$RUNS" "${ONLINE[@]}" "${flags[@]}"
  fi
done

echo "parity: 2/3 offline data: the replay buffer of an X-TD3 run on Pendulum-v1 (--save-buffer)"
DATASET=$OUT/pendulum-replay.hdf5
"$PYTHON" xtd3_continuous.py --env-id Pendulum-v1 --seed 100 --exp-name data --runs-dir "$OUT/data_runs" "${DATA[@]}" \
  --save-buffer "$DATASET" > "$LOGS/data.log" 2>&1 || { echo "parity: the data run failed, see $LOGS/data.log"; exit 1; }

echo "parity: 3/3 offline, X-QL on that dataset, eager and fast"
for mode in eager fast; do
  flags=(); [ $mode = fast ] && flags=("${FAST[@]}")
  # The runs are named after the file (pendulum-replay); --env-id is run_sweep's label only, so --dataset-path names it.
  "$PYTHON" benchmark/run_sweep.py --script xql_offline.py --env-ids pendulum-replay --seeds $SEEDS --workers "$WORKERS" \
    --threads-per-run 1 --status-interval 300 --sweep-name "xql-$mode" --log-dir "$LOGS/xql-$mode" -- \
    --exp-name "xql-$mode" --dataset-path "$DATASET" --runs-dir "$RUNS" "${OFFLINE[@]}" "${flags[@]}" \
    || echo "parity: xql-$mode: some runs failed (see $LOGS/xql-$mode)"
done

wall=$((SECONDS - start))
{
  echo "# Learning parity of the fast path (benchmark/parity.sh$([ "${QUICK:-0}" = 1 ] && echo ", QUICK=1"))"
  echo
  echo "Machine: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc --all) cores, no GPU;" \
       "$WORKERS runs at a time, one thread each. Load average before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Wall time: $((wall / 60)) min $((wall % 60)) s. $(date -u '+%Y-%m-%d %H:%M UTC'). Seeds: $SEEDS."
  echo "eager: the default (fp32, no compile); fast: ${FAST[*]}. Offline data: $("$PYTHON" -c "
import h5py, sys
with h5py.File(sys.argv[1]) as f:
    print(f'{len(f[\"rewards\"])} transitions of {f.attrs[\"script\"]} on {f.attrs[\"env_id\"]} ({f.attrs[\"policy\"]})')" "$DATASET")."
  echo
  "$PYTHON" benchmark/parity.py "$RUNS"
} | tee "$OUT/parity.md"
echo "parity: done in $((wall / 60)) min; table $OUT/parity.md, runs in $RUNS, logs in $LOGS"
