"""The measured table of docs/scaling.md: `jattn compile` of the paper configs for TPU slices.

    python benchmarks/scaling.py --output scaling.md                   # every row: many hours on 2 CPU cores
    python benchmarks/scaling.py --output /tmp/t.md --configs rcan_div2k_x4 --topologies v5e:4x4 --no-max-batch

Rows, for each config (DeepFill v1 also with compute_dtype=bfloat16) and topology:
  paper   the config's global batch (`batch_size`, the paper's); a batch that does not divide
          by the chip count is reported as an error row;
  max     the largest per-chip batch whose step fits a v5e chip (16 GiB), found on the first v5e
          topology given with few compiles: the step's memory per chip is fitted as a line in
          the per-chip batch (through 1 and 2 images per chip, or the paper batch), the batch
          it predicts for the compiler's 15.75 GiB is compiled, and the line is refitted through
          the largest batch that fits and the smallest that does not (or the two largest) until
          a batch fits within 90% of it, the two are neighbours, or 4 tries are spent; the
          largest batch that fit is then compiled on the other topologies too.
Columns: GFLOP per image per step (step FLOPs per chip / per-chip batch: every update of the
step, e.g. DeepFill v1's 5 critic + 1 generator updates), GiB per chip, the collectives in the
step program (a loop body's once), the roofline estimate and its bound, compile seconds.

Each compile is `jattn compile ... --json` in its own subprocess, so one failure or timeout
costs one row. Writes the markdown to --output and the reports as JSON beside it (.json),
after every compile, so an interrupted run keeps every compile it finished; `--reuse` that
JSON to go on from its compiled rows (a max-batch search resumes from its compiled points).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("deepfill_v1_places2", "deepfill_v2_places2", "sa_inpaint_places2", "sagan_imagenet128", "rcan_div2k_x4",
           "se_resnet50_imagenet", "attention_unet_base", "attention_rcnn_coco")
TOPOLOGIES = ("v5e:4x4", "v5p:4x4x8")
V5E_AVAILABLE_GIB = 15.75  # what XLA's TPU compiler offers a program on a 16 GiB v5e chip
CLOSE_ENOUGH = 0.9  # the search stops at a batch that fits within this share of it
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "collective-permute": "CP", "all-to-all": "A2A"}


@dataclasses.dataclass(frozen=True)
class Case:
    """A config file and its overrides (`--set`)."""

    config: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.config, *self.overrides])


def cases(names) -> list[Case]:
    out = []
    for name in names:
        out.append(Case(name))
        if name == "deepfill_v1_places2":
            out.append(Case(name, ("compute_dtype=bfloat16",)))
    return out


def chip_count(topology: str) -> int:
    """Devices of a TPU topology (libtpu, in this process: JAX on the CPU)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as `jattn compile` does: beside other JAX processes
    from jattn.train.aot import topology_devices

    return len(topology_devices(topology))


def compile_one(case: Case, topology: str, batch: int | None, timeout: float, kind: str) -> dict:
    """One `jattn compile` in a subprocess: {"case", "topology", "batch" (None: the
    config's), "kind" ("paper", "max", "search"), "seconds", and "report" (its JSON) or
    "error" (its last stderr line)}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "jattn", "compile", "--config", str(ROOT / "configs" / f"{case.config}.py"),
               "--topology", topology, "--json", str(out)]
        cmd += [] if batch is None else ["--batch-size", str(batch)]
        for o in case.overrides:
            cmd += ["--set", o]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            error = None if out.exists() else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            error = f"no result in {timeout:.0f} s"
        row = {"case": case.label, "topology": topology, "batch": batch, "kind": kind,
               "seconds": round(time.perf_counter() - start, 1)}
        row.update({"error": error} if error else {"report": json.loads(out.read_text())})
    step = row.get("report", {}).get("step", {})
    shown = row.get("error") or ("memory unknown (the compiler could not lay it out)"
                                 if step["hbm_gib_per_chip"] is None else
                                 f"{step['hbm_gib_per_chip']:.2f} GiB per chip, fits {step['fits']}")
    print(f"  {case.label} {topology} batch {batch or 'paper'}: {shown} ({row['seconds']} s)", flush=True)
    return row


def max_batch(case: Case, topology: str, chips: int, known: list[dict], timeout: float,
              tries: int = 4, on_row=lambda row: None) -> tuple[int | None, list[dict]]:
    """The largest per-chip batch whose step fits (see the module docstring) and the rows
    compiled to find it, then (when found) its row as kind "max"; `known`: rows of `case`
    on `topology` already compiled; `on_row(row)` is called after each compile."""
    points = {r["report"]["per_chip_batch"]: r for r in known if "report" in r}
    rows: list[dict] = []

    def measure(b: int) -> bool:
        row = compile_one(case, topology, b * chips, timeout, "search")
        rows.append(row)
        on_row(row)
        if "report" in row:
            points[b] = row
        return "report" in row

    def gib(b: int) -> float:  # a program the compiler could not lay out at all: far too big
        gib = points[b]["report"]["step"]["hbm_gib_per_chip"]
        return float("inf") if gib is None else gib

    def fits(b: int) -> bool:
        return bool(points[b]["report"]["step"]["fits"])

    while len(points) < 2:
        if not measure(2 * max(points) if points else 1):
            return None, rows
    for _ in range(tries):
        lo = max((b for b in points if fits(b)), default=None)
        hi = min((b for b in points if not fits(b) and (lo is None or b > lo)), default=None)
        if lo is not None and (gib(lo) >= CLOSE_ENOUGH * V5E_AVAILABLE_GIB or hi == lo + 1):
            break
        # the line through the bracket (largest that fits, smallest above it that does not),
        # else through the two largest points
        a, b = (lo, hi) if lo is not None and hi is not None else sorted(points)[-2:]
        slope = (gib(b) - gib(a)) / (b - a) if gib(b) < float("inf") else 0.0
        guess = int(a + (V5E_AVAILABLE_GIB - gib(a)) / slope) if slope > 0 else 2 * max(points)
        if hi is not None:  # within the bracket; geometric bisection where the line says little
            if lo is not None and gib(hi) == float("inf"):
                guess = int((lo * hi) ** 0.5)
            elif lo is not None and hi > 2 * lo:
                guess = max(guess, int((lo * hi) ** 0.5))
            guess = min(guess, hi - 1)
        guess = max(guess, lo + 1) if lo is not None else min(guess, int(min(points) * 0.9))
        if guess < 1 or guess in points or not measure(guess):
            break
    best = max((b for b in points if fits(b)), default=None)
    return (None, rows) if best is None else (best, [*rows, {**points[best], "kind": "max"}])


def reused_rows(path: str | None) -> list[dict]:
    """The compiled rows (table and search) of an earlier run's JSON, to skip compiling them again."""
    if not path:
        return []
    data = json.loads(pathlib.Path(path).read_text())
    return [r for r in (*data["rows"], *data["search"]) if "report" in r]


def compile_or_reuse(reuse: list[dict], case: Case, topology: str, batch: int | None, timeout: float,
                     kind: str) -> dict:
    """A row of `reuse` for the same case, topology and global batch (the config's: None), else
    `compile_one`."""
    for r in reuse:
        if (r["case"], r["topology"], r["batch"]) == (case.label, topology, batch):
            print(f"  {case.label} {topology} batch {batch or 'paper'}: reused", flush=True)
            return {**r, "kind": kind}
    return compile_one(case, topology, batch, timeout, kind)


# --------------------------------------------------------------------------- table


def _collectives(report: dict) -> str:
    total = {k: 0 for k in SHORT}
    for p in report["programs"]:
        for k, n in p["collectives"].items():
            total[k] += n * p["runs_per_step"]
    return " ".join(f"{n} {SHORT[k]}" for k, n in total.items() if n) or "none"


def _gib(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    head = ["config", "topology", "batch", "global (per chip)", "GFLOP / image / step", "GiB / chip", "fits",
            "collectives / step", "estimate (bound)", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = row.get("report")
        if r is None:
            lines.append(f"| {row['case']} | {row['topology']} | {row['kind']} | "
                         f"{row['batch'] or 'config'} | not compiled: {row['error']} |" + " |" * (len(head) - 5))
            continue
        step = r["step"]
        est = "-" if step["estimated_seconds"] is None else f"{step['estimated_seconds'] * 1e3:.1f} ms ({step['bound']})"
        compile_s = sum(p["compile_seconds"] for p in r["programs"] if p["runs_per_step"])
        fits = {True: "yes", False: "no", None: "-"}[step["fits"]]
        lines.append(
            f"| {row['case']} | {row['topology']} | {row['kind']} | {r['global_batch']} ({r['per_chip_batch']}) | "
            f"{step['flops_per_chip'] / r['per_chip_batch'] / 1e9:.1f} | {_gib(step['hbm_gib_per_chip'])} | {fits} | "
            f"{_collectives(r)} | {est} | {compile_s:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    try:
        import importlib.metadata

        libtpu = importlib.metadata.version("libtpu")
    except Exception:  # noqa: BLE001
        libtpu = "not installed"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, libtpu {libtpu}"


def measure_case(case: Case, args, chips: dict, search: str | None, reuse: list[dict], rows: list[dict],
                 compiled: list[dict], save) -> None:
    """The paper rows of `case` on every topology, then (unless --no-max-batch) its max rows:
    appended to `rows`, the search's compiles to `compiled`; `save()` after each compile."""
    paper = {}
    for t in args.topologies:
        paper[t] = compile_or_reuse(reuse, case, t, None, args.timeout, "paper")
        rows.append(paper[t])
        save()
    if args.no_max_batch or search is None:
        return
    known = [paper[search], *(r for r in reuse if (r["case"], r["topology"]) == (case.label, search))]
    compiled += [r for r in known if r["kind"] == "search"]  # a resumed search's points stay in the JSON
    per_chip, tried = max_batch(case, search, chips[search], known, args.timeout,
                                on_row=lambda row: (compiled.append(row), save()))
    if per_chip is None:
        rows.append({"case": case.label, "topology": search, "batch": None, "kind": "max", "seconds": 0,
                     "error": "no per-chip batch that fits found"})
        return
    compiled.append(tried[-1])  # the found batch's row as kind "max" (compiled as a search point)
    rows.append(tried[-1])
    save()
    for t in args.topologies:
        if t != search:
            rows.append(compile_or_reuse(reuse, case, t, per_chip * chips[t], args.timeout, "max"))
            save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="markdown file to write (the JSON goes beside it)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="config names (configs/NAME.py)")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--no-max-batch", action="store_true", help="only the paper batch")
    parser.add_argument("--no-bf16", action="store_true", help="leave out DeepFill v1 with compute_dtype=bfloat16")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per compile (default 4 h)")
    parser.add_argument("--reuse", default=None, help="an earlier run's JSON: its compiled rows are not compiled again")
    args = parser.parse_args()

    chips = {t: chip_count(t) for t in args.topologies}
    search = next((t for t in args.topologies if t.startswith("v5e:")), None)
    rows, compiled = [], []
    reuse = reused_rows(args.reuse)
    for case in cases(args.configs):
        if args.no_bf16 and case.overrides:
            continue
        measure_case(case, args, chips, search, reuse, rows, compiled, save=lambda: write(args.output, rows, compiled))

    print(write(args.output, rows, compiled))
    return 0


def write(output: str, rows: list[dict], compiled: list[dict]) -> str:
    """Write the table (markdown) and the rows (JSON beside it); returns the markdown."""
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    text = (f"Measured {datetime.date.today().isoformat()} on a {machine()} with `{command}`.\n\n"
            f"{table(rows)}\n")
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "search": compiled}, indent=2))
    return text


if __name__ == "__main__":
    sys.exit(main())
