"""Resizing that matches TensorFlow 1 bit for bit.

DeepFill (v1 and v2) upsamples with TF1 ``tf.image.resize_nearest_neighbor(x,
(2H, 2W), align_corners=True)``. Its source index for output row ``i`` is::

    scale = float32(in - 1) / float32(out - 1)      # out > 1, else in / out
    src   = min(roundf(float32(i) * scale), in - 1)  # roundf: half away from 0

computed in float32. Neither ``jax.image.resize`` (half-pixel centres) nor
``jnp.repeat`` reproduce it (e.g. 32 -> 16 picks rows 0, 2, ..., 14, 17, 19,
..., 31), so the indices are computed here with numpy float32 arithmetic and
applied with ``jnp.take``.

Exact 2x upsampling (in -> 2 in, DeepFill's decoders) picks ``i // 2``: checked for every
``in`` up to `_REPEAT_CHECKED_UP_TO`. There it is a broadcast and a reshape, whose
gradient is a sum over 2x2 blocks, rather than a gather (and a scatter-add in the
gradient), which XLA:CPU runs as several slower copies.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "nearest_align_corners_indices",
    "resize_bilinear_align_corners",
    "resize_nearest_align_corners",
]


def _roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf`` on non-negative float32: round half away from zero, exactly."""
    whole = np.trunc(x)
    return np.where(x - whole >= np.float32(0.5), whole + 1, whole)


def _source_positions(in_size: int, out_size: int) -> np.ndarray:
    """float32 source position of each output pixel: i * float32((in - 1) / (out - 1))."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    if out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    return np.arange(out_size, dtype=np.float32) * np.float32(scale)


def nearest_align_corners_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of TF1 ``resize_nearest_neighbor(align_corners=True)``.

    Args:
      in_size: input length (> 0).
      out_size: output length (> 0).

    Returns:
      ``int32`` numpy array ``[out_size]`` of indices into ``range(in_size)``.
    """
    src = _source_positions(in_size, out_size)
    src = _roundf(src.astype(np.float32))
    return np.minimum(src.astype(np.int64), in_size - 1).astype(np.int32)


def _symbolic_nearest_indices(in_size, out_size) -> jax.Array:
    """`nearest_align_corners_indices` computed in the graph, for symbolic sizes (`jax.export`
    shape polymorphism): the same float32 arithmetic, so the same indices. `out_size` > 1."""
    scale = jnp.asarray(in_size - 1, jnp.float32) / jnp.asarray(out_size - 1, jnp.float32)
    src = jnp.arange(out_size, dtype=jnp.float32) * scale
    whole = jnp.trunc(src)
    src = jnp.where(src - whole >= jnp.float32(0.5), whole + 1, whole)
    return jnp.minimum(src.astype(jnp.int32), jnp.asarray(in_size - 1, jnp.int32))


def _nearest_indices(in_size, out_size):
    if isinstance(in_size, int) and isinstance(out_size, int):
        return nearest_align_corners_indices(in_size, out_size)
    return _symbolic_nearest_indices(in_size, out_size)


# nearest_align_corners_indices(n, 2 n) == arange(2 n) // 2 for every n up to here (checked).
_REPEAT_CHECKED_UP_TO = 40_000


def _is_exact_double(in_size, out_size) -> bool:
    return isinstance(in_size, int) and isinstance(out_size, int) and out_size == 2 * in_size <= 2 * _REPEAT_CHECKED_UP_TO


def _nearest_along(x: jax.Array, axis: int, out_size) -> jax.Array:
    """Nearest align-corners resize of one axis of x."""
    in_size = x.shape[axis]
    if _is_exact_double(in_size, out_size):
        shape = x.shape[: axis + 1] + (2,) + x.shape[axis + 1 :]
        doubled = jnp.broadcast_to(jnp.expand_dims(x, axis + 1), shape)
        return doubled.reshape(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :])
    return jnp.take(x, _nearest_indices(in_size, out_size), axis=axis)


def resize_nearest_align_corners(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """TF1 ``resize_nearest_neighbor(x, (out_h, out_w), align_corners=True)``.

    Args:
      x: ``[B, H, W, C]``.
      out_h, out_w: output size. Static ints use exact numpy indices; symbolic sizes
        (a `jax.export` with polymorphic H, W) compute the same float32 indices in the graph.

    Returns:
      ``[B, out_h, out_w, C]``, same dtype as ``x``.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {tuple(x.shape)}")
    return _nearest_along(_nearest_along(x, 1, out_h), 2, out_w)


def _bilinear_axis(in_size, out_size):
    """(lower index, upper index, float32 weight of the upper) along one axis, TF1 legacy
    scaler; in the graph (same float32 arithmetic) for symbolic sizes, `out_size` > 1."""
    if isinstance(in_size, int) and isinstance(out_size, int):
        pos = _source_positions(in_size, out_size)
        lower = np.floor(pos).astype(np.int32)
        upper = np.minimum(lower + 1, in_size - 1)
        return lower, upper, (pos - lower.astype(np.float32)).astype(np.float32)
    scale = jnp.asarray(in_size - 1, jnp.float32) / jnp.asarray(out_size - 1, jnp.float32)
    pos = jnp.arange(out_size, dtype=jnp.float32) * scale
    lower = jnp.floor(pos)
    upper = jnp.minimum(lower.astype(jnp.int32) + 1, jnp.asarray(in_size - 1, jnp.int32))
    return lower.astype(jnp.int32), upper, pos - lower


def resize_bilinear_align_corners(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """TF1 `resize_bilinear(x [B, H, W, C], (out_h, out_w), align_corners=True)`: width first, then height."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {tuple(x.shape)}")
    y0, y1, ly = _bilinear_axis(x.shape[1], out_h)
    x0, x1, lx = _bilinear_axis(x.shape[2], out_w)

    def along_w(rows):
        left, right = jnp.take(rows, x0, axis=2), jnp.take(rows, x1, axis=2)
        return left + (right - left) * lx[None, None, :, None]

    top, bottom = along_w(jnp.take(x, y0, axis=1)), along_w(jnp.take(x, y1, axis=1))
    return top + (bottom - top) * ly[None, :, None, None]
