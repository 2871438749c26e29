#!/usr/bin/env bash
# A CPU-scale reproduction of the paper's comparisons: small but real versions of Figure 3 (online) and
# Table 1 (offline) that run in about 80 minutes on a quiet 2-core CPU, then one table and one plot.
#
#   bash benchmark/cpu_proxy.sh           # ~80 minutes on 2 cores; writes docs/cpu_proxy.{md,png}
#   QUICK=1 bash benchmark/cpu_proxy.sh   # a few minutes, tiny settings: checks the pipeline, not the science
#
# Environment: PYTHON (default .venv/bin/python, else python), OUT (runs/cpu_proxy), DOCS (docs; with QUICK=1
# $OUT/docs), WORKERS (2), SEEDS ("1 2 3").
#
# 1. Online, Figure 3 in small: X-SAC against SAC with a value network (--value-loss mse), and X-TD3 against
#    X-TD3 - DQ (--no-double-q) and TD3 (--critic-loss mse), on dm_control/cheetah-run-v0 (a Figure 3 task: beta
#    from Table 6, 2 for X-SAC, 5 / 4 for X-TD3 / - DQ) and dm_control/cartpole-swingup-v0 (fast; not in Table 6:
#    the scripts' fallback beta 2, X-TD3 - DQ 4). Not the paper's scale: 256-wide networks, batch 256, 15k env steps
#    with 5000 random ones first (TD3's default is 25000), SAC's lr 3e-4 (Table 5: 1e-4 at 1024 wide).
# 2. Offline datasets of Hopper-v4, made here as D4RL made its own (each file records its policy and step):
#    an X-SAC run of 60k steps gives "replay" (its whole buffer) and its final policy; rollouts of that policy give
#    "expert", rollouts of the policy of a 15k-step run "medium" (50k steps each, the policies' own sampling).
# 3. Offline, Table 1 in small: X-QL against IQL (--value-loss expectile) on each dataset, 20k gradient steps,
#    the locomotion settings of Table 4 and the authors' reward scaling (--reward-norm returns), scores normalised
#    with D4RL's Hopper reference returns (random -20.3, expert 3234.3) so they read like Table 1's.
# 4. benchmark/summarize.py: final and best per task and arm, the datasets' own mean returns beside the offline
#    rows, the IQM over tasks with its bootstrap interval, curves; runs that stopped on a NaN are counted.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT=${OUT:-runs/cpu_proxy}
WORKERS=${WORKERS:-2}
SEEDS=${SEEDS:-"1 2 3"}
if [ "${QUICK:-0}" = 1 ]; then
  DOCS=${DOCS:-$OUT/docs}; SEEDS=${SEEDS_QUICK:-"1 2"}
  ONLINE=(--total-timesteps 1200 --learning-starts 400 --hidden-dim 32 --batch-size 32 --eval-freq 1200 --eval-episodes 1 --log-freq 400)
  DATA_STEPS=(1500 800); ROLLOUT=600
  OFFLINE=(--max-steps 300 --hidden-dim 32 --batch-size 64 --eval-freq 150 --eval-episodes 1 --log-freq 150)
else
  DOCS=${DOCS:-docs}
  ONLINE=(--total-timesteps 15000 --learning-starts 5000 --hidden-dim 256 --batch-size 256 --eval-freq 5000 --eval-episodes 5 --log-freq 2500)
  DATA_STEPS=(60000 15000); ROLLOUT=50000
  OFFLINE=(--max-steps 20000 --hidden-dim 256 --eval-freq 5000 --eval-episodes 5 --log-freq 2500)
fi
RUNS=$OUT/runs; DATA=$OUT/data; LOGS=$OUT/logs
mkdir -p "$RUNS" "$DATA" "$LOGS" "$DOCS"
export OMP_NUM_THREADS=1
start=$SECONDS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
sweep() {  # sweep NAME SCRIPT ENV_IDS -- FLAGS...: local workers; a failed run does not stop the benchmark
  local name=$1 script=$2 envs=$3; shift 3
  # shellcheck disable=SC2086  # ENV_IDS and SEEDS are word lists
  "$PYTHON" benchmark/run_sweep.py --script "$script" --env-ids $envs --seeds $SEEDS --workers "$WORKERS" \
    --threads-per-run 1 --status-interval 300 --sweep-name "$name" --log-dir "$LOGS/$name" "$@" \
    || echo "cpu_proxy: $name: some runs failed (see $LOGS/$name)"
}

echo "cpu_proxy: step 1/4, datasets' policies: X-SAC on Hopper-v4 for ${DATA_STEPS[0]} and ${DATA_STEPS[1]} env steps"
data_run() {  # data_run STEPS NAME [FLAGS...]: an X-SAC run on Hopper-v4 that saves its final policy
  local steps=$1 name=$2; shift 2
  "$PYTHON" xsac_continuous.py --env-id Hopper-v4 --exp-name "$name" --seed 1 --runs-dir "$OUT/data_runs" \
    "${ONLINE[@]}" --total-timesteps "$steps" --learning-rate 3e-4 --save-model "$@" > "$LOGS/$name.log" 2>&1
}
data_run "${DATA_STEPS[0]}" expert-policy --save-buffer "$DATA/hopper-replay.hdf5" & expert_pid=$!
data_run "${DATA_STEPS[1]}" medium-policy & medium_pid=$!
wait $expert_pid && wait $medium_pid || { echo "cpu_proxy: a data run failed, see $LOGS"; tail -3 "$LOGS"/*-policy.log; exit 1; }
"$PYTHON" benchmark/make_dataset.py --checkpoint "$(ls -d "$OUT"/data_runs/Hopper-v4__expert-policy__1__*/ | tail -1)checkpoint.pt" \
  --steps "$ROLLOUT" --out "$DATA/hopper-expert.hdf5" --seed 1 || exit 1
"$PYTHON" benchmark/make_dataset.py --checkpoint "$(ls -d "$OUT"/data_runs/Hopper-v4__medium-policy__1__*/ | tail -1)checkpoint.pt" \
  --steps "$ROLLOUT" --out "$DATA/hopper-medium.hdf5" --seed 2 || exit 1

echo "cpu_proxy: step 2/4, offline: X-QL and IQL on hopper-replay, hopper-medium, hopper-expert"
for arm in xql iql; do
  flags=(); [ $arm = iql ] && flags=(--value-loss expectile)
  sweep "offline_$arm" xql_offline.py "hopper-replay hopper-medium hopper-expert" -- --exp-name $arm \
    --dataset-path "$DATA/{env_id}.hdf5" --eval-env-id Hopper-v4 --reward-norm returns \
    --ref-min-score -20.272305 --ref-max-score 3234.3 --runs-dir "$RUNS" "${OFFLINE[@]}" "${flags[@]}"
done

echo "cpu_proxy: step 3/4, online: X-SAC / SAC and X-TD3 / X-TD3 - DQ / TD3 on cheetah-run and cartpole-swingup"
TASKS="dm_control/cheetah-run-v0 dm_control/cartpole-swingup-v0"
sweep online_xsac xsac_continuous.py "$TASKS" -- --exp-name xsac --learning-rate 3e-4 --runs-dir "$RUNS" "${ONLINE[@]}"
sweep online_sac xsac_continuous.py "$TASKS" -- --exp-name sac --value-loss mse --learning-rate 3e-4 --runs-dir "$RUNS" "${ONLINE[@]}"
sweep online_xtd3 xtd3_continuous.py "$TASKS" -- --exp-name xtd3 --runs-dir "$RUNS" "${ONLINE[@]}"
sweep online_xtd3_dq xtd3_continuous.py "$TASKS" -- --exp-name xtd3-dq --no-double-q --runs-dir "$RUNS" "${ONLINE[@]}"
sweep online_td3 xtd3_continuous.py "$TASKS" -- --exp-name td3 --critic-loss mse --runs-dir "$RUNS" "${ONLINE[@]}"

echo "cpu_proxy: step 4/4, summary"
wall=$((SECONDS - start))
diverged=$(grep -l "a loss became NaN/inf" "$LOGS"/*/*.log 2>/dev/null | sed "s|$LOGS/||" | tr '\n' ' ')
failed=$(grep -L ": done, " "$LOGS"/*/*.log 2>/dev/null | sed "s|$LOGS/||" | tr '\n' ' ')
"$PYTHON" benchmark/summarize.py "$RUNS" --out "$OUT/table.md" --plot "$DOCS/cpu_proxy.png" --json "$OUT/cpu_proxy.json" || exit 1
{
  echo "# CPU proxy of the paper's comparisons (benchmark/cpu_proxy.sh$([ "${QUICK:-0}" = 1 ] && echo ", QUICK=1"))"
  echo
  echo "Machine: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc --all) cores, no GPU used;" \
       "$WORKERS runs at a time, one thread each. Load average before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Wall time: $((wall / 60)) min $((wall % 60)) s. $(date -u '+%Y-%m-%d %H:%M UTC'). Seeds: $SEEDS."
  echo "Runs stopped by a NaN/inf loss: $([ -n "$diverged" ] && echo "$diverged" || echo none)."
  echo "Runs that failed otherwise: $([ -n "$failed" ] && echo "$failed" || echo none)."
  echo
  echo "Datasets (Hopper-v4, made by this run):"
  for name in replay medium expert; do
    "$PYTHON" - "$DATA/hopper-$name.hdf5" <<'PY'
import sys, h5py, numpy as np
with h5py.File(sys.argv[1]) as f:
    a = dict(f.attrs); n = len(f["rewards"])
    print(f"- `{sys.argv[1].rsplit('/', 1)[-1]}`: {n} transitions; made by {a.get('script')} ({a.get('exp_name')}, "
          f"step {a.get('checkpoint_step', a.get('env_steps'))}); policy: {a.get('policy')}")
PY
  done
  echo
  sed '1,2d' "$OUT/table.md"
} > "$DOCS/cpu_proxy.md"
echo "cpu_proxy: done in $((wall / 60)) min; table $DOCS/cpu_proxy.md, plot $DOCS/cpu_proxy.png, runs in $RUNS"
