#!/usr/bin/env bash
# Speed per core against the peers, side by side in one run on one machine (issues 12, 20).
#
#   bash benchmark/speed.sh                  # THREADS=1: one thread per program, as sweeps run
#   THREADS=2 bash benchmark/speed.sh        # two threads per program
#   REPEATS=2 MODES="eager fast" PAIRS="offline online" OUT=/tmp/speed bash benchmark/speed.sh
#
# Needs `make setup` and the peers built outside the repository under $PEERS_DIR (default /tmp/peers)
# by ../shared/peers/setup.sh: the authors' JAX X-QL, CleanRL's SAC/TD3 and SBX (Stable-Baselines3 in
# JAX). None of their code is here; their own scripts run unmodified.
#
# One counting rule for every program: steps divided by the wall-clock seconds of its whole process
# (start-up, imports, JIT or torch.compile compilation, the random phase, and for ours and SBX the final
# evaluation, all included), timed here the same way for everyone.
#   offline: the authors' Learner.update loop (../shared/peers/xql_official_offline.py) and
#            xql_offline.py, OFF_STEPS gradient steps on one synthetic Hopper-shaped D4RL file
#            (20k rows), batch 256 and 1024, 256-wide networks (Table 4's locomotion settings);
#   online:  CleanRL's sac/td3_continuous_action.py, SBX's SAC/TD3 (../shared/peers/sbx_baseline.py)
#            and xsac/xtd3_continuous.py, Pendulum-v1, ON_STEPS env steps, 1000 random, 256 wide,
#            batch 256, seed 1.
# Modes: eager = our defaults; fast = --compile --matmul-precision medium. Each pair runs its peers
# right before ours, in every mode and repeat: only a ratio taken in one run counts (absolute
# figures swing by 2x with load here). Threads: OMP/MKL_NUM_THREADS=$THREADS for all, and XLA's
# intra-op threads for the JAX programs. The table goes to stdout and $OUT/speed.md. Run it alone.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PEERS=${PEERS_DIR:-/tmp/peers}
HERE=$(cd ../shared/peers 2>/dev/null && pwd || true)
OUT=${OUT:-$(mktemp -d /tmp/xql_speed.XXXXXX)}
THREADS=${THREADS:-1}
MODES=${MODES:-"eager fast"}
PAIRS=${PAIRS:-"offline online"}
REPEATS=${REPEATS:-1}
OFF_STEPS=${OFF_STEPS:-3000}
ON_STEPS=${ON_STEPS:-10000}
PYTHON=$REPO/.venv/bin/python

fail() { echo "speed.sh: $*" >&2; exit 1; }
[ -x "$PYTHON" ] || fail "no .venv here; run \`make setup\` first."
[ -n "$HERE" ] && [ -f "$HERE/xql_official_offline.py" ] || fail "../shared/peers not found."
for peer in xql/venv/bin/python cleanrl/venv/bin/python sbx/venv/bin/python; do
  [ -x "$PEERS/$peer" ] || fail "$PEERS/$peer missing: build the peers with ../shared/peers/setup.sh."
done
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONWARNINGS=ignore
if [ "$THREADS" = 1 ]; then
  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
else
  export XLA_FLAGS="intra_op_parallelism_threads=$THREADS"
fi
RESULTS=$OUT/results.tsv
: > "$RESULTS"

# timed NAME STEPS COMMAND...: runs the command in $OUT/NAME, appends "NAME STEPS WALL LOAD" to the
# results and keeps its output in $OUT/NAME.log.
timed() {
  local name=$1 steps=$2
  shift 2
  mkdir -p "$OUT/$name"
  local load start end
  load=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  (cd "$OUT/$name" && "$@") > "$OUT/$name.log" 2>&1 || fail "$name failed; see $OUT/$name.log"
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$steps" "$(echo "$end - $start" | bc)" "$load" >> "$RESULTS"
  echo "speed.sh: $name: $steps steps in $(echo "$end - $start" | bc | cut -c1-6) s (load $load)" >&2
}

mkdir -p "$OUT/d4rl"
"$PYTHON" - "$OUT/d4rl/hopper_medium-v2.hdf5" <<'PY'
import sys, h5py, numpy as np
rng = np.random.default_rng(0); n = 20000
timeouts = np.zeros(n, bool); timeouts[999::1000] = True
with h5py.File(sys.argv[1], "w") as f:
    f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
    f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    f["rewards"] = rng.normal(size=n).astype(np.float32)
    f["terminals"], f["timeouts"] = np.zeros(n, bool), timeouts
PY

echo "# speed.sh $(date -u +%FT%TZ): $(nproc) cores, THREADS=$THREADS, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for repeat in $(seq "$REPEATS"); do
  for mode in $MODES; do
    case $mode in
      eager) flags=() ;;
      fast) flags=(--compile --matmul-precision medium) ;;
      *) fail "unknown mode '$mode' (eager, fast)" ;;
    esac
    tag="${mode}_r$repeat"
    if [[ " $PAIRS " == *" offline "* ]]; then
      for batch in 256 1024; do
        timed "authors_offline_b${batch}_$tag" "$OFF_STEPS" "$PEERS/xql/venv/bin/python" \
          "$HERE/xql_official_offline.py" --src "$PEERS/xql/src/offline" \
          --h5 "$OUT/d4rl/hopper_medium-v2.hdf5" --steps "$OFF_STEPS" --batch_size "$batch"
        timed "ours_offline_b${batch}_$tag" "$OFF_STEPS" env D4RL_DATASET_DIR="$OUT/d4rl" "$PYTHON" \
          "$REPO/xql_offline.py" --env-id hopper-medium-v2 --max-steps "$OFF_STEPS" --eval-freq 0 \
          --eval-episodes 1 --batch-size "$batch" --log-freq 500 --no-cuda --runs-dir runs "${flags[@]}"
      done
    fi
    if [[ " $PAIRS " == *" online "* ]]; then
      for algo in sac td3; do
        script=$([ "$algo" = sac ] && echo xsac_continuous.py || echo xtd3_continuous.py)
        timed "cleanrl_${algo}_$tag" "$ON_STEPS" env CLEANRL_SRC="$PEERS/cleanrl/src" \
          CLEANRL_VENV="$PEERS/cleanrl/venv" bash "$HERE/cleanrl_baseline.sh" "$algo" Pendulum-v1 1 \
          "$ON_STEPS" .
        timed "sbx_${algo}_$tag" "$ON_STEPS" "$PEERS/sbx/venv/bin/python" "$HERE/sbx_baseline.py" \
          --algo "$algo" --env Pendulum-v1 --steps "$ON_STEPS" --seed 1
        timed "ours_${algo}_$tag" "$ON_STEPS" "$PYTHON" "$REPO/$script" --env-id Pendulum-v1 --seed 1 \
          --total-timesteps "$ON_STEPS" --learning-starts 1000 --batch-size 256 --hidden-dim 256 \
          --eval-freq "$ON_STEPS" --eval-episodes 10 --log-freq 1000 --no-cuda --runs-dir runs \
          "${flags[@]}"
      done
    fi
  done
done

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
{
  echo "Measured $(date -u +%F) by \`THREADS=$THREADS bash benchmark/speed.sh\`: ${cpu:-unknown CPU},"
  echo "$(nproc) cores, no GPU, $THREADS thread(s) per program, one program at a time; torch"
  echo "$("$PYTHON" -c 'import torch; print(torch.__version__)'). Rule: steps / wall seconds of the whole"
  echo "process (start-up and compilation included); offline $OFF_STEPS gradient steps, online"
  echo "$ON_STEPS env steps. Load: the 1-minute load average when each program started."
  echo
  "$PYTHON" "$REPO/benchmark/speed.py" "$RESULTS"
} | tee "$OUT/speed.md"
echo "speed.sh: table in $OUT/speed.md, logs in $OUT" >&2
