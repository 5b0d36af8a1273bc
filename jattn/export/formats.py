"""Export formats of a trained model.

`jax-export`: the whole inpainting function `(image [B, H, W, 3] in [-1, 1], mask
[B, H, W, 1]) -> composite [B, H, W, 3]` with the weights baked in, serialized by
`jax.export` for CPU, CUDA and TPU with a symbolic batch size (H, W are the config's
image size). Run it without jattn: `jax.export.deserialize(data).call(image, mask)`.

`safetensors`: the generator's weights (the network a user deploys), flat names joined by
"/" (e.g. `conv1/kernel`, as the official DeepFill variable names), float32, with the
model config, the step and jattn's provenance as metadata. Loadable without jattn:
`safetensors.numpy.load_file(path)` or `safetensors.torch.load_file(path)`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

__all__ = ["ExportError", "flatten_params", "export_safetensors", "load_safetensors", "export_jax", "load_jax_export"]


class ExportError(ValueError):
    """The export cannot be made; the message names the problem."""


def flatten_params(tree: Any) -> dict[str, np.ndarray]:
    """{"a/b/kernel": float32 array} from a nested dict of arrays."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        arr = np.asarray(jax.device_get(leaf))
        flat[name] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    return flat


def _deployed_network(params: dict) -> str:
    if "generator" in params:
        return "generator"
    if len(params) == 1:
        return next(iter(params))
    raise ExportError(f"cannot tell which network to export among {sorted(params)}")


def _restore(workdir, step):
    """(saved config dict, task, state, step) of a workdir's checkpoint."""
    from jattn.train.checkpoint import Checkpointer
    from jattn.train.loop import restore_for_eval

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
    task, state, _, restored_step = restore_for_eval(ml_collections.ConfigDict(saved), workdir, step)
    return saved, task, state, restored_step


def _write_atomic(output, write) -> pathlib.Path:
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output


def export_safetensors(workdir: str | pathlib.Path, output: str | pathlib.Path, *, step: int | None = None) -> dict:
    """Write the workdir's (latest or `step`) generator weights to `output`; returns the metadata."""
    from safetensors.numpy import save_file

    saved, _, state, restored_step = _restore(workdir, step)
    network = _deployed_network(state.params)
    tensors = flatten_params(state.params[network])
    metadata = {
        "format": "jattn-safetensors-1",
        "network": network,
        "step": str(restored_step),
        "model": json.dumps(saved.get("model")),
        "image_size": json.dumps(saved.get("data", {}).get("image_size")),
        "jattn": json.dumps(saved.get("jattn")),
    }
    _write_atomic(output, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return metadata


def export_jax(workdir, output, *, step: int | None = None, platforms=("cpu", "cuda", "tpu")) -> dict:
    """Serialize the inpainting function of the workdir's checkpoint with `jax.export`."""
    import jax
    import jax.numpy as jnp

    saved, task, state, restored_step = _restore(workdir, step)
    size = saved.get("data", {}).get("image_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    params, variables = state.params, state.variables

    def inpaint(image, mask):
        out = task.predict(params, variables, {"image": image, "mask": mask})["output"]
        return out.astype(jnp.float32)

    (b,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(inpaint), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((b, h, w, 1), jnp.float32)
    )
    data = exported.serialize()
    _write_atomic(output, lambda tmp: pathlib.Path(tmp).write_bytes(bytes(data)))
    meta = {"format": "jax-export", "step": restored_step, "image_size": [h, w], "platforms": list(platforms),
            "model": saved.get("model")}
    pathlib.Path(str(output) + ".json").write_text(json.dumps(meta, indent=2))
    return meta


def load_jax_export(path):
    """The deserialized `jax.export.Exported` (call it with `.call(image, mask)`)."""
    import jax

    return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))


def load_safetensors(path: str | pathlib.Path) -> tuple[dict, dict]:
    """(nested params dict, metadata) from a jattn safetensors export."""
    from safetensors import safe_open

    nested: dict = {}
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():
            node = nested
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = f.get_tensor(name)
    return nested, metadata
