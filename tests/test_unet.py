"""Attention U-Net: layout, attention gates, batch norm modes, the segmentation task."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.unet import AttentionUNet, unet_features
from jattn.train.task import build_task
from jattn.train.tasks.segment import labels_to_image, segmentation_metrics, soft_dice_loss
from jattn.train.state import create_state
from task_helpers import fit, init, jit, task_config

SMALL = (4, 8, 16)


def _abstract(model, size=16, **kw):
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), **kw), jax.random.key(0))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_shapes_and_gates(num_classes):
    model = AttentionUNet(num_classes, SMALL)
    v = _abstract(model)
    logits, alphas = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 16, 16, 3)), return_attention=True), v)
    assert logits.shape == (2, 16, 16, num_classes)
    assert [a.shape for a in alphas] == [(2, 8, 8, 1), (2, 16, 16, 1)]  # coarsest gate first
    p = v["params"]
    assert sorted(k for k in p if k.startswith("gate")) == ["gate0", "gate1"]
    # gate1: skip (8 channels at 8x8) gated by the 4x4 bottom (16 channels): theta_x strided 1x1
    assert p["gate1"]["theta_x"]["kernel"].shape == (1, 1, 8, 4)
    assert p["gate1"]["phi_g"]["kernel"].shape == (1, 1, 16, 4)
    assert p["gate1"]["psi"]["kernel"].shape == (1, 1, 4, 1)
    assert p["up0"]["kernel"].shape == (2, 2, 8, 4)  # transposed conv to the level's width
    assert set(v) == {"params", "batch_stats"}
    plain = _abstract(AttentionUNet(num_classes, SMALL, attention=False))["params"]
    assert not any(k.startswith("gate") for k in plain)


def test_paper_widths_and_size_check():
    assert unet_features() == (64, 128, 256, 512, 1024)
    assert unet_features(16, 4) == (16, 32, 64, 128)
    with pytest.raises(ValueError, match="divisible by 4"):
        _abstract(AttentionUNet(3, SMALL), size=18)


@pytest.fixture(scope="module")
def small_net():
    model = AttentionUNet(3, SMALL)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    return model, flax.core.unfreeze(init(model, x[:1])), x


def test_attention_gate_acts_on_the_skip(small_net):
    model, v, x = small_net
    run = jit(lambda v: model.apply(v, x, return_attention=True))
    logits, (a1, a0) = run(v)
    assert 0 < float(jnp.min(a0)) and float(jnp.max(a0)) < 1
    shut = jax.tree_util.tree_map(lambda a: a, v)  # new containers: the fixture stays as it is
    shut["params"]["gate0"]["psi"]["bias"] = jnp.full((1,), -100.0)
    logits_shut, (_, a0_shut) = run(shut)
    assert float(jnp.max(a0_shut)) < 1e-30  # the finest skip is gated off
    assert float(jnp.max(jnp.abs(logits_shut - logits))) > 1e-3


def test_batch_norm_train_updates_eval_uses(small_net):
    model, v, x = small_net
    _, upd = jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(v)
    before, after = v["batch_stats"]["enc0"]["bn1"]["mean"], upd["batch_stats"]["enc0"]["bn1"]["mean"]
    assert float(jnp.max(jnp.abs(before))) == 0.0 and float(jnp.max(jnp.abs(after))) > 0.0
    evaluate = jit(lambda v, x: model.apply(v, x))
    v2 = {"params": v["params"], **upd}
    np.testing.assert_allclose(np.asarray(evaluate(v2, x[:1])), np.asarray(evaluate(v2, x)[:1]), atol=1e-5)
    assert float(jnp.max(jnp.abs(evaluate(v2, x) - evaluate(v, x)))) > 1e-4


def _shapes_batch(n=4, size=16, seed=0):
    """Squares (class 1) and discs (class 2) on a noisy background (class 0)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(-0.5, 0.1, (n, size, size, 3)).astype(np.float32)
    seg = np.zeros((n, size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        r, c = rng.integers(2, size // 2 - 2, 2)
        seg[i, r : r + 5, c : c + 5] = 1
        cy, cx = rng.integers(size // 2 + 2, size - 3, 2)
        seg[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 5] = 2
    img[seg == 1] = [0.8, 0.2, -0.2]
    img[seg == 2] = [-0.2, 0.2, 0.8]
    return {"image": jnp.asarray(img), "segmentation": jnp.asarray(seg)}


def test_task_fits_a_batch_with_ce_and_dice(small_net):
    config = task_config({"name": "attention_unet", "num_classes": 3, "features": SMALL}, image_size=16, lr=1e-2,
                         loss={"dice_weight": 0.5})
    task = build_task(config)
    assert task.fields == ("segmentation",)
    batch = _shapes_batch()
    # the task's init on an example batch gives the variables of the same network as small_net
    shapes = jax.eval_shape(task.init, jax.random.key(0), {k: v[:1] for k, v in batch.items()})
    _, v, _ = small_net
    same = lambda a, b: jax.tree_util.tree_map(lambda x, y: x.shape == y.shape, a, b)  # noqa: E731
    assert all(jax.tree_util.tree_leaves(same(shapes, ({"model": v["params"]}, {"model": {"batch_stats": v["batch_stats"]}}))))
    # so start from small_net's (already compiled) initialisation
    state = create_state({"model": v["params"]}, task.optimizers, jax.random.key(1), {"model": {"batch_stats": v["batch_stats"]}})
    state, history = fit(task, batch, 25, state=state)
    assert history[0]["dice_loss"] > 0 and history[0]["ce_loss"] > 0
    losses = [h["model_loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(jnp.max(jnp.abs(state.variables["model"]["batch_stats"]["dec0"]["bn2"]["var"] - 1.0))) > 0
    out = jit(task.predict)(state.params, state.variables, batch)
    assert out["output"].shape == (4, 16, 16, 3)
    assert out["labels"].shape == out["target"].shape == (4, 16, 16, 1)
    assert out["attention_0"].shape == (4, 16, 16, 1) and out["attention_1"].shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(np.asarray(out["labels"][..., 0]),
                                  np.asarray(jnp.argmax(out["output"], -1)) - 1.0)  # 0, 1, 2 -> -1, 0, 1
    m = jit(task.eval_metrics)(out, batch)
    assert set(m) == {"pixel_accuracy", "mean_iou", "mean_dice", "loss"}
    assert float(m["pixel_accuracy"]) > 0.6


def test_segmentation_metrics_hand_computed():
    labels = jnp.asarray([[[0, 1], [1, 1]]])
    pred = jnp.asarray([[[0, 0], [1, 1]]])
    logits = jax.nn.one_hot(pred, 4) * 5.0  # classes 2 and 3 absent from both: skipped
    metrics = jit(segmentation_metrics)
    m = metrics(logits, labels)
    assert float(m["pixel_accuracy"]) == 0.75
    # class 0: P = 2 px, T = 1 px, overlap 1 -> IoU 1/2, Dice 2/3; class 1: P 2, T 3, overlap 2 -> 2/3, 4/5
    assert float(m["mean_iou"]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert float(m["mean_dice"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    perfect = metrics(jax.nn.one_hot(labels, 4) * 5.0, labels)
    assert float(perfect["pixel_accuracy"]) == float(perfect["mean_iou"]) == float(perfect["mean_dice"]) == 1.0
    # per-image means: a perfect image and the one above average to their mean
    both = metrics(jnp.concatenate([logits, jax.nn.one_hot(labels, 4) * 5.0]), jnp.concatenate([labels] * 2))
    assert float(both["mean_iou"]) == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
    # soft Dice: near-one-hot logits of the labels give a loss near 0 (smooth = 0)
    assert float(soft_dice_loss(jax.nn.one_hot(labels, 2) * 50.0, labels, smooth=0.0)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(labels_to_image(jnp.asarray([[0, 3]]), 4))[..., 0], [[-1.0, 1.0]])
