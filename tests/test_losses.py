"""jattn.losses: unit tests and the official DeepFill v1 losses (golden losses.npz)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import losses as L
from jattn.models.deepfill import DeepFillV1Critics

LOCAL_BOX = (56, 76, 128, 128)  # top, left, height, width of the golden batch's local crop


# --------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden_losses(golden_dir):
    from jattn.export.deepfill_import import load_official_critics

    d = golden_dir / "deepfill_official" / "v1_seed1"
    if not (d / "losses.npz").is_file():
        pytest.skip(f"official DeepFill v1 losses not found at {d}")
    ref = dict(np.load(d / "losses.npz"))
    g = np.load(d / "golden.npz")
    params = load_official_critics(str(d / "disc_ckpt" / "snap-0"))
    critics = DeepFillV1Critics()
    local = functools.partial(critics.apply, {"params": params}, method="score_local")
    glob = functools.partial(critics.apply, {"params": params}, method="score_global")

    @jax.jit
    def run(batch_pos, x1, x2, mask, boxes, alpha_local, alpha_global):
        return L.deepfill_v1_losses(
            local, glob, batch_pos, x1, x2, mask, boxes, (128, 128),
            alpha_local=alpha_local, alpha_global=alpha_global,
        )

    boxes = np.tile(np.array(LOCAL_BOX, np.int32), (2, 1))  # per-image boxes, traced
    out = run(g["batch_pos"], g["x1"], g["x2"], g["mask"], boxes, ref["gp_alpha_local"], ref["gp_alpha_global"])
    return ref, jax.tree.map(np.asarray, out), g


@pytest.mark.parametrize("key", ["l1_loss", "ae_loss", "g_loss", "d_loss", "gp_loss"])
def test_golden_loss_totals(golden_losses, key):
    ref, out, _ = golden_losses
    np.testing.assert_allclose(out[key], ref[f"loss_{key}"], rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "key", ["d_pos_neg_local", "d_pos_neg_global", "d_interp_local", "d_interp_global",
            "gp_penalty_local", "gp_penalty_global"],
)
def test_golden_critic_outputs(golden_losses, key):
    ref, out, _ = golden_losses
    assert out[key].shape == ref[key].shape
    # Critic outputs can be ~1e-4, so an absolute floor next to the relative tolerance.
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6)


def test_golden_batch_complete(golden_losses):
    _, out, g = golden_losses
    np.testing.assert_allclose(out["batch_complete"], g["x2"] * g["mask"] + g["x_in"] * (1 - g["mask"]), atol=1e-6)


# --------------------------------------------------------------------------- spatial discount


def test_spatial_discount():
    w = np.asarray(L.spatial_discount(128, 128))
    assert w.shape == (128, 128, 1) and w.dtype == np.float32
    assert w[0, 0, 0] == 1.0 and w[0, 127, 0] == 1.0 and w[127, 0, 0] == 1.0
    np.testing.assert_allclose(w[127, 127, 0], 0.9, rtol=1e-7)  # min(127, 1) = 1
    np.testing.assert_allclose(w[64, 64, 0], 0.9**64, rtol=1e-6)  # the minimum, at the centre
    assert w.min() == w[64, 64, 0]
    ref = np.array([[max(0.5 ** min(i, 6 - i), 0.5 ** min(j, 10 - j)) for j in range(10)] for i in range(6)])
    np.testing.assert_allclose(np.asarray(L.spatial_discount(6, 10, 0.5))[..., 0], ref, rtol=1e-7)
    with pytest.raises(ValueError):
        L.spatial_discount(0, 4)


# --------------------------------------------------------------------------- GAN losses


def test_wgan_hinge_nonsaturating_known_values():
    pos = jnp.array([[2.0], [-0.5]])
    neg = jnp.array([[0.5], [-3.0]])
    np.testing.assert_allclose(L.wgan_d_loss(pos, neg), ((0.5 - 2.0) + (-3.0 + 0.5)) / 2)
    np.testing.assert_allclose(L.wgan_g_loss(neg), 1.25)
    # hinge: mean(relu(1 - pos)) = (0 + 1.5) / 2; mean(relu(1 + neg)) = (1.5 + 0) / 2
    np.testing.assert_allclose(L.hinge_d_loss(pos, neg), 1.5)
    np.testing.assert_allclose(L.hinge_g_loss(neg), 1.25)
    # non-saturating, on logits: -log sigmoid(0) = log 2
    zero = jnp.zeros((3, 1))
    np.testing.assert_allclose(L.nonsaturating_d_loss(zero, zero), 2 * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(L.nonsaturating_g_loss(zero), np.log(2.0), rtol=1e-6)
    p, n = np.array([1.5, -2.0]), np.array([0.3, 4.0])
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    np.testing.assert_allclose(
        L.nonsaturating_d_loss(p, n), -np.mean(np.log(sig(p))) - np.mean(np.log(1 - sig(n))), rtol=1e-6
    )
    np.testing.assert_allclose(L.nonsaturating_g_loss(n), -np.mean(np.log(sig(n))), rtol=1e-6)
    np.testing.assert_allclose(L.l1_loss(pos, neg), 2.0)
    np.testing.assert_allclose(L.l1_loss(pos, neg, jnp.array([[1.0], [0.0]])), 0.75)


# --------------------------------------------------------------------------- local crop


def test_local_crop_per_image_boxes():
    images = np.arange(3 * 20 * 24 * 2, dtype=np.float32).reshape(3, 20, 24, 2)
    boxes = np.array([[0, 0, 8, 6], [5, 10, 8, 6], [12, 18, 8, 6]])
    ref = np.stack([images[i, t : t + 8, l : l + 6] for i, (t, l, _, _) in enumerate(boxes)])
    np.testing.assert_array_equal(L.local_crop(images, boxes), ref)  # size from concrete boxes
    jitted = jax.jit(L.local_crop, static_argnums=2)
    np.testing.assert_array_equal(jitted(images, boxes, (8, 6)), ref)  # traced boxes, static size
    # A shared box / a shared (batch 1) image broadcast.
    np.testing.assert_array_equal(L.local_crop(images, boxes[1]), images[:, 5:13, 10:16])
    np.testing.assert_array_equal(L.local_crop(images[:1], boxes), np.stack([images[0, t : t + 8, l : l + 6] for t, l, _, _ in boxes]))
    with pytest.raises(ValueError, match="same"):
        L.local_crop(images, np.array([[0, 0, 8, 6], [0, 0, 4, 6], [0, 0, 8, 6]]))
    with pytest.raises(ValueError, match="does not fit"):
        L.local_crop(images, boxes, (30, 6))
    with pytest.raises(ValueError, match="static crop size"):
        jax.jit(L.local_crop)(images, boxes)


# --------------------------------------------------------------------------- gradient penalty


def test_gradient_penalty_linear_critic():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1, 6, 5, 3)).astype(np.float32) * 0.2
    real = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
    fake = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
    mask = np.zeros((1, 6, 5, 1), np.float32)
    mask[:, 1:4, 2:5] = 1

    def critic(x):  # [B, H, W, C] -> [B, 1]; its gradient is `weight` everywhere
        return jnp.sum(x * weight, axis=(1, 2, 3))[:, None] + 0.5

    slope = np.sqrt(np.sum(weight**2 * mask))
    alpha = rng.uniform(size=(4, 1)).astype(np.float32)
    np.testing.assert_allclose(L.gradient_penalty(critic, real, fake, mask, alpha), (slope - 1) ** 2, rtol=1e-5)
    full = np.sqrt(np.sum(weight**2))
    np.testing.assert_allclose(
        L.gradient_penalty(critic, real, fake, None, key=jax.random.key(1)), (full - 1) ** 2, rtol=1e-5
    )
    pen, out = L.gradient_penalty(critic, real, fake, mask, alpha, return_output=True)
    x = real + alpha[:, :, None, None] * (fake - real)
    np.testing.assert_allclose(out, np.sum(x * weight, axis=(1, 2, 3))[:, None] + 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="PRNG key"):
        L.gradient_penalty(critic, real, fake, mask)


def test_gradient_penalty_quadratic_critic_per_sample():
    """Non-constant gradient: critic sum(x^2) has gradient 2x at the interpolate."""
    rng = np.random.default_rng(1)
    real = rng.standard_normal((3, 4, 4, 2)).astype(np.float32) * 0.1
    fake = rng.standard_normal((3, 4, 4, 2)).astype(np.float32) * 0.1
    alpha = np.array([[0.0], [0.5], [1.0]], np.float32)
    pen = L.gradient_penalty(lambda x: jnp.sum(x**2, axis=(1, 2, 3)), real, fake, None, alpha)
    x = real + alpha[:, :, None, None] * (fake - real)
    slopes = np.sqrt(np.sum((2 * x) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(pen, np.mean((slopes - 1) ** 2), rtol=1e-5)


def test_deepfill_v1_losses_per_image_masks_and_key():
    """Per-image masks and boxes: each image's local crop and crop mask are its own."""
    rng = np.random.default_rng(2)
    b, size, crop = 2, 32, 16
    gt = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    x1 = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    x2 = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    boxes = np.array([[2, 4, crop, crop], [14, 10, crop, crop]])
    mask = np.zeros((b, size, size, 1), np.float32)
    mask[0, 5:15, 8:18] = 1
    mask[1, 16:28, 12:24] = 1
    w_local = rng.standard_normal((1, crop, crop, 3)).astype(np.float32) * 0.1
    w_global = rng.standard_normal((1, size, size, 3)).astype(np.float32) * 0.1
    local = lambda x: jnp.sum(x * w_local, axis=(1, 2, 3))[:, None]  # noqa: E731
    glob = lambda x: jnp.sum(x * w_global, axis=(1, 2, 3))[:, None]  # noqa: E731
    out = L.deepfill_v1_losses(local, glob, gt, x1, x2, mask, boxes, key=jax.random.key(0))
    crop_mask = np.stack([mask[i, t : t + crop, l : l + crop] for i, (t, l, _, _) in enumerate(boxes)])
    slopes = np.sqrt(np.sum(w_local**2 * crop_mask, axis=(1, 2, 3)))  # linear critic: per-image slopes
    np.testing.assert_allclose(out["gp_penalty_local"], np.mean((slopes - 1) ** 2), rtol=1e-5)
    slopes = np.sqrt(np.sum(w_global**2 * mask, axis=(1, 2, 3)))
    np.testing.assert_allclose(out["gp_penalty_global"], np.mean((slopes - 1) ** 2), rtol=1e-5)
    complete = x2 * mask + gt * (1 - mask)
    gt_c = np.stack([gt[i, t : t + crop, l : l + crop] for i, (t, l, _, _) in enumerate(boxes)])
    cm_c = np.stack([complete[i, t : t + crop, l : l + crop] for i, (t, l, _, _) in enumerate(boxes)])
    d_local = np.sum(np.concatenate([gt_c, cm_c]) * w_local, axis=(1, 2, 3))[:, None]
    np.testing.assert_allclose(out["d_pos_neg_local"], d_local, rtol=1e-5, atol=1e-6)
    keep = 1 - mask
    ae = (1.2 * np.mean(np.abs(gt - x1) * keep) + np.mean(np.abs(gt - x2) * keep)) / np.mean(keep)
    np.testing.assert_allclose(out["ae_loss"], ae, rtol=1e-5)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    with pytest.raises(ValueError, match="PRNG key"):
        L.deepfill_v1_losses(local, glob, gt, x1, x2, mask, boxes)
    # the generator's part: the same losses with the critics on the completed images only
    calls = []
    counted = lambda critic: lambda x: calls.append(x.shape[0]) or critic(x)  # noqa: E731
    part = L.deepfill_v1_losses(counted(local), counted(glob), gt, x1, x2, mask, boxes, generator_only=True)
    assert calls == [b, b] and set(part) == {"l1_loss", "ae_loss", "g_loss", "g_loss_local", "g_loss_global",
                                             "batch_complete"}
    for name in part:
        np.testing.assert_allclose(part[name], out[name], rtol=1e-6, atol=1e-7)


def test_pair_interleaves_and_unpair_inverts():
    a = jnp.arange(6.0).reshape(3, 2)
    b = -jnp.arange(6.0).reshape(3, 2) - 1
    x = L.pair(a, b)
    assert x.shape == (6, 2)
    np.testing.assert_array_equal(x[0::2], a)
    np.testing.assert_array_equal(x[1::2], b)
    p, n = L.unpair(x)
    np.testing.assert_array_equal(p, a)
    np.testing.assert_array_equal(n, b)
