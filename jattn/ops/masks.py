"""Mask math on arrays (1 = hole), jit-friendly."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["hole_boxes"]


def hole_boxes(mask: jax.Array, crop: tuple[int, int]) -> jax.Array:
    """A fixed-size box around each image's hole, for DeepFill's local critic.

    mask: [B, H, W, 1] (1 = hole); crop: static (h, w). Returns int32 [B, 4] =
    (top, left, h, w): the crop centred on the hole's bounding box, clamped inside the
    image (an image without a hole gets the centred crop). A box-mask hole no larger than
    the crop lies wholly inside it.
    """
    if mask.ndim != 4:
        raise ValueError(f"hole_boxes: mask must be [B, H, W, 1], got shape {tuple(mask.shape)}")
    _, height, width, _ = mask.shape
    ch, cw = crop
    if ch > height or cw > width:
        raise ValueError(f"hole_boxes: crop {crop} is larger than the image {(height, width)}")
    hole = mask[..., 0] > 0.5

    def extent(any_along, size):
        idx = jnp.arange(size)
        has = jnp.any(any_along, axis=-1)
        first = jnp.min(jnp.where(any_along, idx, size), axis=-1)
        last = jnp.max(jnp.where(any_along, idx, -1), axis=-1)
        centre2 = jnp.where(has, first + last, size - 1)  # twice the centre
        return centre2

    rows = jnp.any(hole, axis=2)  # [B, H]
    cols = jnp.any(hole, axis=1)  # [B, W]
    top = jnp.clip((extent(rows, height) + 1 - ch) // 2, 0, height - ch)
    left = jnp.clip((extent(cols, width) + 1 - cw) // 2, 0, width - cw)
    size = jnp.broadcast_to(jnp.asarray([ch, cw], jnp.int32), (mask.shape[0], 2))
    return jnp.concatenate([jnp.stack([top, left], axis=-1).astype(jnp.int32), size], axis=-1)
