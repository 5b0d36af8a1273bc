"""Export formats of a trained model.

`jax-export`: the whole inpainting function `(image [B, H, W, 3] in [-1, 1], mask
[B, H, W, 1]) -> composite [B, H, W, 3]` with the weights baked in, serialized by
`jax.export` for CPU, CUDA and TPU with a symbolic batch size and symbolic H, W (any
multiples of 8; or the config's image size with `spatial="fixed"`). Run it without
jattn: `jax.export.deserialize(data).call(image, mask)`; `jattn inpaint --checkpoint
FILE.jax` runs it on images of any size.

`safetensors`: the deployed network's variables as its inference reads them: its params
and its non-parameter collections (batch-norm statistics, spectral-norm vectors), by
default the EMA weights where the run keeps them; names are the collection then the Flax
path, joined by "/" (`params/conv1/kernel`, `batch_stats/bn/mean`), float32, with the
model config, the step and jattn's provenance as metadata, byte-identical for the same
checkpoint. The export is checked to reproduce the checkpoint's `predict` before it is
written. Loadable without jattn: `safetensors.numpy.load_file(path)` or
`safetensors.torch.load_file(path)`.

`saved_model`: the same inpainting function as a TensorFlow SavedModel (through
`jax.experimental.jax2tf`, native serialization: a StableHLO module inside a
`tf.XlaCallModule` op, lowered for CPU, CUDA and TPU), the weights as `tf.Variable`s, one
`serving_default` signature `(image, mask) -> {"output"}`: servable by TF Serving, or
`tf.saved_model.load(path).signatures["serving_default"](image=..., mask=...)`.

`onnx` (optional extra `jattn[onnx]`): the same function as an ONNX model through
`jax2onnx`, weights as initializers, a static batch size; runs in onnxruntime:
`InferenceSession(path).run(["output"], {"image": ..., "mask": ...})`.

See docs/export.md for loading each format without jattn.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

__all__ = [
    "ExportError",
    "flatten_params",
    "split_keys",
    "unflatten",
    "export_safetensors",
    "load_safetensors",
    "export_jax",
    "load_jax_export",
    "export_saved_model",
    "export_onnx",
]


class ExportError(ValueError):
    """The export cannot be made; the message names the problem."""


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten_params(tree: Any) -> dict[str, np.ndarray]:
    """{"a/b/kernel": float32 array} from a nested dict of arrays."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(jax.device_get(leaf))
        flat["/".join(_keys(path))] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    return flat


def split_keys(tree: Any) -> dict[str, list[str]]:
    """{name: key path} of the leaves whose keys contain "/" (Flax's SpectralNorm stores
    `"layer_instance/kernel/u"` as one key), which splitting the name at "/" would not give."""
    paths = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        keys = _keys(path)
        if any("/" in k for k in keys):
            paths["/".join(keys)] = list(keys)
    return paths


def unflatten(flat: dict[str, Any], paths: dict[str, list[str]] | None = None) -> dict:
    """The nested dict of `{"a/b/kernel": array}`: each name split at "/", or its key path
    in `paths` (see `split_keys`); the inverse of `flatten_params`."""
    nested: dict = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = (paths or {}).get(name) or name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _deployed_network(params: dict) -> str:
    if "generator" in params:
        return "generator"
    if len(params) == 1:
        return next(iter(params))
    raise ExportError(f"cannot tell which network to export among {sorted(params)}")


def _restore(workdir, step):
    """(saved config dict, task, state, step) of a workdir's checkpoint."""
    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import restore_for_eval

    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise ExportError(f"{workdir}: not a jattn workdir (no checkpoints/ inside)")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        saved = ckpt.restore_config(step)
    finally:
        ckpt.close()
    if not saved:
        raise ExportError(f"{workdir}: no checkpoint with a saved config")
    try:
        task, state, _, restored_step = restore_for_eval(ml_collections.ConfigDict(saved), workdir, step)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{workdir}: checkpoint does not restore ({first})") from None
    return saved, task, state, restored_step


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_output_file(output) -> pathlib.Path:
    """`output` as a path a file can be written to; ExportError (one line) otherwise."""
    output = pathlib.Path(output)
    if output.is_dir():
        raise ExportError(f"{output}: is a folder; give the path of the file to write")
    existing = next(p for p in output.parents if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ExportError(f"{output}: {existing} is a file, not a folder")
    if existing.is_dir() and not os.access(existing, os.W_OK):
        raise ExportError(f"{output}: the folder {existing} is not writable")
    return output


def _write_atomic(output, write) -> pathlib.Path:
    """`write(tmp)` fills `.<name>.tmp` beside `output`, which is then renamed to `output`;
    on failure nothing is left. A file-system error is an ExportError of one line."""
    output = _check_output_file(output)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if tmp.is_file():  # some writers create 0600 files: use the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    except OSError as err:
        raise ExportError(f"{output}: cannot write the export ({err.strerror or _one_line(err)})") from None
    finally:
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink()
    return output


def _image_hw(saved: dict) -> tuple[int, int]:
    """(H, W) of the model's input: the saved config's data.image_size (int or pair)."""
    size = saved.get("data", {}).get("image_size")
    if size is None:
        raise ExportError("the checkpoint's config has no data.image_size")
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _inpaint_fn(task, variables):
    """`inpaint(params, image [B, H, W, 3], mask [B, H, W, 1]) -> composite [B, H, W, 3]` float32."""

    def inpaint(params, image, mask):
        out = task.predict(params, variables, {"image": image, "mask": mask})["output"]
        return out.astype(np.float32)

    return inpaint


# --------------------------------------------------------------------------- safetensors

SAFETENSORS_FORMAT = "jattn-safetensors-2"
WEIGHTS = ("ema", "trained")
LAYOUT = "flax: conv kernels [H, W, in, out], dense kernels [in, out]"


def _export_sources(variables: dict, network: str, weights: str | None) -> tuple[str, dict]:
    """(weights, {collection: (state field, key, sub-collection or None)}): where each
    collection of the export lives in the train state.

    "ema": params from `variables[f"{network}_ema"]`, the other collections from
    `variables[f"{network}_ema_stats"]` when the run keeps them for the EMA weights, else
    the trained network's. "trained": `params[network]` and `variables[network]`. None:
    "ema" when the run keeps an EMA, else "trained".
    """
    ema = f"{network}_ema"
    if weights is None:
        weights = "ema" if ema in variables else "trained"
    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "ema" and ema not in variables:
        raise ExportError(f"the run keeps no EMA of the {network} (no variables[{ema!r}]): export weights='trained'")
    if weights == "ema":
        stats = f"{network}_ema_stats" if f"{network}_ema_stats" in variables else network
        sources = {"params": ("variables", ema, None)}
    else:
        stats = network
        sources = {"params": ("params", network, None)}
    for collection in sorted(variables.get(stats, {})):
        if jax.tree_util.tree_leaves(variables[stats][collection]):
            sources[collection] = ("variables", stats, collection)
    return weights, sources


def _gather(state, sources: dict) -> dict:
    """{collection: tree} read from the train state at `sources`."""
    out = {}
    for collection, (field, key, sub) in sources.items():
        tree = getattr(state, field)[key]
        out[collection] = tree if sub is None else tree[sub]
    return out


def _placed(sources: dict, trees: dict) -> tuple[dict, dict]:
    """(params, variables) laid out like the train state's, holding only `trees` at
    `sources`: what `predict` gets from the export alone."""
    out: dict = {"params": {}, "variables": {}}
    for collection, (field, key, sub) in sources.items():
        if sub is None:
            out[field][key] = trees[collection]
        else:
            out[field].setdefault(key, {})[sub] = trees[collection]
    return out["params"], out["variables"]


def _trained_as_ema(params: dict, variables: dict, network: str, run_keys) -> tuple[dict, dict]:
    """(params, variables) with the EMA entries of `network` that the run has (`run_keys`)
    holding its trained parameters and statistics: `predict`, which samples the EMA
    weights, then runs the trained network."""
    variables = dict(variables)
    if f"{network}_ema" in run_keys:
        variables[f"{network}_ema"] = params[network]
    if f"{network}_ema_stats" in run_keys:
        variables[f"{network}_ema_stats"] = variables.get(network, {})
    return params, variables


def _probe_inputs(saved: dict, fields) -> dict:
    """A fixed batch of 1 with the task's fields at the config's sizes: images uniform in
    [-1, 1], a central box mask, zero labels and segmentations."""
    from jattn.train.setup import batch_shapes

    config = ml_collections.ConfigDict({"data": saved.get("data", {})})
    rng = np.random.default_rng(0)
    batch = {}
    for name, spec in batch_shapes(config, fields, batch_size=1).items():
        if name == "mask":
            _, h, w, _ = spec.shape
            batch[name] = np.zeros(spec.shape, np.float32)
            batch[name][:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
        elif np.issubdtype(spec.dtype, np.floating):
            batch[name] = rng.uniform(-1.0, 1.0, spec.shape).astype(spec.dtype)
        else:
            batch[name] = np.zeros(spec.shape, spec.dtype)
    return batch


def _reproduction_error(task, state, params, variables, batch, network: str, weights: str) -> float:
    """Max |predict(export) - predict(checkpoint)| over the outputs on `batch` (for the
    "trained" weights of a run with an EMA, both sample the trained network); ExportError
    when `predict` needs more than the export holds."""
    reference = (state.params, state.variables)
    if weights == "trained":
        reference = _trained_as_ema(*reference, network, set(state.variables))
        params, variables = _trained_as_ema(params, variables, network, set(state.variables))
    predict = jax.jit(task.predict)  # a compile per call, not one per operation
    expected = predict(*reference, batch)
    try:
        got = predict(params, variables, batch)
    except Exception as err:  # noqa: BLE001 - a missing variable shows as KeyError or a Flax scope error
        raise ExportError(f"the export would not reproduce the model: its inference reads more than the "
                          f"{network}'s exported variables ({type(err).__name__}: {_one_line(err)})") from None
    diffs = [float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(v, np.float64)), initial=0.0))
             for k, v in expected.items()]
    return max(diffs, default=0.0)


def _canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its JSON header's keys sorted, metadata included,
    so that equal tensors and metadata give equal bytes (the writer orders metadata keys
    by hash, which varies between processes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the writer keeps it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def export_safetensors(workdir: str | pathlib.Path, output: str | pathlib.Path, *, step: int | None = None,
                       weights: str | None = None, verify: bool = True) -> dict:
    """Write the deployed network of the workdir's (latest or `step`) checkpoint to `output`.

    The file holds what the network's inference reads, as float32 tensors named
    `<collection>/<Flax path>`: `params/...` and each non-parameter collection of the
    network (`batch_stats/...`: batch-norm statistics, spectral-norm `u` and `sigma`).
    `weights`: "ema" (the EMA of the parameters, what `predict` samples from when the run
    keeps one), "trained", or None (default: "ema" when the run keeps an EMA, else
    "trained"). With `verify`, `predict` on a probe batch with only the exported tensors
    must equal `predict` with the whole checkpoint, or nothing is written (ExportError).
    Returns the metadata (and `verified_max_abs_diff`).
    """
    from safetensors.numpy import save

    _check_output_file(output)
    saved, task, state, restored_step = _restore(workdir, step)
    network = task.export_network or _deployed_network(state.params)
    weights, sources = _export_sources(state.variables, network, weights)
    trees = _gather(state, sources)
    tensors, paths = flatten_params(trees), split_keys(trees)
    if len(tensors) != len(jax.tree_util.tree_leaves(trees)):
        raise ExportError(f"two variables of the {network} have the same name once their keys are joined by '/'")
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "network": network,
        "weights": weights,
        "collections": _json(sorted(sources)),
        "layout": LAYOUT,
        "paths": _json(paths),
        "step": str(restored_step),
        "model": _json(saved.get("model")),
        "image_size": _json(saved.get("data", {}).get("image_size")),
        "jattn": _json(saved.get("jattn")),
    }
    if "batch_stats" in sources:  # the SAGAN EMA without its own statistics normalises with the batch's
        metadata["batch_norm"] = "batch" if weights == "ema" and sources["batch_stats"][1] == network else "running"
    result = dict(metadata)
    if verify:
        params, variables = _placed(sources, unflatten(tensors, paths))
        diff = _reproduction_error(task, state, params, variables, _probe_inputs(saved, task.fields), network,
                                   weights)
        if not diff <= 1e-6:
            raise ExportError(f"the export would not reproduce the model: its outputs differ by {diff:.3g}")
        result["verified_max_abs_diff"] = diff
    data = _canonical_safetensors(save(tensors, metadata=metadata))
    _write_atomic(output, lambda tmp: pathlib.Path(tmp).write_bytes(data))
    return result


SPATIAL_MULTIPLE = 8  # the inpainting models downsample at most 3 times


def _symbolic_specs(spatial: str, h: int, w: int):
    """ShapeDtypeStructs (image, mask) with a symbolic batch and, for spatial="any",
    symbolic H and W that are multiples of SPATIAL_MULTIPLE."""
    import jax.numpy as jnp

    if spatial == "any":
        b, sh, sw = jax.export.symbolic_shape(f"b, {SPATIAL_MULTIPLE}*h, {SPATIAL_MULTIPLE}*w")
    else:
        (b,), sh, sw = jax.export.symbolic_shape("b"), h, w
    return jax.ShapeDtypeStruct((b, sh, sw, 3), jnp.float32), jax.ShapeDtypeStruct((b, sh, sw, 1), jnp.float32)


def export_jax(workdir, output, *, step: int | None = None, platforms=("cpu", "cuda", "tpu"),
               spatial: str = "any", verify: bool = True) -> dict:
    """Serialize the inpainting function of the workdir's checkpoint with `jax.export`.

    `(image float32 [B, H, W, 3] in [-1, 1], mask [B, H, W, 1]) -> composite [B, H, W, 3]`
    with the weights baked in. B is symbolic; with `spatial="any"` (default) H and W are
    too (any multiples of 8: pad other sizes, as `jattn inpaint` does), with "fixed" they
    are the config's data.image_size. With `verify` (and "cpu" in `platforms`), the
    deserialized artifact is run on a probe batch at the trained size (and, for "any", at
    another size) against the in-process model before `output` is written. Writes
    `output` and `output.json` (the metadata, which is returned), each atomically.
    """
    if spatial not in ("any", "fixed"):
        raise ExportError(f"spatial must be 'any' or 'fixed', got {spatial!r}")
    _check_output_file(output)
    saved, restored_step, (h, w), inpaint, params = _inpainting_export(workdir, step, None)
    fn = jax.jit(functools.partial(inpaint, params))
    try:
        exported = jax.export.export(fn, platforms=tuple(platforms))(*_symbolic_specs(spatial, h, w))
    except Exception as err:  # noqa: BLE001 - shape-polymorphism errors name the operation
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (try spatial='fixed': --spatial fixed)" if spatial == "any" else ""
        raise ExportError(f"jax.export could not export the model{hint}: {type(err).__name__}: {first}") from err
    data = bytes(exported.serialize())
    meta = {"format": "jax-export", "step": restored_step, "image_size": [h, w], "spatial": spatial,
            "multiple": SPATIAL_MULTIPLE if spatial == "any" else None, "platforms": list(platforms),
            "signature": "(image [B, H, W, 3], mask [B, H, W, 1]) -> output [B, H, W, 3]",
            "jax": jax.__version__, "model": saved.get("model"), "jattn": saved.get("jattn")}
    if verify and "cpu" in platforms:
        loaded = jax.export.deserialize(bytearray(data))
        sizes = [(h, w)] + ([(h + SPATIAL_MULTIPLE, w + 2 * SPATIAL_MULTIPLE)] if spatial == "any" else [])
        meta["verified_max_abs_diff"] = max(
            _verify(loaded.call, inpaint, params, 2, ph, pw, "jax.export (deserialized)") for ph, pw in sizes)
    _write_atomic(output, lambda tmp: pathlib.Path(tmp).write_bytes(data))
    _write_atomic(str(output) + ".json", lambda tmp: pathlib.Path(tmp).write_text(json.dumps(meta, indent=2)))
    return meta


def load_jax_export(path):
    """The deserialized `jax.export.Exported` (call it with `.call(image, mask)`)."""
    import jax

    return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))


def load_safetensors(path: str | pathlib.Path) -> tuple[dict, dict]:
    """(Flax variables `{"params": ..., "batch_stats": ...}`, metadata) of a jattn
    safetensors export: `module.apply(variables, ...)` runs the exported network."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
    nested = unflatten(load_file(str(path)), json.loads(metadata.get("paths", "{}")))
    if metadata.get("format") == "jattn-safetensors-1":  # params only, without the collection prefix
        nested = {"params": nested}
    return nested, metadata


# --------------------------------------------------------------------------- served graphs
# SavedModel and ONNX: the inpainting function as a graph for another runtime, checked
# against JAX on a probe batch before it is moved into place.

SAVED_MODEL_META = "assets.extra/jattn_export.json"  # TF Serving ignores assets.extra/
ONNX_EXTRA = "pip install 'jattn[onnx]'"


def _inpainting_export(workdir, step, batch_size) -> tuple[dict, int, tuple[int, int], Any, dict]:
    """(saved config, restored step, (H, W), inpaint(params, image, mask), the params it
    reads: only the deployed network's when that suffices, e.g. a generator without its
    critic, else every network's)."""
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    saved, task, state, restored_step = _restore(workdir, step)
    if "mask" not in task.fields:
        raise ExportError(f"model {task.name!r} is not an inpainting model (no mask input): "
                          "export its weights with the safetensors format instead")
    h, w = _image_hw(saved)
    inpaint = _inpaint_fn(task, state.variables)
    specs = [jax.ShapeDtypeStruct((1, h, w, c), np.float32) for c in (3, 1)]
    network = task.export_network or _deployed_network(state.params)
    params = {network: state.params[network]}
    try:
        jax.eval_shape(inpaint, params, *specs)
    except KeyError:
        params = state.params
    return saved, restored_step, (h, w), inpaint, params


def _probe_batch(b: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed image [B, H, W, 3] in [-1, 1] and a central box mask [B, H, W, 1]."""
    image = np.random.default_rng(0).uniform(-1.0, 1.0, (b, h, w, 3)).astype(np.float32)
    mask = np.zeros((b, h, w, 1), np.float32)
    mask[:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
    return image, mask


def _verify(run, inpaint, params, b: int, h: int, w: int, runtime: str, atol: float = 1e-4) -> float:
    """Max |run(image, mask) - JAX| on the probe batch; ExportError if it fails or differs."""
    image, mask = _probe_batch(b, h, w)
    expected = np.asarray(jax.jit(inpaint)(params, image, mask))
    try:
        got = np.asarray(run(image, mask))
    except Exception as err:  # noqa: BLE001 - any failure there means an unusable export
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"the exported model does not run in {runtime}: {type(err).__name__}: {first}") from err
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= atol:
        raise ExportError(f"the exported model's output in {runtime} differs from JAX's by {diff:.3g} (> {atol})")
    return diff


def _check_output_dir(output: pathlib.Path) -> None:
    if output.is_file():
        raise ExportError(f"{output}: is a file; a SavedModel is a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / "saved_model.pb").is_file():
        raise ExportError(f"{output}: exists and is not a SavedModel (not replaced)")


def _write_dir_atomic(output: pathlib.Path, write) -> None:
    """`write(tmp)` fills `.<name>.tmp` beside `output`, which then replaces `output`;
    on failure nothing is left (and an earlier `output` is kept)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if not output.exists():
            os.replace(tmp, output)
            return
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        try:
            os.replace(tmp, output)
        except OSError:
            os.replace(old, output)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export_saved_model(workdir, output, *, step: int | None = None, batch_size: int | None = None,
                       platforms=("cpu", "cuda", "tpu"), verify: bool = True) -> dict:
    """Write the inpainting function of the workdir's checkpoint as a TF SavedModel folder.

    Signature `serving_default(image float32 [B, H, W, 3] in [-1, 1], mask float32
    [B, H, W, 1], 1 = hole) -> {"output": float32 [B, H, W, 3]}`, H, W the config's
    data.image_size. `batch_size` None: B is polymorphic (jax2tf shape polymorphism);
    an int fixes B (for a TensorFlow that cannot run the polymorphic module). jax2tf's
    native serialization (its only mode since JAX 0.4.31: a StableHLO module lowered for
    `platforms` inside a `tf.XlaCallModule` op). The weights are `tf.Variable`s (stored in
    `variables/`, not in the graph: no 2 GB protobuf limit, visible to TF tools). With
    `verify`, the written model is loaded back and run in TensorFlow (CPU) on a probe
    batch against JAX before it replaces `output`; nothing is left on failure. Returns the
    metadata (also in `<output>/assets.extra/jattn_export.json`).
    """
    from jattn import _require_extra

    tf = _require_extra("tensorflow", "tf", "the saved_model export")
    from jax.experimental import jax2tf

    from jattn.data.tfdata import hide_gpus_from_tf

    hide_gpus_from_tf()  # TF only traces and checks here; the accelerators stay JAX's
    output = pathlib.Path(output)
    _check_output_dir(output)
    saved, restored_step, (h, w), inpaint, params = _inpainting_export(workdir, step, batch_size)
    b = int(batch_size) if batch_size is not None else None

    to_tf = jax2tf.convert(inpaint, polymorphic_shapes=None if b else [None, "(b, _, _, _)", "(b, _, _, _)"],
                           with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: tf.Variable(np.asarray(jax.device_get(leaf)), trainable=False,
                                       name="/".join(str(getattr(k, "key", k)) for k in path)),
        params,
    )

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([b, h, w, 3], tf.float32, name="image"),
                                                   tf.TensorSpec([b, h, w, 1], tf.float32, name="mask")])
    def serve(image, mask):
        return {"output": to_tf(module.params, image, mask)}

    module.serve = serve
    meta = {"format": "saved_model", "step": restored_step, "image_size": [h, w], "batch_size": b,
            "platforms": list(platforms), "networks": sorted(params),
            "signature": "serving_default(image [B, H, W, 3], mask [B, H, W, 1]) -> output [B, H, W, 3]",
            "tensorflow": tf.__version__, "jax": jax.__version__, "model": saved.get("model"), "jattn": saved.get("jattn")}

    def write(tmp: pathlib.Path) -> None:
        try:
            tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
        except Exception as err:  # noqa: BLE001 - conversion errors name the primitive
            hint = "" if b else " (try a static batch size: --batch-size N)"
            raise ExportError(f"jax2tf could not convert the model{hint}: {type(err).__name__}: {err}") from err
        if verify and "cpu" in platforms:
            def run(image, mask):
                sig = tf.saved_model.load(str(tmp)).signatures["serving_default"]
                return sig(image=tf.constant(image), mask=tf.constant(mask))["output"].numpy()

            runtime = f"TensorFlow {tf.__version__}" + ("" if b else " (polymorphic batch: try --batch-size N)")
            meta["verified_max_abs_diff"] = _verify(run, inpaint, params, b or 2, h, w, runtime)
        (tmp / SAVED_MODEL_META).parent.mkdir(parents=True, exist_ok=True)
        (tmp / SAVED_MODEL_META).write_text(json.dumps(meta, indent=2))

    _write_dir_atomic(output, write)
    return meta


def _import_onnx_tools():
    """(jax2onnx, onnx_ir, onnxruntime), or an ExportError naming the extra to install."""
    try:
        import jax2onnx
        import onnx_ir
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX export needs the optional dependencies ({err.name} is missing): {ONNX_EXTRA}") from None
    return jax2onnx, onnx_ir, onnxruntime


def export_onnx(workdir, output, *, step: int | None = None, batch_size: int | None = 1, opset: int = 23,
                verify: bool = True) -> dict:
    """Write the inpainting function of the workdir's checkpoint as an ONNX model (jax2onnx).

    Inputs `image` float32 [B, H, W, 3] in [-1, 1] and `mask` float32 [B, H, W, 1]
    (1 = hole), output `output` float32 [B, H, W, 3]; H, W the config's data.image_size;
    the weights are initializers (constants) of the graph. B is `batch_size` (static, 1 by
    default); None asks for a dynamic batch, which jax2onnx 0.13 cannot lower for models
    whose layers are nested `jax.jit` calls with a symbolic batch (DeepFill: `pad`, `rem`
    in contextual attention; see docs/export.md). Unused nodes are removed; the jattn
    metadata is in the model's metadata_props["jattn"]. With `verify`, the file is run
    in onnxruntime (CPU) on a probe batch against JAX before it replaces `output`.
    Needs the optional extra: `pip install 'jattn[onnx]'`.
    """
    import contextlib
    import io
    import logging

    jax2onnx, ir, ort = _import_onnx_tools()
    _check_output_file(output)
    saved, restored_step, (h, w), inpaint, params = _inpainting_export(workdir, step, batch_size)
    b = int(batch_size) if batch_size is not None else "B"
    meta = {"format": "onnx", "step": restored_step, "image_size": [h, w],
            "batch_size": b if batch_size is not None else None, "opset": opset, "networks": sorted(params),
            "inputs": {"image": [b, h, w, 3], "mask": [b, h, w, 1]}, "outputs": {"output": [b, h, w, 3]},
            "jax2onnx": _dist_version("jax2onnx"),
            "onnxruntime": ort.__version__, "jax": jax.__version__, "model": saved.get("model"), "jattn": saved.get("jattn")}

    # jax2onnx 0.13 prints debug lines from its Flax Conv plugin and logs tracebacks for
    # its dm_pix plugins (which do not import under JAX 0.10): keep both off the CLI's output.
    noisy = logging.getLogger("jax2onnx.plugins.plugin_system")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = jax2onnx.to_onnx(lambda image, mask: inpaint(params, image, mask),
                                     inputs=[(b, h, w, 3), (b, h, w, 1)], model_name="jattn_inpaint", opset=opset,
                                     input_names=["image", "mask"], output_names=["output"], return_mode="ir")
    except Exception as err:  # noqa: BLE001 - conversion errors name the primitive
        hint = "" if batch_size is not None else " with a dynamic batch (use a static batch size: --batch-size N)"
        raise ExportError(f"jax2onnx could not convert the model{_failing_plugin(err)}{hint}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    finally:
        noisy.setLevel(level)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    model.metadata_props["jattn"] = json.dumps(meta)
    data = ir.to_proto(model).SerializeToString()

    def write(tmp) -> None:
        pathlib.Path(tmp).write_bytes(data)
        if verify:
            def run(image, mask):
                options = ort.SessionOptions()
                options.log_severity_level = 3  # hide its warnings on constants its optimizer folded
                session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
                return session.run(["output"], {"image": image, "mask": mask})[0]

            meta["verified_max_abs_diff"] = _verify(run, inpaint, params, b if batch_size is not None else 2, h, w,
                                                    f"onnxruntime {ort.__version__}")

    _write_atomic(output, write)
    return meta


def _failing_plugin(err: BaseException) -> str:
    """Where in jax2onnx `err` was raised, e.g. `" in its lowering of lax.rem"` for its
    plugin `jax/lax/rem.py` (the nested-jit plugin that called it is skipped); else ""."""
    import traceback

    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = frame.filename.replace(os.sep, "/")
        if "/jax2onnx/plugins/" in path and not path.endswith("/core/jit.py"):
            name = path.split("/jax2onnx/plugins/")[1].removesuffix(".py").replace("/", ".")
            return f" in its lowering of {name.removeprefix('jax.')}"
    return ""


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
