#!/usr/bin/env bash
# The authors' released code (github.com/Div99/XQL) against ours, same settings, same seeds, one table.
#
#   XQL_GIT_DIR=<bare copy of Div99/XQL> bash benchmark/against_authors.sh   # ~1.5 h on 2 cores, JOBS=2
#   QUICK=1 bash benchmark/against_authors.sh    # a few minutes: the whole pipeline at tiny settings
#
# 1. Builds their code outside the repository, in CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/xql/
#    against_authors): `offline/` and `online/` of the pinned commit, exported from XQL_GIT_DIR (a local
#    bare copy) or from a clone of github.com/Div99/XQL; a venv for each (JAX for offline/, PyTorch for
#    online/), pinned versions. Nothing of theirs enters this repository; the drivers
#    benchmark/against_authors_{offline,online}.py patch their code in memory only (docs list each patch).
# 2. Offline: their X-QL and their IQL arm (`vanilla`) against xql_offline.py and its IQL arm on one
#    D4RL-format file (DATASET=..., default: Hopper-v4 rollouts made here by benchmark/make_dataset.py),
#    rewards scaled once by their locomotion rule, evaluated on the same gymnasium env.
# 3. Online: their GumbelSAC, SAC with V and GumbelTD3 against xsac_continuous.py (X-SAC and
#    --value-loss mse) and xtd3_continuous.py on a dm_control task (TASK, default cartpole-swingup).
# 4. benchmark/against_authors.py writes the table (OUT, default docs/against_authors.md; with QUICK=1
#    the run folder's against_authors.md), with the notes of NOTES (default
#    benchmark/against_authors_notes.md when it exists, none with QUICK=1).
#
# Environment: JOBS (2 runs at a time, one thread each), SEEDS ("1 2 3"; QUICK: "1"), CACHE_DIR,
# RUN_DIR (default CACHE_DIR/runs/<time>), XQL_GIT_DIR, PYTHON (ours: .venv/bin/python),
# BASE_PYTHON (python3, for their venvs), DATASET, EVAL_ENV (Hopper-v4), REWARD_NORM (returns|none),
# TASK, PARTS ("offline online"), and the settings below (OFF_*, ON_*, LR_*, BETA_*, CLIP_*).
# After a look at the numbers, write benchmark/against_authors_notes.md and remake only the table:
#   .venv/bin/python benchmark/against_authors.py table --run-dir RUN_DIR --out docs/against_authors.md \
#     --notes benchmark/against_authors_notes.md --json RUN_DIR/summary.json
set -uo pipefail
main() {  # the whole script, parsed before it runs: editing the file cannot derail a run
cd "$(dirname "$0")/.."
ROOT=$PWD
XQL_COMMIT=dff09afb893fe782be259c2420903f8dfb50ef2c
XQL_URL=https://github.com/Div99/XQL
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
BASE_PYTHON=${BASE_PYTHON:-python3}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xql/against_authors}
QUICK=${QUICK:-0}
JOBS=${JOBS:-2}
PARTS=${PARTS:-"offline online"}
EVAL_ENV=${EVAL_ENV:-Hopper-v4}
REWARD_NORM=${REWARD_NORM:-returns}
TASK=${TASK:-cartpole-swingup}
# Settings shared by both sides. Offline: Table 4's locomotion X-QL values, mujoco_config.py's IQL ones.
# Online: their xsac.yaml / xtd3.yaml, but width and batch 256 (CPU budget) and 5000 random steps.
OFF_BATCH=${OFF_BATCH:-256}; OFF_BETA=${OFF_BETA:-2}; OFF_CLIP=${OFF_CLIP:-7}
OFF_EXPECTILE=${OFF_EXPECTILE:-0.7}; OFF_AWR=${OFF_AWR:-3}
LR_SAC=${LR_SAC:-1e-4}; LR_TD3=${LR_TD3:-1e-3}; BETA_SAC=${BETA_SAC:-1}; BETA_TD3=${BETA_TD3:-1}
CLIP_SAC=${CLIP_SAC:-10}; CLIP_TD3=${CLIP_TD3:-8}
if [ "$QUICK" = 1 ]; then
  SEEDS=${SEEDS:-1}
  OFF_STEPS=${OFF_STEPS:-600}; OFF_EVAL_FREQ=${OFF_EVAL_FREQ:-300}; OFF_EVAL_EPISODES=${OFF_EVAL_EPISODES:-2}
  ON_STEPS=${ON_STEPS:-2000}; ON_RANDOM=${ON_RANDOM:-1000}; ON_EVAL_FREQ=${ON_EVAL_FREQ:-1000}
  ON_EVAL_EPISODES=${ON_EVAL_EPISODES:-1}; ON_HIDDEN=${ON_HIDDEN:-64}; ON_BATCH=${ON_BATCH:-64}
  DATA_STEPS=${DATA_STEPS:-2000}; DATA_RANDOM=${DATA_RANDOM:-1000}; DATA_HIDDEN=${DATA_HIDDEN:-64}
  ROLLOUT=${ROLLOUT:-5000}; TAG=quick
else
  SEEDS=${SEEDS:-"1 2 3"}
  OFF_STEPS=${OFF_STEPS:-30000}; OFF_EVAL_FREQ=${OFF_EVAL_FREQ:-5000}; OFF_EVAL_EPISODES=${OFF_EVAL_EPISODES:-10}
  ON_STEPS=${ON_STEPS:-50000}; ON_RANDOM=${ON_RANDOM:-5000}; ON_EVAL_FREQ=${ON_EVAL_FREQ:-5000}
  ON_EVAL_EPISODES=${ON_EVAL_EPISODES:-10}; ON_HIDDEN=${ON_HIDDEN:-256}; ON_BATCH=${ON_BATCH:-256}
  DATA_STEPS=${DATA_STEPS:-20000}; DATA_RANDOM=${DATA_RANDOM:-5000}; DATA_HIDDEN=${DATA_HIDDEN:-256}
  ROLLOUT=${ROLLOUT:-50000}; TAG=full
fi
DATA_NOISE=${DATA_NOISE:-0.3}
RUN_DIR=${RUN_DIR:-$CACHE_DIR/runs/$(date +%Y%m%d-%H%M%S)-$TAG}
if [ "$QUICK" = 1 ]; then OUT=${OUT:-$RUN_DIR/against_authors.md}; NOTES=${NOTES:-}
else OUT=${OUT:-$ROOT/docs/against_authors.md}; NOTES=${NOTES:-$ROOT/benchmark/against_authors_notes.md}; fi
for pair in "$OFF_STEPS $OFF_EVAL_FREQ" "$ON_STEPS $ON_EVAL_FREQ"; do  # their loops evaluate only there
  set -- $pair
  [ $(($1 % $2)) = 0 ] || { echo "against_authors: steps $1 are not a multiple of the eval frequency $2" >&2; exit 1; }
done
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-disable}
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
log() { echo "against_authors: $*"; }
die() { echo "against_authors: $*" >&2; exit 1; }

# ---- 1. their code and its venvs, in the cache ----
SRC=$CACHE_DIR/src/$XQL_COMMIT
OFF_VENV=$CACHE_DIR/venv-offline
ON_VENV=$CACHE_DIR/venv-online
OFF_PINS="jax[cpu]==0.4.30 jaxlib==0.4.30 flax==0.8.5 optax==0.2.3 chex==0.1.90 orbax-checkpoint==0.6.4
 tensorflow-probability==0.24.0 numpy==1.26.4 ml_collections==1.1.0 absl-py==2.5.1 h5py==3.16.0
 tqdm==4.70.1 tensorboardX==2.6.5 gym==0.23.1 gymnasium[mujoco]==1.4.0 mujoco==3.11.0"
ON_PINS="torch==2.13.0 gym==0.23.1 dm_control==1.0.44 mujoco==3.11.0 numpy==2.4.6 PyYAML==6.0.4
 tensorboard==2.21.0"
build_source() {
  local git_dir=${XQL_GIT_DIR:-$CACHE_DIR/XQL.git}
  if [ -f "$SRC/.complete" ]; then return 0; fi
  if [ -z "${XQL_GIT_DIR:-}" ] && [ ! -d "$git_dir" ]; then
    log "cloning $XQL_URL into $git_dir"
    git clone --quiet --bare "$XQL_URL" "$git_dir" || die "cannot clone $XQL_URL; set XQL_GIT_DIR to a local bare copy"
  fi
  git --git-dir="$git_dir" rev-parse --verify --quiet "$XQL_COMMIT^{commit}" > /dev/null 2>&1 \
    || die "$git_dir has no commit $XQL_COMMIT"
  rm -rf "$SRC" && mkdir -p "$SRC"
  # (a mirror may lack large files of docs/, which git names on stderr: shown only if the export fails)
  git --git-dir="$git_dir" archive "$XQL_COMMIT" offline online 2> "$CACHE_DIR/export.log" | tar -x -C "$SRC" \
    || { cat "$CACHE_DIR/export.log" >&2; die "cannot export their code"; }
  touch "$SRC/.complete"
  log "their code (Div99/XQL $XQL_COMMIT): $SRC"
}
build_venv() {  # build_venv DIR "PINS": a venv with exactly these pins (torch, if any, from the local CPU build first)
  local dir=$1 pins=$2
  if [ -f "$dir/.pins" ] && [ "$(cat "$dir/.pins")" = "$pins" ]; then return 0; fi
  log "building $dir"
  rm -rf "$dir"
  "$BASE_PYTHON" -m venv "$dir" || die "cannot create the venv $dir"
  pip_quiet() { "$dir/bin/pip" install -q "$@" 2>&1 | grep -v "is ignored: it is neither a file" || true; }
  [[ $pins == *torch==* ]] && pip_quiet torch==2.13.0
  # shellcheck disable=SC2086  # the pins are a word list
  pip_quiet $pins
  local pin name
  for pin in $pins; do  # every pin installed at its version, or pip failed
    name=${pin%%==*}
    "$dir/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version(sys.argv[1]).split("+")[0] != sys.argv[2])' "${name%%[*}" "${pin##*==}" 2> /dev/null \
      || die "pip failed in $dir: $pin is not installed"
  done
  echo "$pins" > "$dir/.pins"
}
mkdir -p "$CACHE_DIR" "$RUN_DIR/jobs"
local build_start=$SECONDS
build_source
[[ $PARTS == *offline* ]] && build_venv "$OFF_VENV" "$OFF_PINS"
[[ $PARTS == *online* ]] && build_venv "$ON_VENV" "$ON_PINS"

build_s=$((SECONDS - build_start))
start=$SECONDS
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
log "run folder $RUN_DIR; $JOBS jobs at a time"

# ---- 2. the dataset: DATASET, or Hopper-v4 rollouts of a short X-SAC run (benchmark/make_dataset.py) ----
make_default_dataset() {  # in the cache, reused by later runs with the same settings
  local name="hopper-v4-sac${DATA_STEPS}-noise${DATA_NOISE}-${ROLLOUT}"
  local file=$CACHE_DIR/data/$name.hdf5 runs=$CACHE_DIR/data/$name-runs
  if [ ! -f "$file" ]; then
    mkdir -p "$CACHE_DIR/data" && rm -rf "$runs"
    "$PYTHON" xsac_continuous.py --env-id Hopper-v4 --seed 1 --total-timesteps "$DATA_STEPS" \
      --learning-starts "$DATA_RANDOM" --hidden-dim "$DATA_HIDDEN" --batch-size "$DATA_HIDDEN" \
      --learning-rate 3e-4 --eval-freq 0 --eval-episodes 5 --exp-name dataset-policy --runs-dir "$runs" \
      --save-model --no-cuda || return 1
    local checkpoint
    checkpoint=$(ls -d "$runs"/*/ | tail -1)checkpoint.pt
    "$PYTHON" benchmark/make_dataset.py --checkpoint "$checkpoint" --steps "$ROLLOUT" --policy sample \
      --noise "$DATA_NOISE" --seed 0 --out "$file.tmp.hdf5" || return 1
    mv "$file.tmp.hdf5" "$file"
  fi
  echo "$file" > "$RUN_DIR/dataset_source"
}
prepare_dataset() {
  if [ -n "${DATASET:-}" ]; then
    [ -f "$DATASET" ] || { echo "DATASET=$DATASET does not exist"; return 1; }
    realpath "$DATASET" > "$RUN_DIR/dataset_source"
  else
    make_default_dataset || return 1
  fi
  "$PYTHON" benchmark/against_authors.py prepare-dataset "$(cat "$RUN_DIR/dataset_source")" \
    "$RUN_DIR/dataset.hdf5" --reward-norm "$REWARD_NORM"
}
data_pid=
if [[ $PARTS == *offline* ]]; then
  { prepare_dataset > "$RUN_DIR/dataset.log" 2>&1; echo $? > "$RUN_DIR/dataset_rc"; } &
  data_pid=$!
fi

# ---- 3. the runs: jobs/<part>__<arm>__<side>__<seed>/ (log.txt, wall_s, rc; result.json or runs/) ----
run_job() {  # run_job NAME COMMAND...: one run, its console in log.txt, its wall time in wall_s
  local dir=$RUN_DIR/jobs/$1 t0=$SECONDS; shift
  mkdir -p "$dir"
  "$@" > "$dir/log.txt" 2>&1
  echo $? > "$dir/rc"
  echo $((SECONDS - t0)) > "$dir/wall_s"
}
offline_ours() {  # offline_ours ARM SEED
  local arm=$1 seed=$2 dir=$RUN_DIR/jobs/offline__$1__ours__$2 loss=gumbel
  [ "$arm" = iql ] && loss=expectile
  run_job "offline__${arm}__ours__$seed" "$PYTHON" xql_offline.py --dataset-path "$RUN_DIR/dataset.hdf5" \
    --env-id against-authors --eval-env-id "$EVAL_ENV" --seed "$seed" --max-steps "$OFF_STEPS" \
    --eval-freq "$OFF_EVAL_FREQ" --eval-episodes "$OFF_EVAL_EPISODES" --batch-size "$OFF_BATCH" \
    --beta "$OFF_BETA" --loss-clip "$OFF_CLIP" --clip-mode upper --value-loss "$loss" \
    --expectile "$OFF_EXPECTILE" --awr-temperature "$OFF_AWR" --exp-name "$arm" --runs-dir "$dir/runs" --no-cuda
}
offline_authors() {
  local arm=$1 seed=$2 dir=$RUN_DIR/jobs/offline__$1__authors__$2 layernorm=1
  [ "$arm" = iql ] && layernorm=0
  run_job "offline__${arm}__authors__$seed" "$OFF_VENV/bin/python" benchmark/against_authors_offline.py \
    --src "$SRC/offline" --arm "$arm" --dataset "$RUN_DIR/dataset.hdf5" --eval-env-id "$EVAL_ENV" \
    --seed "$seed" --max-steps "$OFF_STEPS" --eval-interval "$OFF_EVAL_FREQ" --eval-episodes "$OFF_EVAL_EPISODES" \
    --batch-size "$OFF_BATCH" --temp "$OFF_BETA" --max-clip "$OFF_CLIP" --expectile "$OFF_EXPECTILE" \
    --awr-temperature "$OFF_AWR" --value-layernorm "$layernorm" --work-dir "$dir/their_run" --out "$dir/result.json"
}
online_ours() {
  local arm=$1 seed=$2 dir=$RUN_DIR/jobs/online__$1__ours__$2
  local common=(--env-id "dm_control/$TASK-v0" --seed "$seed" --total-timesteps "$ON_STEPS"
    --learning-starts "$ON_RANDOM" --batch-size "$ON_BATCH" --hidden-dim "$ON_HIDDEN" --clip-mode both
    --policy-frequency 2 --eval-freq "$ON_EVAL_FREQ" --eval-episodes "$ON_EVAL_EPISODES" --exp-name "$arm"
    --runs-dir "$dir/runs" --no-cuda)
  case $arm in
    xsac) run_job "online__xsac__ours__$seed" "$PYTHON" xsac_continuous.py "${common[@]}" --value-loss gumbel \
            --learning-rate "$LR_SAC" --beta "$BETA_SAC" --loss-clip "$CLIP_SAC" ;;
    sac) run_job "online__sac__ours__$seed" "$PYTHON" xsac_continuous.py "${common[@]}" --value-loss mse \
           --learning-rate "$LR_SAC" --beta "$BETA_SAC" --loss-clip "$CLIP_SAC" ;;
    xtd3) run_job "online__xtd3__ours__$seed" "$PYTHON" xtd3_continuous.py "${common[@]}" --critic-loss gumbel \
            --learning-rate "$LR_TD3" --beta "$BETA_TD3" --loss-clip "$CLIP_TD3" ;;
  esac
}
online_authors() {
  local arm=$1 seed=$2 dir=$RUN_DIR/jobs/online__$1__authors__$2 lr=$LR_SAC beta=$BETA_SAC clip=$CLIP_SAC
  [ "$arm" = xtd3 ] && { lr=$LR_TD3; beta=$BETA_TD3; clip=$CLIP_TD3; }
  run_job "online__${arm}__authors__$seed" "$ON_VENV/bin/python" benchmark/against_authors_online.py \
    --src "$SRC/online" --arm "$arm" --task "$TASK" --seed "$seed" --total-steps "$ON_STEPS" \
    --init-steps "$ON_RANDOM" --eval-freq "$ON_EVAL_FREQ" --eval-episodes "$ON_EVAL_EPISODES" \
    --batch-size "$ON_BATCH" --hidden-dim "$ON_HIDDEN" --lr "$lr" --beta "$beta" --exp-clip "$clip" \
    --work-dir "$dir/their_run" --out "$dir/result.json"
}
specs=()  # the longest first: online, then offline (which waits for the dataset)
for seed in $SEEDS; do
  [[ $PARTS == *online* ]] && for arm in xsac sac xtd3; do
    specs+=("online_authors $arm $seed" "online_ours $arm $seed"); done
done
for seed in $SEEDS; do
  [[ $PARTS == *offline* ]] && for arm in xql iql; do
    specs+=("offline_authors $arm $seed" "offline_ours $arm $seed"); done
done
dataset_ok=1
for spec in "${specs[@]}"; do
  if [[ $spec == offline* ]] && [ -n "$data_pid" ]; then
    while kill -0 "$data_pid" 2> /dev/null; do sleep 1; done  # `wait -n` below may have reaped it
    [ "$(cat "$RUN_DIR/dataset_rc" 2> /dev/null)" = 0 ] || dataset_ok=0
    data_pid=
    [ "$dataset_ok" = 1 ] || log "the dataset failed (see $RUN_DIR/dataset.log); no offline runs"
    tail -1 "$RUN_DIR/dataset.log"
  fi
  [[ $spec == offline* ]] && [ "$dataset_ok" = 0 ] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  log "start $spec"
  # shellcheck disable=SC2086  # a spec is a function name and its arguments
  $spec &
done
wait
failed=$(grep -L '^0$' "$RUN_DIR"/jobs/*/rc 2>/dev/null | xargs -r -n1 dirname | xargs -r -n1 basename | tr '\n' ' ')
[ -n "$failed" ] && log "failed runs (see their log.txt): $failed"

# ---- 4. the table ----
wall=$((SECONDS - start))
ours_commit=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo " (work tree with changes)")
source_note="exported from ${XQL_GIT_DIR:-a clone of $XQL_URL} into $SRC"
dataset_source=$(cat "$RUN_DIR/dataset_source" 2>/dev/null || echo none)
WALL=$wall BUILD_S=$build_s STARTED=$started LOAD_BEFORE=$load_before SOURCE_NOTE=$source_note OURS_COMMIT=$ours_commit \
DATASET_SOURCE=$dataset_source DATASET_GIVEN=${DATASET:+1} COMMIT=$XQL_COMMIT SEEDS=$SEEDS QUICK=$QUICK JOBS=$JOBS RUN_DIR=$RUN_DIR \
EVAL_ENV=$EVAL_ENV REWARD_NORM=$REWARD_NORM TASK=$TASK OFF_STEPS=$OFF_STEPS OFF_EVAL_FREQ=$OFF_EVAL_FREQ \
OFF_EVAL_EPISODES=$OFF_EVAL_EPISODES OFF_BATCH=$OFF_BATCH OFF_BETA=$OFF_BETA OFF_CLIP=$OFF_CLIP \
OFF_EXPECTILE=$OFF_EXPECTILE OFF_AWR=$OFF_AWR ON_STEPS=$ON_STEPS ON_RANDOM=$ON_RANDOM ON_EVAL_FREQ=$ON_EVAL_FREQ \
ON_EVAL_EPISODES=$ON_EVAL_EPISODES ON_HIDDEN=$ON_HIDDEN ON_BATCH=$ON_BATCH LR_SAC=$LR_SAC LR_TD3=$LR_TD3 \
BETA_SAC=$BETA_SAC BETA_TD3=$BETA_TD3 CLIP_SAC=$CLIP_SAC CLIP_TD3=$CLIP_TD3 DATA_STEPS=$DATA_STEPS \
DATA_RANDOM=$DATA_RANDOM DATA_HIDDEN=$DATA_HIDDEN DATA_NOISE=$DATA_NOISE ROLLOUT=$ROLLOUT \
VENVS="ours=$(dirname "$(dirname "$PYTHON")")|authors offline=$OFF_VENV|authors online=$ON_VENV" \
COMMAND="$([ "$QUICK" = 1 ] && echo "QUICK=1 ")bash benchmark/against_authors.sh" \
"$PYTHON" - <<'PY' || die "cannot write settings.json / meta.json"
import json, os, subprocess
e = os.environ
def attrs(path):
    try:
        import h5py
        with h5py.File(path) as f:
            return dict(f.attrs), len(f["rewards"])
    except Exception:
        return {}, 0
data = os.path.join(e["RUN_DIR"], "dataset.hdf5")
a, n = attrs(data)
source = e["DATASET_SOURCE"]
if a.get("script"):
    about = (f"{n} transitions of {a.get('env_id')}: {a.get('policy')} ({a.get('script')} at step "
             f"{a.get('checkpoint_step')}; {a.get('episodes')} episodes, mean return "
             f"{float(a.get('mean_episode_return', float('nan'))):.1f})")
else:
    about = f"{n} transitions from {source}"
settings = {
    "quick": e["QUICK"] == "1",
    "offline": {"steps": int(e["OFF_STEPS"]), "eval_freq": int(e["OFF_EVAL_FREQ"]),
                "eval_episodes": int(e["OFF_EVAL_EPISODES"]), "batch": int(e["OFF_BATCH"]),
                "beta": float(e["OFF_BETA"]), "clip": float(e["OFF_CLIP"]),
                "expectile": float(e["OFF_EXPECTILE"]), "awr_temperature": float(e["OFF_AWR"]),
                "eval_env": e["EVAL_ENV"], "reward_norm": e["REWARD_NORM"],
                "reward_scale": float(a.get("against_authors_reward_scale", 1.0)),
                "dataset_name": os.path.basename(source), "dataset_about": about,
                "dataset_recipe": "" if e["DATASET_GIVEN"] else (
                                  f"xsac_continuous.py on Hopper-v4, {e['DATA_STEPS']} steps "
                                   f"({e['DATA_RANDOM']} random), {e['DATA_HIDDEN']} wide, lr 3e-4; then "
                                   f"make_dataset.py --policy sample --noise {e['DATA_NOISE']} --steps "
                                   f"{e['ROLLOUT']}"),
                "seeds": e["SEEDS"]},
    "online": {"task": e["TASK"], "steps": int(e["ON_STEPS"]), "random_steps": int(e["ON_RANDOM"]),
               "eval_freq": int(e["ON_EVAL_FREQ"]), "eval_episodes": int(e["ON_EVAL_EPISODES"]),
               "hidden": int(e["ON_HIDDEN"]), "batch": int(e["ON_BATCH"]), "lr_sac": e["LR_SAC"],
               "lr_td3": e["LR_TD3"], "beta_sac": e["BETA_SAC"], "beta_td3": e["BETA_TD3"],
               "clip_sac": e["CLIP_SAC"], "clip_td3": e["CLIP_TD3"], "seeds": e["SEEDS"]},
}
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
meta = {"commit": e["COMMIT"], "source": e["SOURCE_NOTE"], "ours_commit": e["OURS_COMMIT"],
        "machine": f"{model}, {os.cpu_count()} cores, no GPU used", "jobs": int(e["JOBS"]),
        "load_before": e["LOAD_BEFORE"], "load_after": open("/proc/loadavg").read().split()[:3],
        "wall_s": float(e["WALL"]), "build_s": float(e["BUILD_S"]), "started": e["STARTED"],
        "finished": subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True,
                                   text=True).stdout.strip(),
        "command": e["COMMAND"],
        "venvs": dict(item.split("=", 1) for item in e["VENVS"].split("|"))}
meta["load_after"] = " ".join(meta["load_after"])
for name, value in (("settings", settings), ("meta", meta)):
    with open(os.path.join(e["RUN_DIR"], f"{name}.json"), "w") as f:
        json.dump(value, f, indent=1)
PY
notes_flag=()
[ -n "$NOTES" ] && [ -f "$NOTES" ] && notes_flag=(--notes "$NOTES")
"$PYTHON" benchmark/against_authors.py table --run-dir "$RUN_DIR" --out "$OUT" \
  --json "$RUN_DIR/summary.json" "${notes_flag[@]}" || die "cannot write the table"
log "done in $((wall / 60)) min $((wall % 60)) s; table $OUT; runs in $RUN_DIR"
[ -z "$failed" ]
}
main "$@"; exit $?  # one line: bash has read it whole before main runs
