#!/usr/bin/env bash
# gpus.sh: train jattn on one host with all its GPUs, in one process.
#
# What it does
#   Runs `python -m jattn train` once. JAX sees every local GPU and jattn's mesh spans them
#   all: one jitted program, parameters replicated, each global batch split over the GPUs
#   (batch_size is the global batch; make it a multiple of the GPU count). No
#   jax.distributed is needed for a single host (`--distributed off`).
#
# Variables (environment)
#   CONFIG        config file                       (default: configs/deepfill_v1_base.py)
#   WORKDIR       workdir (local or gs://)          (default: workdirs/gpus)
#   GPUS          comma-separated GPU ids to use    (default: all; sets CUDA_VISIBLE_DEVICES)
#   PYTHON        interpreter with jattn installed  (default: .venv/bin/python if present, else python3)
#   EXTRA_ARGS    more `jattn train` arguments, e.g. "--set batch_size=128"
#   DRY_RUN=1     (or --dry-run) print the command instead of running it
#   Arguments after the options are passed on to `jattn train`.
#
# Example (8 H100s, batch 16 per GPU):
#   WORKDIR=workdirs/v1_8gpu ./launch/gpus.sh --set batch_size=128
set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
DRY_RUN="${DRY_RUN:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/deepfill_v1_base.py}"
WORKDIR="${WORKDIR:-workdirs/gpus}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

envs=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TF_CPP_MIN_LOG_LEVEL=2)
if [[ -n "${GPUS:-}" ]]; then envs+=(CUDA_VISIBLE_DEVICES="$GPUS"); fi
cmd=(env "${envs[@]}" "$PYTHON" -m jattn train --distributed off --config "$CONFIG" --workdir "$WORKDIR")
if [[ -n "$EXTRA_ARGS" ]]; then read -r -a extra <<<"$EXTRA_ARGS"; cmd+=("${extra[@]}"); fi
cmd+=("$@")

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

if [[ "$DRY_RUN" == 1 ]]; then
  show "${cmd[@]}"
else
  cd "$ROOT"
  exec "${cmd[@]}"
fi
