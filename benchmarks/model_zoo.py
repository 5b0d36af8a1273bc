"""The model zoo's table: parameter counts of every config, and what each demo run reaches.

    python benchmarks/model_zoo.py                 # parameter counts only (seconds)
    python benchmarks/model_zoo.py --demos         # also train every configs/demo*.py (minutes each)
    python benchmarks/model_zoo.py --demos --only demo_rcan.py

Parameter counts come from `jax.eval_shape` of each task's `init` (nothing is allocated),
per network. A demo run trains the config as it is into a fresh workdir under
`--workdir-root` and reports its wall time, last logged losses and final eval metrics.
Prints markdown tables (for docs/models.md) and writes them with the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def param_counts(config) -> dict[str, int]:
    import jax

    from jattn.train.setup import state_init_fn
    from jattn.train.task import build_task

    task = build_task(config)
    shapes = jax.eval_shape(state_init_fn(task, config), jax.random.key(0))
    return {net: int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(p))) for net, p in shapes.params.items()}


def run_demo(path: pathlib.Path, workdir: pathlib.Path) -> dict:
    from jattn.config import load_config
    from jattn.train.logging import read_metrics
    from jattn.train.loop import train

    config = load_config(path)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(config, workdir, progress=False)
    seconds = time.perf_counter() - t0
    logs = [r for r in read_metrics(workdir) if any(k.endswith("_loss") and not k.startswith("eval_") for k in r)]
    first, last = logs[0], logs[-1]
    losses = {k: (first[k], last[k]) for k in last if k.endswith("_loss") and k in first}
    evals = {k: v for k, v in (result.get("eval") or {}).items() if isinstance(v, float)}
    return {"config": path.name, "steps": result["step"], "seconds": round(seconds, 1), "losses": losses, "eval": evals}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", action="store_true", help="train every demo config")
    parser.add_argument("--only", nargs="*", default=None, help="config file names to include")
    parser.add_argument("--workdir-root", default="/tmp/jattn_zoo")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    from jattn._xla import apply_cpu_defaults

    apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags, before JAX starts a backend
    sys.path.insert(0, str(ROOT))
    from jattn.config import load_config

    configs = sorted((ROOT / "configs").glob("*.py"))
    if args.only:
        configs = [c for c in configs if c.name in args.only]
    rows, demos = [], []
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}")
    print("\n| config | model | image size | parameters (by network) |\n|---|---|---|---|")
    for path in configs:
        config = load_config(path)
        counts = param_counts(config)
        rows.append({"config": path.name, "model": config.model.name, "params": counts})
        nets = ", ".join(f"{n} {c / 1e6:.3f} M" for n, c in counts.items())
        print(f"| {path.name} | {config.model.name} | {config.data.image_size} | {nets} |", flush=True)
    if args.demos:
        print("\n| demo config | steps | seconds | losses (first -> last logged) | final eval |\n|---|---|---|---|---|")
        for path in configs:
            if not path.name.startswith("demo"):
                continue
            r = run_demo(path, pathlib.Path(args.workdir_root) / path.stem)
            demos.append(r)
            losses = ", ".join(f"{k} {a:.4g} -> {b:.4g}" for k, (a, b) in r["losses"].items())
            evals = ", ".join(f"{k[5:]} {v:.4g}" for k, v in r["eval"].items() if k != "eval_images")
            print(f"| {r['config']} | {r['steps']} | {r['seconds']} | {losses} | {evals} |", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"params": rows, "demos": demos}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
