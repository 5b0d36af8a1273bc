"""Middlebury colour coding of attention offsets (DeepFill's `flow_to_image`).

The official code runs NumPy inside `tf.py_func`; this is the same arithmetic in JAX
(jit-friendly, on device), matching the official pictures within one uint8 step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.ops.resize import resize_bilinear_align_corners, resize_nearest_align_corners

__all__ = ["color_wheel", "flow_to_color"]


def color_wheel() -> np.ndarray:
    """The Middlebury colour wheel: float [55, 3] in 0..255 (RY, YG, GC, CB, BM, MR)."""
    segments = (("RY", 15), ("YG", 6), ("GC", 4), ("CB", 11), ("BM", 13), ("MR", 6))
    rows = []
    for name, n in segments:
        ramp = np.floor(255.0 * np.arange(n) / n)
        full, zero = np.full(n, 255.0), np.zeros(n)
        rows.append(
            {
                "RY": (full, ramp, zero),
                "YG": (255.0 - ramp, full, zero),
                "GC": (zero, full, ramp),
                "CB": (zero, 255.0 - ramp, full),
                "BM": (ramp, zero, full),
                "MR": (full, zero, 255.0 - ramp),
            }[name]
        )
    return np.concatenate([np.stack(r, axis=1) for r in rows], axis=0)


def _colorize(u: jax.Array, v: jax.Array) -> jax.Array:
    """Normalised flow components [..., ] -> uint8-valued float colours [..., 3]."""
    wheel = jnp.asarray(color_wheel(), jnp.float32) / 255.0
    ncols = wheel.shape[0]
    rad = jnp.sqrt(u**2 + v**2)
    a = jnp.arctan2(-v, -u) / jnp.pi
    fk = (a + 1.0) / 2.0 * (ncols - 1) + 1.0
    k0 = jnp.floor(fk).astype(jnp.int32)
    k1 = jnp.where(k0 + 1 == ncols + 1, 1, k0 + 1)
    frac = (fk - k0)[..., None]
    col = (1.0 - frac) * wheel[k0 - 1] + frac * wheel[k1 - 1]
    inside = (rad <= 1.0)[..., None]
    col = jnp.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)
    return jnp.floor(255.0 * col)


def flow_to_color(offsets: jax.Array, rate: int = 1, upsample: str = "nearest") -> jax.Array:
    """Colour picture of attention offsets, as DeepFill's `flow_to_image_tf`.

    Args:
      offsets: int [B, h, w, 2], (row, col) offsets (the second output of
        `contextual_attention`).
      rate: upsampling factor back to the feature size (the op's `rate`).
      upsample: "nearest" (DeepFill v1) or "bilinear" (DeepFill v2), TF1 align_corners.

    Returns:
      float32 [B, h * rate, w * rate, 3] in [-1, 1]. Offsets are normalised by the largest
      radius seen so far in the batch (the official loop keeps a running maximum), coloured
      with the Middlebury wheel, quantised to uint8, then mapped to [-1, 1].
    """
    if offsets.ndim != 4 or offsets.shape[-1] != 2:
        raise ValueError(f"flow_to_color: offsets must be [B, h, w, 2], got shape {tuple(offsets.shape)}")
    if upsample not in ("nearest", "bilinear"):
        raise ValueError(f"flow_to_color: upsample must be 'nearest' or 'bilinear', got {upsample!r}")
    flow = offsets.astype(jnp.float32)
    flow = jnp.where(jnp.abs(flow) > 1e7, 0.0, flow)  # the official 'unknown flow' guard
    u, v = flow[..., 0], flow[..., 1]
    rad = jnp.sqrt(u**2 + v**2)
    maxrad = jax.lax.cummax(jnp.max(rad, axis=(1, 2)), axis=0)[:, None, None]
    eps = np.finfo(np.float64).eps
    img = _colorize(u / (maxrad + eps), v / (maxrad + eps))
    img = img / 127.5 - 1.0
    if rate != 1:
        b, h, w, _ = img.shape
        resize = resize_nearest_align_corners if upsample == "nearest" else resize_bilinear_align_corners
        img = resize(img, h * rate, w * rate)
    return img
