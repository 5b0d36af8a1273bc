"""Import official DeepFill TF1 checkpoints into jattn's Flax parameter trees.

The official variable-scope names are jattn's module names (see
:mod:`jattn.models.deepfill` for v1, :mod:`jattn.models.deepfill_v2` for v2), so importing
is: read the checkpoint with ``tf.train.load_checkpoint(prefix)``, keep the tensors under
``inpaint_net/`` (generator) or ``discriminator/`` (critics), drop optimizer slots
(``.../Adam``, ``.../Adam_1``, ...) and everything outside the scope (``global_step``,
``beta1_power``, ...), split the rest of each name on ``/`` into the nested dict, and check
the result against the model's own parameter shapes (for v2's critic: its params and its
spectral-norm vectors ``.../kernel_sn/u``, which go to the ``batch_stats`` collection).

Channel order: official checkpoints were trained on OpenCV (**BGR**) images; jattn's
pipeline is RGB. ``channel_order="bgr"`` (default) returns the tensors unchanged (feed BGR
images); ``channel_order="rgb"`` reverses the image-channel axes of the layers that touch
images (generator: the first 3 input channels of conv1 / xconv1 / pmconv1 and the outputs
of conv17 / allconv17, for v1 and v2 alike; critics: the inputs of both conv1 of v1, the
first 3 inputs of v2's ``sn_patch_gan/conv1``, whose 4th input is the mask), so the network
takes and returns RGB with the same numbers up to float summation order. (v2's spectral-norm
vectors ``u`` live in the output space of each kernel and need no change.)

TensorFlow is imported lazily, inside the loaders.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jattn.export.formats import unflatten

__all__ = [
    "expected_critic_v2_shapes",
    "expected_critics_shapes",
    "expected_generator_shapes",
    "import_official_checkpoint",
    "load_official_critic_v2",
    "load_official_critics",
    "load_official_generator",
    "read_checkpoint_scope",
    "unflatten",
]

GENERATOR_SCOPE = "inpaint_net"
CRITICS_SCOPE = "discriminator"
_CHANNEL_ORDERS = ("bgr", "rgb")
_VERSIONS = ("v1", "v2")
#: The official base width of each generator version.
_OFFICIAL_CNUM = {"v1": 32, "v2": 48}
# Optimizer slots and moving averages stored next to the variables they belong to.
_SLOT = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?|Adagrad|ExponentialMovingAverage)$")


def expected_generator_shapes(version: str = "v1", cnum: int | None = None) -> dict[str, tuple[int, ...]]:
    """``{"conv1/kernel": (5, 5, 5, 32), ...}`` of jattn's generator (no computation).

    Args:
      version: "v1" (:class:`DeepFillV1Generator`) or "v2" (:class:`DeepFillV2Generator`).
      cnum: base width; None: the official one (v1 32, v2 48).
    """
    from jattn.models.deepfill import DeepFillV1Generator
    from jattn.models.deepfill_v2 import DeepFillV2Generator

    if version not in _VERSIONS:
        raise ValueError(f"unsupported DeepFill generator version {version!r}: jattn has {', '.join(_VERSIONS)}")
    cls = {"v1": DeepFillV1Generator, "v2": DeepFillV2Generator}[version]
    model = cls(cnum=_OFFICIAL_CNUM[version] if cnum is None else cnum)
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


def expected_critic_v2_shapes(cnum: int = 64, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """``{"sn_patch_gan/conv1/kernel": (5, 5, 4, 64), ..., "sn_patch_gan/conv1/kernel_sn/u": (1, 64)}``
    of jattn's :class:`SNPatchGANCritic`: its params and its ``batch_stats`` (the
    power-iteration vectors) under their official names (no computation).

    ``in_channels``: 4 for the official critic (RGB + mask, ``gan_with_mask``).
    """
    from jattn.models.deepfill_v2 import SNPatchGANCritic

    variables = jax.eval_shape(SNPatchGANCritic(cnum=cnum).init, jax.random.key(0), jnp.zeros((1, 64, 64, in_channels)))
    return {**_flatten_shapes(variables["params"]), **_flatten_shapes(variables["batch_stats"])}


def _flatten_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_shapes(value, name + "/"))
        else:
            out[name] = tuple(value.shape)
    return out


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
    from jattn import _require_extra

    tf = _require_extra("tensorflow", "tf", "reading an official TensorFlow checkpoint")  # only the importer needs it

    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (ValueError, tf.errors.OpError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read a TensorFlow checkpoint at {prefix!r}: {first}") from err
    stored = reader.get_variable_to_shape_map()
    head = scope.rstrip("/") + "/"
    found = {
        name[len(head):]: tuple(shape)
        for name, shape in stored.items()
        if name.startswith(head) and not _SLOT.search(name)
    }
    problem = _mismatch(found, expected, head)
    if problem:
        if not found:
            problem += f"; no tensor under {head!r}, scopes present: {sorted({k.split('/')[0] for k in stored})}"
        raise ValueError(f"checkpoint {prefix!r} does not match the model (scope {head!r}): {problem}")
    return {n: np.asarray(reader.get_tensor(head + n), dtype=np.float32) for n in expected}


def _listed(items: list[str], shown: int = 3, sep: str = ", ") -> str:
    """The first `shown` items joined by `sep`, then how many more there are."""
    more = f"{sep}... and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _mismatch(found: Mapping[str, tuple], expected: Mapping[str, tuple], head: str) -> str:
    """One line naming the missing, unexpected and misshaped tensors ("" when they match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(n for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_listed([head + n for n in missing])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listed([head + n for n in unexpected])})")
    if misshaped:
        shapes = [f"{head + n} is {list(found[n])}, expected {list(expected[n])}" for n in misshaped]
        parts.append(f"{len(misshaped)} of the wrong shape ({_listed(shapes, 2, '; ')})")
    return "; ".join(parts)


def _generator_version(prefix: str) -> str | None:
    """The DeepFill generator version whose tensor shapes the checkpoint has, at any width."""
    from jattn import _require_extra

    tf = _require_extra("tensorflow", "tf", "reading an official TensorFlow checkpoint")
    head = GENERATOR_SCOPE + "/"
    try:
        stored = tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map()
    except (ValueError, tf.errors.OpError):
        return None
    found = {n[len(head):]: tuple(s) for n, s in stored.items() if n.startswith(head) and not _SLOT.search(n)}
    if "conv1/kernel" not in found:
        return None
    width = found["conv1/kernel"][-1]
    for version in _VERSIONS:
        for cnum in sorted({width, width // 2, _OFFICIAL_CNUM[version]}):
            try:
                expected = expected_generator_shapes(version, cnum)
            except ValueError:  # a width this version's generator cannot have
                continue
            if not _mismatch(found, expected, head):
                return version
    return None


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
    """Official DeepFill generator checkpoint -> params of :class:`DeepFillV1Generator` (v1)
    or :class:`DeepFillV2Generator` (v2).

    Args:
      prefix: TF1 checkpoint prefix (``".../snap-0"``) or its directory.
      version: "v1" or "v2".
      channel_order: "bgr" (official tensors unchanged) or "rgb" (see module docstring).
      cnum: base width; None: official (v1 32, v2 48).

    Raises:
      ValueError: unreadable checkpoint, or tensors that do not fit the model; the message
        starts with ``DeepFill <version> generator:`` and names the tensors.

    Returns:
      ``{"conv1": {"kernel", "bias"}, ..., "conv13_upsample": {"conv13_upsample_conv": ...}}``
      of float32 ``jnp`` arrays; use as ``model.apply({"params": params}, x_in, mask)``.
    """
    _check_order(channel_order)
    expected = expected_generator_shapes(version, cnum)
    try:
        flat = read_checkpoint_scope(prefix, GENERATOR_SCOPE, expected)
    except ValueError as err:
        other = _generator_version(prefix)
        hint = "" if other in (None, version) else (
            f"; it is a DeepFill {other} generator: import it as {other} (--version {other})")
        raise ValueError(f"DeepFill {version} generator: {err}{hint}") from err
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


def load_official_critic_v2(prefix: str, *, channel_order: str = "bgr", cnum: int = 64) -> dict[str, Any]:
    """Official DeepFill v2 critic (SN-PatchGAN) -> variables of :class:`SNPatchGANCritic`.

    Args:
      prefix: TF1 checkpoint prefix or its directory (tensors under
        ``discriminator/sn_patch_gan/``).
      channel_order: "bgr" (unchanged) or "rgb" (reverses the 3 image inputs of ``conv1``;
        the 4th, the mask, stays).
      cnum: base width (official 64).

    Returns:
      ``{"params": {"sn_patch_gan": {"conv1": {"kernel", "bias"}, ...}},
      "batch_stats": {"sn_patch_gan": {"conv1": {"kernel_sn": {"u"}}, ...}}}`` of float32
      arrays; use as ``critic.apply(variables, x, update_stats=..., mutable=["batch_stats"])``.
    """
    _check_order(channel_order)
    try:
        flat = read_checkpoint_scope(prefix, CRITICS_SCOPE, expected_critic_v2_shapes(cnum))
    except ValueError as err:
        raise ValueError(f"DeepFill v2 critic: {err}") from err
    if channel_order == "rgb":
        flat["sn_patch_gan/conv1/kernel"] = _flip_in(flat["sn_patch_gan/conv1/kernel"])
    tree = jax.tree.map(jnp.asarray, unflatten(flat))
    layers = tree["sn_patch_gan"]
    params = {"sn_patch_gan": {name: {k: v for k, v in t.items() if k != "kernel_sn"} for name, t in layers.items()}}
    stats = {"sn_patch_gan": {name: {"kernel_sn": t["kernel_sn"]} for name, t in layers.items()}}
    return {"params": params, "batch_stats": stats}


def import_official_checkpoint(prefix: str, workdir, config, *, version: str = "v1") -> dict:
    """Write an official DeepFill checkpoint as a step-0 jattn workdir.

    The generator (and the critics, when the file holds them; else freshly initialised)
    are converted to RGB channel order and saved with `config` as checkpoint 0 of
    `workdir`, so `jattn inpaint --checkpoint WORKDIR` uses it directly and
    `jattn train --workdir WORKDIR` fine-tunes it. Refuses a workdir that has checkpoints.

    Args:
      prefix: TF1 checkpoint prefix or its directory.
      workdir: the new jattn workdir.
      config: a training config of the matching task: model.name "deepfill_v1" for v1
        (configs/deepfill_v1_base.py), "deepfill_v2" for v2 (configs/deepfill_v2_base.py).
        model.cnum is set to the official width (v1 32, v2 48), and for v2
        model.critic_cnum to 64 when the critic is imported.
      version: "v1" or "v2". v2 also imports the critic's spectral-norm vectors into
        ``variables["critic"]["batch_stats"]``.

    Returns:
      ``{"workdir", "cnum", "critics"}`` (critics: whether the critic weights were imported).
    """
    import json
    import pathlib

    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import initial_state, provenance
    from jattn.train.task import build_task

    if version not in _VERSIONS:
        raise ValueError(f"unsupported DeepFill version {version!r}: jattn has {', '.join(_VERSIONS)}")
    task_name = f"deepfill_{version}"
    if config.model.get("name") != task_name:
        raise ValueError(
            f"import of DeepFill {version} needs a config with model.name {task_name!r} "
            f"(e.g. configs/{task_name}_base.py), got {config.model.get('name')!r}"
        )
    workdir = pathlib.Path(workdir)
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ValueError(f"{workdir} already has checkpoints; import into a new workdir")
    generator = load_official_generator(prefix, version, channel_order="rgb")
    critic_vars: dict[str, Any] = {}
    try:
        if version == "v1":
            critics = load_official_critics(prefix, channel_order="rgb")
        else:
            loaded = load_official_critic_v2(prefix, channel_order="rgb")
            critics, critic_vars = loaded["params"], {"batch_stats": loaded["batch_stats"]}
            config.model.critic_cnum = int(critics["sn_patch_gan"]["conv1"]["kernel"].shape[-1])
    except ValueError:
        critics = None  # a generator-only file (as the golden and some released ones)
    config.model.cnum = int(generator["conv1"]["kernel"].shape[-1])
    task = build_task(config)
    state = initial_state(task, config)

    def cast_like(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.asarray(n, o.dtype), new, old)

    params = dict(state.params)
    variables = dict(state.variables)
    params["generator"] = cast_like(generator, params["generator"])
    if critics is not None:
        params["critic"] = cast_like(critics, params["critic"])
        for collection, value in critic_vars.items():  # v2: the spectral-norm vectors
            variables["critic"] = {**variables["critic"], collection: cast_like(value, variables["critic"][collection])}
    state = state.replace(params=params, variables=variables)
    config_dict = json.loads(json.dumps(config.to_dict()))
    config_dict["jattn"] = {**provenance(), "imported_from": str(prefix), "imported_critics": critics is not None}
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        ckpt.save(0, state, config=config_dict)
    finally:
        ckpt.close()
    return {"workdir": str(workdir), "cnum": config.model.cnum, "critics": critics is not None}
