"""Flax module around `jattn.ops.contextual_attention` (no parameters)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.ops.contextual import contextual_attention
from jattn.ops.flow import flow_to_color

__all__ = ["ContextualAttention"]


class ContextualAttention(nn.Module):
    """DeepFill's contextual attention layer.

    Attributes mirror the op's keyword arguments (DeepFill v1 uses rate=2, ksize=3,
    fuse_k=3, softmax_scale=10, fuse=True). `dtype` is the compute dtype (e.g. bf16); the
    op has no parameters. `flow`: also return the offset picture (`flow_to_color`, with
    `flow_upsample` "nearest" as in v1 or "bilinear" as in v2) instead of the raw offsets.

    Call: `(f [B, H, W, C], b [B, H, W, C], mask [1 or B, H, W, 1] | None)` ->
    `(y [B, H, W, C], offsets int32 [B, H/rate, W/rate, 2])`, or `(y, flow [B, H, W, 3])`.
    """

    ksize: int = 3
    stride: int = 1
    rate: int = 1
    fuse_k: int = 3
    softmax_scale: float = 10.0
    fuse: bool = True
    block_size: int | None = None
    precision: Any = None
    dtype: Any = None
    flow: bool = False
    flow_upsample: str = "nearest"

    @nn.compact
    def __call__(self, f: jax.Array, b: jax.Array, mask: jax.Array | None = None):
        if self.dtype is not None:
            f, b = jnp.asarray(f, self.dtype), jnp.asarray(b, self.dtype)
        y, offsets = contextual_attention(
            f,
            b,
            mask,
            ksize=self.ksize,
            stride=self.stride,
            rate=self.rate,
            fuse_k=self.fuse_k,
            softmax_scale=self.softmax_scale,
            fuse=self.fuse,
            block_size=self.block_size,
            precision=self.precision,
        )
        if self.flow:
            return y, flow_to_color(offsets, self.rate, self.flow_upsample)
        return y, offsets
