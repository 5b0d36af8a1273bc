"""Axis-aligned boxes for detection: areas, IoU / GIoU, clipping, the box coder, anchors.

A box is ``[..., 4] = (x1, y1, x2, y2)``, float32, in pixels (x to the right, y down).

Width convention: ``width = x2 - x1`` and ``height = y2 - y1`` (no ``+ 1``), the
convention of torchvision (and Detectron2); Detectron1 / the original Faster R-CNN code
used ``x2 - x1 + 1``, which these functions do not.

Degenerate boxes (``x2 <= x1`` or ``y2 <= y1``) have area ``<= 0`` (negative areas are not
clamped, as torchvision's ``box_area``); wherever a ratio would divide by zero (IoU of two
empty boxes, GIoU of boxes whose enclosing box is empty) the ratio is defined as 0, so the
value and its gradient stay finite.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "anchors",
    "box_area",
    "box_iou",
    "cell_anchors",
    "clip_boxes",
    "decode",
    "draw_boxes",
    "encode",
    "generalized_box_iou",
    "giou",
    "DEFAULT_WEIGHTS",
    "DEFAULT_DECODE_CLIP",
]

DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Faster R-CNN box head (the RPN uses (1, 1, 1, 1))
DEFAULT_DECODE_CLIP = math.log(1000.0 / 16)  # torchvision's bbox_xform_clip


def _check_last(name: str, x: jax.Array) -> None:
    if x.ndim < 1 or x.shape[-1] != 4:
        raise ValueError(f"{name} must be [..., 4] (x1, y1, x2, y2), got shape {tuple(x.shape)}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 (finite value and gradient)."""
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1), 0)


def box_area(boxes: jax.Array) -> jax.Array:
    """``[..., 4] -> [...]``: ``(x2 - x1) * (y2 - y1)`` (negative for inverted boxes)."""
    boxes = jnp.asarray(boxes)
    _check_last("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a: jax.Array, b: jax.Array):
    """Intersection and union of broadcast-compatible ``[..., 4]`` box arrays."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _iou(a: jax.Array, b: jax.Array) -> jax.Array:
    inter, union = _inter_union(a, b)
    return _safe_div(inter, union)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU: ``a [N, 4]``, ``b [M, 4]`` -> ``[N, M]`` (0 where the union is 0)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_last("a", a)
    _check_last("b", b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"box_iou takes [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}")
    return _iou(a[:, None, :], b[None, :, :])


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise generalised IoU (Rezatofighi et al. 2019), for losses (``1 - giou``).

    ``a``, ``b``: broadcast-compatible ``[..., 4]`` -> ``[...]`` in ``[-1, 1]``:
    ``iou - (C - union) / C`` with ``C`` the area of the smallest box enclosing both
    (the second term is 0 where ``C`` is 0). Gradients are finite for every input.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_last("a", a)
    _check_last("b", b)
    inter, union = _inter_union(a, b)
    iou = _safe_div(inter, union)
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_div(enclosing - union, enclosing)


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise generalised IoU: ``a [N, 4]``, ``b [M, 4]`` -> ``[N, M]`` (as torchvision's)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            f"generalized_box_iou takes [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return giou(a[:, None, :], b[None, :, :])


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
    """Clamps ``[..., 4]`` boxes into the image: x into ``[0, width]``, y into ``[0, height]``.

    As torchvision's ``clip_boxes_to_image`` (the bound is the image size, not ``size - 1``).
    ``height`` / ``width`` may be Python numbers or (traced) scalars.
    """
    boxes = jnp.asarray(boxes)
    _check_last("boxes", boxes)
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1).astype(boxes.dtype)


def _centre_size(boxes: jax.Array):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: jax.Array, anchors: jax.Array, weights: Sequence[float] = DEFAULT_WEIGHTS) -> jax.Array:
    """Regression targets of ``boxes`` relative to ``anchors`` (torchvision ``BoxCoder.encode_single``).

    ``boxes`` (the targets, e.g. matched ground truth) and ``anchors`` (anchors or proposals):
    broadcast-compatible ``[..., 4]``. Returns ``[..., 4] = (dx, dy, dw, dh)``::

        dx = wx * (cx_box - cx_anchor) / w_anchor      dw = ww * log(w_box / w_anchor)
        dy = wy * (cy_box - cy_anchor) / h_anchor      dh = wh * log(h_box / h_anchor)

    with ``w = x2 - x1``, ``cx = x1 + 0.5 w`` (no ``+ 1``). Anchors and boxes must have
    positive width and height (as in torchvision, nothing guards the division / log).
    """
    boxes, anchors = jnp.asarray(boxes), jnp.asarray(anchors)
    _check_last("boxes", boxes)
    _check_last("anchors", anchors)
    wx, wy, ww, wh = (float(v) for v in weights)
    ex_cx, ex_cy, ex_w, ex_h = _centre_size(anchors)
    gt_cx, gt_cy, gt_w, gt_h = _centre_size(boxes)
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(
    deltas: jax.Array,
    anchors: jax.Array,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    clip: float = DEFAULT_DECODE_CLIP,
) -> jax.Array:
    """Boxes from regression ``deltas`` relative to ``anchors`` (torchvision ``BoxCoder.decode_single``).

    ``deltas`` ``[..., 4] = (dx, dy, dw, dh)`` and ``anchors`` ``[..., 4]``, broadcast-compatible
    (per-class deltas ``[N, K, 4]`` decode against ``anchors[:, None, :]``). ``dw / ww`` and
    ``dh / wh`` are clamped from above at ``clip`` before ``exp``. Returns ``[..., 4]`` boxes,
    not clipped to the image (see `clip_boxes`). Inverse of `encode` (up to rounding) where the
    clamp is inactive.
    """
    deltas = jnp.asarray(deltas)
    anchors = jnp.asarray(anchors).astype(deltas.dtype)
    _check_last("deltas", deltas)
    _check_last("anchors", anchors)
    wx, wy, ww, wh = (float(v) for v in weights)
    cx, cy, w, h = _centre_size(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    pcx = dx * w + cx
    pcy = dy * h + cy
    pw = jnp.exp(dw) * w
    ph = jnp.exp(dh) * h
    return jnp.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)


# --------------------------------------------------------------------------- #
# anchors (static: numpy, computed once at trace time)
# --------------------------------------------------------------------------- #
def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors of one level: ``[len(aspect_ratios) * len(sizes), 4]`` float32.

    torchvision's ``AnchorGenerator.generate_anchors``, in float32: for aspect ratio
    ``r = h / w`` and size ``s``, ``h = sqrt(r) s``, ``w = s / sqrt(r)``, box
    ``round((-w, -h, w, h) / 2)`` (round half to even). Order: aspect-ratio major, then size
    (row ``i * len(sizes) + j`` is ``aspect_ratios[i]``, ``sizes[j]``).
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    if scales.ndim != 1 or ratios.ndim != 1 or scales.size == 0 or ratios.size == 0:
        raise ValueError(f"sizes and aspect_ratios must be non-empty flat sequences, got {sizes}, {aspect_ratios}")
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base).astype(np.float32)


def _is_flat(seq) -> bool:
    return not isinstance(seq[0], (list, tuple, np.ndarray))


def anchors(
    feature_sizes: Sequence,
    strides: int | Sequence,
    sizes: Sequence,
    aspect_ratios: Sequence = (0.5, 1.0, 2.0),
) -> np.ndarray:
    """Grid anchors over one or several feature levels, as torchvision's ``AnchorGenerator``.

    Args:
      feature_sizes: ``(H, W)`` of one level, or a sequence of ``(H, W)``, one per level.
      strides: pixels between neighbouring cells, per level: an int or ``(stride_h, stride_w)``
        for a single level, or a sequence of those. (torchvision derives it as
        ``image_size // feature_size``.)
      sizes: anchor sizes (side of the square anchor, pixels). With one level, a flat
        sequence is that level's sizes; with L levels, either a sequence of L sequences or a
        flat sequence of L numbers, one size per level (torchvision's convention).
      aspect_ratios: ``h / w`` ratios: one flat sequence for every level, or one per level.

    Returns:
      float32 numpy ``[sum_l H_l * W_l * A_l, 4]`` (x1, y1, x2, y2), ``A_l =
      len(aspect_ratios_l) * len(sizes_l)``. Anchor ``(y, x, a)`` of level ``l`` is
      `cell_anchors` row ``a`` shifted by ``(x * stride_w, y * stride_h)`` (cell anchors centred
      on the cell's top-left corner, as torchvision) at row
      ``offset_l + (y * W_l + x) * A_l + a``: level major, then row, column, cell anchor
      (ratio major, then size). This is the order of an NHWC head output ``[B, H, W, A * k]``
      reshaped to ``[B, H * W * A, k]`` and concatenated over levels.
    """
    single = not isinstance(feature_sizes[0], (list, tuple, np.ndarray))
    levels = [tuple(int(v) for v in feature_sizes)] if single else [tuple(int(v) for v in f) for f in feature_sizes]
    n = len(levels)
    if any(len(f) != 2 for f in levels):
        raise ValueError(f"feature_sizes must be (H, W) or a sequence of (H, W), got {feature_sizes}")

    if isinstance(strides, (int, np.integer, float)):
        strides = [(strides, strides)] * n
    elif single and len(strides) == 2 and not isinstance(strides[0], (list, tuple)):
        strides = [tuple(strides)]
    else:
        strides = [(s, s) if isinstance(s, (int, np.integer, float)) else tuple(s) for s in strides]
    if _is_flat(sizes):
        sizes = [tuple(sizes)] if n == 1 else [(s,) for s in sizes]
    if _is_flat(aspect_ratios):
        aspect_ratios = [tuple(aspect_ratios)] * n
    if not len(strides) == len(sizes) == len(aspect_ratios) == n:
        raise ValueError(
            f"{n} feature levels need as many strides, sizes and aspect_ratios; got "
            f"{len(strides)}, {len(sizes)} and {len(aspect_ratios)}"
        )

    out = []
    for (fh, fw), (sh, sw), lsizes, lratios in zip(levels, strides, sizes, aspect_ratios):
        base = cell_anchors(lsizes, lratios)  # [A, 4]
        shift_x = np.arange(fw, dtype=np.float32) * np.float32(sw)
        shift_y = np.arange(fh, dtype=np.float32) * np.float32(sh)
        sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)  # [H * W, 1, 4]
        out.append((shifts + base[None]).reshape(-1, 4))
    return np.concatenate(out, axis=0).astype(np.float32)


def draw_boxes(image: jax.Array, boxes: jax.Array, valid: jax.Array, colour: Sequence[float],
               thickness: int = 1) -> jax.Array:
    """``image [B, H, W, C]`` with the outlines of ``boxes [B, N, 4]`` (pixels; the rows where
    ``valid [B, N]``) painted in ``colour`` (C values): the box's own border pixels, those
    whose centre lies inside the box but not inside the box shrunk by ``thickness`` on every
    side. For pictures (summaries), not for gradients."""
    h, w = image.shape[1:3]
    ys = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5  # [H, 1]
    xs = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5  # [1, W]
    b = jnp.asarray(boxes, jnp.float32)[:, :, None, None, :]  # [B, N, 1, 1, 4]

    def inside(d):
        return (xs >= b[..., 0] - d) & (xs <= b[..., 2] + d) & (ys >= b[..., 1] - d) & (ys <= b[..., 3] + d)

    on = inside(0.0) & ~inside(-float(thickness)) & jnp.asarray(valid, bool)[:, :, None, None]  # [B, N, H, W]
    on = jnp.any(on, axis=1)[..., None]
    return jnp.where(on, jnp.asarray(colour, image.dtype), image)
