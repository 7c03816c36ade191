#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it when it exists), copy the code to
# every worker, install, and run the same `tr-align train` on all workers (--worker=all),
# streaming their output here (each worker also keeps it in ~/tr_align_train.log).
#
#   bash launch/tpu_pod.sh --name=tr-align-v5p --zone=us-east5-a --accelerator-type=v5p-32 \
#     --bucket=MY_BUCKET --config=configs/default.py -- --config.train.steps=1000
#   bash launch/tpu_pod.sh ... --dry-run      # print every command instead of running it
#
# Options (--opt=value or --opt value):
#   --name NAME              TPU VM name (default tr-align)
#   --zone ZONE              required, e.g. us-east5-a (v5p), us-west4-a (v5e)
#   --accelerator-type TYPE  v4-32, v5p-32, v5e-64 (= v5litepod-64), v6e-8, ... (default v5litepod-8)
#   --version VERSION        TPU software version (default per generation: v4
#                            tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                            v6e v2-alpha-tpuv6e)
#   --project PROJECT        gcloud project (default: gcloud's configured one)
#   --spot                   create a Spot VM (preemptible; rerun this script to resume)
#   --repo URL [--branch B]  git clone the code on every worker instead of copying this checkout
#   --config FILE            training config, relative to the repo (default configs/default.py)
#   --bucket BUCKET          mount gs://BUCKET with Cloud Storage FUSE at /mnt/gcs on every
#                            worker; the default workdir is then /mnt/gcs/tr_align/NAME (else
#                            ~/runs/NAME, fine for a single-host slice);
#                            the VM's service account needs write access to the bucket
#   --workdir DIR            run directory, the same path on every worker; a multi-host slice
#                            needs one all workers see (the --bucket mount, an NFS share):
#                            tr-align writes it with local file APIs, so not a gs:// URL
#   --max-restarts N         on every worker, rerun `tr-align train` up to N times when it
#                            exits with 75 (stopped by SIGTERM or a preemption notice, with
#                            a checkpoint: "resume me"; all workers stop at the same step);
#                            default 3. A preempted Spot VM is gone: rerun this script
#   --delete                 delete the TPU VM when training ends
#   --dry-run                print the commands, run nothing
#   -- ARGS...               passed on to `tr-align train` (e.g. --config.train.steps=1000)
set -euo pipefail

NAME=tr-align
ZONE=""
ACCEL=v5litepod-8
VERSION=""
PROJECT=""
SPOT=0
REPO_URL=""
BRANCH=main
CONFIG=configs/default.py
BUCKET=""
WORKDIR=""
DELETE=0
MAX_RESTARTS=3
DRY_RUN=0
TRAIN_ARGS=()
# shellcheck disable=SC2088  # expanded on the workers, inside their --command
REMOTE_DIR='~/tr_align'
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

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
    --spot) SPOT=1; shift; continue ;;
    --delete) DELETE=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --*=*) key="${opt%%=*}"; val="${opt#*=}"; shift ;;
    --*) key="$opt"; [[ $# -ge 2 ]] || die "$opt needs a value"; val="$2"; shift 2 ;;
    *) die "unexpected argument '$opt' (train flags go after --)" ;;
  esac
  case "$key" in
    --name) NAME="$val" ;;
    --zone) ZONE="$val" ;;
    --accelerator-type) ACCEL="$val" ;;
    --version) VERSION="$val" ;;
    --project) PROJECT="$val" ;;
    --repo) REPO_URL="$val" ;;
    --branch) BRANCH="$val" ;;
    --config) CONFIG="$val" ;;
    --bucket) BUCKET="${val#gs://}" ;;
    --workdir) WORKDIR="$val" ;;
    --max-restarts) MAX_RESTARTS="$val" ;;
    *) die "unknown option $key" ;;
  esac
done

[[ -n "$ZONE" ]] || die "--zone is required (e.g. --zone=us-east5-a)"
ACCEL="${ACCEL/#v5e-/v5litepod-}"  # gcloud spells v5e slices v5litepod-N
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "--accelerator-type=$ACCEL: give --version for it (known: v4-*, v5litepod-*, v5p-*, v6e-*)" ;;
  esac
fi
if [[ -z "$WORKDIR" ]]; then
  # $HOME is expanded on the workers.
  if [[ -n "$BUCKET" ]]; then WORKDIR="/mnt/gcs/tr_align/$NAME"; else WORKDIR="\$HOME/runs/$NAME"; fi
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
on_all() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

# 1. The slice: reuse it if it exists (a dry run shows both commands).
show "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}"
if [[ $DRY_RUN == 1 ]] || ! "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ $SPOT == 0 ]] || create+=(--spot)
  run "${create[@]}"
fi

# 2. The code on every worker.
if [[ -n "$REPO_URL" ]]; then
  on_all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $BRANCH && git -C $REMOTE_DIR checkout -q FETCH_HEAD; else git clone -q --branch $BRANCH $REPO_URL $REMOTE_DIR; fi"
else
  TARBALL="${TMPDIR:-/tmp}/tr_align_code.tgz"
  # Tracked and untracked-but-not-ignored files of this checkout, as they are on disk.
  # shellcheck disable=SC2016  # printed, not run: what the next line archives
  show tar -czf "$TARBALL" -C "$HERE" '$(git ls-files -co --exclude-standard)'
  if [[ $DRY_RUN == 0 ]]; then
    (cd "$HERE" && git ls-files -co --exclude-standard -z | tar -czf "$TARBALL" --null -T -)
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:tr_align_code.tgz" "${WHERE[@]}" --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar -xzf ~/tr_align_code.tgz -C $REMOTE_DIR"
fi

# 3. Install (libtpu comes with jax[tpu]); optionally mount the bucket.
on_all "cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e . \"jax[tpu]\""
if [[ -n "$BUCKET" ]]; then
  on_all "command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; mountpoint -q /mnt/gcs || { sudo mkdir -p /mnt/gcs && sudo chown \$(id -u):\$(id -g) /mnt/gcs && gcsfuse --implicit-dirs $BUCKET /mnt/gcs; }"
fi

# 4. The same command on every worker (jax joins them into one job), rerun on exit 75
#    (stopped with a checkpoint) at most MAX_RESTARTS times; rerun this script to resume.
cmd="python3 -m tr_align train --config=$CONFIG --workdir=$WORKDIR"
for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do printf -v q '%q' "$a"; cmd+=" $q"; done
on_all "cd $REMOTE_DIR && for attempt in \$(seq 0 $MAX_RESTARTS); do $cmd 2>&1 | tee -a ~/tr_align_train.log; rc=\${PIPESTATUS[0]}; [ \$rc = 75 ] || break; echo \"tr-align exited 75: resuming\" >&2; done; exit \$rc"

if [[ $DELETE == 1 ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
