"""Small helpers shared by the ``jattn.nn`` modules (private)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any


def compute_dtype(x: jax.Array, dtype: Dtype | None, param_dtype: Dtype) -> Dtype:
    """The module's compute dtype: ``dtype`` or, when None, promote(x, params)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(jnp.asarray(x).dtype, param_dtype)


def check_nhwc(name: str, x: jax.Array) -> jax.Array:
    """Returns ``x`` as an array, raising ``ValueError`` unless it is ``[B, H, W, C]``."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")
    return x


def reduced_width(channels: int, reduction: int, what: str = "reduction") -> int:
    """``channels // reduction``, raising ``ValueError`` if that is below 1."""
    if reduction < 1:
        raise ValueError(f"{what} must be >= 1, got {reduction}")
    width = channels // reduction
    if width < 1:
        raise ValueError(
            f"{what}={reduction} leaves no features for {channels} channels "
            f"(channels // {what} = 0)"
        )
    return width
