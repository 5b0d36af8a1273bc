"""Inpainting with a trained checkpoint: images in, completed images out.

`Inpainter.from_checkpoint(path)` takes a training workdir (its latest checkpoint), one
checkpoint folder (`WORKDIR/checkpoints/<step>`; the model config is the one saved with
the checkpoint) or a `jattn export --format jax-export` file (no jattn model code runs).
Images of any size are padded by reflection to the model's multiple (8) and cropped back;
the result keeps every known pixel of the input exactly (prediction in the hole, the
input's own values elsewhere). Files are read as RGB (RGBA drops alpha, grayscale and
palette images are converted, 16-bit images scaled to 8 bits) and written under a
temporary name, then renamed, so a failed run leaves no partial output.

Memory: from a checkpoint, each padded size is compiled once within a memory budget
(`max_memory`, default `default_memory_budget()`); DeepFill's contextual attention is
evaluated in blocks where the dense evaluation does not fit (`Inpainter`). Running out of
memory is an `InpaintError`, never a traceback.

Module state: `LOADED`, the last two models `inpaint` loaded from paths (a bounded cache).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

__all__ = ["InferenceError", "InpaintError", "Inpainter", "Plan", "restore_trained", "read_image", "read_mask",
           "write_image", "check_outputs", "check_inpaint_files", "inpaint_file", "inpaint_files", "inpaint",
           "parse_memory", "default_memory_budget", "default_memory_limit", "write_random_checkpoint",
           "checkpoint_identity", "LoadedModels", "LOADED"]

MULTIPLE = 8  # DeepFill downsamples 3 times


class InferenceError(ValueError):
    """Bad input for inference: the message names the file and the problem."""


class InpaintError(InferenceError):
    """Bad input for inpainting: the message names the file and the problem."""


# --------------------------------------------------------------------------- files


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image file of any common mode."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise InpaintError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr[..., :3]
            return np.asarray(img.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InpaintError(f"{path}: not a readable image ({err})") from None


def read_mask(path: str | pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] hole mask from a mask image: white (> 127) = hole; must match `size`."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise InpaintError(f"{path}: mask not found")
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InpaintError(f"{path}: not a readable mask image ({err})") from None
    if arr.shape != tuple(size):
        raise InpaintError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {size[1]}x{size[0]}")
    return arr > 127


def _image_format(path: pathlib.Path, error=InpaintError) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise error(f"{path}: unknown image extension {path.suffix!r}")
    return fmt


def check_outputs(paths, error=InpaintError) -> None:
    """An `error` naming the first of `paths` that cannot be written as an image (an unknown
    extension, a folder in its place, a parent that is a file, a folder that is not
    writable), so that nothing is written when one of them is bad."""
    from jattn._paths import write_problem

    for path in map(pathlib.Path, paths):
        _image_format(path, error)
        problem = write_problem(path, folder=False)
        if problem is not None:
            raise error(f"cannot write {path}: {problem}")


def write_image(path: str | pathlib.Path, image: np.ndarray, error=InpaintError) -> None:
    """Write uint8 [H, W, 3] atomically (temporary name, then rename), making its missing
    parent folders; an OSError (a full disk) is an `error` naming the path, and leaves
    neither the file nor a folder made for it."""
    from PIL import Image

    path = pathlib.Path(path)
    fmt = _image_format(path, error)
    made = [p for p in path.parents if not p.exists()]  # innermost first
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp, format=fmt)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        for folder in made:
            with contextlib.suppress(OSError):  # one the failed mkdir did not make
                folder.rmdir()
        raise error(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- model


def _resolve_checkpoint(path: str | pathlib.Path, error=InpaintError) -> tuple[pathlib.Path, int | None]:
    """(workdir, step or None for latest) from a workdir or a checkpoint step folder."""
    path = pathlib.Path(path)
    if not path.exists():
        raise error(f"{path}: checkpoint not found")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name == "checkpoints":
        return path.parent, None
    raise error(f"{path}: not a jattn workdir or checkpoint folder (no checkpoints/ inside)")


def restore_trained(path: str | pathlib.Path, config=None, error=InpaintError):
    """(task, state, config) of a workdir (latest checkpoint) or a checkpoint step folder.

    The model config is the one saved with the checkpoint unless `config` is given; a
    config whose model does not match the checkpoint's parameters is an `error` naming both.
    """
    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import restore_for_eval

    workdir, step = _resolve_checkpoint(path, error)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        saved = ckpt.restore_config(step)
    except Exception as err:  # noqa: BLE001
        raise error(f"{path}: cannot read the checkpoint's config ({err})") from None
    finally:
        ckpt.close()
    if config is None:
        if not saved:
            raise error(f"{path}: no checkpoint with a saved config")
        config = ml_collections.ConfigDict(saved)
    elif saved and saved.get("model") is not None:
        given = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
        if given.get("name") != saved["model"].get("name"):
            raise error(f"{path}: the config is for model {given.get('name')!r} but the checkpoint holds "
                        f"{saved['model'].get('name')!r}")
    try:
        task, state, _, _ = restore_for_eval(config, workdir, step)
    except FileNotFoundError as err:
        raise error(f"{path}: checkpoint does not restore ({err})") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path}: checkpoint does not match the config's model {dict(config.model)} ({first})") from None
    return task, state, config


def _with_defaults(config) -> ml_collections.ConfigDict:
    from jattn.config import with_defaults

    return with_defaults(config)


def _export_metadata(path: pathlib.Path) -> dict:
    """The `<export>.json` written beside a jax-export artifact ({} if absent)."""
    import json

    meta_path = pathlib.Path(str(path) + ".json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise InpaintError(f"{meta_path}: unreadable export metadata ({err})") from None


def write_random_checkpoint(workdir: str | pathlib.Path, config) -> pathlib.Path:
    """A workdir holding checkpoint 0 of `config`'s model with random weights, saved as a
    training run saves it (with the config): for measuring inference memory and time, which
    do not depend on the weights' values. Float arrays of 2 or more dimensions are drawn
    from N(0, 1 / fan-in) (seed 0), other arrays are zeros, PRNG keys key(0)."""
    import json

    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import state_init_fn
    from jattn.train.task import build_task

    workdir = pathlib.Path(workdir)
    config = _with_defaults(config)
    shapes = jax.eval_shape(state_init_fn(build_task(config), config), jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if len(s.shape) < 2 or not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)

    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        ckpt.save(0, jax.tree_util.tree_map(draw, shapes), config=json.loads(json.dumps(config.to_dict())))
    finally:
        ckpt.close()
    return workdir


# --------------------------------------------------------------------------- memory

# Units of `max_memory` strings: decimal (KB, MB, GB, TB; K, M, G, T alike) and binary (KiB ...).
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# The default memory budget, a share of the memory free when a size is first planned. On a
# host, XLA's figure leaves out the rest of this process (the runtime, the restored model,
# the images) and the system and other programs share what is free; an accelerator's memory
# is this program's, less a margin for the runtime's own allocations.
HOST_MEMORY_FRACTION = 1 / 3
DEVICE_MEMORY_FRACTION = 0.9
# A single image whose smallest attention blocks exceed the default budget may use up to
# this share of the host's available memory (the default limit); on a GPU / TPU the limit
# is the budget.
HOST_MEMORY_LIMIT_FRACTION = 2 / 3

# DeepFill v1 and v2 run contextual attention on their 1/4-resolution features with rate 2:
# queries and keys are the cells of an (H / 8) x (W / 8) grid.
_CA_STRIDE = 8
# Rows a block of query rows adds for the fuse step (fuse_k = 3; see
# `jattn.ops.contextual._contextual_attention`).
_CA_EXTRA_ROWS = 2
# Float32 score arrays ([B, rows, L]) live at the attention's peak, fit to XLA's memory
# analysis of DeepFill v1 (cnum 32) on CPU from 1024 to 4096 pixels a side: the dense path
# holds about 5 of all N rows; a block of r rows about 4 of r + 2 rows and one of r.
# It only orders the candidates: the chosen one is verified by its compiled memory analysis.
_DENSE_COPIES = 5
# The dense path takes one more [B, N, L] float32 array than XLA's analysis counts (peak
# resident memory on CPU exceeds it by exactly that; the blocked path's matches): it is
# added to the analysis, on every backend, so a dense plan never exceeds its budget.
_DENSE_UNCOUNTED = 1
_BLOCK_COPIES, _BLOCK_OUT_COPIES = 4, 1
# The convolutions' peak (their largest im2col buffers), per pixel of the batch.
_CONV_BYTES_PER_PIXEL = 600
# Bytes per pixel of the model call's inputs (image and mask, float32).
_INPUT_BYTES_PER_PIXEL = 16


def parse_memory(value, error=InpaintError) -> int | None:
    """Bytes from a memory size: None (no limit given), an int (bytes) or a string, a number
    with an optional unit: "8GB", "1.5 GiB", "512MB", "2e9" (B, KB, MB, GB, TB and K, M, G, T
    are powers of 1000; KiB, MiB, GiB, TiB powers of 1024). Not positive: an `error`."""
    if value is None:
        return None
    bad = error(f"--max-memory / max_memory={value!r} is not a memory size: give bytes or a number "
                "with a unit, e.g. 8GB or 512MiB")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, np.integer)):
        number = int(value)
    else:
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise bad
        number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number <= 0:
        raise bad
    return number


def _format_bytes(n: float) -> str:
    """"21.3 GB", "412 MB", "36.2 KB": in the units `--max-memory` takes."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GB" or n >= 100 * size else f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device=None) -> int | None:
    """The memory one model call may allocate when no `max_memory` is given, in bytes:
    `HOST_MEMORY_FRACTION` of the host's available memory on CPU, `DEVICE_MEMORY_FRACTION`
    of the free memory (memory_stats' bytes_limit - bytes_in_use) on a GPU / TPU; None when
    the backend reports neither (no limit)."""
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        free = _host_available()
        return None if free is None else int(free * HOST_MEMORY_FRACTION)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" not in stats:
        return None
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * DEVICE_MEMORY_FRACTION)


def default_memory_limit(device=None) -> int | None:
    """The most one model call of a single image may allocate when no `max_memory` is given,
    in bytes: `HOST_MEMORY_LIMIT_FRACTION` of the host's available memory on CPU (taken only
    by an image whose smallest attention blocks do not fit `default_memory_budget`), the
    budget itself on a GPU / TPU; None when unknown (no limit)."""
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        free = _host_available()
        return None if free is None else int(free * HOST_MEMORY_LIMIT_FRACTION)
    return default_memory_budget(device)


def _is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: NumPy's MemoryError or an XLA runtime error (RESOURCE_EXHAUSTED)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _on_one_device(tree):
    """`tree`'s arrays on the first local device: inference runs one program on one device
    (the restored state is replicated over the training mesh, which would run it on each)."""
    device = jax.local_devices()[0]
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, device) if isinstance(x, jax.Array) else x, tree)


class Plan(NamedTuple):
    """How a padded size runs: `block_size` (contextual attention's, None: dense or a model
    without it), `needed` (bytes the call allocates: XLA's temporaries, outputs and inputs;
    None when the backend has no memory analysis) and the `budget` it was chosen for (None:
    no limit)."""

    block_size: int | None
    needed: int | None
    budget: int | None


class _NoFit(Exception):
    """No candidate fits the budget at this batch size (the smallest needs `needed`)."""

    def __init__(self, needed: int | None):
        super().__init__(needed)
        self.needed = needed


class Inpainter:
    """A restored generator: `inpainter(image uint8 [H, W, 3], hole bool [H, W]) -> uint8 [H, W, 3]`.

    The model maps image [N, H', W', 3] in [-1, 1] and mask [N, H', W', 1] at a padded size
    (H', W' multiples of `multiple`, or exactly `fixed_size` for an export of one size) to
    {name: [N, h, w, C]}: an export's function `run`, or a checkpoint's `task.predict`
    (`run` None). "output" is the composite; a checkpoint also gives "flow", "coarse", ...
    (the task's outputs), an export only "output". `params` / `variables`: the restored
    networks (None for an export).

    From a checkpoint, each padded size and batch is compiled once (`plan`) within a memory
    budget: `max_memory` (bytes or a string such as "8GB", see `parse_memory`), by default
    `default_memory_budget()` when the size is first seen. For models with contextual
    attention (`config.model.ca_block_size`) the block size is chosen per size: dense where
    it fits, else the largest block that fits (larger blocks recompute fewer halo rows);
    the block size changes how the attention is evaluated, not its result or the weights.
    A batch that does not fit runs in smaller batches. Without `max_memory`, a single image
    whose smallest blocks exceed the budget runs with them if they fit within
    `default_memory_limit()`; one that does not fit is an `InpaintError` naming the memory
    it needs. Running out of memory anyway is an `InpaintError` too, never a traceback.
    """

    def __init__(self, run, config, *, multiple: int = MULTIPLE, fixed_size: tuple[int, int] | None = None,
                 source: str = "", params: dict | None = None, variables: dict | None = None,
                 task=None, max_memory=None):
        self.config, self.params, self.variables = config, params, variables
        self.multiple, self.fixed_size, self.source = multiple, fixed_size, source
        self.max_memory = parse_memory(max_memory)
        self._run = run
        self._task = task  # a checkpoint's task: compiled per size within the budget (run unused)
        # Models with contextual attention in blocks (older checkpoints' configs lack the key: defaults)
        self._blocks = task is not None and "ca_block_size" in _with_defaults(config).model
        self._tasks: dict[Any, Any] = {}  # block size -> the task evaluating attention that way
        self._compiled: dict[tuple, tuple[Any, int | None]] = {}  # (H', W', N, block) -> (executable, bytes)
        self._plans: dict[tuple, Plan | _NoFit] = {}  # (H', W', N) -> the choice
        self._calibration: dict[tuple, float] = {}  # (H', W') -> measured / estimated bytes

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path, config=None, *, max_memory=None) -> Inpainter:
        """From a workdir, a checkpoint folder or a jax-export file (`jattn export --format
        jax-export`); `config` (optional, not for exports) replaces the saved one;
        `max_memory` (not for exports, whose attention is fixed) bounds each model call's
        memory (default: `default_memory_budget()`)."""
        if pathlib.Path(path).is_file():
            if config is not None:
                raise InpaintError(f"{path}: an export carries its model; --config applies to checkpoints only")
            if max_memory is not None:
                raise InpaintError(f"{path}: an export's attention is compiled in; --max-memory applies to "
                                   "checkpoints only")
            return cls.from_export(path)
        parse_memory(max_memory)  # a bad size is refused before the restore
        task, state, config = restore_trained(path, config, InpaintError)
        if "mask" not in task.fields:
            raise InpaintError(f"{path}: model {config.model.name!r} is not an inpainting model")
        params, variables = _on_one_device(state.params), _on_one_device(state.variables)
        return cls(None, config, source=str(path), params=params, variables=variables, task=task,
                   max_memory=max_memory)

    @classmethod
    def from_export(cls, path: str | pathlib.Path) -> Inpainter:
        """From a `jax.export` artifact of the inpainting function (symbolic or fixed H, W)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise InpaintError(f"{path}: export not found")
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 - any failure here means "not a jax-export file"
            raise InpaintError(f"{path}: not a jattn workdir, checkpoint folder or jax-export file "
                               f"({type(err).__name__})") from None
        meta = _export_metadata(path)
        avals = exported.in_avals
        if len(avals) != 2 or len(avals[0].shape) != 4 or avals[0].shape[-1] != 3 or avals[1].shape[-1] != 1:
            raise InpaintError(f"{path}: a jax-export, but not of an inpainting function (image, mask) -> output "
                               f"(its inputs: {', '.join(str(a) for a in avals)})")
        if jax.default_backend() not in exported.platforms:
            raise InpaintError(f"{path}: exported for {', '.join(exported.platforms)}, not for this "
                               f"{jax.default_backend()} backend")
        _, h, w, _ = avals[0].shape
        fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        multiple = int(meta.get("multiple") or MULTIPLE)
        config = ml_collections.ConfigDict({"model": meta.get("model") or {}, "export": {**meta, "path": str(path)}})
        return cls(lambda x, m: {"output": exported.call(x, m)}, config, multiple=multiple, fixed_size=fixed,
                   source=str(path))

    # ----------------------------------------------------------------------- memory plan

    def memory_budget(self) -> int | None:
        """Bytes one model call may allocate: `max_memory`, else `default_memory_budget()` now."""
        return self.max_memory if self.max_memory is not None else default_memory_budget()

    def memory_limit(self) -> int | None:
        """Bytes a single image whose smallest blocks exceed `memory_budget()` may allocate:
        `max_memory`, else `default_memory_limit()` now."""
        return self.max_memory if self.max_memory is not None else default_memory_limit()

    def _has_attention_blocks(self) -> bool:
        return self._blocks

    def _candidates(self, th: int, tw: int) -> list[int | None]:
        """Block sizes worth compiling at padded size th x tw, largest (fastest) first: None
        (dense), then whole rows of the query grid, each a distinct number of rows per block."""
        if not self._has_attention_blocks():
            return [None]
        from jattn.ops.contextual import _choose_rows

        h, w = th // _CA_STRIDE, tw // _CA_STRIDE
        out: list[int | None] = [None]
        for rows in range(h - 1, 0, -1):
            if h % rows == 0 and _choose_rows(rows * w, h, w, _CA_EXTRA_ROWS) == rows:
                out.append(rows * w)
        return out

    def _estimate(self, th: int, tw: int, n: int, block_size: int | None) -> int:
        """Bytes a call of n images at th x tw allocates, by formula (see `_DENSE_COPIES`)."""
        pixels = n * th * tw
        attention = 0
        if self._has_attention_blocks():
            h, w = th // _CA_STRIDE, tw // _CA_STRIDE
            row = n * w * (h * w) * 4  # one query row's float32 scores against all L = h * w keys
            if block_size is None:
                attention = (_DENSE_COPIES + _DENSE_UNCOUNTED) * h * row
            else:
                rows = block_size // w
                attention = (_BLOCK_COPIES * (rows + _CA_EXTRA_ROWS) + _BLOCK_OUT_COPIES * rows) * row
        return max(attention, _CONV_BYTES_PER_PIXEL * pixels) + _INPUT_BYTES_PER_PIXEL * pixels

    def _task_for(self, block_size: int | None):
        if not self._has_attention_blocks():
            return self._task
        if block_size not in self._tasks:
            from jattn.train.task import build_task

            config = _with_defaults(self.config)
            config.model.ca_block_size = block_size
            self._tasks[block_size] = build_task(config)
        return self._tasks[block_size]

    def _compile(self, th: int, tw: int, n: int, block_size: int | None) -> tuple[Any, int | None]:
        """(executable, bytes it allocates per XLA's memory analysis, or None) for n images."""
        key = (th, tw, n, block_size)
        if key not in self._compiled:
            batch = {"image": jax.ShapeDtypeStruct((n, th, tw, 3), jnp.float32),
                     "mask": jax.ShapeDtypeStruct((n, th, tw, 1), jnp.float32)}
            predict = self._task_for(block_size).predict
            compiled = jax.jit(predict).lower(self.params, self.variables, batch).compile()
            needed = None
            analysis = compiled.memory_analysis()
            if analysis is not None:
                # Inputs counted are the images this call adds; the parameters are resident already.
                needed = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes
                             - analysis.alias_size_in_bytes) + _INPUT_BYTES_PER_PIXEL * n * th * tw
                if self._blocks and block_size is None:
                    cells = (th // _CA_STRIDE) * (tw // _CA_STRIDE)
                    needed += _DENSE_UNCOUNTED * n * cells * cells * 4
            self._compiled[key] = (compiled, needed)
        return self._compiled[key]

    def _plan(self, th: int, tw: int, n: int, *, last: bool, shown: tuple[int, int]) -> Plan:
        """The largest candidate whose bytes fit the budget at n images (see `plan`); raises
        _NoFit, or with `last` (nothing smaller to try) the InpaintError naming the image
        size `shown` (height, width before padding) and the memory it needs."""
        key = (th, tw, n)
        cached = self._plans.get(key)
        if isinstance(cached, Plan):
            return cached
        budget = self.memory_budget()
        candidates = self._candidates(th, tw)
        if budget is None:
            plan = self._plans[key] = Plan(candidates[0], self._compile(th, tw, n, candidates[0])[1], None)
            return plan
        if cached is None:
            ratio = self._calibration.get((th, tw), 1.0)
            tried: dict[Any, int | None] = {}
            while True:
                untried = [c for c in candidates if c not in tried]
                fitting = [c for c in untried if self._estimate(th, tw, n, c) * ratio <= budget]
                if fitting:
                    choice = fitting[0]
                elif candidates[-1] not in tried and (last or (th, tw) not in self._calibration):
                    # compiled for the exact figure the error names, or to correct the estimates
                    # of smaller batches at this size
                    choice = candidates[-1]
                else:
                    break
                _, needed = self._compile(th, tw, n, choice)
                if needed is None or needed <= budget:
                    plan = self._plans[key] = Plan(choice, needed, budget)
                    return plan
                tried[choice] = needed
                ratio = needed / self._estimate(th, tw, n, choice)
                self._calibration[(th, tw)] = ratio
            smallest = candidates[-1]
            limit = self.memory_limit() if n == 1 else budget
            if limit is not None and limit > budget:
                needed = self._compile(th, tw, n, smallest)[1]
                if needed is None or needed <= limit:
                    plan = self._plans[key] = Plan(smallest, needed, limit)
                    return plan
                tried[smallest] = needed
            cached = self._plans[key] = _NoFit(tried.get(smallest) or int(self._estimate(th, tw, n, smallest) * ratio))
        if not last:
            raise cached
        blocks = " with the smallest attention blocks" if len(candidates) > 1 else ""
        what = f"a {shown[1]}x{shown[0]} image" if n == 1 else f"{n} images of {shown[1]}x{shown[0]} at once"
        allowed = max(budget, self.memory_limit() or 0) if n == 1 else budget
        raise InpaintError(f"{self.source}: inpainting {what} needs "
                           f"{_format_bytes(cached.needed)} of memory{blocks}, over the {_format_bytes(allowed)} "
                           f"allowed ({self._budget_origin(limit=allowed > budget)}); raise it with --max-memory "
                           "(max_memory=) or inpaint a smaller image")

    def _budget_origin(self, limit: bool = False) -> str:
        if self.max_memory is not None:
            return "--max-memory / max_memory="
        if jax.local_devices()[0].platform == "cpu":
            share = HOST_MEMORY_LIMIT_FRACTION if limit else HOST_MEMORY_FRACTION
            return f"the default: {share:.2g} of the available memory"
        return f"the default: {DEVICE_MEMORY_FRACTION:.2g} of the device's free memory"

    def plan(self, height: int, width: int, batch: int = 1) -> Plan:
        """How `batch` images of `height` x `width` (before padding) run from a checkpoint:
        the block size chosen and the bytes it needs. Compiles what it verifies (the first
        candidate whose estimate fits, then smaller ones if XLA's analysis says it does not
        fit); the result and the executables are kept for later calls of this size.
        Raises InpaintError when `batch` images with the smallest blocks do not fit (when
        inpainting, a batch that does not fit runs in smaller batches instead)."""
        if self._task is None:
            raise InpaintError(f"{self.source}: an export's attention is compiled in; nothing to plan")
        th, tw = self._padded_size(height, width)
        return self._plan(th, tw, batch, last=True, shown=(height, width))

    def _batch_that_fits(self, th: int, tw: int, n: int, shown: tuple[int, int]) -> int:
        """The largest batch size, n halved until it fits, whose plan fits the budget."""
        while True:
            try:
                self._plan(th, tw, n, last=n == 1, shown=shown)
                return n
            except _NoFit:
                n = (n + 1) // 2

    def _run_checkpoint(self, x: np.ndarray, m: np.ndarray, shown: tuple[int, int]) -> dict[str, np.ndarray]:
        """The outputs of a checkpoint's model for x [N, H', W', 3], m [N, H', W', 1], in
        batches that fit (see `plan`); `shown`: (height, width) before padding, for errors."""
        n, th, tw, _ = x.shape
        size = self._batch_that_fits(th, tw, n, shown)
        parts = []
        for start in range(0, n, size):
            k = min(size, n - start)
            plan = self._plan(th, tw, k, last=True, shown=shown)
            compiled, _ = self._compile(th, tw, k, plan.block_size)
            out = compiled(self.params, self.variables, {"image": x[start : start + k], "mask": m[start : start + k]})
            parts.append({name: np.asarray(v) for name, v in out.items()})
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ----------------------------------------------------------------------- inference

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        if self.fixed_size is None:
            return h + (-h) % self.multiple, w + (-w) % self.multiple
        fh, fw = self.fixed_size
        if h > fh or w > fw:
            raise InpaintError(f"{self.source}: this export takes images of at most {fw}x{fh} (fixed size), "
                               f"got {w}x{h}; export with spatial='any' or use the workdir")
        return fh, fw

    def predict_batch(self, images: np.ndarray, holes: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the model for same-size images: uint8 [N, H, W, 3], bool [N, H, W]
        -> name -> [N, h, w, C] float in [-1, 1], padded by reflection to the model's size
        and cropped back."""
        n, h, w = holes.shape
        th, tw = self._padded_size(h, w)
        ph, pw = th - h, tw - w
        mode = "reflect" if min(h, w) > max(ph, pw) else "symmetric"
        x = np.pad(images.astype(np.float32) / 127.5 - 1.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
        m = np.pad(holes.astype(np.float32), ((0, 0), (0, ph), (0, pw)))[..., None]
        try:
            if self._task is not None:
                out = self._run_checkpoint(x, m, (h, w))
            else:
                out = {k: np.asarray(v) for k, v in self._run(jnp.asarray(x), jnp.asarray(m)).items()}
        except InpaintError:
            raise
        except Exception as err:
            if not _is_out_of_memory(err):
                raise
            what = f"a {w}x{h} image" if n == 1 else f"{n} images of {w}x{h}"
            if self._task is not None:
                hint = "set a lower --max-memory (max_memory=) so that smaller attention blocks are used"
            else:
                hint = ("an export's attention blocks are fixed: inpaint with the workdir (it chooses them "
                        "within --max-memory / max_memory=) or a smaller image")
            raise InpaintError(f"{self.source}: out of memory inpainting {what} ({_first_line(err)}); {hint}") from None
        return {k: v[:, : h * v.shape[1] // th, : w * v.shape[2] // tw] for k, v in out.items()}

    def predict(self, image: np.ndarray, hole: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the model for one image ([H, W, C] float in [-1, 1]), unpadded."""
        return {k: v[0] for k, v in self.predict_batch(image[None], hole[None]).items()}

    def complete_batch(self, images: np.ndarray, holes: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] with the holes filled and every known pixel kept exactly."""
        pred = self.predict_batch(images, holes)["output"]
        pred = np.clip(np.round((pred + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return np.where(holes[..., None], pred, images)

    def __call__(self, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InpaintError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if hole.shape != image.shape[:2]:
            raise InpaintError(f"mask shape {hole.shape} does not match the image's {image.shape[:2]}")
        return self.complete_batch(image[None], hole[None])[0]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _flow_path(output: pathlib.Path) -> pathlib.Path:
    return output.with_name(output.stem + "_flow" + output.suffix)


def check_inpaint_files(triples, *, save_flow: bool = False, batch_size: int = 8) -> None:
    """What `inpaint_files` checks before it reads an image: the batch size, and every output
    path (`check_outputs`; the flow pictures' too with `save_flow`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InpaintError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
    paths = [pathlib.Path(t[2]) for t in triples]
    check_outputs(paths + ([_flow_path(p) for p in paths] if save_flow else []))


def inpaint_files(inpainter: Inpainter, triples, *, save_flow: bool = False, batch_size: int = 8, progress=None) -> list[pathlib.Path]:
    """Inpaint (image, mask, output) path triples: every input is read and checked first
    (nothing is written if one is bad), then images of equal size run in batches of
    `batch_size`. Every output path is checked before the first is written (`check_outputs`);
    each is written atomically; `<output>_flow` with `save_flow`."""
    triples = list(triples)
    check_inpaint_files(triples, save_flow=save_flow, batch_size=batch_size)
    loaded = []
    for image_path, mask_path, output_path in triples:
        image = read_image(image_path)
        loaded.append((image, read_mask(mask_path, image.shape[:2]), pathlib.Path(output_path)))
    groups: dict[tuple[int, int], list] = {}
    for item in loaded:
        groups.setdefault(item[0].shape[:2], []).append(item)
    written = []
    for items in groups.values():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = np.stack([c[0] for c in chunk])
            holes = np.stack([c[1] for c in chunk])
            outputs = inpainter.predict_batch(images, holes)
            if save_flow and "flow" not in outputs:  # found before anything is written
                raise InpaintError(f"{inpainter.source}: gives no attention flow picture (an export holds only "
                                   "the composite; models without contextual attention have none): drop --save-flow")
            pred = _to_uint8(outputs["output"])
            completed = np.where(holes[..., None], pred, images)
            for i, (_, _, out) in enumerate(chunk):
                write_image(out, completed[i])
                written.append(out)
                if save_flow and "flow" in outputs:
                    flow_path = _flow_path(out)
                    write_image(flow_path, _to_uint8(outputs["flow"][i]))
                    written.append(flow_path)
            if progress is not None:
                progress(len(chunk))
    return written


def inpaint_file(inpainter: Inpainter, image_path, mask_path, output_path, *, save_flow: bool = False) -> pathlib.Path:
    """Inpaint one file; returns the output path. Nothing is written on error."""
    return inpaint_files(inpainter, [(image_path, mask_path, output_path)], save_flow=save_flow)[0]


def checkpoint_identity(path: str | pathlib.Path, error=InpaintError) -> tuple:
    """What `path` loads, as a key: the resolved workdir and the checkpoint step it resolves to
    (the latest for a workdir) with the step folder's inode and modification time, or an
    export file's resolved path, inode, size and modification time. A newer checkpoint (or a
    rewritten one) gives a new key."""
    p = pathlib.Path(path)
    if p.is_file():
        st = p.stat()
        return ("file", str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    workdir, step = _resolve_checkpoint(p, error)
    folder = workdir / "checkpoints"
    if step is None:
        steps = [int(q.name) for q in folder.iterdir() if q.name.isdigit() and q.is_dir()]
        step = max(steps, default=None)
    st = (folder / str(step) if step is not None else folder).stat()
    return ("checkpoint", str(workdir.resolve()), step, st.st_ino, st.st_mtime_ns)


class LoadedModels:
    """A small bounded cache of loaded models (least recently used first out): the Python
    API's one-call functions (`inpaint`, `jattn.export.upscale.upscale`) keep the last `size`
    models, each with its compiled programs, keyed by `checkpoint_identity` and the options
    the model was built with, so repeated calls neither restore nor compile again and a
    newer checkpoint is loaded."""

    def __init__(self, size: int):
        import collections
        import threading

        self.size = size
        self._models: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load):
        """The model cached under `key`, else `load()` (cached once it succeeds)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load()
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


# The models `inpaint` loaded from paths (module state: bounded, see LoadedModels).
LOADED = LoadedModels(size=2)


def inpaint(params_or_path: Any, image: np.ndarray, mask: np.ndarray, *, max_memory=None) -> np.ndarray:
    """Python API: `jattn.inpaint(workdir_or_inpainter, uint8 [H, W, 3], mask [H, W]) -> uint8 [H, W, 3]`.

    A path (workdir, checkpoint folder or jax-export file) is loaded once: the last
    `LOADED.size` models stay loaded, with their compiled programs, keyed by the checkpoint
    the path resolves to (`checkpoint_identity`: a newer checkpoint is loaded anew) and
    `max_memory` (see `Inpainter`)."""
    if isinstance(params_or_path, Inpainter):
        if max_memory is not None:
            raise InpaintError("max_memory applies to a path; an Inpainter keeps its own "
                               "(Inpainter.from_checkpoint(path, max_memory=...))")
        inpainter = params_or_path
    else:
        budget = parse_memory(max_memory)
        key = (checkpoint_identity(params_or_path), budget)
        inpainter = LOADED.get(key, lambda: Inpainter.from_checkpoint(params_or_path, max_memory=budget))
    mask = np.asarray(mask)
    return inpainter(np.asarray(image, np.uint8), mask if mask.dtype == bool else mask > 0.5)
