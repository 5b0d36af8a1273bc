"""Steps per second of a GAN training step dispatched three ways, side by side in one run
(not a test):

* `per-update`: each update its own jitted program (`jit_update`), dispatched one after the
  other, its batch copied to the devices before each, and the step's metrics fetched to the
  host every step;
* `unrolled`: the whole step as one program (`make_train_step`), every update written out
  in order, fed a stacked batch, metrics left on the devices; this is what `jattn train`
  runs by default;
* `scan`: the same program with the critic's repeats as a `lax.scan` (`step_unroll=False`).

For each: compile seconds (all programs of a step), steps/s (median of `--repeats`
timings of `--steps` steps each, input batches prepared on the host beforehand, so the
difference is dispatch, host round-trips and what XLA makes of the program) and the
process's minor page faults per timed step. Runs on `configs/demo.py` (DeepFill v1 at
64x64) and a micro config (the same with 32x32 images and 4-channel layers, where per-step
host overhead dominates). Like the `jattn` command, it runs under the allocator
`jattn/_alloc.py` picks (`JATTN_MALLOC=0`: the C library's malloc as it is).

    python benchmarks/step_dispatch.py [--steps 10] [--repeats 3] [--dispatch unrolled ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import time

import jax
import numpy as np

from jattn._alloc import active_allocator, reexec_with_allocator
from jattn._xla import apply_cpu_defaults

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.cnum=4", "model.critic_cnum=4", "model.local_size=16", "data.image_size=32",
         "data.mask.hole_size=[16,16]", "data.mask.max_delta=[4,4]", "data.source.crop_size=32"]


def _inputs(config, task, steps: int) -> list[list[dict]]:
    from jattn.train.loop import make_train_data

    data = make_train_data(config, fields=task.fields)
    return [[next(data) for _ in task.updates] for _ in range(steps)]


DISPATCH = ("per-update", "unrolled", "scan")


def _timed(run, steps: int, repeats: int) -> dict:
    """steps/s (median over `repeats` calls of `run`, each `steps` steps) and minor page
    faults per step."""
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"steps_per_s": steps / statistics.median(times), "minor_faults_per_step": faults / (steps * repeats)}


def measure(config_path: str, overrides: list[str], steps: int, repeats: int,
            dispatch: tuple[str, ...] = DISPATCH) -> dict:
    from jattn.config import load_config
    from jattn.train.setup import state_init_fn
    from jattn.train.sharding import make_mesh, replicated
    from jattn.train.task import build_task

    config = load_config(config_path, overrides)
    mesh = make_mesh()
    task = build_task(config)
    host = _inputs(config, task, steps)
    init = jax.jit(state_init_fn(task, config), out_shardings=replicated(mesh))
    out = {"config": config_path, "overrides": overrides, "devices": jax.device_count(),
           "batch_size": int(config.batch_size), "updates_per_step": len(task.updates),
           "allocator": active_allocator()}
    if "per-update" in dispatch:
        out["per-update"] = _per_update(task, mesh, init, host, steps, repeats)
    for name, unroll in (("unrolled", True), ("scan", False)):
        if name in dispatch:
            out[name] = _one_program(task, mesh, init, host, steps, repeats, unroll)
    return out


def _per_update(task, mesh, init, host, steps: int, repeats: int) -> dict:
    """One program per distinct update, batches copied and metrics fetched each step."""
    from jattn.train.sharding import to_global_array
    from jattn.train.steps import jit_update, run_updates

    jitted: dict[int, object] = {}
    fns = [jitted.setdefault(id(u), jit_update(u, mesh)) for u in task.updates]
    state = init(jax.random.key(0))
    t0 = time.perf_counter()
    state, m = run_updates(fns, state, [to_global_array(b, mesh) for b in host[0]])
    jax.device_get(m)
    compile_s = time.perf_counter() - t0

    def per_update():
        nonlocal state
        for batches in host:
            state, metrics = run_updates(fns, state, [to_global_array(b, mesh) for b in batches])
            jax.device_get(metrics)

    return {"compile_s": compile_s, **_timed(per_update, steps, repeats)}


def _one_program(task, mesh, init, host, steps: int, repeats: int, unroll: bool) -> dict:
    """The whole step as one program, fed a stacked batch, metrics left on the devices."""
    from jattn.train.input import stack_batches
    from jattn.train.sharding import to_global_array
    from jattn.train.steps import make_train_step

    step = make_train_step(task.updates, mesh, unroll=unroll)
    state = init(jax.random.key(0))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, m = step(state, to_global_array(stack_batches(host[0]), mesh, stacked=True))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0

        def one_program():
            nonlocal state
            for batches in host:
                state, metrics = step(state, to_global_array(stack_batches(batches), mesh, stacked=True))
            jax.block_until_ready(metrics)

        return {"compile_s": compile_s, **_timed(one_program, steps, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dispatch", nargs="+", choices=DISPATCH, default=list(DISPATCH))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reexec_with_allocator()  # as the `jattn` command does (jattn/_alloc.py)
    demo = str(REPO / "configs" / "demo.py")
    dispatch = tuple(args.dispatch)
    results = [measure(demo, [], args.steps, args.repeats, dispatch),
               measure(demo, MICRO, args.steps, args.repeats, dispatch)]
    print(f"allocator: {results[0]['allocator']}")
    print(f"{'config':<8} {'dispatch':<11} {'compile s':>9} {'steps/s':>8} {'faults/step':>11}")
    for name, r in zip(("demo", "micro"), results):
        for kind in dispatch:
            print(f"{name:<8} {kind:<11} {r[kind]['compile_s']:9.1f} {r[kind]['steps_per_s']:8.2f} "
                  f"{r[kind]['minor_faults_per_step']:11.0f}")
    print(json.dumps(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
