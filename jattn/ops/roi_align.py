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

`roi_align_levels` pools each box from its own level of several maps (an FPN) in one gather.

The implementation gathers the four neighbours of every sample point
(``jnp.take_along_axis`` on ``[B, H * W, C]``) and reduces them with the bilinear weights, so it
is differentiable with respect to the features (the gradient is a scatter-add, as the
reference's backward kernel) and, almost everywhere, with respect to the boxes (through the
weights; torchvision gives boxes no gradient: `jax.lax.stop_gradient` them for that).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["roi_align", "roi_align_levels"]


def _axis_samples(start, size, bins: int, grid: int, limit):
    """Per-axis sample indices and weights.

    ``start``, ``size``: ``[B, R]`` (feature coordinates); ``limit``: the feature map's size
    along the axis, a number or ``[B, R]`` (each box's level). Returns ``low``, ``high`` int32
    and ``w_low``, ``w_high`` float32, each ``[B, R, bins * grid]`` (bin major), the weights
    zero for points outside ``[-1, limit]``.
    """
    limit = jnp.asarray(limit, jnp.float32)
    limit = limit[..., None] if limit.ndim else limit
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


def _check(features, boxes, output_size, sampling_ratio) -> tuple[int, int]:
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
    return oh, ow


def _pool(flat, boxes, scale, height, width, base, oh: int, ow: int, g: int, aligned: bool):
    """RoIAlign out of flattened feature maps.

    ``flat``: ``[B, N, C]``, one or more maps, each row-major; ``boxes``: ``[B, R, 4]`` image
    pixels; ``scale``, ``height``, ``width``, ``base``: each box's spatial scale, map size and
    the map's first row in ``flat`` (numbers, or ``[B, R]``). Returns ``[B, R, oh, ow, C]``.
    """
    b, _, c = flat.shape
    r = boxes.shape[1]
    scale = jnp.asarray(scale, jnp.float32)
    scaled = boxes.astype(jnp.float32) * (scale[..., None] if scale.ndim else scale)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (scaled[..., k] - offset for k in range(4))
    box_w, box_h = x2 - x1, y2 - y1
    if not aligned:
        box_w, box_h = jnp.maximum(box_w, 1.0), jnp.maximum(box_h, 1.0)

    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(y1, box_h, oh, g, height)  # [B, R, oh * g]
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(x1, box_w, ow, g, width)  # [B, R, ow * g]

    # four neighbours of every (y, x) sample: flat indices and weights [B, R, oh*g, ow*g, 4]
    ys = jnp.stack([y_lo, y_lo, y_hi, y_hi], axis=-1)[:, :, :, None, :]
    xs = jnp.stack([x_lo, x_hi, x_lo, x_hi], axis=-1)[:, :, None, :, :]
    wys = jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi], axis=-1)[:, :, :, None, :]
    wxs = jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi], axis=-1)[:, :, None, :, :]
    per_box = lambda v: jnp.asarray(v, jnp.int32)[..., None, None, None] if jnp.ndim(v) else v  # noqa: E731
    index = (per_box(base) + ys * per_box(width) + xs).reshape(b, -1, 1)
    weight = (wys * wxs) / float(g * g)  # the bin's mean folded into the weights

    values = jnp.take_along_axis(flat, index, axis=1, mode="clip")  # [B, R*oh*g*ow*g*4, C]
    values = values.reshape(b, r, oh, g, ow, g, 4, c)
    weight = weight.reshape(b, r, oh, g, ow, g, 4, 1)
    out = jnp.sum(values.astype(jnp.float32) * weight, axis=(3, 5, 6))
    return out.astype(flat.dtype)


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
    oh, ow = _check(features, boxes, output_size, sampling_ratio)
    b, h, w, c = features.shape
    return _pool(features.reshape(b, h * w, c), boxes, spatial_scale, h, w, 0, oh, ow, sampling_ratio, aligned)


def roi_align_levels(
    levels: Sequence[jax.Array],
    boxes: jax.Array,
    level: jax.Array,
    spatial_scales: Sequence[float],
    output_size: int | tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jax.Array:
    """RoIAlign of each box out of one of several feature maps (an FPN's levels): equal to
    ``roi_align(levels[level[b, r]], boxes, ..., spatial_scales[level[b, r]])`` box by box.

    The maps are flattened into one ``[B, sum H_l W_l, C]`` array and every box's samples are
    gathered from its own map, so the work and the bytes are those of one `roi_align`, not
    one per level; the gradient reaches only each box's map.

    Args:
      levels: ``[B, H_l, W_l, C]`` per level (one C and dtype).
      boxes: ``[B, R, 4]`` image pixels, as in `roi_align`.
      level: ``[B, R]`` int, the index in ``levels`` of each box's map (clamped to the range).
      spatial_scales: per level, static.

    Returns:
      ``[B, R, oh, ow, C]`` in the features' dtype.
    """
    levels = [jnp.asarray(f) for f in levels]
    boxes = jnp.asarray(boxes)
    if len(spatial_scales) != len(levels) or not levels:
        raise ValueError(f"{len(levels)} levels but {len(spatial_scales)} spatial scales")
    for f in levels:
        oh, ow = _check(f, boxes, output_size, sampling_ratio)
        if f.shape[-1] != levels[0].shape[-1] or f.dtype != levels[0].dtype:
            raise ValueError(f"levels must share channels and dtype, got {[(f.shape, f.dtype) for f in levels]}")
    b, c = levels[0].shape[0], levels[0].shape[-1]
    heights = [f.shape[1] for f in levels]
    widths = [f.shape[2] for f in levels]
    bases = np.cumsum([0] + [h * w for h, w in zip(heights, widths)])[:-1]
    flat = jnp.concatenate([f.reshape(b, -1, c) for f in levels], axis=1)
    level = jnp.clip(jnp.asarray(level, jnp.int32), 0, len(levels) - 1)
    pick = lambda table, dtype: jnp.asarray(np.asarray(table), dtype)[level]  # noqa: E731
    return _pool(flat, boxes, pick(spatial_scales, jnp.float32), pick(heights, jnp.float32),
                 pick(widths, jnp.int32), pick(bases, jnp.int32), oh, ow, sampling_ratio, aligned)
