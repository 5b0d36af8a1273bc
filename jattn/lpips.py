"""LPIPS, the learned perceptual image distance (Zhang et al. 2018), in Flax.

``d(a, b) = sum_l mean_hw( w_l . (n(f_l(a)) - n(f_l(b)))^2 )``: the five ReLU feature maps
``f_l`` of an ImageNet backbone, each unit-normalised over its channels
(``n(x) = x / (sqrt(sum_c x^2) + 1e-10)``), squared differences weighted per channel by the
learned non-negative 1x1 layers ``lin0`` .. ``lin4`` (no bias), averaged over the map, summed
over the layers. As the ``lpips`` package (v0.1, ``LPIPS(net=...)`` with ``spatial=False``),
images in [-1, 1] pass its scaling layer first: ``(x - shift) / scale`` with shift
``[-.030, -.088, -.188]`` and scale ``[.458, .448, .450]`` (ImageNet's normalisation
rewritten for [-1, 1] inputs).

Backbones, torchvision's ``features`` (torch's indices kept in the parameter names):

* ``"alex"`` (the LPIPS default): AlexNet, conv 11x11 stride 4 pad 2 -> ReLU (tap 1) -> max
  pool 3 stride 2 -> conv 5x5 pad 2 -> ReLU (tap 2) -> max pool -> three convs 3x3 pad 1,
  each followed by a ReLU (taps 3, 4, 5); images at least 31 x 31.
* ``"vgg"``: VGG16, the taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (2x2 max pools
  between the blocks); images at least 16 x 16.

Weights are never downloaded: :func:`load_lpips_weights` reads them from one ``.npz`` /
``.safetensors`` file holding torchvision's ``features.*`` tensors and the lpips package's
``lin*.model.1.weight`` tensors (docs/metrics.md says where to get them and how to convert;
:func:`lpips_tensors_from_torch` does the renaming and the conversion to numpy).

* :class:`LPIPS` -- the Flax module: ``(a, b) [B, H, W, 3] -> [B]``.
* :func:`lpips` -- ``lpips(params, a, b) -> [B]`` (jitted; the backbone is read off the params).
* :func:`load_lpips_weights`, :func:`lpips_tensor_shapes`, :func:`lpips_network`.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.gan_metrics import _read_tensors

__all__ = [
    "LPIPS",
    "NETS",
    "SCALE",
    "SHIFT",
    "load_lpips_weights",
    "lpips",
    "lpips_min_size",
    "lpips_network",
    "lpips_tensor_shapes",
    "lpips_tensors_from_torch",
]

SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer: (x - SHIFT) / SCALE, x in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips normalize_tensor: x / (||x||_channels + EPS)

# Backbone layers in order: ("conv", torchvision features index, out channels, kernel, stride,
# padding) -- always followed by a ReLU --, ("pool", window, stride) -- a max pool without
# padding, floor mode -- and "tap" -- an LPIPS feature map (the last ReLU's output).
_ALEX = (
    ("conv", 0, 64, 11, 4, 2), "tap", ("pool", 3, 2),
    ("conv", 3, 192, 5, 1, 2), "tap", ("pool", 3, 2),
    ("conv", 6, 384, 3, 1, 1), "tap",
    ("conv", 8, 256, 3, 1, 1), "tap",
    ("conv", 10, 256, 3, 1, 1), "tap",
)
_VGG16 = (
    ("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), "tap", ("pool", 2, 2),
    ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), "tap", ("pool", 2, 2),
    ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), "tap", ("pool", 2, 2),
    ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), "tap", ("pool", 2, 2),
    ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), "tap",
)
NETS: dict[str, tuple] = {"alex": _ALEX, "vgg": _VGG16}


def _spec(net: str) -> tuple:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {sorted(NETS)}")
    return NETS[net]


def _out_size(net: str, size: int) -> int:
    """The smallest spatial size of any feature map for an input of ``size`` pixels (<= 0: too small)."""
    smallest = size
    for layer in _spec(net):
        if layer == "tap":
            continue
        if layer[0] == "conv":
            _, _, _, k, s, p = layer
            size = (size + 2 * p - k) // s + 1 if size + 2 * p >= k else 0
        else:
            _, k, s = layer
            size = (size - k) // s + 1 if size >= k else 0
        smallest = min(smallest, size)
    return smallest


@functools.lru_cache(maxsize=None)
def lpips_min_size(net: str = "alex") -> int:
    """The smallest image height / width the backbone ``net`` accepts (alex 31, vgg 16)."""
    size = 1
    while _out_size(net, size) < 1:
        size += 1
    return size


class LPIPS(nn.Module):
    """LPIPS distance: ``a, b [B, H, W, 3]`` in [-1, 1] ``-> [B]`` (float32).

    Params: ``features_<i>`` (``kernel [k, k, Cin, Cout]``, ``bias [Cout]``) for torchvision's
    ``features.<i>`` convs, and ``lin0`` .. ``lin4`` (``kernel [C_l, 1]``, the 1x1 layers).
    ``a`` and ``b`` go through the backbone together (one batch of ``2B``). Differentiable
    (usable as a perceptual loss; gradients stay finite where a feature vector is all zero,
    as the ReLU's gradient there is 0).
    """

    net: str = "alex"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        _check_shapes(np.shape(a), np.shape(b), self.net)
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        x = (jnp.concatenate([a, b], axis=0) - shift) / scale
        n = a.shape[0]
        total = jnp.zeros((n,), jnp.float32)
        tap = 0
        for layer in _spec(self.net):
            if layer == "tap":
                f = x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + EPS)
                d = (f[:n] - f[n:]) ** 2
                w = nn.Dense(1, use_bias=False, name=f"lin{tap}")(d)  # [B, h, w, 1]
                total = total + jnp.mean(w[..., 0], axis=(1, 2))
                tap += 1
            elif layer[0] == "conv":
                _, index, features, k, s, p = layer
                x = nn.relu(nn.Conv(features, (k, k), (s, s), ((p, p), (p, p)), name=f"features_{index}")(x))
            else:
                _, k, s = layer
                x = nn.max_pool(x, (k, k), (s, s), "VALID")
        return total


def _check_shapes(a: tuple[int, ...], b: tuple[int, ...], net: str) -> None:
    if len(a) != 4 or a[-1] != 3 or tuple(a) != tuple(b):
        raise ValueError(f"lpips: images must both be [B, H, W, 3], got shapes {tuple(a)} and {tuple(b)}")
    low = lpips_min_size(net)
    if min(a[1:3]) < low:
        raise ValueError(f"lpips: {a[1]}x{a[2]} images are too small for the {net!r} network (at least {low}x{low})")


def _net_of(params: Mapping) -> str:
    """The backbone whose parameter names ``params`` has."""
    keys = set(params)
    for net in NETS:
        if keys == set(_param_shapes(net)):
            return net
    raise ValueError(f"lpips: params are not those of an LPIPS network ({sorted(NETS)}); "
                     f"got modules {sorted(keys)}")


@jax.jit
def _lpips(params, a, b):
    return LPIPS(_net_of(params)).apply({"params": params}, a, b)


def lpips(params, a, b) -> jax.Array:
    """LPIPS distances ``[B]`` of images ``a``, ``b`` ``[B, H, W, 3]`` in [-1, 1] (jitted).

    ``params``: from :func:`load_lpips_weights` (or ``{"params": ...}`` around them); the
    backbone (alex / vgg) is recognised from the parameter names. Images in [0, 1]: pass
    ``2 * x - 1`` (the lpips package's ``normalize=True``).
    """
    if "params" in params and len(params) == 1:
        params = params["params"]
    _check_shapes(np.shape(a), np.shape(b), _net_of(params))
    return _lpips(params, a, b)


# --------------------------------------------------------------------------- weight files


@functools.lru_cache(maxsize=None)
def _param_shapes(net: str) -> dict[str, dict[str, tuple[int, ...]]]:
    size = lpips_min_size(net)
    x = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)["params"]
    order = sorted(shapes, key=lambda m: (m.startswith("lin"), int(re.sub(r"\D", "", m))))  # network order
    return {m: {k: tuple(shapes[m][k].shape) for k in sorted(shapes[m], reverse=True)} for m in order}


def _torch_name(module: str, leaf: str) -> str:
    if module.startswith("lin"):
        return f"{module}.model.1.weight"
    return module.replace("_", ".") + "." + {"kernel": "weight", "bias": "bias"}[leaf]


def _torch_shape(module: str, leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if module.startswith("lin"):  # Dense [C, 1] <- Conv2d 1x1 [1, C, 1, 1]
        return (1, shape[0], 1, 1)
    if leaf == "kernel":  # HWIO <- OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def lpips_tensor_shapes(net: str = "alex") -> dict[str, tuple[int, ...]]:
    """Every tensor an LPIPS weights file must hold for ``net``: PyTorch name -> shape (torch layout).

    alex: ``features.{0,3,6,8,10}.weight`` / ``.bias`` (torchvision AlexNet) and
    ``lin{0..4}.model.1.weight [1, C, 1, 1]`` with ``C`` = 64, 192, 384, 256, 256.
    vgg: ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.*`` (torchvision VGG16) and ``lin*``
    with ``C`` = 64, 128, 256, 512, 512.
    """
    return {_torch_name(m, leaf): _torch_shape(m, leaf, s)
            for m, leaves in _param_shapes(net).items() for leaf, s in leaves.items()}


def load_lpips_weights(path: str | os.PathLike, net: str = "alex") -> dict:
    """Flax params of :class:`LPIPS` (backbone ``net``: ``"alex"`` or ``"vgg"``) from one file.

    The ``.npz`` / ``.safetensors`` file holds, under their PyTorch names and in torch layout,
    torchvision's backbone tensors ``features.<i>.weight [out, in, k, k]`` and
    ``features.<i>.bias [out]`` and the lpips package's ``lin<l>.model.1.weight [1, C, 1, 1]``
    (:func:`lpips_tensor_shapes` lists them). Other tensors (e.g. ``classifier.*``) are ignored.
    The ``lin`` weights must be non-negative (the lpips package clamps them in training: a
    negative one would let distances go below 0).

    Raises FileNotFoundError (no file) or ValueError: one line with the file, the number of
    problems and the first of them (a missing or mis-shaped tensor, negative ``lin`` weights).
    """
    spec = _param_shapes(net)  # an unknown net fails here
    path = pathlib.Path(path)
    tensors = _read_tensors(path, f"LPIPS ({net})", "docs/metrics.md")
    params: dict = {}
    problems = []
    for module, leaves in spec.items():
        for leaf, shape in leaves.items():
            name, want = _torch_name(module, leaf), _torch_shape(module, leaf, shape)
            if name not in tensors:
                problems.append(f"missing tensor {name!r} (shape {want})")
                continue
            value = np.asarray(tensors[name], np.float32)
            if value.shape != want:
                problems.append(f"tensor {name!r} has shape {value.shape}, expected {want}")
                continue
            if module.startswith("lin"):
                if (value < 0).any():
                    problems.append(f"tensor {name!r} has negative weights (LPIPS's are non-negative)")
                    continue
                value = value.reshape(shape)
            elif leaf == "kernel":
                value = value.transpose(2, 3, 1, 0)
            params.setdefault(module, {})[leaf] = jnp.asarray(value)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"LPIPS ({net}) weights file {path}: {len(problems)} problem(s): {problems[0]}{more}")
    return params


def lpips_network(path: str | os.PathLike, net: str = "alex") -> Callable[[Any, Any], jax.Array]:
    """``(a, b) -> [B]`` LPIPS distances with the weights of ``path`` (see :func:`load_lpips_weights`).

    Cached by path and net: repeated calls reuse the loaded weights and the compiled network.
    """
    return _lpips_network(str(pathlib.Path(path).resolve()), net)


@functools.lru_cache(maxsize=2)
def _lpips_network(path: str, net: str):
    params = load_lpips_weights(path, net)
    return lambda a, b: lpips(params, a, b)


_SLICE = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


def lpips_tensors_from_torch(*state_dicts: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The LPIPS tensors of PyTorch state dicts as float32 numpy arrays, ready for ``np.savez``.

    Accepts, in any combination: a torchvision ``alexnet()`` / ``vgg16()`` state dict
    (``features.*`` kept, ``classifier.*`` dropped), the lpips package's ``weights/v0.1/alex.pth``
    / ``vgg.pth`` (``lin*.model.1.weight``), or a whole ``lpips.LPIPS(...)`` state dict (its
    ``net.slice<k>.<i>.*`` renamed ``features.<i>.*``, torchvision's index; its scaling-layer
    buffers dropped). Values may be torch tensors (detached, moved to the CPU) or anything
    ``numpy.asarray`` takes. Needs no torch itself.
    """
    out: dict[str, np.ndarray] = {}
    for sd in state_dicts:
        for name, value in sd.items():
            m = _SLICE.match(name)
            if m:
                name = f"features.{m.group(1)}.{m.group(2)}"
            elif not (name.startswith("features.") or re.match(r"^lin\d+\.model\.1\.weight$", name)):
                continue
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().float().numpy()
            out[name] = np.asarray(value, np.float32)
    return out
