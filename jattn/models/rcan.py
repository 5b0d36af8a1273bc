"""RCAN (Zhang et al., "Image Super-Resolution Using Very Deep Residual Channel Attention
Networks", ECCV 2018).

The layout of the official code (yulunzhang/RCAN, ``RCAN_TrainCode/code/model/rcan.py``,
built on EDSR-PyTorch)::

    x -> sub_mean -> head (3x3 conv 3 -> F)                         shallow features s
      -> body: n_resgroups x ResidualGroup, then a 3x3 conv F -> F  (residual in residual)
      -> + s                                                         (long skip)
      -> tail: Upsampler (3x3 conv F -> r*r*F, pixel shuffle r; x4 = two x2 steps)
               -> 3x3 conv F -> 3
      -> add_mean

with ``ResidualGroup = x + conv(RCAB(...RCAB(x)))`` (:class:`jattn.nn.RCAB`: conv, relu,
conv, channel attention, residual). Parameter count at (10, 20, 64, 16): 15,592,355
trainable for x4; the official PyTorch model reports 15,592,379 because its two MeanShift
layers are fixed 1x1 convs (2 x 12 non-trainable parameters) counted by ``numel``.

**Range and mean shift.** jattn images are in [-1, 1]; the model takes and returns that
range. The official code works on 0..255 and subtracts the DIV2K RGB mean
(0.4488, 0.4371, 0.4040) x 255 before the head and adds it back after the tail. Here the
same mean is subtracted on jattn's scale, ``m = 2 * rgb_mean - 1`` (a constant, not a
parameter): ``y = net(x - m) + m``. The network thus sees inputs 127.5x smaller than the
official one (and the channel attention's sigmoid is not scale-free), so official weights
would not transfer as they are. ``rgb_mean=None`` turns the shift off.

**Initialisation.** Use :func:`init_rcan`, not ``RCAN.init`` alone: Flax's default conv
initialiser (LeCun normal, kernel variance ``1 / fan_in``) makes each RCAB amplify its input
and the 10 x 20-block trunk blows up at init (output std ~3e7 for a uniform [-1, 1] input,
measured); :func:`init_rcan` rescales every kernel to PyTorch's default ``Conv2d`` variance
``1 / (3 fan_in)``, which the official model starts from (output std ~0.35 then).

**Non-local option.** ``non_local=True`` inserts a :class:`jattn.nn.NonLocalBlock`
(embedded Gaussian, identity at init) on the trunk branch right after the shallow
features (the long skip still carries the plain shallow features). Its phi / g are 2x2
max-pooled (``sub_sample``) to keep the ``HW x HW / 4`` affinity affordable.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.nn.attention import NonLocalBlock
from jattn.nn.channel import RCAB

__all__ = [
    "RCAN", "ResidualGroup", "Upsampler", "init_rcan", "torch_conv_variance", "pixel_shuffle", "upsampler_factors",
    "DIV2K_RGB_MEAN",
]

#: DIV2K training-set RGB mean on [0, 1] (official ``rgb_mean``).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """Depth to space, PyTorch ``PixelShuffle`` channel order: ``[B, H, W, C*r*r] -> [B, rH, rW, C]``.

    Input channel ``c * r * r + i * r + j`` goes to output channel ``c`` at ``(r*h + i, r*w + j)``.
    """
    return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=r, j=r)


def upsampler_factors(scale: int) -> tuple[int, ...]:
    """The pixel-shuffle steps of EDSR's ``Upsampler``: ``2**n`` -> n x2 steps, 3 -> one x3 step."""
    if scale >= 1 and scale & (scale - 1) == 0:
        return (2,) * (scale.bit_length() - 1)
    if scale == 3:
        return (3,)
    raise ValueError(f"RCAN supports scales 1, 2, 3, 4, 8, ... (powers of two or 3), got {scale}")


def _conv(features: int, dtype: Dtype, param_dtype: Dtype, name: str, kernel_size: int = 3) -> nn.Conv:
    k = (kernel_size, kernel_size)
    return nn.Conv(features, k, padding="SAME", dtype=dtype, param_dtype=param_dtype, name=name)


class ResidualGroup(nn.Module):
    """``x + conv(RCAB_n(...RCAB_1(x)))``; ``x [B, H, W, C] -> [B, H, W, C]``.

    Params: ``rcab_0`` ... ``rcab_{n-1}`` (:class:`jattn.nn.RCAB`), ``conv`` (3x3, C -> C).
    """

    n_resblocks: int = 20
    reduction: int = 16
    res_scale: float = 1.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res = x
        for i in range(self.n_resblocks):
            res = RCAB(self.reduction, self.res_scale, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"rcab_{i}")(res)
        return x + _conv(x.shape[-1], self.dtype, self.param_dtype, "conv")(res)


class Upsampler(nn.Module):
    """EDSR ``Upsampler``: per factor r of :func:`upsampler_factors`, a 3x3 conv C -> r*r*C and
    :func:`pixel_shuffle`; ``[B, H, W, C] -> [B, sH, sW, C]``. Params: ``conv_0``, ``conv_1``, ..."""

    scale: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        for i, r in enumerate(upsampler_factors(self.scale)):
            x = pixel_shuffle(_conv(r * r * c, self.dtype, self.param_dtype, f"conv_{i}")(x), r)
        return x


class RCAN(nn.Module):
    """Residual channel attention network for ``scale``x super-resolution.

    Attributes:
      scale: upscaling factor (2, 3, 4, 8).
      n_resgroups, n_resblocks, n_feats, reduction: official 10, 20, 64, 16.
      non_local: add a :class:`jattn.nn.NonLocalBlock` after the shallow features.
      res_scale: RCAB residual scale (official 1).
      rgb_mean: per-channel mean on [0, 1] subtracted on the way in and added on the way
        out (DIV2K's by default; None: no shift). See the module docstring.
      dtype: compute dtype (None: promote input and params).

    Call: ``lowres [B, h, w, 3]`` in [-1, 1] ``-> [B, scale*h, scale*w, 3]`` (unclipped).
    Params: ``head``, ``group_0`` ... (:class:`ResidualGroup`), ``body_conv``, ``upsampler``,
    ``tail`` (and ``non_local``).
    """

    scale: int
    n_resgroups: int = 10
    n_resblocks: int = 20
    n_feats: int = 64
    reduction: int = 16
    non_local: bool = False
    res_scale: float = 1.0
    rgb_mean: Sequence[float] | None = DIV2K_RGB_MEAN
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, lowres: jax.Array) -> jax.Array:
        x = check_nhwc("lowres", lowres)
        if x.shape[-1] != 3:
            raise ValueError(f"RCAN takes RGB images [B, h, w, 3], got shape {tuple(x.shape)}")
        upsampler_factors(self.scale)  # validate early
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        conv = functools.partial(_conv, dtype=dtype, param_dtype=self.param_dtype)
        shift = 0.0 if self.rgb_mean is None else 2.0 * jnp.asarray(self.rgb_mean, jnp.float32) - 1.0
        x = (x.astype(jnp.float32) - shift).astype(dtype)

        s = conv(self.n_feats, name="head")(x)
        res = s
        if self.non_local:
            res = NonLocalBlock(sub_sample=True, dtype=dtype, param_dtype=self.param_dtype, name="non_local")(res)
        for i in range(self.n_resgroups):
            res = ResidualGroup(
                self.n_resblocks, self.reduction, self.res_scale, dtype=dtype, param_dtype=self.param_dtype,
                name=f"group_{i}",
            )(res)
        res = conv(self.n_feats, name="body_conv")(res) + s
        y = Upsampler(self.scale, dtype=dtype, param_dtype=self.param_dtype, name="upsampler")(res)
        y = conv(3, name="tail")(y)
        return y.astype(jnp.float32) + shift


def torch_conv_variance(params: dict) -> dict:
    """Every ``kernel`` of ``params`` divided by sqrt(3): Flax's default LeCun-normal kernels
    (variance ``1 / fan_in``) become PyTorch's default ``Conv2d`` variance ``1 / (3 fan_in)``."""
    scale = 1.0 / math.sqrt(3.0)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * jnp.asarray(scale, x.dtype) if getattr(path[-1], "key", None) == "kernel" else x, params
    )


def init_rcan(model: RCAN, key: jax.Array, lowres: jax.Array) -> dict:
    """``model.init`` with the kernels at PyTorch's default variance (see the module docstring).

    Returns the variables ``{"params": ...}``; ``key`` is the "params" PRNG key.
    """
    variables = dict(model.init({"params": key}, lowres))
    variables["params"] = torch_conv_variance(variables["params"])
    return variables
