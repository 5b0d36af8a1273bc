"""Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018), 2-D.

A U-Net whose skip connections pass through additive attention gates
(:class:`jattn.nn.AttentionGate`) before they are concatenated in the decoder::

    encoder level i (i = 0..L-1): [2x2 max pool if i > 0] -> ConvBlock(features[i])   -> skip_i
    g = skip_{L-1} (the bottom)
    decoder level i (i = L-2..0): skip_i' = gate_i(skip_i, g)  (g is one level coarser:
                                  the gate's theta_x has stride 2, as in the paper)
                                  up = 2x2 stride-2 transposed conv of g to features[i]
                                  g = ConvBlock(features[i])(concat(skip_i', up))
    logits = 1x1 conv of g to num_classes

``ConvBlock`` = (3x3 conv, BN, relu) x 2. Batch norm statistics live in ``"batch_stats"``
(``train=True`` with ``mutable=["batch_stats"]`` updates them; ``train=False`` uses the
running averages). H and W must be divisible by ``2 ** (L - 1)``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.nn.attention import AttentionGate

__all__ = ["AttentionUNet", "ConvBlock", "unet_features"]


def unet_features(base: int = 64, depth: int = 5) -> tuple[int, ...]:
    """``(base, 2 base, ..., 2**(depth-1) base)``: the paper's (64, ..., 1024) for base 64."""
    if base < 1 or depth < 2:
        raise ValueError(f"need base >= 1 and depth >= 2, got base={base}, depth={depth}")
    return tuple(base * 2**i for i in range(depth))


class ConvBlock(nn.Module):
    """(3x3 conv, BN, relu) x 2: ``[B, H, W, Cin], train -> [B, H, W, features]``.
    Params: ``conv1``, ``bn1``, ``conv2``, ``bn2``."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, self.features, (3, 3), padding="SAME", use_bias=False,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(norm(name="bn1")(conv(name="conv1")(x)))
        return nn.relu(norm(name="bn2")(conv(name="conv2")(x)))


class AttentionUNet(nn.Module):
    """Attention U-Net for per-pixel classification.

    Attributes:
      num_classes: output classes (background included).
      features: widths of the levels, finest first (paper: 64, 128, 256, 512, 1024;
        :func:`unet_features` builds them from a base width).
      attention: gate the skips (False: a plain U-Net, for ablations).
      dtype: compute dtype (None: promote input and params); logits are float32.

    Call: ``image [B, H, W, C], train: bool = False, return_attention: bool = False`` ->
    ``logits [B, H, W, num_classes]``, and with ``return_attention`` also the gates'
    coefficients ``[alpha_{L-2}, ..., alpha_0]`` (coarsest first), ``alpha_i [B, H / 2**i, W / 2**i, 1]``
    in (0, 1).
    Params: ``enc{i}``, ``dec{i}`` (:class:`ConvBlock`), ``gate{i}`` (:class:`jattn.nn.AttentionGate`),
    ``up{i}`` (ConvTranspose), ``head`` (1x1 Conv).
    """

    num_classes: int
    features: Sequence[int] = (64, 128, 256, 512, 1024)
    attention: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False, return_attention: bool = False):
        x = check_nhwc("image", image)
        levels = len(self.features)
        if levels < 2:
            raise ValueError(f"AttentionUNet needs at least 2 levels, got features={tuple(self.features)}")
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"AttentionUNet with {levels} levels needs H, W divisible by {factor}, got {x.shape[1:3]}")
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)

        skips = []
        for i, f in enumerate(self.features):
            if i:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(f, **kw, name=f"enc{i}")(x, train)
            skips.append(x)
        g, alphas = skips[-1], []
        for i in reversed(range(levels - 1)):
            skip = skips[i]
            if self.attention:
                skip, alpha = AttentionGate(return_alpha=True, **kw, name=f"gate{i}")(skip, g)
                alphas.append(alpha.astype(jnp.float32))
            up = nn.ConvTranspose(self.features[i], (2, 2), strides=(2, 2), **kw, name=f"up{i}")(g)
            g = ConvBlock(self.features[i], **kw, name=f"dec{i}")(jnp.concatenate([skip, up], axis=-1), train)
        logits = nn.Conv(self.num_classes, (1, 1), **kw, name="head")(g).astype(jnp.float32)
        return (logits, alphas) if return_attention else logits
