"""The memory allocator's effect on XLA:CPU training, side by side in one run (not a test).

Runs, under each allocator in turn (`JATTN_MALLOC`, `jattn/_alloc.py`):
- `benchmarks/step_dispatch.py`: steps/s and minor page faults per step of the demo and
  micro configs, dispatched per update and as one unrolled program;
- `benchmarks/train_step.py` on one core (`taskset -c 0`): seconds per 256x256 DeepFill v1
  iteration (official widths) and the process's peak resident memory.

The allocators: glibc's malloc as it is (`JATTN_MALLOC=0`), glibc's malloc tuned as the
`jattn` command sets it where there is no tcmalloc (`glibc`), and, with `--tcmalloc PATH`,
tcmalloc. The allocators take turns, `--rounds` times, so that a drift of the machine's
speed reaches all of them alike; each figure is the median over the rounds. All runs share
one persistent compilation cache, filled by a first pass that is not timed, so every timed
process loads its programs rather than compiling them (a compile leaves the heap in another
state). Prints one table; nothing else should run on the machine meanwhile.

    python benchmarks/allocator.py [--tcmalloc /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4] \
        [--rounds 3] [--steps 6] [--repeats 2] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
CLEARED = ("LD_PRELOAD", "JATTN_MALLOC", "JATTN_MALLOC_ACTIVE", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
           "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
           "TCMALLOC_RELEASE_RATE")
CASES = [(config, kind) for config in ("demo", "micro") for kind in ("per-update", "unrolled")]


def _environment(setting: str, cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(JATTN_MALLOC=setting, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _run(cmd: list[str], env: dict[str, str], out: pathlib.Path) -> dict:
    print("$", f"JATTN_MALLOC={env['JATTN_MALLOC']}", " ".join(cmd), flush=True)
    subprocess.run([*cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def _figures(dispatch: list[dict], iteration: dict) -> dict:
    """One round's figures of one allocator."""
    out = {}
    for config, kind in CASES:
        d = dispatch[("demo", "micro").index(config)][kind]
        out[f"{config} {kind}"] = {"steps_per_s": d["steps_per_s"], "faults_per_step": d["minor_faults_per_step"]}
    it = iteration["results"][0]
    out["256x256 iteration, 1 core"] = {"seconds": it["seconds_per_iteration"], "peak_rss_gb": it["peak_rss_mb"] / 1024}
    return out


def _median(rounds: list[dict]) -> dict:
    return {case: {k: statistics.median(r[case][k] for r in rounds) for k in rounds[0][case]} for case in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tcmalloc", help="a tcmalloc library: time it too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write all results here")
    args = parser.parse_args()
    allocators = {"glibc as it is": "0", "glibc tuned": "glibc"}
    if args.tcmalloc:
        if not pathlib.Path(args.tcmalloc).is_file():
            parser.error(f"--tcmalloc {args.tcmalloc}: no such file")
        allocators["tcmalloc"] = args.tcmalloc
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    dispatch = [sys.executable, str(HERE / "step_dispatch.py"), "--dispatch", "per-update", "unrolled"]
    iteration = [*pin, sys.executable, str(HERE / "train_step.py"), "--batch", str(args.batch)]
    rounds: dict[str, list[dict]] = {name: [] for name in allocators}
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = pathlib.Path(tmp) / "out.json", str(pathlib.Path(tmp) / "cache")
        env = _environment("0", cache)  # fill the cache
        _run([*dispatch, "--steps", "1", "--repeats", "1"], env, out)
        _run([*iteration, "--repeats", "1"], env, out)
        for _ in range(args.rounds):
            for name, setting in allocators.items():
                env = _environment(setting, cache)
                rounds[name].append(_figures(
                    _run([*dispatch, "--steps", str(args.steps), "--repeats", str(args.repeats)], env, out),
                    _run([*iteration, "--repeats", "3"], env, out)))
    results = {name: {"median": _median(r), "rounds": r} for name, r in rounds.items()}
    print(f"median of {args.rounds} rounds; steps/s (minor page faults per step); 256²: seconds per iteration "
          f"on 1 core, peak RSS")
    print(" | ".join(["allocator", *(f"{c} {k}" for c, k in CASES), "256² 1 core"]))
    for name, r in results.items():
        m = r["median"]
        cells = [f"{m[f'{c} {k}']['steps_per_s']:.2f} ({m[f'{c} {k}']['faults_per_step']:.0f})" for c, k in CASES]
        it = m["256x256 iteration, 1 core"]
        print(" | ".join([name, *cells, f"{it['seconds']:.2f} s, {it['peak_rss_gb']:.1f} GB"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
