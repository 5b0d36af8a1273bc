"""Greedy non-maximum suppression with a fixed output size (jit / vmap friendly).

Semantics (torchvision's ``nms`` / ``batched_nms``): candidates are visited in decreasing
score; a candidate is kept unless a kept box (of the same class, for `batched_nms`) overlaps
it with IoU strictly greater than ``iou_threshold``. IoU is computed as in
`jattn.ops.boxes.box_iou` (``x2 - x1`` widths; two boxes whose union is empty have IoU 0,
so degenerate boxes never suppress each other).

Ties are deterministic: candidates are ordered by score, decreasing, then by index,
increasing (a stable sort; ``-0.0`` counts as ``0.0``). Candidates whose score is NaN, or
that ``valid`` marks False, are never kept.

Output: ``max_output`` slots, the kept indices (into the input) in the visiting order, then
``-1``; ``valid`` tells which slots are filled. At most ``max_output`` boxes are kept; the
search stops there (torchvision keeps all and the caller truncates: the same first
``max_output``).

Implementation: one ``lax.while_loop`` step per *kept* box (not per candidate): the step
writes the current candidate, clears every remaining candidate it suppresses (one row of
IoUs, O(N)), and jumps to the first candidate left. Cost O(N log N + K N) for K kept boxes
and O(N) memory (no N x N IoU matrix), fine for the N of a few thousand of an RPN or a box
head; pre-select larger candidate sets with ``lax.top_k``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.ops.boxes import _iou

__all__ = ["batched_nms", "detections", "nms"]


def _check(boxes, scores, name="boxes"):
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [N, 4], got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [N] = [{boxes.shape[0]}], got shape {tuple(scores.shape)}")


def _greedy(boxes, scores, classes, valid, iou_threshold, max_output: int):
    n = boxes.shape[0]
    if max_output < 1:
        raise ValueError(f"max_output must be >= 1, got {max_output}")
    empty = (jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool))
    if n == 0:
        return empty
    scores = jnp.asarray(scores)
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)  # -0.0 -> 0.0 for the sort
    candidate = ~jnp.isnan(scores)
    if valid is not None:
        candidate = candidate & jnp.asarray(valid, bool)
    key = jnp.where(candidate, -scores, jnp.inf)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sboxes = boxes[order]
    sclasses = None if classes is None else jnp.asarray(classes)[order]
    alive = candidate[order]
    threshold = jnp.asarray(iou_threshold, jnp.float32)

    def first_alive(alive):
        i = jnp.argmax(alive).astype(jnp.int32)
        return jnp.where(alive[i], i, n)

    def cond(state):
        i, _, count, _ = state
        return (i < n) & (count < max_output)

    def body(state):
        i, alive, count, out = state
        out = out.at[count].set(order[i])
        suppress = _iou(sboxes[i][None, :], sboxes) > threshold
        if sclasses is not None:
            suppress = suppress & (sclasses == sclasses[i])
        alive = alive & ~suppress
        alive = alive.at[i].set(False)
        return first_alive(alive), alive, count + 1, out

    state = (first_alive(alive), alive, jnp.int32(0), empty[0])
    _, _, count, out = jax.lax.while_loop(cond, body, state)
    return out, jnp.arange(max_output) < count


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold, max_output: int, valid: jax.Array | None = None):
    """Greedy NMS with a fixed-size output (see the module docstring).

    Args:
      boxes: ``[N, 4]`` (x1, y1, x2, y2).
      scores: ``[N]``.
      iou_threshold: suppress IoU ``>`` this (Python float or traced scalar).
      max_output: static number of output slots.
      valid: optional ``[N]`` bool, False for padding candidates (never kept).

    Returns:
      ``(indices [max_output] int32, valid [max_output] bool)``: indices into ``boxes`` of
      the kept boxes by decreasing score, padded with -1 where ``valid`` is False.
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    _check(boxes, scores)
    return _greedy(boxes, scores, None, valid, iou_threshold, max_output)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    iou_threshold,
    max_output: int,
    valid: jax.Array | None = None,
):
    """NMS within each class: boxes of different classes never suppress each other.

    torchvision's ``batched_nms`` (its coordinate-offset trick and per-class loop give the same
    set); here the suppression mask is restricted to the kept box's class, which is exact
    whatever the coordinates. ``classes``: ``[N]`` int. Other arguments and the output as `nms`
    (the kept boxes of all classes together, by decreasing score).
    """
    boxes, scores, classes = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes)
    _check(boxes, scores)
    if classes.shape != scores.shape:
        raise ValueError(f"classes must be [N] = [{boxes.shape[0]}], got shape {tuple(classes.shape)}")
    return _greedy(boxes, scores, classes, valid, iou_threshold, max_output)


def detections(
    boxes: jax.Array,
    scores: jax.Array,
    score_threshold,
    iou_threshold,
    max_per_image: int,
    min_size: float = 1e-2,
    pre_nms_topk: int | None = None,
    valid: jax.Array | None = None,
):
    """Per-class post-processing of one image's box-head outputs, padded to ``max_per_image``.

    As torchvision's ``RoIHeads.postprocess_detections`` after decoding and clipping: every
    (box, class) pair is a candidate; candidates with score ``<= score_threshold`` or width or
    height ``< min_size`` are dropped; per-class NMS; the ``max_per_image`` best are kept.

    Args:
      boxes: ``[N, K, 4]`` per-class boxes, or ``[N, 4]`` shared by all classes (decode and
        `jattn.ops.boxes.clip_boxes` them first).
      scores: ``[N, K]`` class probabilities. Drop the background column first (torchvision's
        labels are then ``classes + 1``).
      score_threshold, iou_threshold: floats or traced scalars.
      max_per_image: static number of output slots.
      min_size: minimum width and height (torchvision's ``remove_small_boxes(boxes, 1e-2)``).
      pre_nms_topk: static; if set (and below ``N * K``), only the ``pre_nms_topk`` best
        candidates by score (ties: lower index first) enter NMS, bounding its cost.
      valid: optional ``[N]`` bool, False for padded proposals.

    Returns:
      ``boxes [max_per_image, 4]``, ``scores [max_per_image]``, ``classes [max_per_image]``
      int32 (the column of ``scores``), ``valid [max_per_image]`` bool; by decreasing score,
      padded with zero boxes, score 0 and class -1.
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, K], got shape {tuple(scores.shape)}")
    n, k = scores.shape
    if boxes.shape == (n, 4):
        boxes = jnp.broadcast_to(boxes[:, None, :], (n, k, 4))
    if boxes.shape != (n, k, 4):
        raise ValueError(f"boxes must be [N, K, 4] or [N, 4] with N, K = {n}, {k}, got {tuple(boxes.shape)}")
    flat_boxes = boxes.reshape(n * k, 4)
    flat_scores = scores.reshape(n * k)
    flat_classes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :], (n, k)).reshape(n * k)
    keep = flat_scores > score_threshold
    keep &= (flat_boxes[:, 2] - flat_boxes[:, 0] >= min_size) & (flat_boxes[:, 3] - flat_boxes[:, 1] >= min_size)
    if valid is not None:
        keep &= jnp.broadcast_to(jnp.asarray(valid, bool)[:, None], (n, k)).reshape(n * k)

    if pre_nms_topk is not None and pre_nms_topk < n * k:
        masked = jnp.where(keep, flat_scores, -jnp.inf)
        _, top = jax.lax.top_k(masked, pre_nms_topk)
        flat_boxes, flat_scores, flat_classes, keep = flat_boxes[top], flat_scores[top], flat_classes[top], keep[top]

    idx, ok = batched_nms(flat_boxes, flat_scores, flat_classes, iou_threshold, max_per_image, valid=keep)
    safe = jnp.maximum(idx, 0)
    out_boxes = jnp.where(ok[:, None], flat_boxes[safe], 0).astype(flat_boxes.dtype)
    out_scores = jnp.where(ok, flat_scores[safe], 0).astype(flat_scores.dtype)
    out_classes = jnp.where(ok, flat_classes[safe], -1)
    return out_boxes, out_scores, out_classes, ok
