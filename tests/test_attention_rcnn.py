"""Attention R-CNN: stage shapes, anchor / head alignment, target assignment and sampling on
hand-made cases, losses on known cases, the proposal attention, jit + grad, detect, and a tiny
overfitting run (a tiny backbone on 64x64 images; the model is compiled once per module)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn import losses as L
from jattn.models import AttentionRCNN, SEResNet, attention_rcnn_tiny
from jattn.models.attention_rcnn import (
    multiscale_roi_align,
    postprocess_detections,
    roi_levels,
    rpn_proposals,
    upsample_nearest,
)
from jattn.nn import ProposalAttention
from jattn.ops import boxes as B
from jattn.ops.roi_align import roi_align
from task_helpers import init, jit

K = 2  # foreground classes
SIZE = 64
GT_BOXES = [[10.0, 8.0, 26.0, 24.0], [30.0, 34.0, 54.0, 58.0], [0.0, 0.0, 0.0, 0.0]]  # last row: padding
GT_CLASSES = [0, 1, -1]


def _scene(seed=0):
    """One 64x64 image in [-1, 1]: noise, a red square (class 0) and a blue one (class 1)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.3, (SIZE, SIZE, 3)).astype(np.float32)
    img[8:24, 10:26] = [1, -1, -1]
    img[34:58, 30:54] = [-1, -1, 1]
    return np.clip(img, -1, 1)


def _batch(n=1):
    return {
        "image": jnp.asarray(np.stack([_scene(i) for i in range(n)])),
        "boxes": jnp.asarray([GT_BOXES] * n, jnp.float32),
        "classes": jnp.asarray([GT_CLASSES] * n, jnp.int32),
    }


@pytest.fixture(scope="module")
def model():
    return attention_rcnn_tiny(K)


@pytest.fixture(scope="module")
def variables(model):
    return init(model, jnp.zeros((1, SIZE, SIZE, 3)))


def _all_stages(m, image):
    c = m.backbone(image, train=False)
    levels = m.fpn(c)
    obj_maps, delta_maps = m.rpn_head(levels)
    obj, deltas, anchors, sizes = m.rpn(levels)
    boxes, scores, valid = m.proposals(obj, deltas, anchors, sizes, image.shape[1:3], False)
    heads = m.heads(levels, boxes, valid)
    return {"c": c, "levels": levels, "obj_maps": obj_maps, "delta_maps": delta_maps, "objectness": obj,
            "deltas": deltas, "anchors": anchors, "proposals": boxes, "proposal_scores": scores,
            "proposal_valid": valid, "heads": heads, "call": m(image), "detect": m.detect(image)}


@pytest.fixture(scope="module")
def stages_fn(model):
    return jit(lambda v, image: model.apply(v, image, method=_all_stages))


@pytest.fixture(scope="module")
def stages(stages_fn, variables):
    return stages_fn(variables, _batch(2)["image"])


@pytest.fixture(scope="module")
def train_step(model):
    opt = optax.adam(5e-4)

    def step(params, batch_stats, opt_state, batch, key):
        def loss(p):
            out, upd = model.apply({"params": p, "batch_stats": batch_stats}, batch, key, method="losses",
                                   mutable=["batch_stats"])
            return out["loss"], (out, upd["batch_stats"])

        (_, (out, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, out, grads

    return opt, jit(step)


# --------------------------------------------------------------------------- backbone


def test_se_resnet_features_only_and_plain_resnet():
    kw = {"width": 8, "bottleneck": False, "reduction": 4}
    x = jnp.zeros((1, 64, 64, 3))
    feats = jax.eval_shape(lambda: SEResNet((1, 1, 1, 1), 0, features_only=True, **kw).init_with_output(
        jax.random.key(0), x)[0])
    assert [f.shape for f in feats] == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 32), (1, 2, 2, 64)]  # C2..C5
    full = jax.eval_shape(SEResNet((1, 1, 1, 1), 5, **kw).init, jax.random.key(0), x)["params"]
    only = jax.eval_shape(SEResNet((1, 1, 1, 1), 5, features_only=True, **kw).init, jax.random.key(0), x)["params"]
    plain = jax.eval_shape(SEResNet((1, 1, 1, 1), 5, se=False, **kw).init, jax.random.key(0), x)["params"]
    assert set(full) - set(only) == {"head"}
    assert all("se" in full[k] and "se" not in plain[k] for k in full if k.startswith("stage"))
    def shapes_without_se(t):
        t = {k: {n: s for n, s in v.items() if n != "se"} if k.startswith("stage") else v for k, v in t.items()}
        return jax.tree_util.tree_map(lambda a: a.shape, t)

    assert shapes_without_se(full) == shapes_without_se(plain)


# --------------------------------------------------------------------------- shapes and alignment


def test_shapes_of_every_stage(stages, model):
    b, p, a = 2, model.rpn_post_nms_top_n_test, 3
    assert [x.shape for x in stages["c"]] == [(b, 16, 16, 8), (b, 8, 8, 16), (b, 4, 4, 32), (b, 2, 2, 64)]
    assert [x.shape for x in stages["levels"]] == [(b, s, s, 16) for s in (16, 8, 4, 2, 1)]  # P2..P6
    n = a * (256 + 64 + 16 + 4 + 1)
    assert stages["objectness"].shape == (b, n) and stages["deltas"].shape == (b, n, 4)
    assert stages["anchors"].shape == (n, 4)
    assert stages["proposals"].shape == (b, p, 4) and stages["proposal_valid"].shape == (b, p)
    h = stages["heads"]
    assert h["class_logits"].shape == (b, p, K + 1) and h["box_deltas"].shape == (b, p, K, 4)
    assert h["features"].shape == (b, p, 32) and h["attention_weights"].shape == (b, K, p)
    call = stages["call"]
    assert set(call) == {"objectness", "rpn_deltas", "proposals", "proposal_scores", "proposal_valid",
                         "class_logits", "box_deltas", "attention_weights", "class_weights"}
    for k in ("class_logits", "box_deltas", "proposals"):
        np.testing.assert_allclose(np.asarray(call[k]), np.asarray(stages[k] if k == "proposals" else h[k]), atol=1e-5)
    # proposals: valid ones inside the image, sorted by score, padding zero
    boxes, valid, scores = (np.asarray(stages[k]) for k in ("proposals", "proposal_valid", "proposal_scores"))
    assert valid.any(axis=1).all()
    assert (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[~valid] == 0).all()
    for i in range(b):
        s = scores[i][valid[i]]
        assert (np.diff(s) <= 1e-7).all()


def test_anchors_align_with_rpn_head_outputs(stages):
    anchors = np.asarray(stages["anchors"])
    obj, deltas = np.asarray(stages["objectness"]), np.asarray(stages["deltas"])
    offset = 0
    for lvl, (om, dm) in enumerate(zip(stages["obj_maps"], stages["delta_maps"])):
        om, dm = np.asarray(om), np.asarray(dm)
        bsz, h, w, a = om.shape
        n = h * w * a
        # head output [b, y, x, a] is flat row offset + (y * W + x) * A + a, as the anchors
        np.testing.assert_array_equal(obj[:, offset : offset + n].reshape(bsz, h, w, a), om)
        np.testing.assert_array_equal(deltas[:, offset : offset + n].reshape(bsz, h, w, a, 4),
                                      dm.reshape(bsz, h, w, a, 4))
        stride, size = 2 ** (lvl + 2), 8 * 2**lvl
        grid = anchors[offset : offset + n].reshape(h, w, a, 4)
        cx, cy = (grid[..., 0] + grid[..., 2]) / 2, (grid[..., 1] + grid[..., 3]) / 2
        np.testing.assert_allclose(cx, np.broadcast_to(np.arange(w)[None, :, None] * stride, (h, w, a)), atol=0.5)
        np.testing.assert_allclose(cy, np.broadcast_to(np.arange(h)[:, None, None] * stride, (h, w, a)), atol=0.5)
        np.testing.assert_array_equal(grid[0, 0], B.cell_anchors([size], (0.5, 1.0, 2.0)))
        offset += n
    assert offset == anchors.shape[0]


def test_proposals_decode_the_best_anchor_and_stop_gradients():
    anchors = B.anchors([(4, 4), (2, 2)], [8, 16], [8, 16], (1.0,))  # 16 + 4 anchors
    obj = jnp.full((1, 20), -5.0).at[0, 5].set(5.0).at[0, 17].set(4.0)
    deltas = jnp.zeros((1, 20, 4)).at[0, 17].set(jnp.asarray([0.1, 0.0, 0.0, 0.0]))
    propose = functools.partial(rpn_proposals, anchors=anchors, level_sizes=[16, 4], image_size=(32, 32),
                                pre_nms_top_n=3, post_nms_top_n=8)
    boxes, scores, valid = jit(propose)(obj, deltas)
    assert boxes.shape == (1, 8, 4) and int(valid.sum()) == 6  # 3 per level, no overlap above 0.7
    np.testing.assert_allclose(np.asarray(boxes[0, 0]), B.clip_boxes(anchors[5], 32, 32), atol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes[0, 1]), B.clip_boxes(B.decode(deltas[0, 17], anchors[17], (1, 1, 1, 1)),
                                                                      32, 32), atol=1e-5)
    assert float(scores[0, 0]) == pytest.approx(float(jax.nn.sigmoid(5.0)))
    g = jit(jax.grad(lambda o: jnp.sum(propose(o, deltas)[1])))(obj)
    assert float(jnp.abs(g).sum()) == 0.0


def test_roi_level_assignment_and_multiscale_pooling():
    boxes = jnp.asarray([[0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 1000, 1000], [0, 0, 10, 10],
                         [0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(roi_levels(boxes)), [3, 4, 5, 5, 2, 2])
    # each box is pooled from its level, as roi_align on that level alone
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(rng.normal(size=(1, 64 // s, 64 // s, 3)), jnp.float32) for s in (4, 8, 16, 32)]
    rois = jnp.asarray([[[0, 0, 8, 8], [4, 4, 60, 60], [10, 20, 30, 40]]], jnp.float32)
    pool = jit(lambda f, r: multiscale_roi_align(f, r, [4, 8, 16, 32], output_size=3, canonical_scale=32.0))
    out = pool(levels, rois)
    lv = np.asarray(roi_levels(rois, 2, 5, 32.0, 4))[0]
    assert list(lv) == [2, 4, 3]
    refs = jit(lambda f, r: [roi_align(f[k - 2], r, 3, 1.0 / 2**k, 2, True) for k in (2, 3, 4, 5)])(levels, rois)
    for r, k in enumerate(lv):
        np.testing.assert_array_equal(np.asarray(out[:, r]), np.asarray(refs[k - 2][:, r]))
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(upsample_nearest(x, (4, 6)))[0, :, :, 0],
                                  np.repeat(np.repeat(np.arange(6.0).reshape(2, 3), 2, 0), 2, 1))


# --------------------------------------------------------------------------- target assignment


def _grid_anchors():
    """4x4 cells, stride 16, square anchors of sizes 16 and 24 per cell (row 2 * cell + size)."""
    return B.anchors((4, 4), 16, (16, 24), (1.0,))


def test_rpn_targets_on_hand_made_boxes():
    anchors = _grid_anchors()
    exact = anchors[2 * 5]  # the 16-px anchor of cell 5
    shifted = anchors[2 * 15] + np.float32([4, 0, 4, 0])  # IoU 0.6 with its best anchor only
    gt = jnp.asarray([exact, shifted, [0, 0, 0, 0]])
    t = jit(lambda k: L.rpn_targets(anchors, gt, jnp.asarray([0, 1, -1]), k, batch_size=256))(jax.random.key(0))
    labels = np.asarray(t["labels"])
    iou = np.asarray(B.box_iou(anchors, gt[:2]))
    assert iou[10, 0] == pytest.approx(1.0) and iou[30, 1] == pytest.approx(0.6)
    assert labels[10] == 1  # the exact match
    assert labels[30] == 1  # below 0.7, but the best anchor of its box
    assert labels[11] == -1 and labels[31] == -1  # the concentric 24-px anchors: IoU 0.44 and 0.44
    far = iou.max(axis=1) < 0.3
    assert (labels[far] == 0).all() and far.sum() == 32 - 4
    assert np.asarray(t["matched"])[[10, 30]].tolist() == [0, 1]
    np.testing.assert_allclose(np.asarray(t["box_targets"][10]), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t["box_targets"][30]), [0.25, 0, 0, 0], atol=1e-6)  # (4 px) / 16
    assert not np.asarray(t["box_targets"])[labels != 1].any()
    # 32 anchors < 256: every positive and negative is sampled, ignored ones never
    assert np.asarray(t["positive"]).sum() == 2 and np.asarray(t["negative"]).sum() == 28
    assert not np.asarray(t["positive"] | t["negative"])[labels == -1].any()
    # no ground truth: every anchor background
    t0 = jit(L.rpn_targets)(anchors, jnp.zeros((2, 4)), jnp.asarray([-1, -1]), jax.random.key(0))
    assert (np.asarray(t0["labels"]) == 0).all() and np.isfinite(np.asarray(t0["box_targets"])).all()


@pytest.mark.parametrize("n_pos, n_neg, want_pos, want_neg", [(300, 700, 128, 128), (10, 990, 10, 246),
                                                              (300, 50, 128, 50)])
def test_balanced_sampling_counts_and_determinism(n_pos, n_neg, want_pos, want_neg):
    labels = np.full(1100, -1)
    rng = np.random.default_rng(0)
    idx = rng.permutation(1100)
    labels[idx[:n_pos]] = 1
    labels[idx[n_pos : n_pos + n_neg]] = 0
    sample = jit(lambda lab, k: L.sample_balanced(lab, k, 256, 0.5))
    pos, neg = (np.asarray(x) for x in sample(jnp.asarray(labels), jax.random.key(1)))
    assert pos.sum() == want_pos and neg.sum() == want_neg
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    pos2, neg2 = (np.asarray(x) for x in sample(jnp.asarray(labels), jax.random.key(1)))
    np.testing.assert_array_equal(pos, pos2)
    np.testing.assert_array_equal(neg, neg2)
    pos3, neg3 = (np.asarray(x) for x in sample(jnp.asarray(labels), jax.random.key(2)))
    assert pos3.sum() == want_pos and neg3.sum() == want_neg
    if want_pos < n_pos or want_neg < n_neg:
        assert (pos3 != pos).any() or (neg3 != neg).any()


def test_rpn_sampling_draws_256_per_image_deterministically():
    anchors = B.anchors((16, 16), 4, (8, 16), (0.5, 1.0, 2.0))  # 1536 anchors
    gt = jnp.asarray([GT_BOXES, [[0, 0, 64, 64], [0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32)
    cls = jnp.asarray([GT_CLASSES, [1, -1, -1]])
    one = lambda b, c, k: L.rpn_targets(anchors, b, c, k)  # noqa: E731
    targets = jit(lambda k: jax.vmap(one)(gt, cls, jax.random.split(k, 2)))
    t = targets(jax.random.key(3))
    for i in range(2):
        pos, neg = np.asarray(t["positive"][i]), np.asarray(t["negative"][i])
        n_pos = int((np.asarray(t["labels"][i]) == 1).sum())
        assert pos.sum() == min(n_pos, 128) and pos.sum() + neg.sum() == 256
    t2 = targets(jax.random.key(3))
    assert all(np.array_equal(np.asarray(t[k]), np.asarray(t2[k])) for k in ("positive", "negative"))
    t3 = targets(jax.random.key(4))
    assert not np.array_equal(np.asarray(t["negative"]), np.asarray(t3["negative"]))


def test_sample_rois_appends_ground_truth_and_samples_deterministically():
    gt = jnp.asarray([GT_BOXES], jnp.float32)
    cls = jnp.asarray([GT_CLASSES])
    props = jnp.asarray([[[11, 8, 26, 24], [40, 40, 60, 60], [0, 0, 5, 5], [31, 35, 54, 58]] + [[0, 0, 0, 0]] * 4],
                        jnp.float32)
    pvalid = jnp.asarray([[True] * 4 + [False] * 4])
    sample = jit(lambda k: L.sample_rois(props, pvalid, gt, cls, k, batch_size=8, positive_fraction=0.5))
    s = sample(jax.random.key(0))
    assert s["rois"].shape == (1, 8, 4)
    valid, labels = np.asarray(s["valid"][0]), np.asarray(s["labels"][0])
    # candidates: 4 proposals + 2 ground-truth boxes (the padding row is no candidate)
    # foreground (IoU >= 0.5): proposals 0 and 3, both ground-truth boxes -> 4 >= cap 4
    assert valid.sum() == 6 and (labels[:4] > 0).all() and (labels[4:] == 0).all() and valid[:6].all()
    rois = np.asarray(s["rois"][0])
    iou = np.asarray(B.box_iou(jnp.asarray(rois[:4]), gt[0, :2]))
    np.testing.assert_array_equal(labels[:4], iou.argmax(1) + 1)  # class + 1
    np.testing.assert_allclose(np.asarray(s["matched_boxes"][0, :4]), np.asarray(gt[0])[iou.argmax(1)])
    np.testing.assert_allclose(np.asarray(s["box_targets"][0, :4]),
                               np.asarray(B.encode(s["matched_boxes"][0, :4], s["rois"][0, :4])), atol=1e-6)
    assert not np.asarray(s["box_targets"][0, 4:]).any() and not rois[~valid].any()
    s2 = sample(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(s["rois"]), np.asarray(s2["rois"]))
    # at most 25% foreground of 512 when there are many foreground candidates
    many = jnp.tile(gt[:, :1], (1, 600, 1)) + jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 600, 4)),
                                                          jnp.float32)
    many = jnp.concatenate([many, jnp.tile(jnp.asarray([[[40.0, 0, 60, 20]]]), (1, 600, 1))], axis=1)
    s = jit(L.sample_rois)(many, jnp.ones((1, 1200), bool), gt, cls, jax.random.key(0))
    assert s["rois"].shape == (1, 512, 4)
    assert int((s["labels"] > 0).sum()) == 128 and int(s["valid"].sum()) == 512


# --------------------------------------------------------------------------- losses


def test_rpn_loss_known_cases():
    anchors = _grid_anchors()
    gt = jnp.asarray([[anchors[10], anchors[30] + np.float32([4, 0, 4, 0])]])
    cls = jnp.asarray([[0, 1]])
    key = jax.random.key(5)
    t = L.rpn_targets(anchors, gt[0], cls[0], jax.random.split(key, 1)[0])
    # perfect deltas everywhere (the encoded best box of every anchor): zero box loss
    best = np.asarray(B.box_iou(anchors, gt[0])).argmax(1)
    perfect = B.encode(gt[0][best], anchors, (1, 1, 1, 1))[None]
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32)), jnp.float32)
    rpn_loss = jit(L.rpn_loss)
    out = rpn_loss(logits, perfect, anchors, gt, cls, key)
    assert float(out["rpn_box"]) == pytest.approx(0.0, abs=1e-7)
    # objectness: mean BCE over the sampled anchors
    sampled = np.asarray(t["positive"] | t["negative"])
    y = np.asarray(t["positive"], np.float64)
    z = np.asarray(logits[0], np.float64)
    bce = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y
    assert float(out["rpn_objectness"]) == pytest.approx(bce[sampled].mean(), rel=1e-5)
    assert float(out["rpn_num_sampled"]) == sampled.sum() == 30
    # a delta off by 1 on one coordinate of each positive: (1 - beta / 2) per positive / #sampled
    off = perfect.at[..., 0].add(1.0)
    out = rpn_loss(logits, off, anchors, gt, cls, key)
    assert float(out["rpn_box"]) == pytest.approx(2 * (1 - 1 / 18) / 30, rel=1e-5)


def _samples():
    rois = jnp.asarray([[[10, 10, 30, 30], [0, 0, 20, 20], [40, 40, 50, 60], [0, 0, 0, 0]]], jnp.float32)
    gt = jnp.asarray([[[12, 8, 30, 32], [0, 0, 20, 20], [40, 40, 50, 60], [0, 0, 0, 0]]], jnp.float32)
    labels = jnp.asarray([[1, 2, 0, 0]])
    valid = jnp.asarray([[True, True, True, False]])
    fg = (labels > 0)[..., None]
    targets = jnp.where(fg, B.encode(jnp.where(fg, gt, rois), jnp.where(fg, rois, 1.0)), 0.0)
    return {"rois": rois, "valid": valid, "labels": labels, "matched_boxes": jnp.where(fg, gt, rois),
            "box_targets": targets}


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_roi_loss_known_cases(box_loss):
    s = _samples()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 4, K + 1)), jnp.float32)
    # perfect class-specific deltas (the other class's deltas are garbage: unused)
    deltas = jnp.asarray(rng.normal(size=(1, 4, K, 4)), jnp.float32)
    lab = np.asarray(s["labels"][0])
    for r in range(2):
        deltas = deltas.at[0, r, lab[r] - 1].set(s["box_targets"][0, r])
    loss_fn = functools.partial(L.roi_loss, box_loss=box_loss)
    roi_loss = jit(loss_fn)
    out = roi_loss(logits, deltas, s)
    assert float(out["roi_box"]) == pytest.approx(0.0, abs=1e-6)
    # classification: the hand cross-entropy, mean over the 3 valid RoIs
    z = np.asarray(logits[0], np.float64)[:3]
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert float(out["roi_classification"]) == pytest.approx(-logp[np.arange(3), lab[:3]].mean(), rel=1e-6)
    assert float(out["roi_num_foreground"]) == 2 and float(out["roi_num_sampled"]) == 3
    worse = roi_loss(logits, deltas.at[0, 0, 0, 2].add(1.0), s)
    if box_loss == "smooth_l1":
        assert float(worse["roi_box"]) == pytest.approx((1 - 1 / 18) / 3, rel=1e-5)
    else:
        assert float(worse["roi_box"]) > 0.01
    g = jit(jax.grad(lambda d: loss_fn(logits, d, s)["roi_box"]))(deltas.at[0, 0, 0].add(0.3))
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g[0, 2:]).any()  # background / padding: no gradient
    with pytest.raises(ValueError, match="box_loss"):
        L.roi_loss(logits, deltas, s, box_loss="l2")


# --------------------------------------------------------------------------- the attention


def _attention_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 6, 8)), jnp.float32)
    valid = jnp.asarray([[True] * 4 + [False] * 2, [False, True] + [False] * 4, [False] * 6])
    return x, valid


@pytest.mark.parametrize("score", ["dot", "additive"])
def test_proposal_attention_weights_masking_and_formula(score):
    x, valid = _attention_inputs()
    att = ProposalAttention(3, score, attention_dim=5, return_attention=True)
    v = init(att, x, valid)
    run = jit(lambda v, x: att.apply(v, x, valid))
    y, aux = run(v, x)
    a = np.asarray(aux["weights"])
    assert y.shape == x.shape and a.shape == (3, 3, 6) and aux["context"].shape == (3, 3, 8)
    np.testing.assert_allclose(a[:2].sum(-1), 1.0, atol=1e-6)  # over each image's valid proposals
    assert (a[np.broadcast_to(~np.asarray(valid)[:, None, :], a.shape)] == 0).all()  # padding: exactly 0
    np.testing.assert_allclose(a[1, :, 1], 1.0)
    assert not a[2].any() and not np.asarray(aux["context"][2]).any()  # no valid proposal: z = 0
    # the seed's formulas: e = f(x, h), a = softmax over the valid proposals, z = sum_i a_i x_i
    p = v["params"]
    h, wx = np.asarray(p["class_embeddings"], np.float64), np.asarray(p["w_x"], np.float64)
    xn = np.asarray(x, np.float64)
    if score == "dot":
        e = np.einsum("ka,bra->bkr", h, xn @ wx) / np.sqrt(5)
    else:
        wh, vv = np.asarray(p["w_h"], np.float64), np.asarray(p["v"], np.float64)
        e = np.einsum("bkra,a->bkr", np.tanh((xn @ wx)[:, None] + (h @ wh)[None, :, None]), vv)
    e0 = np.where(np.asarray(valid)[0], e[0], -np.inf)
    ref = np.exp(e0 - e0.max(-1, keepdims=True))
    np.testing.assert_allclose(a[0], ref / ref.sum(-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["context"]), np.einsum("bkr,brd->bkd", a, xn), atol=1e-5)
    # padded proposals change nothing on the valid ones, and pass through unchanged
    x2 = x.at[:, 4:].set(100.0).at[1, 0].set(-7.0)
    y2, _ = run(v, x2)
    np.testing.assert_allclose(np.asarray(y2)[np.asarray(valid)], np.asarray(y)[np.asarray(valid)], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y2)[~np.asarray(valid)], np.asarray(x2)[~np.asarray(valid)])
    assert float(jnp.abs(y - x)[np.asarray(valid)].max()) > 1e-3  # the context does reach the valid ones
    with pytest.raises(ValueError, match="score"):
        ProposalAttention(3, "cosine").init(jax.random.key(0), x, valid)


def test_model_attention_weights_over_proposals(stages):
    a = np.asarray(stages["call"]["attention_weights"])
    valid = np.asarray(stages["call"]["proposal_valid"])
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    assert (a[np.broadcast_to(~valid[:, None, :], a.shape)] == 0).all()


# --------------------------------------------------------------------------- jit, grad, detect, overfitting


def test_losses_jit_differentiable_and_finite(variables, train_step):
    opt, step = train_step
    batch = _batch(1)
    _, bs, _, out, grads = step(variables["params"], variables["batch_stats"], opt.init(variables["params"]), batch,
                                jax.random.key(0))
    assert set(out) >= {"loss", "rpn_objectness", "rpn_box", "roi_classification", "roi_box"}
    assert all(np.isfinite(float(v)) for v in out.values())
    total = sum(float(out[k]) for k in ("rpn_objectness", "rpn_box", "roi_classification", "roi_box"))
    assert float(out["loss"]) == pytest.approx(total, rel=1e-6)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    for name in ("backbone", "fpn", "rpn_head", "box_head", "proposal_attention", "cls_score", "bbox_pred"):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads[name]))
        assert norm > 0, name
    assert float(jnp.abs(grads["proposal_attention"]["class_embeddings"]).sum()) > 0
    # train mode moved the backbone's batch statistics
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), bs, variables["batch_stats"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_detect_fixed_size_outputs(stages, model):
    d = stages["detect"]
    n = model.detections_per_img
    assert d["boxes"].shape == (2, n, 4) and d["scores"].shape == (2, n)
    assert d["classes"].shape == (2, n) and d["valid"].shape == (2, n) and d["valid"].dtype == bool
    ok, cls = np.asarray(d["valid"]), np.asarray(d["classes"])
    assert ((cls >= 0) & (cls < K))[ok].all() and (cls[~ok] == -1).all()
    assert not np.asarray(d["boxes"])[~ok].any() and not np.asarray(d["scores"])[~ok].any()
    # post-processing on hand-made head outputs: class probabilities, decoded boxes, fixed size
    props = jnp.asarray([[[10, 10, 30, 30], [40, 40, 60, 60], [0, 0, 0, 0]]], jnp.float32)
    logits = jnp.asarray([[[0.0, 3.0, 1.0], [0.0, 1.0, 2.9], [9.0, 9.0, 9.0]]])
    out = postprocess_detections(logits, jnp.zeros((1, 3, K, 4)), props, jnp.asarray([[True, True, False]]),
                                 (64, 64), detections_per_img=4)
    assert out["boxes"].shape == (1, 4, 4) and np.asarray(out["valid"]).sum() == 4  # 2 boxes x 2 classes
    np.testing.assert_allclose(np.asarray(out["boxes"][0, :2]), np.asarray(props[0, :2]), atol=1e-5)
    assert np.asarray(out["classes"][0, :2]).tolist() == [0, 1]
    assert float(out["scores"][0, 0]) == pytest.approx(float(jax.nn.softmax(logits[0, 0])[1]), rel=1e-6)


def test_overfits_one_image(variables, train_step, stages_fn):
    opt, step = train_step
    batch = _batch(1)
    params, bs = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    history = []
    for i in range(50):
        params, bs, opt_state, out, _ = step(params, bs, opt_state, batch, jax.random.fold_in(jax.random.key(1), i))
        history.append({k: float(v) for k, v in out.items()})
    first, last = history[0], history[-10:]
    assert np.mean([h["loss"] for h in last]) < 0.5 * first["loss"], [h["loss"] for h in history]
    assert np.mean([h["rpn_objectness"] for h in last]) < 0.6 * first["rpn_objectness"]
    assert np.mean([h["roi_classification"] for h in last]) < 0.5 * first["roi_classification"]
    # the trained detector (the compiled stages of a batch of two)
    d = stages_fn({"params": params, "batch_stats": bs}, _batch(2)["image"].at[1].set(batch["image"][0]))["detect"]
    ok = np.asarray(d["valid"][1])
    assert ok[0]
    # the best detection is one of the squares, with its class
    iou = np.asarray(B.box_iou(d["boxes"][1, :1], jnp.asarray(GT_BOXES[:2])))[0]
    assert iou.max() >= 0.5, d["boxes"][1]
    assert int(d["classes"][1, 0]) == GT_CLASSES[int(iou.argmax())], d["classes"][1]


def test_config_errors():
    x = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="four backbone stages"):
        jax.eval_shape(AttentionRCNN(2, stage_sizes=(1, 1, 1)).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="box_loss"):
        jax.eval_shape(attention_rcnn_tiny(2, box_loss="l1").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="anchor_sizes"):
        jax.eval_shape(attention_rcnn_tiny(2, anchor_sizes=(8, 16)).init, jax.random.key(0), x)
    v = flax.core.unfreeze(jax.eval_shape(attention_rcnn_tiny(2, attention=False).init, jax.random.key(0), x))
    assert "proposal_attention" not in v["params"]


def test_resnet50_fpn_parameter_count_is_torchvisions():
    """Without SE blocks and attention the layout is torchvision's fasterrcnn_resnet50_fpn
    (41,755,286 parameters with 91 classes). Two known differences: torchvision's
    predictor also regresses the background's box (4 x 1025 more), and its frozen batch
    norm keeps the backbone's scales and offsets as buffers (53,120, parameters here)."""
    import math

    model = AttentionRCNN(90, se=False, attention=False)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert count == 41_755_286 - 4 * 1025 + 53_120
