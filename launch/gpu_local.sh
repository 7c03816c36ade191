#!/usr/bin/env bash
# Train on one host with all its local GPUs: one process drives every visible GPU (the mesh
# defaults to data parallel over all of them; set --config.mesh.* to shard the model).
#
#   bash launch/gpu_local.sh --config=configs/default.py --workdir=runs/gpu -- --config.train.steps=1000
#   bash launch/gpu_local.sh ... --dry-run      # print every command instead of running it
#
# Options (--opt=value or --opt value):
#   --config FILE       training config (default configs/default.py)
#   --workdir DIR       run directory (default runs/gpu); rerun the same command to resume
#   --venv DIR          virtual environment, created if missing (default .venv)
#   --gpus LIST         CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs)
#   --mem-fraction F    XLA_PYTHON_CLIENT_MEM_FRACTION: share of each GPU's memory jax may
#                       preallocate (default 0.95; jax's own default is 0.75)
#   --max-restarts N    rerun `tr-align train` up to N times when it exits with 75 (stopped by
#                       SIGTERM/SIGINT or a preemption notice, state checkpointed: "resume
#                       me"); default 3; 0 = never. Any other exit code ends the script with it
#   --no-install        skip the venv / pip install step
#   --dry-run           print the commands, run nothing
#   -- ARGS...          passed on to `tr-align train`
set -euo pipefail

CONFIG=configs/default.py
WORKDIR=runs/gpu
VENV=.venv
GPUS=""
MEM_FRACTION=0.95
MAX_RESTARTS=3
EXIT_RESUME=75  # tr-align train: interrupted with a checkpoint, rerun to resume
INSTALL=1
DRY_RUN=0
TRAIN_ARGS=()

die() { echo "gpu_local.sh: $*" >&2; exit 2; }
quote() {  # one argument, single-quoted when it holds spaces or shell characters
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {  # prints a command, copy-pasteable
  local out="+" a
  for a in "$@"; do out+=" $(quote "$a")"; done
  echo "$out"
}
run() { show "$@"; if [[ $DRY_RUN == 0 ]]; then "$@"; fi; }

while [[ $# -gt 0 ]]; do
  opt="$1"
  case "$opt" in
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --no-install) INSTALL=0; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --*=*) key="${opt%%=*}"; val="${opt#*=}"; shift ;;
    --*) key="$opt"; [[ $# -ge 2 ]] || die "$opt needs a value"; val="$2"; shift 2 ;;
    *) die "unexpected argument '$opt' (train flags go after --)" ;;
  esac
  case "$key" in
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --venv) VENV="$val" ;;
    --gpus) GPUS="$val" ;;
    --mem-fraction) MEM_FRACTION="$val" ;;
    --max-restarts) MAX_RESTARTS="$val" ;;
    *) die "unknown option $key" ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $INSTALL == 1 ]]; then
  [[ -x "$VENV/bin/python" && $DRY_RUN == 0 ]] || run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  run "$VENV/bin/pip" install -q -e . 'jax[cuda12]'
fi
command -v nvidia-smi >/dev/null && [[ $DRY_RUN == 0 ]] && nvidia-smi -L || true

envs=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -z "$GPUS" ]] || envs=(CUDA_VISIBLE_DEVICES="$GPUS" "${envs[@]}")
run mkdir -p "$WORKDIR"
echo "# rerun on exit $EXIT_RESUME (resume), at most $MAX_RESTARTS times:"
echo "$(show env "${envs[@]}" "$VENV/bin/tr-align" train --config="$CONFIG" --workdir="$WORKDIR" \
  "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}") 2>&1 | tee -a $(quote "$WORKDIR/train.log")"
if [[ $DRY_RUN == 0 ]]; then
  STOPPING=0  # this script was signalled itself: no restart after the run stops
  trap 'STOPPING=1' TERM INT
  restarts=0
  while true; do
    set +e
    env "${envs[@]}" "$VENV/bin/tr-align" train --config="$CONFIG" --workdir="$WORKDIR" \
      "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}" 2>&1 | tee -a "$WORKDIR/train.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc != "$EXIT_RESUME" || $STOPPING == 1 || $restarts -ge $MAX_RESTARTS ]]; then
      exit "$rc"
    fi
    restarts=$((restarts + 1))
    echo "gpu_local.sh: tr-align exited $rc (stopped with a checkpoint): resuming, restart $restarts/$MAX_RESTARTS" >&2
  done
fi
