"""Speed and memory of a DeepFill v1 training iteration (not a test).

An iteration is one critic update plus one generator update (WGAN-GP), at the official
widths (cnum 32, critics 64) and 256x256 images, on the local devices, as `jattn train`
runs them (`jattn.train.steps.jit_update` over a mesh). Prints, per batch size:
compile time, median seconds per iteration, images/s, XLA's FLOP count of the two
compiled updates and its rate, the nominal rate (256 GFLOP per image and
iteration), next to a `jnp.matmul` rate in the run's compute dtype measured in the same run,
two ways: the machine's peak (the best of 20 calls before and 20 after the iterations) and
its sustained rate interleaved with the iterations (20 calls back to back after each timed
iteration; each iteration's rate is divided by the block that follows it, and the median of
those ratios is reported, so a drift of the machine's speed during the run moves both the
numerator and the denominator); and XLA's
memory analysis of each update plus the process's peak RSS. Like the `jattn` command, it
runs under tcmalloc where the machine has it, else under tuned glibc malloc
(`jattn/_alloc.py`; `JATTN_MALLOC=0` not to).

    python benchmarks/train_step.py [--batch 4 16] [--repeats 3]
    taskset -c 0 python benchmarks/train_step.py --batch 4   # pinned to one core
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn._xla import apply_cpu_defaults
from jattn._alloc import active_allocator, reexec_with_allocator

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
NOMINAL_GFLOP_PER_IMAGE = 256.0  # 3x the generator's 52 GFLOP forward + the critics with GP


MATMUL_CALLS = 20


def _matmul_timer(n: int, dtype):
    """A compiled [n, n] x [n, n] `jnp.matmul` in `dtype` (float32 accumulation); returns
    `timed()`, which runs it `MATMUL_CALLS` times back to back, each to completion, and
    gives the list of the calls' seconds."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))

    def timed() -> list[float]:
        times = []
        for _ in range(MATMUL_CALLS):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a, a))
            times.append(time.perf_counter() - t0)
        return times

    return timed


def _peak_gflops(n: int, times: list[float]) -> float:
    """The best call's GFLOP/s: the machine's peak rate (a median of a few calls varied by
    15% from run to run on the shared development machine)."""
    return 2 * n**3 / min(times) / 1e9


def _sustained_gflops(n: int, times: list[float]) -> float:
    """GFLOP/s of the whole block of calls: the rate the machine sustains at that moment."""
    return 2 * n**3 * len(times) / sum(times) / 1e9


def _batch(batch: int, size: int):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    for i in range(batch):
        top, left = rng.integers(0, size // 2, 2)
        mask[i, top : top + size // 2 - 16, left : left + size // 2 - 16] = 1.0
    return {"image": image, "mask": mask}


def setup(batch: int, overrides: list[str] = ()):
    """The DeepFill v1 task at the official widths, its initial state and one batch, on a
    mesh of the local devices. Returns `(task, mesh, state, data)`; `task.updates` are
    the critic and generator updates."""
    from jattn.config import load_config
    from jattn.train.setup import state_init_fn
    from jattn.train.sharding import make_mesh, replicated, to_global_array
    from jattn.train.task import build_task

    config = load_config(REPO / "configs" / "deepfill_v1_base.py", [f"batch_size={batch}", "n_critic=1", *overrides])
    mesh = make_mesh()
    task = build_task(config)
    state = jax.jit(state_init_fn(task, config), out_shardings=replicated(mesh))(jax.random.key(0))
    data = to_global_array(_batch(batch, config.data.image_size), mesh)
    return task, mesh, state, data


def bench(batch: int, repeats: int, overrides: list[str], sustained_matmul=None) -> dict:
    """Times `repeats` iterations (median). With `sustained_matmul` (a callable that runs a
    block of matmuls and returns its GFLOP/s), a block follows each timed iteration: the
    result gains the blocks' rates and the median of the per-iteration ratios (nominal rate
    / the rate of the block that follows)."""
    from jattn.train.steps import jit_update

    task, mesh, state, data = setup(batch, overrides)
    fns, compile_s, flops, memory = [], 0.0, 0.0, {}
    for name, update in zip(("critic", "generator"), task.updates):
        fn = jit_update(update, mesh, donate=False)
        t0 = time.perf_counter()
        compiled = fn.lower(state, data, 0).compile()
        compile_s += time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops += float(cost.get("flops", 0.0)) if cost else 0.0
        mem = compiled.memory_analysis()
        if mem is not None:
            memory[name] = {"temp_mb": mem.temp_size_in_bytes / 2**20, "argument_mb": mem.argument_size_in_bytes / 2**20}
        fns.append(compiled)

    def iteration(state):
        for i, fn in enumerate(fns):
            state, metrics = fn(state, data, i)
        return state, metrics

    state, _ = iteration(state)  # warm-up
    jax.block_until_ready(state)
    times, blocks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = iteration(state)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        if sustained_matmul is not None:
            blocks.append(sustained_matmul())
    seconds = float(np.median(times))
    interleaved = {}
    if blocks:
        ratios = [NOMINAL_GFLOP_PER_IMAGE * batch / t / b for t, b in zip(times, blocks)]
        interleaved = {
            "matmul_gflops_interleaved": [round(b, 1) for b in blocks],
            "pct_of_matmul_interleaved_nominal": round(100 * float(np.median(ratios)), 1),
        }
    return {
        "batch": batch,
        "compile_seconds": round(compile_s, 1),
        "seconds_per_iteration": round(seconds, 3),
        "images_per_second": round(batch / seconds, 2),
        "xla_gflop_per_iteration": round(flops / 1e9, 1),
        "xla_gflops": round(flops / seconds / 1e9, 1),
        "nominal_gflops": round(NOMINAL_GFLOP_PER_IMAGE * batch / seconds, 1),
        "memory": memory,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "losses_finite": bool(np.isfinite(float(metrics["g_loss"]))),
        **interleaved,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--matmul-size", type=int, default=None, help="baseline matmul size (default 2048 CPU, 8192 else)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    info = {
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.local_devices()],
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "allocator": active_allocator(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(json.dumps(info))
    # the baseline matmul: in the run's compute dtype; 2048 on CPU, 8192 on accelerators (a
    # 2048 matmul is too small to reach a GPU's rate)
    dtype = next((o.split("=", 1)[1] for o in args.set if o.startswith("compute_dtype=")), "float32")
    n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
    timer = _matmul_timer(n, jnp.dtype(dtype))
    before = _peak_gflops(n, timer())
    print(json.dumps({f"matmul_gflops_{dtype}_{n}_before": round(before, 1)}))
    info["results"] = [bench(batch, args.repeats, args.set, lambda: _sustained_gflops(n, timer()))
                       for batch in args.batch]
    after = _peak_gflops(n, timer())
    # the baseline: the better of the peak rates measured before and after the iterations
    info["matmul_gflops"] = round(max(before, after), 1)
    info["matmul_gflops_before_after"] = [round(before, 1), round(after, 1)]
    info["matmul"] = (f"{dtype} {n}x{n}, best of {MATMUL_CALLS} calls before and {MATMUL_CALLS} after; "
                      f"interleaved: {MATMUL_CALLS} calls back to back after each timed iteration")
    for result in info["results"]:
        result["pct_of_matmul_xla_flops"] = round(100 * result["xla_gflops"] / info["matmul_gflops"], 1)
        result["pct_of_matmul_nominal"] = round(100 * result["nominal_gflops"] / info["matmul_gflops"], 1)
        print(json.dumps(result))
    print(json.dumps({"matmul_gflops": info["matmul_gflops"], "before_after": info["matmul_gflops_before_after"]}))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    reexec_with_allocator()  # as the `jattn` command does (jattn/_alloc.py); JATTN_MALLOC=0 to compare
    main()
