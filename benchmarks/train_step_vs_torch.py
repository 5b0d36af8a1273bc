"""jattn's DeepFill v1 training iteration side by side with the PyTorch reference (not a test).

Runs `benchmarks/train_step.py` (jattn, this interpreter) and `benchmarks/torch_reference.py`
(PyTorch, `--torch-python`, a separate virtualenv: PyTorch is not a jattn dependency) one
after the other in one invocation, on one core (`taskset -c 0`, PyTorch with 1 thread) and
on every allowed core, and prints one JSON line per run and a table of seconds per
iteration with the ratios. Nothing else should run on the machine meanwhile. Where the
machine has tcmalloc, both libraries run under it (`jattn/_alloc.py`); `JATTN_TCMALLOC=0`
runs both under the C library's malloc.

    python benchmarks/train_step_vs_torch.py --torch-python /tmp/torchvenv/bin/python [--batch 4] [--repeats 3]
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

from jattn._alloc import preload_environment

HERE = pathlib.Path(__file__).resolve().parent


def _run(cmd: list[str], out: pathlib.Path, env: dict | None = None) -> dict:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([*cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", required=True, help="python of a virtualenv with torch installed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write all results here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    jattn_cmd = [sys.executable, str(HERE / "train_step.py"), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    torch_cmd = [args.torch_python, str(HERE / "torch_reference.py"), "--batch", str(args.batch),
                 "--repeats", str(args.repeats), "--no-flop-count"]
    # train_step.py runs under tcmalloc when the machine has it, as `jattn` does; PyTorch gets
    # the same allocator so that the comparison is between the libraries, not the mallocs.
    torch_env = preload_environment(os.environ)
    if torch_env is not None:
        print(f"both libraries under {torch_env['LD_PRELOAD']}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for label, cmd in (
            ("jattn, 1 core", pin + jattn_cmd),
            ("PyTorch, 1 core, 1 thread", pin + torch_cmd + ["--threads", "1"]),
            (f"jattn, {cores} cores", jattn_cmd),
            (f"PyTorch, {cores} cores, {cores} threads", torch_cmd + ["--threads", str(cores)]),
        ):
            result = _run(cmd, tmp / "out.json", None if "jattn" in label else torch_env)
            first = result["results"][0]
            runs[label] = {"seconds_per_iteration": first["seconds_per_iteration"],
                           "matmul_gflops": result.get("matmul_gflops"),
                           **{k: first[k] for k in ("pct_of_matmul_nominal", "pct_of_matmul_interleaved_nominal") if k in first},
                           "raw": result}
            print(json.dumps({label: {k: v for k, v in runs[label].items() if k != "raw"}}), flush=True)
    labels = list(runs)
    print(f"\nbatch {args.batch}, {time.strftime('%Y-%m-%d')}, seconds per iteration (median of {args.repeats}):")
    for jattn_label, torch_label in ((labels[0], labels[1]), (labels[2], labels[3])):
        j, t = runs[jattn_label]["seconds_per_iteration"], runs[torch_label]["seconds_per_iteration"]
        print(f"  {jattn_label}: {j:.2f} s | {torch_label}: {t:.2f} s | PyTorch / jattn = {t / j:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
