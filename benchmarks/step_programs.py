"""Programs and collectives per training step, dispatched per update or as one program,
compiled side by side for a TPU topology (or `local`) in one run (not a test).

* `per-update`: each update its own jitted program (`jattn.train.steps.jit_update`), one
  dispatch per update: DeepFill v1's step is 5 critic updates then 1 generator update, so
  6 dispatches of 2 programs;
* `step`: the whole step as the one program `jattn train` dispatches (`make_train_step`,
  every update written out), what `jattn compile` reports.

For each: programs per step, the collectives a step runs (each program's, times its runs
per step), the step's FLOPs and bytes per chip and compile seconds.

    python benchmarks/step_programs.py --config configs/deepfill_v1_places2.py --topology v5e:4x4 [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _per_update(task, config, mesh, global_batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jattn.train.aot import _compile, cost_of, count_collectives
    from jattn.train.setup import abstract_eval_batch, abstract_train_state
    from jattn.train.sharding import replicated
    from jattn.train.steps import jit_update

    state = abstract_train_state(task, config, mesh)
    batch = abstract_eval_batch(task, config, mesh, global_batch)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    runs = collections.Counter(u.name for u in task.updates)
    seen, collectives, flops, nbytes, seconds = {}, collections.Counter(), 0.0, 0.0, 0.0
    for update in task.updates:
        if update.name in seen:
            continue
        compiled, sec, _ = _compile(jit_update(update, mesh), (state, batch, index), mesh)
        seen[update.name] = compiled
        f, b = cost_of(compiled)
        n = runs[update.name]
        flops, nbytes, seconds = flops + n * f, nbytes + n * b, seconds + sec
        for name, count in count_collectives(compiled.as_text()).items():
            collectives[name] += n * count
    return {"programs": len(seen), "dispatches_per_step": len(task.updates), "collectives_per_step": dict(collectives),
            "flops_per_chip": flops, "bytes_per_chip": nbytes, "compile_seconds": round(seconds, 1)}


def _step(task, config, mesh, global_batch: int) -> dict:
    from jattn.train.aot import _compile, cost_of, count_collectives
    from jattn.train.setup import abstract_step_batches, abstract_train_state
    from jattn.train.steps import make_train_step

    state = abstract_train_state(task, config, mesh)
    batches = abstract_step_batches(task, config, mesh, global_batch)
    compiled, seconds, _ = _compile(make_train_step(task.updates, mesh, unroll=True), (state, batches), mesh)
    flops, nbytes = cost_of(compiled)
    return {"programs": 1, "dispatches_per_step": 1, "collectives_per_step": count_collectives(compiled.as_text()),
            "flops_per_chip": flops, "bytes_per_chip": nbytes, "compile_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", default="v5e:4x4", help="a TPU topology (libtpu) or 'local'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.topology != "local":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.path.insert(0, str(ROOT))
    from jattn.config import load_config, with_defaults
    from jattn.train.aot import topology_devices
    from jattn.train.sharding import make_mesh
    from jattn.train.task import build_task

    config = with_defaults(load_config(args.config, args.set))
    devices = topology_devices(args.topology)
    mesh = make_mesh(devices)
    task = build_task(config)
    global_batch = int(config.batch_size)
    results = {"config": args.config, "overrides": args.set, "topology": args.topology,
               "chip": devices[0].device_kind, "chips": len(devices), "global_batch": global_batch,
               "updates_per_step": [u.name for u in task.updates]}
    for name, fn in (("per-update", _per_update), ("step", _step)):
        results[name] = fn(task, config, mesh, global_batch)
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
