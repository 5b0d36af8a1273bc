"""Ahead-of-time compilation of a run's training step: what `jattn compile` measures.

A run's step is compiled for a TPU topology that is described, not attached (libtpu's
compiler runs on any CPU: `jax.experimental.topologies.get_topology_desc("v5e:4x4")`), or
for this process's own devices (`"local"`). Nothing is allocated: the state and the
batches are `jax.ShapeDtypeStruct`s with the run's shardings (`jattn.train.setup`), and the
step is the very program the loop dispatches (`jattn.train.steps.make_train_step`).

Per program, from the compiled executable (all figures per chip):
  compile_seconds   tracing, lowering and XLA compilation;
  flops_per_chip    cost_analysis()["flops"]: XLA counts 2·M·N·K for a [M, K] x [K, N]
                    product or the equivalent convolution, 1 per element of an elementwise op;
  bytes_per_chip    cost_analysis()["bytes accessed"]: operand and result bytes of every
                    (fused) instruction, i.e. HBM traffic as XLA models it;
  hbm_gib_per_chip  memory_analysis(): arguments, outputs, temporaries and
                    total = arguments + outputs + temporaries - aliased (donated) bytes;
  collectives       all-reduce, all-gather, reduce-scatter, collective-permute and
                    all-to-all instructions in the optimized HLO (`as_text()`), an async
                    `-start` / `-done` pair counted once. This is the program text: an
                    instruction in a loop body counts once, however often the loop runs.

XLA's cost analysis also counts a loop body once. The step writes every update out by
default; with `step_unroll=False` it runs repeated updates (DeepFill's `n_critic` critic
updates) as a `lax.scan`, and then each such update is compiled once more on its own
(`jit_update`) and its cost added `count - 1` times to the step's flops and bytes; the
notes of the report say so and how long that took.

The step summary weighs each program by how often the loop runs it per step, takes the
largest step program's memory, and compares it with the chip's HBM (`CHIPS`). Its time is
the roofline estimate max(flops / peak, bytes / bandwidth) per chip, with the chip's
published peak dense bf16 FLOP/s and HBM bandwidth: a lower bound that leaves out the
collectives' time and assumes every unit busy. Images per second count every update's
batch: global_batch x len(task.updates) images per step (DeepFill v1: 6 x the batch), as
the training loop's `images_per_second` does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CompileError", "Chip", "CHIPS", "COLLECTIVES", "Compiled", "libtpu_installed", "topology_devices",
           "chip_figures", "cost_of", "memory_gib", "count_collectives", "repeated_updates", "step_summary",
           "compile_run", "format_report"]

GIB = 2**30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
LOCAL = "local"


class CompileError(ValueError):
    """Input `jattn compile` cannot use: the message names the problem in one line."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator: peak dense bf16 FLOP/s, HBM bytes, HBM
    bytes/s, and where they come from."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str


_GCP = "cloud.google.com/tpu/docs/{}"
_NV = "nvidia.com/en-us/data-center/{}"

# devices[0].device_kind -> figures per chip. Google Cloud TPU docs: peak bf16 TFLOP/s, HBM in
# GiB, HBM GB/s. NVIDIA data sheets, SXM parts: dense bf16 TFLOP/s (without sparsity), HBM in
# GB, GB/s. TPU kinds as libtpu names them (the devices of "v5p:4x4x8" are "TPU v5"); GPU
# kinds as CUDA names the SXM parts (PCIe and NVL parts have other figures: not listed).
CHIPS: types.MappingProxyType = types.MappingProxyType({
    "TPU v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9, _GCP.format("v4")),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 16 * GIB, 819e9, _GCP.format("v5e")),
    "TPU v5": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9, _GCP.format("v5p")),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 32 * GIB, 1640e9, _GCP.format("v6e")),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 989e12, 80e9, 3350e9, _NV.format("h100")),
    "NVIDIA H200": Chip("H200 SXM", 989e12, 141e9, 4800e9, _NV.format("h200")),
})


@dataclasses.dataclass(frozen=True)
class Compiled:
    """`report`: the JSON of `jattn compile` (see `compile_run`); `notes`: lines for the
    printed output (how figures were obtained, caveats, why some are missing)."""

    report: dict
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- devices


def libtpu_installed() -> bool:
    """Whether libtpu (the TPU compiler, `pip install 'jattn[tpu]'`) can be imported."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
    """The devices of topology `name`: a TPU topology ("v5e:2x2", "v5p:4x4x8", ...; compile-
    only devices, no TPU needed) or "local" (`jax.devices()`). Raises CompileError."""
    import jax

    if name == LOCAL:
        return list(jax.devices())
    if not name or ":" not in name:
        raise CompileError(f"unknown topology {name!r}: use a TPU topology such as v5e:2x2, v5e:4x4, v5p:4x4x8, "
                           f"v4:2x2x1, v6e:16x16 (NAME:AxB[xC]), or {LOCAL!r} for this process's devices")
    if not libtpu_installed():
        raise CompileError(f"compiling for TPU topology {name!r} needs libtpu: pip install 'jattn[tpu]'")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "lockfile" in first:  # another process holds libtpu (on a TPU VM: e.g. a training run)
            raise CompileError(f"libtpu is in use by another process, so it cannot compile for {name!r}: {first}") from None
        raise CompileError(f"unknown topology {name!r}: {first}") from None


def chip_figures(device_kind: str) -> Chip | None:
    """The published figures of a device kind, or None when `CHIPS` does not list it."""
    return CHIPS.get(device_kind)


# --------------------------------------------------------------------------- one program


def cost_of(compiled) -> tuple[float, float]:
    """(flops, bytes accessed) per chip from `compiled.cost_analysis()`, which is a dict
    (JAX >= 0.4.30) or a list holding one dict per program (older JAX): the first one."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else {}
    costs = costs or {}
    return float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))


def memory_gib(compiled) -> dict[str, float] | None:
    """{arguments, outputs, temporaries, total} GiB per chip from `memory_analysis()`;
    total = arguments + outputs + temporaries - aliased (donated) bytes. None when the
    backend gives no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    args, outs, temps = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    total = args + outs + temps - m.alias_size_in_bytes
    return {"arguments": args / GIB, "outputs": outs / GIB, "temporaries": temps / GIB, "total": total / GIB}


def _opcode(line: str) -> str | None:
    """The opcode of one HLO instruction line (`[ROOT] %name = TYPE opcode(operands), ...`).
    TYPE may be a tuple `(f32[], f32[8]{0:T(128)})` or an array type with a layout."""
    _, sep, rhs = line.partition(" = ")
    if not sep:
        return None
    rhs = rhs.lstrip()
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                rhs = rhs[i + 1:]
                break
    else:
        rhs = rhs.partition(" ")[2]
    head = rhs.lstrip().partition("(")
    return head[0] if head[1] else None


def count_collectives(hlo_text: str) -> dict[str, int]:
    """{collective: instructions} in an HLO module's text: `all-reduce` and
    `all-reduce-start` count as one all-reduce, `-done` not at all. Only opcodes are read,
    never names or metadata (`%all-reduce.3`, `op_name="..."`)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        op = _opcode(line)
        if op is None:
            continue
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in counts:
            counts[base] += 1
    return counts


def _while_loops(hlo_text: str) -> int:
    return sum(_opcode(line) == "while" for line in hlo_text.splitlines())


def _compile(fn: Callable, args: Sequence[Any], mesh) -> tuple[Any, float, str | None]:
    """(compiled, seconds, refusal) of `fn.lower(*args).compile()` under `jax.set_mesh(mesh)`.

    XLA's TPU compiler refuses a program that does not fit the chip's HBM
    (RESOURCE_EXHAUSTED). It is then compiled again with `xla_tpu_no_crash_on_oom`, which
    gives the memory it would need; `refusal` is the compiler's message (else None) and
    `seconds` counts both compiles. A program far beyond the HBM can fail that compile too
    (the compiler cannot lay it out at all): `compiled` is then None."""
    import jax

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
        try:
            return lowered.compile(), time.perf_counter() - start, None
        except jax.errors.JaxRuntimeError as err:
            message = _first_line(err)
            if not message.startswith("RESOURCE_EXHAUSTED") or mesh.devices.flat[0].platform != "tpu":
                raise
        try:
            compiled = lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True})
        except jax.errors.JaxRuntimeError as err:
            compiled, message = None, f"{message}; without the HBM check: {_first_line(err)}"
    return compiled, time.perf_counter() - start, message


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def argument_gib(args: Any) -> float:
    """GiB per chip of the abstract arguments `args` (ShapeDtypeStructs with shardings):
    the largest shard of each array."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(args):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total / GIB


def _program(name: str, runs: int, compiled, seconds: float, extra: tuple[float, float] = (0.0, 0.0),
             args: Any = None) -> dict:
    """One program's row. `compiled` None (the compiler could not lay it out): only the
    size of its arguments `args` is known, every other figure is None."""
    if compiled is None:
        return {"name": name, "runs_per_step": int(runs), "compile_seconds": round(seconds, 3),
                "flops_per_chip": None, "bytes_per_chip": None,
                "hbm_gib_per_chip": {"arguments": argument_gib(args), "outputs": None, "temporaries": None,
                                     "total": None},
                "collectives": None}
    flops, nbytes = cost_of(compiled)
    return {
        "name": name,
        "runs_per_step": int(runs),
        "compile_seconds": round(seconds, 3),
        "flops_per_chip": flops + extra[0],
        "bytes_per_chip": nbytes + extra[1],
        "hbm_gib_per_chip": memory_gib(compiled),
        "collectives": count_collectives(compiled.as_text()),
    }


# --------------------------------------------------------------------------- the step


def repeated_updates(updates: Sequence) -> list[tuple[Any, int]]:
    """[(update, count)] of the runs of one update repeated back to back (count > 1):
    those the step runs as a `lax.scan` (the same grouping as `train_step`)."""
    runs: list[list] = []
    for u in updates:
        if runs and runs[-1][0] is u:
            runs[-1][1] += 1
        else:
            runs.append([u, 1])
    return [(u, n) for u, n in runs if n > 1]


def step_summary(programs: Sequence[dict], chip: Chip | None, images_per_step: int, *, refused: bool = False) -> dict:
    """The step from its programs: flops and bytes summed over them weighted by
    `runs_per_step`, memory the largest step program's total GiB; against `chip` (None:
    fits, estimate, bound and images/s are None) whether it fits the HBM (never when the
    compiler `refused` a step program for lack of HBM: it keeps a reserve) and the roofline
    estimate max(flops / peak, bytes / bandwidth) seconds, "compute" or "memory" bound."""
    in_step = [p for p in programs if p["runs_per_step"] > 0]
    known = all(p["flops_per_chip"] is not None for p in in_step)
    flops = sum(p["flops_per_chip"] * p["runs_per_step"] for p in in_step) if known else None
    nbytes = sum(p["bytes_per_chip"] * p["runs_per_step"] for p in in_step) if known else None
    totals = [(p["hbm_gib_per_chip"] or {}).get("total") for p in in_step]
    hbm = max(totals) if totals and None not in totals else None
    out = {"flops_per_chip": flops, "bytes_per_chip": nbytes, "hbm_gib_per_chip": hbm, "fits": None,
           "estimated_seconds": None, "bound": None, "estimated_images_per_second": None}
    if chip is None:
        return out
    if not known:  # a program the compiler could not lay out: it was refused
        out["fits"] = False
        return out
    compute, memory = flops / chip.peak_flops, nbytes / chip.hbm_bandwidth
    seconds = max(compute, memory)
    out.update({
        "fits": False if refused else None if hbm is None else bool(hbm * GIB <= chip.hbm_bytes),
        "estimated_seconds": seconds,
        "bound": "compute" if compute >= memory else "memory",
        "estimated_images_per_second": images_per_step / seconds if seconds > 0 else None,
    })
    return out


def _step_programs(task, config, mesh, global_batch: int) -> tuple[list[dict], list[str], set[str]]:
    """The programs of one step as the loop dispatches them (today: one), plus the
    inference program of inpainting models (runs_per_step 0); notes; the names of the
    programs the compiler refused for lack of HBM."""
    import jax
    import jax.numpy as jnp

    from jattn.train.setup import abstract_eval_batch, abstract_step_batches, abstract_train_state
    from jattn.train.sharding import data_sharding, replicated
    from jattn.train.steps import jit_update, make_train_step

    unroll = bool(config.step_unroll)
    state = abstract_train_state(task, config, mesh)
    batches = abstract_step_batches(task, config, mesh, global_batch)
    step_fn = make_train_step(task.updates, mesh, unroll=unroll)  # what the loop calls once per step
    step, step_seconds, refusal = _compile(step_fn, (state, batches), mesh)
    refusals = {"train_step": refusal}

    notes = []
    extra = (0.0, 0.0)
    repeats = [] if unroll else repeated_updates(task.updates)
    if repeats and step is not None and _while_loops(step.as_text()) >= len(repeats):
        batch = abstract_eval_batch(task, config, mesh, global_batch)
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
        for update, count in repeats:
            compiled, seconds, _ = _compile(jit_update(update, mesh), (state, batch, index), mesh)
            flops, nbytes = cost_of(compiled)
            extra = (extra[0] + (count - 1) * flops, extra[1] + (count - 1) * nbytes)
            notes.append(f"train_step runs update {update.name!r} {count}x in a loop, whose body XLA's cost analysis "
                         f"counts once: {count - 1} x the update's cost compiled alone ({seconds:.1f} s) is added to "
                         "its flops and bytes; its collectives are the program text's (the loop body's once)")
    programs = [_program("train_step", 1, step, step_seconds, extra, (state, batches))]

    if "mask" in task.fields:  # inpainting: the inference function of `jattn inpaint`
        rep = replicated(mesh)
        predict = jax.jit(task.predict, in_shardings=(rep, rep, data_sharding(mesh)))
        batch = abstract_eval_batch(task, config, mesh, global_batch)
        compiled, seconds, refusals["inference"] = _compile(predict, (state.params, state.variables, batch), mesh)
        programs.append(_program("inference", 0, compiled, seconds, args=(state.params, state.variables, batch)))
    for name, message in refusals.items():
        if message:
            figures = ("only the size of its arguments is known: the compiler could not lay it out even without "
                       "the HBM check" if "without the HBM check" in message else
                       "its figures come from a compile with xla_tpu_no_crash_on_oom: the memory it would need")
            notes.append(f"{name}: the TPU compiler refused it ({message}); {figures}")
    return programs, notes, {name for name, message in refusals.items() if message}


def compile_run(config, devices: Sequence, topology: str) -> Compiled:
    """Compile `config`'s step for `devices` (of `topology`, a name for the report) at the
    global batch `config.batch_size`; raises CompileError when it does not divide by the
    chip count. Returns the report:

      {"topology", "chip" (devices[0].device_kind), "chips", "global_batch",
       "per_chip_batch", "compute_dtype", "programs_per_step" (programs the loop runs per
       step), "programs": [{"name", "runs_per_step", "compile_seconds", "flops_per_chip",
       "bytes_per_chip", "hbm_gib_per_chip": {"arguments", "outputs", "temporaries",
       "total"}, "collectives": {name: count}}], "step": step_summary(...)}
    """
    from jattn.config import with_defaults
    from jattn.train.sharding import make_mesh
    from jattn.train.task import build_task

    config = with_defaults(config)
    chips = len(devices)
    global_batch = int(config.batch_size)
    if global_batch <= 0 or global_batch % chips:
        raise CompileError(f"global batch {global_batch} does not divide by the {chips} chips of {topology}: "
                           f"use --batch-size with a multiple of {chips}")
    kind = devices[0].device_kind
    chip = chip_figures(kind)
    task = build_task(config)
    mesh = make_mesh(devices)
    programs, notes, refused = _step_programs(task, config, mesh, global_batch)
    images_per_step = global_batch * len(task.updates)
    compute_dtype = str(config.compute_dtype)
    report = {
        "topology": topology,
        "chip": kind,
        "chips": chips,
        "global_batch": global_batch,
        "per_chip_batch": global_batch // chips,
        "compute_dtype": compute_dtype,
        "programs_per_step": sum(p["runs_per_step"] for p in programs),
        "programs": programs,
        "step": step_summary(programs, chip, images_per_step,
                             refused=any(p["name"] in refused for p in programs if p["runs_per_step"])),
    }
    notes.append(f"a step runs {len(task.updates)} updates, each on its own global batch: "
                 f"{images_per_step} images per step")
    if chip is None:
        notes.append(f"no published figures for chip {kind!r} (jattn.train.aot.CHIPS): fits, estimate and bound "
                     "are not computed")
    else:
        notes.append(f"{chip.name} per chip: {chip.peak_flops / 1e12:g} TFLOP/s bf16, {chip.hbm_bytes / GIB:.1f} GiB "
                     f"HBM, {chip.hbm_bandwidth / 1e9:g} GB/s ({chip.source}); the estimate leaves out the "
                     "collectives' time")
        if compute_dtype == "float32":
            notes.append("compute_dtype float32: the estimate divides by the bf16 peak. On TPU, at JAX's default "
                         "precision, float32 convolutions and matmuls run as one bf16 pass, so only their float32 "
                         "activations' bytes cost more; on H100/H200 they run as TF32 at half the bf16 rate, and the "
                         "bf16 peak flatters a float32 step; compare with --set compute_dtype=bfloat16")
    return Compiled(report, tuple(notes))


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _giga(x: float | None) -> float | None:
    return None if x is None else x / 1e9


def format_report(compiled: Compiled) -> str:
    """A readable table: one row per program, then the step summary and the notes."""
    r = compiled.report
    step = r["step"]
    head = (f"{r['topology']}: {r['chips']} x {r['chip']}, global batch {r['global_batch']} "
            f"({r['per_chip_batch']} per chip), compute_dtype {r['compute_dtype']}, "
            f"{r['programs_per_step']} program(s) per step")
    cols = ["program", "runs/step", "compile s", "GFLOP/chip", "GB/chip", "GiB args", "GiB out", "GiB temp",
            "GiB total", *COLLECTIVES]
    rows = []
    for p in r["programs"]:
        m = p["hbm_gib_per_chip"] or {}
        rows.append([p["name"], str(p["runs_per_step"]), f"{p['compile_seconds']:.1f}",
                     _fmt(_giga(p["flops_per_chip"]), 4), _fmt(_giga(p["bytes_per_chip"]), 4),
                     *(_fmt(m.get(k)) for k in ("arguments", "outputs", "temporaries", "total")),
                     *(str((p["collectives"] or {}).get(c, "-")) for c in COLLECTIVES)])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    table = [" ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [cols, *rows]]
    fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[step["fits"]]
    lines = [head, "", *table, "",
             f"step per chip: {_fmt(_giga(step['flops_per_chip']), 4)} GFLOP, {_fmt(_giga(step['bytes_per_chip']), 4)} GB "
             f"accessed, {_fmt(step['hbm_gib_per_chip'])} GiB HBM ({fits})"]
    if step["estimated_seconds"] is not None:
        lines.append(f"roofline estimate: {step['estimated_seconds'] * 1e3:.4g} ms per step, {step['bound']} bound, "
                     f"{_fmt(step['estimated_images_per_second'], 4)} images/s")
    lines += [f"note: {n}" for n in compiled.notes]
    return "\n".join(lines)
