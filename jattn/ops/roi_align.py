"""RoIAlign (He et al. 2017) on NHWC features, with torchvision's / Detectron2's semantics.

For each box and each of the ``oh x ow`` output bins, ``sampling_ratio x sampling_ratio``
points are sampled on a regular grid inside the bin, each point is bilinearly interpolated,
and the bin is their mean. In feature-map coordinates (pixel ``i`` covers ``[i, i + 1)``
with its centre at ``i + 0.5`` when ``aligned``)::

    offset  = 0.5 if aligned else 0
    start   = x1 * spatial_scale - offset          (likewise y)
    size    = x2 * spatial_scale - offset - start  (if not aligned: max(size, 1))
    bin     = size / ow
    x[pw, ix] = start + pw * bin + (ix + 0.5) * bin / sampling_ratio

A sample point with ``y`` outside ``[-1, H]`` or ``x`` outside ``[-1, W]`` (or NaN)
contributes 0 (it still counts in the mean). Otherwise ``y`` is clamped at 0 from below,
``y_low = floor(y)``, and where ``y_low >= H - 1`` both neighbours are row ``H - 1``; the
bilinear weights are ``1 - (y - y_low)`` and ``y - y_low`` (likewise x). This is
torchvision's ``roi_align`` CPU / CUDA kernel for a fixed ``sampling_ratio > 0`` (the
adaptive ``sampling_ratio <= 0`` of torchvision, a data-dependent grid, is not supported:
shapes here are static).

The implementation gathers the four neighbours of every sample point
(``jnp.take_along_axis`` on ``[B, H * W, C]``) and reduces them with the bilinear weights, so it
is differentiable with respect to the features (the gradient is a scatter-add, as the
reference's backward kernel) and, almost everywhere, with respect to the boxes (through the
weights; torchvision gives boxes no gradient: `jax.lax.stop_gradient` them for that).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["roi_align"]


def _axis_samples(start, size, bins: int, grid: int, limit: int):
    """Per-axis sample indices and weights.

    ``start``, ``size``: ``[B, R]`` (feature coordinates). Returns ``low``, ``high`` int32 and
    ``w_low``, ``w_high`` float32, each ``[B, R, bins * grid]`` (bin major), the weights zero
    for points outside ``[-1, limit]``.
    """
    bin_size = size / bins
    p = jnp.arange(bins, dtype=jnp.float32)[:, None]
    i = jnp.arange(grid, dtype=jnp.float32)[None, :]
    # start + p * bin + ((i + 0.5) * bin) / grid, evaluated in the reference's order
    coord = (start[..., None, None] + p * bin_size[..., None, None]) + (i + 0.5) * bin_size[..., None, None] / grid
    coord = coord.reshape(coord.shape[:-2] + (bins * grid,))
    inside = (coord >= -1.0) & (coord <= limit)  # False for NaN
    c = jnp.where(inside, jnp.maximum(coord, 0.0), 0.0)
    low = jnp.floor(c)
    top = low >= limit - 1
    low = jnp.where(top, limit - 1, low)
    c = jnp.where(top, low, c)
    frac = c - low
    low = low.astype(jnp.int32)
    high = jnp.where(top, low, low + 1)
    zero = jnp.zeros_like(frac)
    return low, high, jnp.where(inside, 1.0 - frac, zero), jnp.where(inside, frac, zero)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int] = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jax.Array:
    """Pools ``boxes`` of each image out of its ``features`` (torchvision ``roi_align`` semantics).

    Args:
      features: ``[B, H, W, C]``.
      boxes: ``[B, R, 4]`` (x1, y1, x2, y2) in image pixels; box ``r`` of image ``b`` samples
        ``features[b]``. R is fixed: pad with any finite boxes (e.g. zeros: a zero-area box
        samples one point, a finite output) and ignore their rows.
      output_size: ``(oh, ow)`` or one int, static.
      spatial_scale: feature pixels per image pixel (``1 / stride``, e.g. 1/16), static or traced.
      sampling_ratio: sample points per bin along each axis (static, > 0).
      aligned: ``True`` shifts box coordinates by -0.5 feature pixel (pixel centres at
        ``i + 0.5``; Detectron2's ``ROIAlign(aligned=True)``); ``False`` is the original
        Mask R-CNN RoIAlign, whose boxes are also at least 1 feature pixel wide and high.

    Returns:
      ``[B, R, oh, ow, C]`` in the dtype of ``features`` (accumulated in float32).
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes)
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got shape {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"boxes must be [B, R, 4] with B = {features.shape[0]}, got shape {tuple(boxes.shape)}"
        )
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ValueError(
            f"sampling_ratio must be a positive int (the adaptive grid of sampling_ratio <= 0 is not "
            f"supported), got {sampling_ratio}"
        )
    b, h, w, c = features.shape
    r = boxes.shape[1]
    g = sampling_ratio

    scaled = boxes.astype(jnp.float32) * jnp.asarray(spatial_scale, jnp.float32)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (scaled[..., k] - offset for k in range(4))
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = jnp.maximum(width, 1.0), jnp.maximum(height, 1.0)

    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, height, oh, g, h)  # [B, R, oh * g]
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, width, ow, g, w)  # [B, R, ow * g]

    # four neighbours of every (y, x) sample: flat indices and weights [B, R, oh*g, ow*g, 4]
    ys = jnp.stack([y_lo, y_lo, y_hi, y_hi], axis=-1)[:, :, :, None, :]
    xs = jnp.stack([x_lo, x_hi, x_lo, x_hi], axis=-1)[:, :, None, :, :]
    wys = jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi], axis=-1)[:, :, :, None, :]
    wxs = jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi], axis=-1)[:, :, None, :, :]
    index = (ys * w + xs).reshape(b, -1, 1)
    weight = (wys * wxs) / float(g * g)  # the bin's mean folded into the weights

    flat = features.reshape(b, h * w, c)
    values = jnp.take_along_axis(flat, index, axis=1, mode="clip")  # [B, R*oh*g*ow*g*4, C]
    values = values.reshape(b, r, oh, g, ow, g, 4, c)
    weight = weight.reshape(b, r, oh, g, ow, g, 4, 1)
    out = jnp.sum(values.astype(jnp.float32) * weight, axis=(3, 5, 6))
    return out.astype(features.dtype)
