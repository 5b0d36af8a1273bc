"""Import official DeepFill TF1 checkpoints into jattn's Flax parameter trees.

The official variable-scope names are jattn's module names (see
:mod:`jattn.models.deepfill`), so importing is: read the checkpoint with
``tf.train.load_checkpoint(prefix)``, keep the tensors under ``inpaint_net/`` (generator)
or ``discriminator/`` (critics), drop optimizer slots (``.../Adam``, ``.../Adam_1``, ...)
and everything outside the scope (``global_step``, ``beta1_power``, ...), split the rest of
each name on ``/`` into the nested dict, and check the result against the model's own
parameter shapes.

Channel order: official checkpoints were trained on OpenCV (**BGR**) images; jattn's
pipeline is RGB. ``channel_order="bgr"`` (default) returns the tensors unchanged (feed BGR
images); ``channel_order="rgb"`` reverses the image-channel axes of the layers that touch
images (generator: the first 3 input channels of conv1 / xconv1 / pmconv1 and the outputs
of conv17 / allconv17; critics: the inputs of both conv1), so the network takes and returns
RGB with the same numbers up to float summation order.

TensorFlow is imported lazily, inside the loaders.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "expected_critics_shapes",
    "expected_generator_shapes",
    "load_official_critics",
    "load_official_generator",
    "read_checkpoint_scope",
    "unflatten",
]

GENERATOR_SCOPE = "inpaint_net"
CRITICS_SCOPE = "discriminator"
_CHANNEL_ORDERS = ("bgr", "rgb")
# Optimizer slots and moving averages stored next to the variables they belong to.
_SLOT = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?|Adagrad|ExponentialMovingAverage)$")


def expected_generator_shapes(version: str = "v1", cnum: int | None = None) -> dict[str, tuple[int, ...]]:
    """``{"conv1/kernel": (5, 5, 5, 32), ...}`` of jattn's generator (no computation).

    Args:
      version: "v1" (the only DeepFill generator jattn has so far).
      cnum: base width; None: the official one (32).
    """
    from jattn.models.deepfill import DeepFillV1Generator

    if version != "v1":
        raise ValueError(f"unsupported DeepFill generator version {version!r}: jattn has 'v1'")
    model = DeepFillV1Generator(cnum=32 if cnum is None else cnum)
    x, m = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, m)["params"]
    return _flatten_shapes(shapes)


def expected_critics_shapes(local_size: int = 128, global_size: int = 256, cnum: int = 64) -> dict[str, tuple[int, ...]]:
    """``{"discriminator_local/conv1/kernel": (5, 5, 3, 64), ...}`` of jattn's v1 critics.

    The dense layers' input sizes depend on the local crop and global image sizes
    (official: 128 and 256).
    """
    from jattn.models.deepfill import DeepFillV1Critics

    model = DeepFillV1Critics(cnum=cnum)
    loc = jnp.zeros((1, local_size, local_size, 3))
    glo = jnp.zeros((1, global_size, global_size, 3))
    return _flatten_shapes(jax.eval_shape(model.init, jax.random.key(0), loc, glo)["params"])


def _flatten_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_shapes(value, name + "/"))
        else:
            out[name] = tuple(value.shape)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/kernel": x}`` -> ``{"a": {"b": {"kernel": x}}}``."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def read_checkpoint_scope(
    prefix: str, scope: str, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Reads the tensors ``scope/<name>`` of a TF checkpoint and checks them against ``expected``.

    Args:
      prefix: checkpoint prefix (e.g. ``".../snap-0"``) or a directory holding a
        ``checkpoint`` file (the latest checkpoint is then used).
      scope: top-level variable scope to keep (``"inpaint_net"``).
      expected: ``{name relative to scope: shape}``.

    Returns:
      ``{name relative to scope: float32 numpy array}``, exactly the expected names.

    Raises:
      ValueError: the checkpoint cannot be read, or tensors are missing, unexpected
        (under ``scope``, optimizer slots aside) or of the wrong shape; the message names them.
    """
    import tensorflow as tf  # lazy: only the importer needs TensorFlow

    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (ValueError, tf.errors.OpError) as err:
        raise ValueError(f"cannot read a TensorFlow checkpoint at {prefix!r}: {err}") from err
    stored = reader.get_variable_to_shape_map()
    head = scope.rstrip("/") + "/"
    found = {
        name[len(head):]: tuple(shape)
        for name, shape in stored.items()
        if name.startswith(head) and not _SLOT.search(name)
    }
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(n for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {prefix!r} does not match the model (scope {head!r}):"]
        if missing:
            lines.append(f"  missing {len(missing)}: " + ", ".join(head + n for n in missing))
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: " + ", ".join(head + n for n in unexpected))
        for n in misshaped:
            lines.append(f"  wrong shape: {head + n} is {list(found[n])}, expected {list(expected[n])}")
        if not found:
            lines.append(f"  (no tensor under {head!r}; scopes present: {sorted({k.split('/')[0] for k in stored})})")
        raise ValueError("\n".join(lines))
    return {n: np.asarray(reader.get_tensor(head + n), dtype=np.float32) for n in expected}


def _check_order(channel_order: str) -> None:
    if channel_order not in _CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")


def _flip_in(kernel: np.ndarray) -> np.ndarray:
    """Reverse the first 3 input channels of an HWIO kernel (the image channels)."""
    kernel = kernel.copy()
    kernel[:, :, :3] = kernel[:, :, 2::-1]
    return kernel


def load_official_generator(
    prefix: str, version: str = "v1", *, channel_order: str = "bgr", cnum: int | None = None
) -> dict[str, Any]:
    """Official DeepFill generator checkpoint -> params of :class:`DeepFillV1Generator`.

    Args:
      prefix: TF1 checkpoint prefix (``".../snap-0"``) or its directory.
      version: "v1".
      channel_order: "bgr" (official tensors unchanged) or "rgb" (see module docstring).
      cnum: base width; None: official (32).

    Returns:
      ``{"conv1": {"kernel", "bias"}, ..., "conv13_upsample": {"conv13_upsample_conv": ...}}``
      of float32 ``jnp`` arrays; use as ``model.apply({"params": params}, x_in, mask)``.
    """
    _check_order(channel_order)
    flat = read_checkpoint_scope(prefix, GENERATOR_SCOPE, expected_generator_shapes(version, cnum))
    if channel_order == "rgb":
        for name in ("conv1", "xconv1", "pmconv1"):
            flat[f"{name}/kernel"] = _flip_in(flat[f"{name}/kernel"])
        for name in ("conv17", "allconv17"):
            flat[f"{name}/kernel"] = flat[f"{name}/kernel"][..., ::-1].copy()
            flat[f"{name}/bias"] = flat[f"{name}/bias"][::-1].copy()
    return jax.tree.map(jnp.asarray, unflatten(flat))


def load_official_critics(
    prefix: str, *, channel_order: str = "bgr", local_size: int = 128, global_size: int = 256
) -> dict[str, Any]:
    """Official DeepFill v1 critic weights -> params of :class:`DeepFillV1Critics`.

    Args:
      prefix: TF1 checkpoint prefix or its directory (tensors under ``discriminator/``).
      channel_order: "bgr" (unchanged) or "rgb" (reverses conv1's input channels).
      local_size, global_size: sizes the critics were built for (official 128, 256);
        they fix the dense layers' shapes.

    Returns:
      ``{"discriminator_local": {"conv1": ...}, "discriminator_global": ...,
      "dout_local_fc": {"kernel", "bias"}, "dout_global_fc": ...}`` of float32 arrays.
    """
    _check_order(channel_order)
    flat = read_checkpoint_scope(prefix, CRITICS_SCOPE, expected_critics_shapes(local_size, global_size))
    if channel_order == "rgb":
        for name in ("discriminator_local/conv1/kernel", "discriminator_global/conv1/kernel"):
            flat[name] = _flip_in(flat[name])
    return jax.tree.map(jnp.asarray, unflatten(flat))


def import_official_checkpoint(prefix: str, workdir, config, *, version: str = "v1") -> dict:
    """Write an official DeepFill checkpoint as a step-0 jattn workdir.

    The generator (and the critics, when the file holds them; else freshly initialised)
    are converted to RGB channel order and saved with `config` as checkpoint 0 of
    `workdir`, so `jattn inpaint --checkpoint WORKDIR` uses it directly and
    `jattn train --workdir WORKDIR` fine-tunes it. Refuses a workdir that has checkpoints.
    """
    import json
    import pathlib

    import jax

    from jattn.train.checkpoint import Checkpointer
    from jattn.train.loop import _state_init_fn, provenance
    from jattn.train.task import build_task

    if version != "v1":
        raise ValueError(f"import of DeepFill {version} needs the DeepFill v2 model, which jattn does not have yet")
    workdir = pathlib.Path(workdir)
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ValueError(f"{workdir} already has checkpoints; import into a new workdir")
    generator = load_official_generator(prefix, "v1", channel_order="rgb")
    try:
        critics = load_official_critics(prefix, channel_order="rgb")
    except ValueError:
        critics = None  # a generator-only file (as the golden and some released ones)
    config.model.cnum = int(generator["conv1"]["kernel"].shape[-1])
    task = build_task(config)
    state = jax.jit(_state_init_fn(task, config))(jax.random.key(config.seed))
    params = dict(state.params)
    params["generator"] = jax.tree_util.tree_map(lambda new, old: jax.numpy.asarray(new, old.dtype), generator, params["generator"])
    if critics is not None:
        params["critic"] = jax.tree_util.tree_map(lambda new, old: jax.numpy.asarray(new, old.dtype), critics, params["critic"])
    state = state.replace(params=params)
    config_dict = json.loads(json.dumps(config.to_dict()))
    config_dict["jattn"] = {**provenance(), "imported_from": str(prefix), "imported_critics": critics is not None}
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        ckpt.save(0, state, config=config_dict)
    finally:
        ckpt.close()
    return {"workdir": str(workdir), "cnum": config.model.cnum, "critics": critics is not None}
