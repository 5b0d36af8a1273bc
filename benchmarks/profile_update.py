"""Where a DeepFill v1 training iteration spends its time on the CPU (not a test).

Compiles the two updates as `benchmarks/train_step.py` does (batch 4 by default, official
widths, 256x256) and, for each:

1. runs it `--repeats` times: median wall seconds, and per run the process's user and
   kernel CPU seconds and minor page faults (`getrusage`);
2. records one run with `jax.profiler.trace` and splits its wall time among the HLO
   instructions running at each instant, by kind: convolutions (XLA:CPU runs them
   asynchronously, so they are the time when no other instruction runs), dots and other
   YNNPACK fusions, layout transposes, and the remaining (elementwise) fusions;
3. adds up the bytes each non-convolution instruction reads and writes (its operand and
   result shapes in the compiled HLO) and divides by their own run time: their rate of
   memory traffic.

It also times one streaming elementwise op (`x * a + b`) on arrays of 4 and 32 MB, the
machine's rate of memory traffic for data inside and outside the core's cache.

    python benchmarks/profile_update.py [--batch 4] [--repeats 4] [--top 20] [--json FILE]

Like the `jattn` command, it runs under tcmalloc where the machine has it, else under tuned
glibc malloc (`jattn/_alloc.py`; `JATTN_MALLOC=0` to compare). The trace format read here is
XLA:CPU's (jaxlib 0.10): events with an `hlo_op` argument inside `ThunkExecutor::Execute`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn._xla import apply_cpu_defaults
from jattn._alloc import active_allocator, reexec_with_allocator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the same batch and config)

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "pred": 1, "s8": 1, "u8": 1, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)", re.M)


def _nbytes(shapes: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shapes):
        total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _kind(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if "conv" in base:
        return "convolutions (synchronous)"
    if base.startswith("ynn") or "dot" in base:
        return "dots and YNNPACK fusions"
    if "transpose" in base or base == "copy" or base.startswith("copy_"):
        return "layout transposes and copies"
    return "elementwise and other fusions"


def _hlo_table(hlo_text: str) -> dict[str, tuple[int, int]]:
    """instruction name -> (bytes of its result, bytes of its operands), ENTRY only."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    result, operands = {}, {}
    for name, shape, _op, args in _INSTR.findall(entry):
        result[name] = _nbytes(shape)
        operands[name] = [a.strip().lstrip("%") for a in args.split(",") if a.strip().startswith("%")]
    return {n: (result[n], sum(result.get(a, 0) for a in operands[n])) for n in result}


def _trace_events(trace_dir: str) -> tuple[list[dict], dict]:
    paths = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler.trace wrote no *.trace.json.gz under {trace_dir}")
    events = [e for e in json.load(gzip.open(paths[0]))["traceEvents"] if e.get("ph") == "X"]
    ops = [e for e in events if "hlo_op" in (e.get("args") or {})]
    waits = [e for e in events if e["name"].startswith("ThunkExecutor::Execute")]
    if not ops or not waits:
        raise RuntimeError("the trace has no XLA:CPU thunk events (hlo_op / ThunkExecutor::Execute): "
                           "this script reads jaxlib 0.10's CPU trace format")
    return ops, max(waits, key=lambda e: e["dur"])


def profile(compiled, args, repeats: int, top: int = 0) -> dict:
    """Timing, CPU time, page faults and the wall-time split of one compiled update."""
    jax.block_until_ready(compiled(*args))
    walls, user, sys_, faults = [], [], [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(compiled(*args))
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        walls.append(t1 - t0)
        user.append(r1.ru_utime - r0.ru_utime)
        sys_.append(r1.ru_stime - r0.ru_stime)
        faults.append(r1.ru_minflt - r0.ru_minflt)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(compiled(*args))
        ops, execute = _trace_events(trace_dir)
    hlo = compiled.as_text()
    sizes = _hlo_table(hlo)
    shapes = {name: shape for name, shape, _op, _args in _INSTR.findall(hlo[hlo.index("ENTRY"):])}

    # Wall time: each instant goes to the instructions running then, in equal shares; an
    # instant with none running is an asynchronous convolution.
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(ops)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(ops)])
    wall, by_op = collections.Counter(), collections.Counter()
    active, last = set(), execute["ts"]
    for t, step, i in points:
        if t > last:
            if active:
                for j in active:
                    wall[_kind(ops[j]["args"]["hlo_op"])] += (t - last) / len(active)
                    by_op[ops[j]["args"]["hlo_op"]] += (t - last) / len(active)
            else:
                wall["convolutions (asynchronous)"] += t - last
        last = t
        (active.add if step == 1 else active.discard)(i)
    wall["convolutions (asynchronous)"] += max(0.0, execute["ts"] + execute["dur"] - last)
    total = sum(wall.values())

    traffic = collections.defaultdict(lambda: [0.0, 0])  # kind -> [own microseconds, bytes]
    for e in ops:
        name = e["args"]["hlo_op"]
        kind = _kind(name)
        if name in sizes and not kind.startswith(("convolutions", "dots")):
            traffic[kind][0] += e["dur"]
            traffic[kind][1] += sum(sizes[name])
    return {
        "seconds": round(float(np.median(walls)), 3),
        "user_cpu_seconds": round(float(np.median(user)), 3),
        "kernel_cpu_seconds": round(float(np.median(sys_)), 3),
        "minor_page_faults": int(np.median(faults)),
        "traced_wall_seconds": round(total / 1e6, 3),
        "wall_share": {k: round(v / total, 3) for k, v in wall.most_common()},
        "top_instructions": [{"name": n, "wall_ms": round(v / 1e3, 1), "shape": shapes.get(n, "?")}
                             for n, v in by_op.most_common(top)],
        "memory_traffic": {k: {"gigabytes": round(b / 1e9, 2), "own_seconds": round(us / 1e6, 3),
                               "gb_per_second": round(b / us / 1e3, 1)} for k, (us, b) in traffic.items() if us},
    }


def streaming_rate(megabytes: int) -> float:
    """GB/s of `x * 1.5 + 1` on a float32 array of `megabytes` (read + write), best of 20."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 1.5 + 1.0)
    jax.block_until_ready(f(x))
    best = min(_timed(f, x) for _ in range(20))
    return 2 * x.nbytes / best / 1e9


def _timed(f, x) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--top", type=int, default=0, help="also list the N instructions that take the most wall time")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from jattn.train.steps import jit_update

    task, mesh, state, data = train_step.setup(args.batch)
    out = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "batch": args.batch,
           "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "allocator": active_allocator(),
           "streaming_gb_per_second": {f"{mb} MB": round(streaming_rate(mb), 1) for mb in (4, 32)}}
    print(json.dumps(out), flush=True)
    for name, update in zip(("critic", "generator"), task.updates):
        compiled = jit_update(update, mesh, donate=False).lower(state, data, 0).compile()
        out[name] = profile(compiled, (state, data, 0), args.repeats, args.top)
        print(json.dumps({name: out[name]}), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    reexec_with_allocator()
    main()
