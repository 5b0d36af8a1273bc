"""jattn's DeepFill v1 training iteration side by side with PyTorch (not a test).

Runs `benchmarks/train_step.py` (jattn, this interpreter), `benchmarks/torch_reference.py`
(the same iteration written in plain PyTorch from the spec) and, with `--port-dir`,
`benchmarks/torch_port.py` (the public PyTorch port daa233/generative-inpainting-pytorch
with its own trainer, from a checkout the user provides) one after the other in one
invocation, the PyTorch ones with `--torch-python` (a separate virtualenv: PyTorch is not a
jattn dependency), on one core (`taskset -c 0`, PyTorch with 1 thread) and on every allowed
core, and prints one JSON line per run and a table of seconds per iteration with the ratios.
Nothing else should run on the machine meanwhile. Both libraries run under the allocator
the `jattn` command picks (tcmalloc where the machine has it, else tuned glibc malloc:
`jattn/_alloc.py`); `JATTN_MALLOC=0` runs both under the C library's malloc as it is.

    python benchmarks/train_step_vs_torch.py --torch-python /tmp/torchvenv/bin/python \
        [--port-dir /tmp/gip] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from jattn._alloc import allocator_environment

HERE = pathlib.Path(__file__).resolve().parent


def _run(cmd: list[str], out: pathlib.Path, env: dict | None = None) -> dict:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([*cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", required=True, help="python of a virtualenv with torch installed")
    parser.add_argument("--port-dir", help="a checkout of daa233/generative-inpainting-pytorch: time it too")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write all results here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    jattn_cmd = [sys.executable, str(HERE / "train_step.py"), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    torch_cmd = [args.torch_python, str(HERE / "torch_reference.py"), "--batch", str(args.batch),
                 "--repeats", str(args.repeats), "--no-flop-count"]
    port_cmd = ([args.torch_python, str(HERE / "torch_port.py"), "--port-dir", args.port_dir, "--batch", str(args.batch),
                 "--repeats", str(args.repeats)] if args.port_dir else None)
    # train_step.py runs under the allocator `jattn` picks, as `jattn` does; PyTorch gets
    # the same allocator so that the comparison is between the libraries, not the mallocs.
    torch_env = allocator_environment(os.environ)
    if torch_env is not None:
        print(f"both libraries under {torch_env['JATTN_MALLOC_ACTIVE']}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        plan = [("jattn, 1 core", pin + jattn_cmd), ("PyTorch reference, 1 core, 1 thread", pin + torch_cmd + ["--threads", "1"])]
        plan += [("PyTorch port, 1 core, 1 thread", pin + port_cmd + ["--threads", "1"])] if port_cmd else []
        plan += [(f"jattn, {cores} cores", jattn_cmd),
                 (f"PyTorch reference, {cores} cores, {cores} threads", torch_cmd + ["--threads", str(cores)])]
        plan += [(f"PyTorch port, {cores} cores, {cores} threads", port_cmd + ["--threads", str(cores)])] if port_cmd else []
        for label, cmd in plan:
            result = _run(cmd, tmp / "out.json", None if "jattn" in label else torch_env)
            first = result["results"][0]
            runs[label] = {"seconds_per_iteration": first["seconds_per_iteration"],
                           "matmul_gflops": result.get("matmul_gflops"),
                           **{k: first[k] for k in ("pct_of_matmul_nominal", "pct_of_matmul_interleaved_nominal") if k in first},
                           "raw": result}
            print(json.dumps({label: {k: v for k, v in runs[label].items() if k != "raw"}}), flush=True)
    print(f"\nbatch {args.batch}, {time.strftime('%Y-%m-%d')}, seconds per iteration (median of {args.repeats}):")
    for jattn_label in [k for k in runs if k.startswith("jattn")]:
        setting = jattn_label.split(", ", 1)[1]
        j = runs[jattn_label]["seconds_per_iteration"]
        for other in [k for k in runs if k.startswith("PyTorch") and k.split(", ")[1] == setting]:
            t = runs[other]["seconds_per_iteration"]
            print(f"  {jattn_label}: {j:.2f} s | {other}: {t:.2f} s | PyTorch / jattn = {t / j:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
