#!/usr/bin/env bash
# GPU / TPU measurements on a machine with an accelerator (not a test, not CI).
#
# For a machine that has jax, flax, optax, orbax and einops but no network, TensorFlow or
# grain. What else the benchmarks import (ml_collections, Pillow) travels as wheels: on the
# development machine, first
#     pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_28_x86_64 -d .device_wheels pillow ml_collections
# then copy the checkout with .device_wheels to the accelerator machine and run:
#     bash benchmarks/device_check.sh            # results in $OUT (or ./device_out)
# It records the accelerator, then the DeepFill v1 training iteration (benchmarks/train_step.py)
# in float32 and in bfloat16 compute, and contextual attention (benchmarks/contextual_attention.py),
# each as JSON next to a matmul of the same run, for docs/benchmarks.md. About 5 minutes on
# an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"

missing=$("$py" - <<'PY'
import importlib.util
print(" ".join(m for m in ("ml_collections", "PIL") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then  # into a folder of its own: works for a system Python and a venv alike
    echo "installing from .device_wheels: $missing"
    "$py" -m pip install -q --no-index --no-deps --target "$out/site" .device_wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$out/site"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true; } | tee "$out/accelerator.txt"
"$py" -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" | tee -a "$out/accelerator.txt"

run() {  # name, then the command; a failing step is recorded and the next one still runs
    local name=$1; shift
    echo "== $name: $*"
    if ! timeout 240 "$@" > "$out/$name.log" 2>&1; then echo "FAILED: $name (see $out/$name.log)"; fi
    tail -n 3 "$out/$name.log"
}
run train_step_fp32 "$py" benchmarks/train_step.py --batch 16 64 --repeats 5 --json "$out/train_step_fp32.json"
run train_step_bf16 "$py" benchmarks/train_step.py --batch 16 64 --repeats 5 --set compute_dtype=bfloat16 \
    --json "$out/train_step_bf16.json"
run contextual_attention "$py" benchmarks/contextual_attention.py --repeats 10 --json "$out/contextual_attention.json"
