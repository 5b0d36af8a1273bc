"""Export formats of a trained model.

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

__all__ = ["ExportError", "flatten_params", "export_safetensors", "load_safetensors"]


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


def export_safetensors(workdir: str | pathlib.Path, output: str | pathlib.Path, *, step: int | None = None) -> dict:
    """Write the workdir's (latest or `step`) generator weights to `output`; returns the metadata."""
    from safetensors.numpy import save_file

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
    config = ml_collections.ConfigDict(saved)
    _, state, _, restored_step = restore_for_eval(config, workdir, step)
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
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return metadata


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
