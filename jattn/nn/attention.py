"""Spatial attention modules (Flax Linen) over NHWC feature maps ``[B, H, W, C]``.

* :class:`SelfAttention2D` -- SAGAN self-attention block (Zhang et al. 2019).
* :class:`MultiHeadAttention2D` -- multi-head attention over all H*W positions,
  optional learned relative position bias.
* :class:`AdditiveAttention` -- Bahdanau attention over sequences ``[B, T, D]``.
* :class:`NonLocalBlock` -- embedded-Gaussian non-local block (Wang et al. 2018).
* :class:`AttentionGate` -- additive attention gate of Attention U-Net
  (Oktay et al. 2018).

Every module takes ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``; ``None`` =
promote input and parameter dtypes) and ``param_dtype`` (default float32). The
arithmetic is in :mod:`jattn.ops.attention`; the modules only hold parameters.
"""
from __future__ import annotations

import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype, reduced_width
from jattn.ops import attention as ops

__all__ = [
    "SelfAttention2D",
    "MultiHeadAttention2D",
    "AdditiveAttention",
    "NonLocalBlock",
    "AttentionGate",
]

Initializer = Any


def _conv1x1(features: int, name: str, dtype: Dtype, param_dtype: Dtype, **kw) -> nn.Conv:
    return nn.Conv(
        features, (1, 1), dtype=dtype, param_dtype=param_dtype, name=name, **kw
    )


def _flatten(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H*W, C]``."""
    return einops.rearrange(x, "b h w c -> b (h w) c")


class SelfAttention2D(nn.Module):
    """SAGAN self-attention: ``y = gamma * softmax(q k^T) v + x``.

    ``q``, ``k`` are 1x1 convs of ``x`` to ``C // reduction`` features, ``v`` a
    1x1 conv to ``C``; attention runs over all ``H*W`` positions (softmax over
    keys). Logits are unscaled by default, as in SAGAN (``scale=1.0``); pass e.g.
    ``scale=1 / sqrt(C // reduction)`` for scaled attention. ``gamma`` is a
    learned scalar initialised to 0, so the block is the identity at init.

    Attributes:
      reduction: query / key width is ``C // reduction`` (8 in SAGAN).
      scale: logit scale.
      use_bias: biases in the 1x1 convs.
      return_weights: also return the ``[B, H*W, H*W]`` attention weights.
      implementation: ``jax.nn.dot_product_attention`` implementation.

    Call: ``x [B, H, W, C] -> y [B, H, W, C]`` (and weights ``[B, HW, HW]``).
    Params: ``query``, ``key``, ``value`` (Conv), ``gamma`` (scalar).
    """

    reduction: int = 8
    scale: float = 1.0
    use_bias: bool = True
    return_weights: bool = False
    implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        _, h, w, c = x.shape
        d = reduced_width(c, self.reduction)
        conv = functools.partial(
            _conv1x1, dtype=dtype, param_dtype=self.param_dtype, use_bias=self.use_bias
        )
        q = _flatten(conv(d, "query")(x))
        k = _flatten(conv(d, "key")(x))
        v = _flatten(conv(c, "value")(x))
        o = ops.dot_product_attention(
            q, k, v, scale=self.scale, implementation=self.implementation
        )
        o = einops.rearrange(o, "b (h w) c -> b h w c", h=h, w=w)
        gamma = self.param("gamma", nn.initializers.zeros_init(), (), self.param_dtype)
        y = gamma.astype(dtype) * o + x
        if self.return_weights:
            return y, ops.attention_weights(q, k, scale=self.scale)[:, 0]
        return y


class MultiHeadAttention2D(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions of a feature map.

    Projections ``w_q, w_k, w_v: [C, F]`` (``F = qkv_features``, default C) and
    ``w_o: [F, C]`` back to C, computed by :func:`jattn.ops.attention.multi_head_attention`.

    With ``relative_position_bias=True`` a learned table
    ``relative_position_bias_table: [(2H-1)(2W-1), num_heads]`` is indexed by the
    relative offset ``(dy, dx)`` of every (query, key) pair and added to the
    logits (Swin style); H and W must then be the same at every call.

    Attributes:
      num_heads: N; must divide F.
      qkv_features: F, default C.
      use_bias: biases ``b_q, b_k, b_v, b_o``.
      relative_position_bias: learned relative position bias.
      residual: return ``x + attention(x)``.
      scale: logit scale, default ``1 / sqrt(F / N)``.
      implementation: ``jax.nn.dot_product_attention`` implementation.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``; optional boolean ``mask``
    broadcastable to ``[B, N, HW, HW]``.
    """

    num_heads: int
    qkv_features: int | None = None
    use_bias: bool = True
    relative_position_bias: bool = False
    residual: bool = False
    scale: float | None = None
    implementation: str | None = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        _, h, w, c = x.shape
        f = self.qkv_features or c
        if self.num_heads < 1 or f % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide qkv_features={f}")

        def kernel(name, shape):
            return self.param(name, self.kernel_init, shape, self.param_dtype).astype(dtype)

        def bias(name, n):
            if not self.use_bias:
                return None
            return self.param(name, nn.initializers.zeros_init(), (n,), self.param_dtype).astype(dtype)

        logit_bias = None
        if self.relative_position_bias:
            table = self.param(
                "relative_position_bias_table",
                nn.initializers.truncated_normal(0.02),
                ((2 * h - 1) * (2 * w - 1), self.num_heads),
                self.param_dtype,
            )
            index = ops.relative_position_index(h, w)  # [HW, HW], static
            logit_bias = einops.rearrange(table[index], "t s n -> 1 n t s").astype(dtype)

        seq = _flatten(x)
        y = ops.multi_head_attention(
            seq, seq,
            kernel("w_q", (c, f)), kernel("w_k", (c, f)),
            kernel("w_v", (c, f)), kernel("w_o", (f, c)),
            b_q=bias("b_q", f), b_k=bias("b_k", f), b_v=bias("b_v", f), b_o=bias("b_o", c),
            num_heads=self.num_heads, mask=mask, bias=logit_bias, scale=self.scale,
            implementation=self.implementation,
        )
        y = einops.rearrange(y, "b (h w) c -> b h w c", h=h, w=w)
        return x + y if self.residual else y


class AdditiveAttention(nn.Module):
    """Bahdanau (additive) attention over sequences, wrapping
    :func:`jattn.ops.attention.additive_attention`.

    Attributes:
      attention_dim: A, the hidden width of the score MLP.

    Call: ``query [B, T, Dq], key [B, S, Dk], value [B, S, Dv] (default key),
    mask [B, T, S] (bool, True = attend) -> (out [B, T, Dv], weights [B, T, S])``.
    Params: ``w_q [Dq, A]``, ``w_k [Dk, A]``, ``v [A]``.
    """

    attention_dim: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value=None, mask=None):
        query, key = jnp.asarray(query), jnp.asarray(key)
        value = key if value is None else jnp.asarray(value)
        for name, arr in (("query", query), ("key", key), ("value", value)):
            if arr.ndim != 3:
                raise ValueError(f"{name} must be [B, L, D], got shape {tuple(arr.shape)}")
        if self.attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {self.attention_dim}")
        dtype = compute_dtype(query, self.dtype, self.param_dtype)
        a = self.attention_dim
        w_q = self.param("w_q", self.kernel_init, (query.shape[-1], a), self.param_dtype)
        w_k = self.param("w_k", self.kernel_init, (key.shape[-1], a), self.param_dtype)
        v = self.param("v", nn.initializers.normal(a ** -0.5), (a,), self.param_dtype)
        args = (query, key, value, w_q, w_k, v)
        return ops.additive_attention(*(t.astype(dtype) for t in args), mask=mask)


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block: ``z = W(softmax(theta phi^T) g) + x``.

    ``theta``, ``phi``, ``g`` are 1x1 convs to ``inter_channels`` (default C // 2);
    the affinity is unscaled (``softmax(theta phi^T)``); ``W`` is a 1x1 conv back
    to C with kernel and bias initialised to zero, so the block is the identity at
    init (the paper zero-initialises the BatchNorm after W instead; there is no
    BatchNorm here). With ``sub_sample=True`` phi and g are 2x2 max-pooled.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``.
    Params: ``theta``, ``phi``, ``g``, ``W`` (Conv).
    """

    inter_channels: int | None = None
    sub_sample: bool = False
    implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        _, h, w, c = x.shape
        ci = self.inter_channels if self.inter_channels is not None else c // 2
        if ci < 1:
            raise ValueError(f"inter_channels must be >= 1, got {ci} (for C={c})")
        if self.sub_sample and (h < 2 or w < 2):
            raise ValueError(f"sub_sample needs H, W >= 2, got {h}x{w}")
        conv = functools.partial(_conv1x1, dtype=dtype, param_dtype=self.param_dtype)
        theta = conv(ci, "theta")(x)
        phi = conv(ci, "phi")(x)
        g = conv(ci, "g")(x)
        if self.sub_sample:
            phi = nn.max_pool(phi, (2, 2), strides=(2, 2))
            g = nn.max_pool(g, (2, 2), strides=(2, 2))
        y = ops.dot_product_attention(
            _flatten(theta), _flatten(phi), _flatten(g), scale=1.0,
            implementation=self.implementation,
        )
        y = einops.rearrange(y, "b (h w) c -> b h w c", h=h, w=w)
        z = conv(
            c, "W",
            kernel_init=nn.initializers.zeros_init(),
            bias_init=nn.initializers.zeros_init(),
        )(y)
        return z + x


class AttentionGate(nn.Module):
    """Attention U-Net gate: ``y = x * alpha(x, g)``.

    ``theta_x`` (1x1 conv, no bias; stride 2 when g is exactly half x's size) and
    ``phi_g`` (1x1 conv) map to ``inter_channels``; if their sizes still differ
    phi_g is resized bilinearly to theta_x's size. Then ``relu(sum)`` ->
    ``psi`` (1x1 conv to 1) -> sigmoid gives alpha, resized bilinearly
    (``jax.image.resize``) to x's size. The output transform W (1x1 conv + BN) of
    the reference code is left out.

    Attributes:
      inter_channels: default ``Cx // 2`` (at least 1).
      return_alpha: also return alpha ``[B, Hx, Wx, 1]``.

    Call: ``x [B, Hx, Wx, Cx]`` (skip features), ``g [B, Hg, Wg, Cg]`` (gating
    signal) ``-> [B, Hx, Wx, Cx]``.
    """

    inter_channels: int | None = None
    return_alpha: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, g: jax.Array):
        x, g = check_nhwc("x", x), check_nhwc("g", g)
        if x.shape[0] != g.shape[0]:
            raise ValueError(f"batch sizes differ: x {x.shape[0]} vs g {g.shape[0]}")
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x, g = x.astype(dtype), g.astype(dtype)
        b, hx, wx, cx = x.shape
        hg, wg = g.shape[1:3]
        ci = self.inter_channels if self.inter_channels is not None else max(1, cx // 2)
        if ci < 1:
            raise ValueError(f"inter_channels must be >= 1, got {ci}")
        stride = 2 if (hx, wx) == (2 * hg, 2 * wg) else 1
        conv = functools.partial(_conv1x1, dtype=dtype, param_dtype=self.param_dtype)
        theta = conv(ci, "theta_x", strides=(stride, stride), use_bias=False)(x)
        phi = conv(ci, "phi_g")(g)
        if phi.shape[1:3] != theta.shape[1:3]:
            phi = jax.image.resize(phi, theta.shape, "bilinear")
        f = nn.relu(theta + phi)
        alpha = nn.sigmoid(conv(1, "psi")(f))
        if alpha.shape[1:3] != (hx, wx):
            alpha = jax.image.resize(alpha, (b, hx, wx, 1), "bilinear")
        y = x * alpha
        return (y, alpha) if self.return_alpha else y
