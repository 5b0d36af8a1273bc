"""Self-attention inpainting: the introductory encoder / self-attention / decoder network,
trained with L1 + an adversarial loss against a PatchGAN critic.

Generator (:class:`SAInpaintGenerator`), for an H x W image (H, W divisible by 4)::

    [image * (1 - mask), mask]                        [B, H, W, 4]
    conv 5x5, 4 -> 64, relu                           [B, H, W, 64]
    conv 3x3 stride 2, 64 -> 128, relu                [B, H/2, W/2, 128]
    conv 3x3 stride 2, 128 -> 256, relu               [B, H/4, W/4, 256]
    self-attention (jattn.nn.SelfAttention2D):        [B, H/4, W/4, 256]
        q, k, v = 1x1 convs at full width C = 256 (reduction 1),
        y = gamma * softmax(q k^T / sqrt(C)) v + x,  gamma a learned scalar, 0 at init
    transposed conv 4x4 stride 2, 256 -> 128, relu    [B, H/2, W/2, 128]
    transposed conv 4x4 stride 2, 128 -> 64, relu     [B, H, W, 64]
    conv 3x3, 64 -> 3, tanh                           [B, H, W, 3] in (-1, 1)

Critic (:class:`PatchCritic`): PatchGAN-style convs on ``[image, mask]`` (4 channels), 4x4
kernels, widths 64, 128, 256 (stride 2) and 512 (stride 1), leaky relu 0.2, then a 4x4
conv to one logit per patch; ``[B, H, W, 4] -> [B, H/8, W/8, 1]``. With
``spectral_norm=True`` every conv is a :class:`jattn.nn.SNConv` whose power-iteration
vectors live in ``"batch_stats"`` (updated when called with ``train=True``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.nn.attention import SelfAttention2D
from jattn.nn.conv import SNConv

__all__ = ["SAInpaintGenerator", "PatchCritic"]


def _check_image_mask(image: jax.Array, mask: jax.Array, divisor: int) -> None:
    image, mask = check_nhwc("image", image), check_nhwc("mask", mask)
    if image.shape[-1] != 3:
        raise ValueError(f"image must be [B, H, W, 3], got shape {tuple(image.shape)}")
    if mask.shape[-1] != 1 or mask.shape[1:3] != image.shape[1:3] or mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask must be [1 or B, H, W, 1] for image {tuple(image.shape)}, got {tuple(mask.shape)}")
    if image.shape[1] % divisor or image.shape[2] % divisor:
        raise ValueError(f"H and W must be divisible by {divisor}, got {image.shape[1:3]}")


class SAInpaintGenerator(nn.Module):
    """Encoder -> full-width self-attention -> decoder (see the module docstring).

    Attributes:
      widths: encoder widths (64, 128, 256); the decoder mirrors them.
      attention: include the self-attention block (False: ablation).
      dtype: compute dtype (None: promote input and params); the output is float32.

    Call: ``image [B, H, W, 3]`` in [-1, 1] (its hole is zeroed here, so the raw or the
    masked image may be passed), ``mask [B or 1, H, W, 1]`` (1 = hole),
    ``return_attention=False`` -> ``raw [B, H, W, 3]`` in (-1, 1) (and the attention
    weights ``[B, HW/16, HW/16]``).
    Params: ``enc0``, ``enc1``, ``enc2`` (Conv), ``attention`` (``query``, ``key``,
    ``value``, ``gamma``), ``dec0``, ``dec1`` (ConvTranspose), ``out`` (Conv).
    """

    widths: Sequence[int] = (64, 128, 256)
    attention: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array, return_attention: bool = False):
        _check_image_mask(image, mask, 4)
        if len(self.widths) != 3:
            raise ValueError(f"widths must be three encoder widths, got {tuple(self.widths)}")
        dtype = compute_dtype(image, self.dtype, self.param_dtype)
        mask = jnp.broadcast_to(mask, (image.shape[0], *mask.shape[1:])).astype(dtype)
        x = jnp.concatenate([image.astype(dtype) * (1 - mask), mask], axis=-1)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        w0, w1, w2 = self.widths
        x = nn.relu(nn.Conv(w0, (5, 5), padding="SAME", **kw, name="enc0")(x))
        x = nn.relu(nn.Conv(w1, (3, 3), (2, 2), padding="SAME", **kw, name="enc1")(x))
        x = nn.relu(nn.Conv(w2, (3, 3), (2, 2), padding="SAME", **kw, name="enc2")(x))
        weights = None
        if self.attention:
            x = SelfAttention2D(reduction=1, scale=1.0 / math.sqrt(w2), return_weights=return_attention, **kw,
                                name="attention")(x)
            if return_attention:
                x, weights = x
        x = nn.relu(nn.ConvTranspose(w1, (4, 4), (2, 2), padding="SAME", **kw, name="dec0")(x))
        x = nn.relu(nn.ConvTranspose(w0, (4, 4), (2, 2), padding="SAME", **kw, name="dec1")(x))
        out = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME", **kw, name="out")(x)).astype(jnp.float32)
        return (out, weights) if return_attention else out


class PatchCritic(nn.Module):
    """PatchGAN-style critic on ``[image, mask]`` (see the module docstring).

    Attributes:
      widths: conv widths (64, 128, 256, 512); all but the last have stride 2.
      spectral_norm: spectrally normalised convs (:class:`jattn.nn.SNConv`).
      dtype: compute dtype; the logits are float32.

    Call: ``image [B, H, W, 3], mask [B or 1, H, W, 1], train: bool`` (updates the
    spectral-norm vectors; apply with ``mutable=["batch_stats"]``) ``-> logits
    [B, H / 2**(n-1), W / 2**(n-1), 1]`` for n widths.
    Params: ``conv0`` ... ``conv{n-1}``, ``logits``.
    """

    widths: Sequence[int] = (64, 128, 256, 512)
    spectral_norm: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        n = len(self.widths)
        _check_image_mask(image, mask, 2 ** (n - 1))
        dtype = compute_dtype(image, self.dtype, self.param_dtype)
        mask = jnp.broadcast_to(mask, (image.shape[0], *mask.shape[1:])).astype(dtype)
        x = jnp.concatenate([image.astype(dtype), mask], axis=-1)

        def conv(features, strides, name):
            if self.spectral_norm:
                layer = SNConv(features, 4, strides, dtype=dtype, param_dtype=self.param_dtype, name=name)
                return functools.partial(layer, update_stats=train)
            return nn.Conv(features, (4, 4), (strides, strides), padding="SAME", dtype=dtype,
                           param_dtype=self.param_dtype, name=name)

        for i, w in enumerate(self.widths):
            x = nn.leaky_relu(conv(w, 2 if i < n - 1 else 1, f"conv{i}")(x), 0.2)
        return conv(1, 1, "logits")(x).astype(jnp.float32)
