#!/usr/bin/env bash
# tpu_pod.sh: train jattn on a Cloud TPU VM pod slice (e.g. v5e-256: 64 hosts x 4 chips).
#
# What it does
#   1. creates the TPU VM slice with `gcloud compute tpus tpu-vm create`, or reuses it when
#      `gcloud compute tpus tpu-vm describe` finds it;
#   2. copies this checkout to every worker (`scp --worker=all`) and installs it there
#      (`pip install -e .` plus jax[tpu]) with `ssh --worker=all`;
#   3. starts `python -m jattn train --distributed auto` on all workers at once
#      (`ssh --worker=all`): one process per host; jax.distributed.initialize() finds the
#      coordinator and the process ids from the TPU metadata, and the mesh spans every chip.
#   The workdir (checkpoints, logs) must be on gs:// so that every host writes into the same
#   checkpoint and a later run on another slice can restore it; the data too (TFDS data_dir
#   or files on gs://), since every host reads its own slice of each global batch.
#
# Variables (environment)
#   TPU_NAME        name of the slice                     (default: jattn-pod)
#   ZONE            zone                                  (default: us-west4-a)
#   PROJECT         gcloud project                        (default: gcloud's configured one)
#   ACCELERATOR     accelerator type                      (default: v5litepod-256)
#   RUNTIME         TPU VM software version               (default: v2-alpha-tpuv5-lite)
#   CONFIG          config file, relative to the checkout (default: configs/deepfill_v1_places2.py)
#   WORKDIR         gs:// workdir                         (required)
#   DATA_DIR        gs:// TFDS data dir, passed as TFDS_DATA_DIR (optional)
#   EXTRA_ARGS      more `jattn train` arguments, e.g. "--set batch_size=4096 --total-steps 100000"
#   SPOT=1          create a spot slice
#   DRY_RUN=1       (or --dry-run) print every command instead of running it
#
# Example
#   WORKDIR=gs://my-bucket/jattn/places2 DATA_DIR=gs://my-bucket/tfds \
#   EXTRA_ARGS="--set batch_size=4096" ./launch/tpu_pod.sh
#   DRY_RUN=1 WORKDIR=gs://b/w ./launch/tpu_pod.sh          # shows the gcloud commands
set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
DRY_RUN="${DRY_RUN:-0}"
TPU_NAME="${TPU_NAME:-jattn-pod}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5litepod-256}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
CONFIG="${CONFIG:-configs/deepfill_v1_places2.py}"
WORKDIR="${WORKDIR:?set WORKDIR to a gs:// path (every host writes the same checkpoints)}"
DATA_DIR="${DATA_DIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
SPOT="${SPOT:-0}"
REMOTE_DIR="jattn"

case "$WORKDIR" in
  gs://*) ;;
  *) echo "tpu_pod.sh: WORKDIR must be on gs:// (got $WORKDIR)" >&2; exit 2 ;;
esac

show() {  # print a command, each argument shell-quoted only where needed
  local a out="+"
  for a in "$@"; do
    case "$a" in
      ''|*[!A-Za-z0-9_./:=@,+%~-]*) a="'${a//\'/\'\\\'\'}'" ;;
    esac
    out+=" $a"
  done
  printf '%s\n' "$out"
}

run() {  # print the command (quoted) in a dry run, else run it
  if [[ "$DRY_RUN" == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then where+=(--project="$PROJECT"); fi

# 1. create or reuse the slice
if [[ "$DRY_RUN" != 1 ]] && "${gc[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $TPU_NAME"
else
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${gc[@]}" describe "$TPU_NAME" "${where[@]}"
    echo "# (if describe fails:)"
  fi
  create=("${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
fi

# 2. copy this checkout to every worker and install it
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR"
run "${gc[@]}" scp --recurse "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/jattn" "$SRC/configs" \
  "$TPU_NAME:~/$REMOTE_DIR/" "${where[@]}" --worker=all
install="cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip"
install+=" && .venv/bin/pip install -q -e . 'jax[tpu]' && .venv/bin/python -c 'import jattn'"
run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$install"

# 3. start training on all workers at once (one process per host)
envs="TF_CPP_MIN_LOG_LEVEL=2"
if [[ -n "$DATA_DIR" ]]; then envs+=" TFDS_DATA_DIR=$DATA_DIR"; fi
train="cd ~/$REMOTE_DIR && $envs .venv/bin/python -m jattn train --distributed auto"
train+=" --config $CONFIG --workdir $WORKDIR --no-progress"
if [[ -n "$EXTRA_ARGS" ]]; then train+=" $EXTRA_ARGS"; fi
run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$train"
