"""Steps per second of a GAN training step dispatched three ways, side by side in one run
(not a test):

* `per-update`: each update its own jitted program (`jit_update`), dispatched one after the
  other, its batch copied to the devices before each, and the step's metrics fetched to the
  host every step;
* `unrolled`: the whole step as one program (`make_train_step`), every update written out
  in order, fed a stacked batch, metrics left on the devices; this is what `jattn train`
  runs by default;
* `scan`: the same program with the critic's repeats as a `lax.scan` (`step_unroll=False`).

For each: compile seconds (all programs of a step) and steps/s (median of `--repeats`
timings of `--steps` steps each, input batches prepared on the host beforehand, so the
difference is dispatch, host round-trips and what XLA makes of the program). Runs on
`configs/demo.py` (DeepFill v1 at 64x64) and a micro config (the same with 32x32 images and
4-channel layers, where per-step host overhead dominates).

    python benchmarks/step_dispatch.py [--steps 10] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from jattn._xla import apply_cpu_defaults

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.cnum=4", "model.critic_cnum=4", "model.local_size=16", "data.image_size=32",
         "data.mask.hole_size=[16,16]", "data.mask.max_delta=[4,4]", "data.source.crop_size=32"]


def _inputs(config, task, steps: int) -> list[list[dict]]:
    from jattn.train.loop import make_train_data

    data = make_train_data(config, fields=task.fields)
    return [[next(data) for _ in task.updates] for _ in range(steps)]


def _timed(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(config_path: str, overrides: list[str], steps: int, repeats: int) -> dict:
    from jattn.config import load_config
    from jattn.train.input import stack_batches
    from jattn.train.setup import state_init_fn
    from jattn.train.sharding import make_mesh, replicated, to_global_array
    from jattn.train.steps import jit_update, make_train_step, run_updates
    from jattn.train.task import build_task

    config = load_config(config_path, overrides)
    mesh = make_mesh()
    task = build_task(config)
    host = _inputs(config, task, steps)
    init = jax.jit(state_init_fn(task, config), out_shardings=replicated(mesh))
    out = {"config": config_path, "overrides": overrides, "devices": jax.device_count(),
           "batch_size": int(config.batch_size), "updates_per_step": len(task.updates)}

    # per update: one program per distinct update, batches copied and metrics fetched each step
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

    out["per-update"] = {"compile_s": compile_s, "steps_per_s": steps / _timed(per_update, repeats)}

    for name, unroll in (("unrolled", True), ("scan", False)):
        step = make_train_step(task.updates, mesh, unroll=unroll)
        state = init(jax.random.key(0))
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            first = to_global_array(stack_batches(host[0]), mesh, stacked=True)
            state, m = step(state, first)
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0

            def one_program(step=step):
                nonlocal state
                for batches in host:
                    state, metrics = step(state, to_global_array(stack_batches(batches), mesh, stacked=True))
                jax.block_until_ready(metrics)

            out[name] = {"compile_s": compile_s, "steps_per_s": steps / _timed(one_program, repeats)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    demo = str(REPO / "configs" / "demo.py")
    results = [measure(demo, [], args.steps, args.repeats), measure(demo, MICRO, args.steps, args.repeats)]
    print(f"{'config':<8} {'dispatch':<11} {'compile s':>9} {'steps/s':>8}")
    for name, r in zip(("demo", "micro"), results):
        for kind in ("per-update", "unrolled", "scan"):
            print(f"{name:<8} {kind:<11} {r[kind]['compile_s']:9.1f} {r[kind]['steps_per_s']:8.2f}")
    print(json.dumps(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
