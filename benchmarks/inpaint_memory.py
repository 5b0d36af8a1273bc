"""Time and peak memory of `jattn inpaint` on large images with no options.

    python benchmarks/inpaint_memory.py                                  # 1024, 2048, 4096 px
    python benchmarks/inpaint_memory.py --sizes 2048 --checkpoint WORKDIR --output out.json
    python benchmarks/inpaint_memory.py --sizes 4096 --max-memory 21GB --timeout 7200

What: one image of each size (a square of random pixels, a centred hole of half its side),
inpainted by a DeepFill v1 generator of the official widths (cnum 32). Without
`--checkpoint` the script writes such a workdir first: the model's shapes (configs/
deepfill_v1_base.py) with random weights, saved as a training run saves it
(`jattn.export.inference.write_random_checkpoint`); time and memory do not depend on the
weights' values.

How: each size runs in a fresh process that makes the `jattn` command's process settings
(`jattn.cli.process_settings`), then does what `jattn inpaint` does
(`Inpainter.from_checkpoint(path)`, `inpaint_file`), with no options unless `--max-memory`
is given. It reports the memory budget, the contextual attention block size chosen and the
bytes XLA's memory analysis gives for it, the seconds to restore, to plan and compile, and
to inpaint (read, run, write), and the peak resident memory before inpainting. The parent
records the process's wall-clock time and its peak resident memory (`ru_maxrss` of
`os.wait4`) and stops a size after `--timeout` seconds. A size whose inpainting is refused (it does not fit the budget) is reported with
the one-line error. Prints one JSON object per size, and all of them to `--output`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_checkpoint(workdir: pathlib.Path, cnum: int = 32) -> pathlib.Path:
    """A DeepFill v1 workdir (checkpoint 0) of configs/deepfill_v1_base.py's model with random weights."""
    from jattn.config import load_config
    from jattn.export.inference import write_random_checkpoint

    config = load_config(ROOT / "configs" / "deepfill_v1_base.py", [f"model.cnum={cnum}"])
    return write_random_checkpoint(workdir, config)


def write_inputs(folder: pathlib.Path, size: int) -> tuple[pathlib.Path, pathlib.Path]:
    """image.png (random pixels) and mask.png (a centred square hole of half the side)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size)
    image, mask = folder / f"image_{size}.png", folder / f"mask_{size}.png"
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image)
    hole = np.zeros((size, size), np.uint8)
    hole[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(hole).save(mask)
    return image, mask


def child(args) -> int:
    """One size in this process: prints a JSON report on stdout."""
    from jattn.cli import process_settings

    process_settings()
    start = time.perf_counter()
    from jattn.export.inference import InpaintError, Inpainter, inpaint_file, read_image

    report: dict = {"size": args.size}
    try:
        inpainter = Inpainter.from_checkpoint(args.checkpoint, max_memory=args.max_memory)
        t_load = time.perf_counter()
        h, w = read_image(args.image).shape[:2]
        plan = inpainter.plan(h, w)
        t_plan = time.perf_counter()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: restore and compile
        inpaint_file(inpainter, args.image, args.mask, args.out)
        t_run = time.perf_counter()
        report.update(block_size=plan.block_size, needed_bytes=plan.needed, budget_bytes=plan.budget,
                      restore_s=round(t_load - start, 1), plan_compile_s=round(t_plan - t_load, 1),
                      inpaint_s=round(t_run - t_plan, 1), rss_before_inpaint_gib=round(rss_before / 2**20, 2))
    except InpaintError as err:
        report["error"] = str(err)
    print(json.dumps(report), flush=True)
    return 0


def run_size(size: int, checkpoint: pathlib.Path, folder: pathlib.Path, max_memory: str | None,
             timeout: float) -> dict:
    image, mask = write_inputs(folder, size)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", "--size", str(size),
           "--checkpoint", str(checkpoint), "--image", str(image), "--mask", str(mask),
           "--out", str(folder / f"out_{size}.png")]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    out_path, err_path = folder / f"stdout_{size}.txt", folder / f"stderr_{size}.txt"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - start
    report = {"size": size, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    lines = [line for line in out_path.read_text().splitlines() if line.startswith("{")]
    if lines:
        report.update(json.loads(lines[-1]))
    elif wall > timeout:
        report["error"] = f"stopped after {timeout:.0f} s (--timeout)"
    else:
        tail = err_path.read_text().strip().splitlines()[-3:]
        report["error"] = f"exit status {os.waitstatus_to_exitcode(status)}: {' | '.join(tail)}"
    for key in ("needed_bytes", "budget_bytes"):
        if report.get(key) is not None:
            report[key.replace("_bytes", "_gib")] = round(report.pop(key) / 2**30, 2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--checkpoint", default=None, help="a DeepFill v1 workdir (default: make one, cnum 32)")
    parser.add_argument("--max-memory", default=None, help="passed to Inpainter.from_checkpoint (default: none)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per size")
    parser.add_argument("--output", default=None, help="also write the reports here (JSON)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="inpaint_memory_") as tmp:
        folder = pathlib.Path(tmp)
        checkpoint = pathlib.Path(args.checkpoint) if args.checkpoint else make_checkpoint(folder / "deepfill_v1")
        meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB",
                "command": " ".join(["python", "benchmarks/inpaint_memory.py", *sys.argv[1:]])}
        print(json.dumps(meta), flush=True)
        reports = []
        for size in args.sizes:
            reports.append(run_size(size, checkpoint, folder, args.max_memory, args.timeout))
            print(json.dumps(reports[-1]), flush=True)
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps({**meta, "results": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
