"""Tests of jattn.ops.boxes, jattn.ops.roi_align and jattn.ops.nms against loop-based NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops import boxes as B
from jattn.ops.nms import batched_nms, detections, nms
from jattn.ops.roi_align import roi_align, roi_align_levels

# one compilation per call shape rather than one per primitive (eager dispatch)
_roi_align = jax.jit(roi_align, static_argnames=("output_size", "sampling_ratio", "aligned"))
_nms = jax.jit(nms, static_argnames=("max_output",))
_batched_nms = jax.jit(batched_nms, static_argnames=("max_output",))


def _random_boxes(rng, n, size=100.0, min_wh=1.0, max_wh=40.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- #
# numpy references
# --------------------------------------------------------------------------- #
def _ref_area(b):
    return (b[2] - b[0]) * (b[3] - b[1])


def _ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = _ref_area(a) + _ref_area(b) - inter
    return inter / union if union > 0 else 0.0


def _ref_giou(a, b):
    a, b = np.float64(a), np.float64(b)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = _ref_area(a) + _ref_area(b) - inter
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    enclosing = cw * ch
    return inter / union - (enclosing - union) / enclosing


def _ref_iou_matrix(a, b):
    a, b = np.float64(a), np.float64(b)
    return np.array([[_ref_iou(x, y) for y in b] for x in a])


def _ref_nms(boxes, scores, thr, classes=None, limit=None):
    """Greedy NMS, visiting by score descending then index ascending; kept indices (the first `limit`)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    boxes = np.float64(boxes)
    kept = []
    for i in order:
        if limit is not None and len(kept) == limit:
            break
        if all(
            _ref_iou(boxes[j], boxes[i]) <= thr for j in kept if classes is None or classes[j] == classes[i]
        ):
            kept.append(i)
    return kept


def _ref_bilinear(fmap, y, x):
    """torchvision's bilinear_interpolate on one [H, W, C] map at one point (float64)."""
    h, w = fmap.shape[:2]
    if not (-1.0 <= y <= h and -1.0 <= x <= w):
        return np.zeros(fmap.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * fmap[y_low, x_low]
        + hy * lx * fmap[y_low, x_high]
        + ly * hx * fmap[y_high, x_low]
        + ly * lx * fmap[y_high, x_high]
    )


def _ref_roi_align(features, boxes, out_hw, scale, ratio, aligned):
    """Loop implementation of torchvision.ops.roi_align (fixed sampling_ratio), NHWC."""
    bsz, _, _, c = features.shape
    oh, ow = out_hw
    feats = np.float64(features)
    out = np.zeros((bsz, boxes.shape[1], oh, ow, c))
    off = 0.5 if aligned else 0.0
    for b in range(bsz):
        for r, box in enumerate(np.float64(boxes[b])):
            x1, y1, x2, y2 = box * scale - off
            rw, rh = x2 - x1, y2 - y1
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
            bw, bh = rw / ow, rh / oh
            for ph in range(oh):
                for pw in range(ow):
                    acc = np.zeros(c)
                    for iy in range(ratio):
                        y = y1 + ph * bh + (iy + 0.5) * bh / ratio
                        for ix in range(ratio):
                            x = x1 + pw * bw + (ix + 0.5) * bw / ratio
                            acc += _ref_bilinear(feats[b], y, x)
                    out[b, r, ph, pw] = acc / (ratio * ratio)
    return out


def _ref_cell_anchors(sizes, ratios):
    rows = []
    for r in ratios:
        for s in sizes:
            hr = np.sqrt(np.float32(r))
            wr = np.float32(1) / hr
            w, h = np.float32(wr * np.float32(s)), np.float32(hr * np.float32(s))
            rows.append([np.round(-w / 2), np.round(-h / 2), np.round(w / 2), np.round(h / 2)])
    return rows


# --------------------------------------------------------------------------- #
# boxes
# --------------------------------------------------------------------------- #
def test_area_iou_known_cases():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 1], [5, 5, 6, 6]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 1, 1], [3, 3, 3, 3]], np.float32)
    np.testing.assert_allclose(B.box_area(a), [100, 2, 1])
    iou = np.asarray(B.box_iou(a, b))
    assert iou.shape == (3, 5)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.01, 0.0], rtol=1e-6)
    np.testing.assert_allclose(iou[1], [0.02, 0.0, 0.0, 0.5, 0.0], rtol=1e-6)
    # an empty box against an empty box: union 0 -> IoU 0, not NaN
    assert float(B.box_iou(b[4:], b[4:])[0, 0]) == 0.0


def test_iou_giou_random_against_reference():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 17), _random_boxes(rng, 13)
    np.testing.assert_allclose(B.box_iou(a, b), _ref_iou_matrix(a, b), atol=1e-6)
    ref = np.array([[_ref_giou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(B.generalized_box_iou(a, b), ref, atol=1e-6)
    np.testing.assert_allclose(B.giou(a[:13], b), np.diag(ref[:13]), atol=1e-6)  # element-wise
    g = np.asarray(B.giou(a[:, None], b[None]))
    assert g.min() >= -1 and g.max() <= 1


def test_giou_known_cases_and_finite_gradient():
    a = np.array([0, 0, 2, 2], np.float32)
    np.testing.assert_allclose(B.giou(a, a), 1.0)
    # disjoint: iou 0, enclosing (0,0)-(4,2) = 8, union 8 -> 0; further apart: negative
    np.testing.assert_allclose(B.giou(a, np.array([2, 0, 4, 2], np.float32)), 0.0, atol=1e-7)
    np.testing.assert_allclose(B.giou(a, np.array([4, 0, 6, 2], np.float32)), 8 / 12 - 1, rtol=1e-6)
    pts = np.array([3, 3, 3, 3], np.float32)
    # degenerate inputs give finite values and gradients
    value_and_grad = jax.jit(jax.value_and_grad(B.giou, argnums=(0, 1)))
    for x, y in [(a, a), (pts, pts), (a, pts), (np.zeros(4, np.float32), np.zeros(4, np.float32))]:
        val, grads = value_and_grad(x, y)
        assert np.isfinite(float(val))
        assert all(np.all(np.isfinite(np.asarray(gr))) for gr in grads)


def test_clip_boxes():
    boxes = np.array([[-5, -3, 50, 20], [10, 10, 20, 20], [70, 45, 90, 80]], np.float32)
    out = np.asarray(B.clip_boxes(boxes, 40, 64))
    np.testing.assert_array_equal(out, [[0, 0, 50, 20], [10, 10, 20, 20], [64, 40, 64, 40]])
    # works with a leading batch axis and traced sizes
    out2 = jax.jit(B.clip_boxes)(boxes[None], jnp.float32(40), jnp.float32(64))
    np.testing.assert_array_equal(out2[0], out)


def test_encode_hand_computed():
    anchor = np.array([0, 0, 10, 20], np.float32)  # centre (5, 10), w 10, h 20
    box = np.array([2, 4, 22, 24], np.float32)  # centre (12, 14), w 20, h 20
    d = np.asarray(B.encode(box, anchor))  # weights (10, 10, 5, 5)
    np.testing.assert_allclose(d, [10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2), 5 * math.log(1)], rtol=1e-6, atol=1e-7)
    d1 = np.asarray(B.encode(box, anchor, weights=(1, 1, 1, 1)))
    np.testing.assert_allclose(d1, [0.7, 0.2, math.log(2), 0.0], rtol=1e-6, atol=1e-7)
    back = np.asarray(B.decode(d1, anchor, weights=(1, 1, 1, 1)))
    np.testing.assert_allclose(back, box, rtol=1e-6, atol=1e-5)


def test_encode_decode_round_trip_and_broadcast():
    rng = np.random.default_rng(1)
    anchors = _random_boxes(rng, 50, min_wh=4)
    boxes = _random_boxes(rng, 50, min_wh=4)
    for w in [B.DEFAULT_WEIGHTS, (1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 4.0, 0.5)]:
        d = B.encode(boxes, anchors, w)
        np.testing.assert_allclose(B.decode(d, anchors, w), boxes, rtol=1e-5, atol=2e-4)
    # per-class deltas [N, K, 4] against anchors [N, 1, 4]
    deltas = rng.normal(size=(50, 3, 4)).astype(np.float32)
    out = np.asarray(B.decode(deltas, anchors[:, None]))
    assert out.shape == (50, 3, 4)
    np.testing.assert_allclose(out[:, 1], B.decode(deltas[:, 1], anchors), rtol=1e-6)


def test_decode_reference_and_clip():
    rng = np.random.default_rng(2)
    anchors = _random_boxes(rng, 20, min_wh=2)
    deltas = rng.normal(scale=3.0, size=(20, 4)).astype(np.float32)
    deltas[0, 2] = 100.0  # clamped: exp(log(1000 / 16)) * w
    deltas[1, 3] = 1e4
    wx, wy, ww, wh = 10.0, 10.0, 5.0, 5.0
    clip = math.log(1000 / 16)
    ref = []
    for d, a in zip(np.float64(deltas), np.float64(anchors)):
        w, h = a[2] - a[0], a[3] - a[1]
        cx, cy = a[0] + 0.5 * w, a[1] + 0.5 * h
        pcx, pcy = d[0] / wx * w + cx, d[1] / wy * h + cy
        pw, ph = math.exp(min(d[2] / ww, clip)) * w, math.exp(min(d[3] / wh, clip)) * h
        ref.append([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2])
    out = np.asarray(B.decode(deltas, anchors))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000 / 16 * (anchors[0, 2] - anchors[0, 0]), rtol=1e-5)
    assert np.all(np.isfinite(out))


def test_cell_anchors_torchvision_defaults():
    # sizes (32,), ratios (0.5, 1, 2): w = 32 / sqrt(r), h = 32 sqrt(r), halves rounded
    # r = 0.5: w = 45.25, h = 22.63 -> (-23, -11, 23, 11); r = 2: (-11, -23, 11, 23)
    np.testing.assert_array_equal(
        B.cell_anchors((32,), (0.5, 1.0, 2.0)), [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    )
    sizes, ratios = (128, 256, 512), (0.5, 1.0, 2.0)
    np.testing.assert_array_equal(B.cell_anchors(sizes, ratios), _ref_cell_anchors(sizes, ratios))
    # round half to even: size 3, ratio 1 -> halves 1.5 -> 2
    np.testing.assert_array_equal(B.cell_anchors((3, 5), (1.0,)), [[-2, -2, 2, 2], [-2, -2, 2, 2]])


def test_anchors_single_level_order_and_values():
    a = B.anchors((3, 4), 16, (32,), (0.5, 1.0, 2.0))
    assert a.shape == (3 * 4 * 3, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(
        a[:7],
        [
            [-23, -11, 23, 11],  # (y 0, x 0), ratio 0.5
            [-16, -16, 16, 16],  # ratio 1
            [-11, -23, 11, 23],  # ratio 2
            [-7, -11, 39, 11],  # (y 0, x 1): shifted 16 px right
            [0, -16, 32, 16],
            [5, -23, 27, 23],
            [9, -11, 55, 11],  # (y 0, x 2)
        ],
    )
    # row-major cells: (y 1, x 0) follows the 4 cells of row 0
    np.testing.assert_array_equal(a[4 * 3], [-23, 5, 23, 27])
    cell = B.cell_anchors((32,), (0.5, 1.0, 2.0))
    for y in range(3):
        for x in range(4):
            for k in range(3):
                np.testing.assert_array_equal(a[(y * 4 + x) * 3 + k], cell[k] + [16 * x, 16 * y, 16 * x, 16 * y])


def test_anchors_fpn_levels():
    feature_sizes = [(8, 10), (4, 5), (2, 3)]
    strides = [4, (8, 8), (16, 12)]
    sizes = ((32,), (64,), (128, 256))
    ratios = ((0.5, 1.0, 2.0), (1.0,), (0.5, 2.0))
    a = B.anchors(feature_sizes, strides, sizes, ratios)
    counts = [8 * 10 * 3, 4 * 5 * 1, 2 * 3 * 4]
    assert a.shape == (sum(counts), 4)
    ref = []
    for (fh, fw), st, sz, rt in zip(feature_sizes, strides, sizes, ratios):
        sh, sw = (st, st) if isinstance(st, int) else st
        cell = _ref_cell_anchors(sz, rt)
        for y in range(fh):
            for x in range(fw):
                for c in cell:
                    ref.append([c[0] + x * sw, c[1] + y * sh, c[2] + x * sw, c[3] + y * sh])
    np.testing.assert_array_equal(a, ref)
    # flat sizes with several levels: one size per level (torchvision's convention)
    flat = B.anchors([(2, 2), (1, 1)], [16, 32], (32, 64))
    assert flat.shape == (2 * 2 * 3 + 3, 4)
    np.testing.assert_array_equal(flat[-2], [-32, -32, 32, 32])
    with pytest.raises(ValueError):
        B.anchors([(2, 2), (1, 1)], [16], ((32,), (64,)))


# --------------------------------------------------------------------------- #
# RoIAlign
# --------------------------------------------------------------------------- #
def _roi_boxes(rng, bsz, r, h, w, scale):
    """Image-pixel boxes: inside, partly / wholly outside, tiny, zero-area and inverted."""
    ih, iw = h / scale, w / scale
    out = []
    for _ in range(bsz):
        bx = list(_random_boxes(rng, r - 7, size=max(ih, iw), min_wh=0.5, max_wh=max(ih, iw) / 2))
        bx += [
            [-0.3 * iw, -0.2 * ih, 0.5 * iw, 0.4 * ih],  # partly outside, top-left
            [0.6 * iw, 0.7 * ih, 1.4 * iw, 1.3 * ih],  # partly outside, bottom-right
            [1.2 * iw, 1.2 * ih, 1.5 * iw, 1.6 * ih],  # wholly outside
            [0.4 * iw, 0.4 * ih, 0.4 * iw + 0.05, 0.4 * ih + 0.03],  # tiny
            [0, 0, 0, 0],  # padding
            [0.3 * iw, 0.5 * ih, 0.3 * iw, 0.5 * ih],  # zero area inside
            [0.5 * iw, 0.5 * ih, 0.2 * iw, 0.3 * ih],  # inverted
        ]
        out.append(bx)
    return np.asarray(out, np.float32)


@pytest.mark.parametrize(
    "aligned,scale,out_hw,ratio",
    [(True, 0.25, (7, 7), 2), (False, 0.25, (7, 7), 2), (True, 1.0, (3, 5), 1), (False, 0.5, (4, 2), 3)],
)
def test_roi_align_matches_reference(aligned, scale, out_hw, ratio):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    boxes = _roi_boxes(rng, 2, 12, 9, 11, scale)
    out = _roi_align(feats, boxes, out_hw, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
    assert out.shape == (2, 12) + out_hw + (3,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref_roi_align(feats, boxes, out_hw, scale, ratio, aligned), atol=2e-5)
    # box 9 (wholly outside the image) is all zeros, every output finite
    np.testing.assert_array_equal(np.asarray(out)[:, 7], 0.0)
    assert np.all(np.isfinite(np.asarray(out)))


def test_roi_align_known_values():
    # bilinear sampling reproduces a linear ramp f(y, x) = x inside the image, so each bin is
    # the ramp at the bin's centre
    h, w = 8, 10
    ramp = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :, None], (1, h, w, 1))
    box = np.array([[[2, 0, 6, 4]]], np.float32)
    out = np.asarray(_roi_align(ramp, box, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True))
    # aligned: x from 1.5 to 5.5, bins [1.5, 3.5], [3.5, 5.5] -> mean x 2.5 and 4.5
    np.testing.assert_allclose(out[0, 0, :, :, 0], [[2.5, 4.5], [2.5, 4.5]], atol=1e-6)
    out = np.asarray(_roi_align(ramp, box, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False))
    np.testing.assert_allclose(out[0, 0, :, :, 0], [[3.0, 5.0], [3.0, 5.0]], atol=1e-6)
    # an int output_size is square
    assert jax.eval_shape(lambda f, b: roi_align(f, b, 3), ramp, np.zeros((1, 2, 4), np.float32)).shape == (1, 2, 3, 3, 1)
    with pytest.raises(ValueError):
        roi_align(ramp, np.zeros((1, 2, 4), np.float32), 3, sampling_ratio=0)


def test_roi_align_gradient_is_the_adjoint_and_jits():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
    boxes = _roi_boxes(rng, 2, 9, 6, 7, 0.5)
    cot = rng.normal(size=(2, 9, 3, 3, 4)).astype(np.float32)
    probe = rng.normal(size=feats.shape).astype(np.float32)

    @jax.jit
    def loss(f, bx):
        return jnp.sum(roi_align(f, bx, (3, 3), 0.5, 2, True) * cot)

    g_f, g_b = jax.grad(loss, argnums=(0, 1))(feats, boxes)
    assert np.all(np.isfinite(np.asarray(g_f))) and np.all(np.isfinite(np.asarray(g_b)))
    # roi_align is linear in the features: <grad, probe> == loss(probe)
    np.testing.assert_allclose(np.sum(np.asarray(g_f) * probe), float(loss(probe, boxes)), rtol=1e-4)
    # the features' dtype is kept (bf16 accumulates in float32)
    out16 = _roi_align(feats.astype(jnp.bfloat16), boxes, output_size=(3, 3), spatial_scale=0.5)
    assert out16.dtype == jnp.bfloat16
    ref = _roi_align(feats, boxes, output_size=(3, 3), spatial_scale=0.5)
    np.testing.assert_allclose(np.float32(out16), ref, atol=0.05)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_levels_equals_roi_align_on_each_boxs_level(aligned):
    """One gather over the flattened levels gives, box by box, exactly roi_align on the box's
    level, and the features' gradient lands only on each box's level, as the per-level one."""
    rng = np.random.default_rng(5)
    levels = [rng.normal(size=(2, 32 // s, 40 // s, 3)).astype(np.float32) for s in (4, 8, 16)]
    scales = [1 / 4, 1 / 8, 1 / 16]
    boxes = _roi_boxes(rng, 2, 10, 32, 40, 1.0)
    level = rng.integers(-1, 4, size=(2, 10)).astype(np.int32)  # out of range is clamped
    cot = rng.normal(size=(2, 10, 2, 3, 3)).astype(np.float32)
    kept = np.clip(level, 0, 2)

    def pooled(lv, bx):
        return roi_align_levels(lv, bx, level, scales, (2, 3), 2, aligned)

    def per_level(lv, bx):
        outs = [roi_align(f, bx, (2, 3), s, 2, aligned) for f, s in zip(lv, scales)]
        return jnp.select([(kept == k)[:, :, None, None, None] for k in range(3)], outs)

    out, ref = jax.jit(pooled)(levels, boxes), jax.jit(per_level)(levels, boxes)
    assert out.shape == (2, 10, 2, 3, 3)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    grads = jax.jit(jax.grad(lambda lv: jnp.sum(pooled(lv, boxes) * cot)))(levels)
    refs = jax.jit(jax.grad(lambda lv: jnp.sum(per_level(lv, boxes) * cot)))(levels)
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)
    with pytest.raises(ValueError, match="spatial scales"):
        roi_align_levels(levels, boxes, level, scales[:2])


# --------------------------------------------------------------------------- #
# NMS
# --------------------------------------------------------------------------- #
def _kept(idx, ok):
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert idx.dtype == np.int32 and ok.dtype == bool
    n = int(ok.sum())
    assert ok[:n].all() and not ok[n:].any()  # valid slots first
    assert np.all(idx[n:] == -1) and np.all(idx[:n] >= 0)
    return idx[:n].tolist()


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_reference(thr):
    rng = np.random.default_rng(5)
    boxes = _random_boxes(rng, 120, size=60.0, min_wh=5, max_wh=30)
    scores = rng.integers(0, 15, 120).astype(np.float32) / 15  # many ties
    ref = _ref_nms(boxes, scores, thr)
    got = _kept(*_nms(boxes, scores, thr, max_output=120))
    assert got == ref
    # fewer slots: the first max_output of the same sequence
    got = _kept(*_nms(boxes, scores, thr, max_output=5))
    assert got == ref[:5]


def test_nms_ties_threshold_and_degenerate():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 1, 1]], np.float32)
    scores = np.array([0.5, 0.9, 0.5, 0.8, 0.8, -0.0], np.float32)
    # IoU([0,0,1,1], [0,0,2,1]) = 0.5 exactly: kept at threshold 0.5 (strict >), suppressed below
    assert _kept(*_nms(boxes, scores, 0.5, 8)) == [1, 3, 4, 0]
    assert _kept(*_nms(boxes, scores, 0.49, 8)) == [1, 3, 4]
    # equal scores: lower index first; identical boxes (IoU 1) suppress each other, except empty ones
    assert _kept(*_nms(boxes, scores, 0.99, 8)) == [1, 3, 4, 0]
    assert _kept(*_nms(boxes[[0, 2, 5]], np.zeros(3, np.float32), 0.99, 4)) == [0]
    scores2 = np.array([0.0, -0.0, 0.0], np.float32)
    assert _kept(*_nms(np.float32([[0, 0, 1, 1], [3, 3, 4, 4], [6, 6, 7, 7]]), scores2, 0.5, 3)) == [0, 1, 2]


def test_nms_valid_mask_nan_and_padding():
    rng = np.random.default_rng(6)
    boxes = _random_boxes(rng, 30)
    scores = rng.random(30).astype(np.float32)
    valid = rng.random(30) > 0.4
    scores_nan = scores.copy()
    scores_nan[~valid] = np.nan
    ref = _ref_nms(boxes[valid], scores[valid], 0.5)
    ref = [int(np.flatnonzero(valid)[i]) for i in ref]
    assert _kept(*_nms(boxes, scores, 0.5, 40, valid=valid)) == ref
    assert _kept(*_nms(boxes, scores_nan, 0.5, 40)) == ref
    idx, ok = _nms(boxes, scores, 0.5, 40, valid=np.zeros(30, bool))
    assert not np.asarray(ok).any() and np.all(np.asarray(idx) == -1)
    idx, ok = _nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 3)
    assert idx.shape == (3,) and not np.asarray(ok).any()


def test_batched_nms_per_class():
    rng = np.random.default_rng(7)
    boxes = _random_boxes(rng, 150, size=50.0, min_wh=5, max_wh=30)
    scores = rng.integers(0, 20, 150).astype(np.float32) / 20
    classes = rng.integers(0, 4, 150).astype(np.int32)
    for thr in (0.3, 0.6):
        kept = []
        for c in range(4):
            members = np.flatnonzero(classes == c)
            kept += [int(members[i]) for i in _ref_nms(boxes[members], scores[members], thr)]
        ref = sorted(kept, key=lambda i: (-float(scores[i]), i))
        assert ref == _ref_nms(boxes, scores, thr, classes)
        assert _kept(*_batched_nms(boxes, scores, classes, thr, 150)) == ref
        # torchvision's coordinate-offset trick gives the same set here
        shifted = boxes + (classes * (boxes.max() + 1)).astype(np.float32)[:, None]
        assert sorted(_kept(*_nms(shifted, scores, thr, 150))) == sorted(ref)


def test_nms_jit_vmap_and_large_n():
    rng = np.random.default_rng(8)
    boxes = _random_boxes(rng, 2000, size=400.0, min_wh=10, max_wh=80)
    scores = rng.random(2000).astype(np.float32)
    f = jax.jit(nms, static_argnums=(3,))
    got = _kept(*f(boxes, scores, jnp.float32(0.7), 300))
    assert got == _ref_nms(boxes, scores, 0.7, limit=300)
    # vmap over images of one batch
    bb = np.stack([boxes[:200], boxes[200:400]])
    ss = np.stack([scores[:200], scores[200:400]])
    idx, ok = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.5, 50)))(bb, ss)
    for i in range(2):
        assert _kept(idx[i], ok[i]) == _ref_nms(bb[i], ss[i], 0.5, limit=50)


def _ref_detections(boxes, scores, score_thr, iou_thr, max_det, min_size):
    n, k = scores.shape
    if boxes.ndim == 2:
        boxes = np.repeat(boxes[:, None], k, axis=1)
    fb, fs = boxes.reshape(-1, 4), scores.reshape(-1)
    fc = np.tile(np.arange(k), n)
    keep = (fs > score_thr) & (fb[:, 2] - fb[:, 0] >= min_size) & (fb[:, 3] - fb[:, 1] >= min_size)
    ids = np.flatnonzero(keep)
    kept = [int(ids[i]) for i in _ref_nms(fb[ids], fs[ids], iou_thr, fc[ids])][:max_det]
    return fb[kept], fs[kept], fc[kept]


@pytest.mark.parametrize("shared_boxes", [False, True])
def test_detections_matches_reference(shared_boxes):
    rng = np.random.default_rng(9)
    n, k = 60, 5
    boxes = _random_boxes(rng, n, size=80.0, min_wh=4, max_wh=40)
    if not shared_boxes:
        boxes = boxes[:, None] + rng.normal(scale=3.0, size=(n, k, 4)).astype(np.float32)
    boxes[3] = 7.0  # an empty box: removed by min_size
    scores = rng.random((n, k)).astype(np.float32)
    ref_b, ref_s, ref_c = _ref_detections(boxes, scores, 0.3, 0.5, 25, 1e-2)
    out_b, out_s, out_c, ok = jax.jit(detections, static_argnums=(4,))(boxes, scores, 0.3, 0.5, 25)
    m = int(np.asarray(ok).sum())
    assert m == len(ref_s) == 25
    np.testing.assert_array_equal(out_b[:m], ref_b)
    np.testing.assert_array_equal(out_s[:m], ref_s)
    np.testing.assert_array_equal(out_c[:m], ref_c)
    # a high threshold leaves few detections: the rest is padding
    ref_b, ref_s, ref_c = _ref_detections(boxes, scores, 0.97, 0.5, 25, 1e-2)
    out_b, out_s, out_c, ok = jax.jit(detections, static_argnums=(4,))(boxes, scores, 0.97, 0.5, 25)
    m = len(ref_s)
    assert 0 < m < 25 and int(np.asarray(ok).sum()) == m
    np.testing.assert_array_equal(out_c[:m], ref_c)
    np.testing.assert_array_equal(np.asarray(out_b)[m:], 0)
    np.testing.assert_array_equal(np.asarray(out_s)[m:], 0)
    np.testing.assert_array_equal(np.asarray(out_c)[m:], -1)


def test_detections_pre_nms_topk_and_valid():
    rng = np.random.default_rng(10)
    n, k = 40, 3
    boxes = _random_boxes(rng, n, size=60.0, min_wh=4, max_wh=30)
    scores = rng.random((n, k)).astype(np.float32)
    valid = np.arange(n) < 30
    # pre_nms_topk = 20: NMS over the 20 best (valid, above-threshold) candidates only
    run = jax.jit(detections, static_argnames=("max_per_image", "pre_nms_topk"))
    _, out_s, out_c, ok = run(boxes, scores, 0.1, 0.5, max_per_image=50, pre_nms_topk=20, valid=valid)
    s = np.where(valid[:, None], scores, -np.inf).reshape(-1)
    top = np.argsort(-s, kind="stable")[:20]
    fb = np.repeat(boxes[:, None], k, axis=1).reshape(-1, 4)[top]
    fc = np.tile(np.arange(k), n)[top]
    ref = [int(top[i]) for i in _ref_nms(fb, s[top], 0.5, fc)]
    m = int(np.asarray(ok).sum())
    assert m == len(ref)
    np.testing.assert_array_equal(out_s[:m], s[ref])
    np.testing.assert_array_equal(out_c[:m], np.asarray(ref) % k)


def test_draw_boxes_outlines_exactly_the_border_pixels():
    image = jnp.zeros((2, 12, 16, 3))
    boxes = jnp.asarray([[[2.0, 3.0, 7.0, 9.0], [0.0, 0.0, 16.0, 12.0]], [[1.0, 1.0, 4.0, 4.0], [0, 0, 0, 0]]])
    valid = jnp.asarray([[True, False], [True, False]])
    out = np.asarray(jax.jit(B.draw_boxes, static_argnames=("colour", "thickness"))(image, boxes, valid, (1.0, 0.5, -1.0)))
    want = np.zeros((2, 12, 16), bool)
    want[0, 3:9, 2] = want[0, 3:9, 6] = want[0, 3, 2:7] = want[0, 8, 2:7] = True  # pixel centres on the border
    want[1, 1:4, 1] = want[1, 1:4, 3] = want[1, 1, 1:4] = want[1, 3, 1:4] = True
    np.testing.assert_array_equal(np.any(out != 0, axis=-1), want)
    np.testing.assert_array_equal(out[want], np.tile([1.0, 0.5, -1.0], (want.sum(), 1)))
