"""RCAN: layout, parameter count of the official model, mean shift, pixel shuffle, task."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.rcan import DIV2K_RGB_MEAN, RCAN, init_rcan, pixel_shuffle, upsampler_factors
from jattn.train.task import build_task
from jattn.train.tasks.rcan import PSNR_CAP, sr_metrics, upscale_bicubic
from task_helpers import fit, init, init_key, jit, task_config

TINY = dict(n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(model, h=6, w=5):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))


@pytest.fixture(scope="module")
def nl_params():
    """Initialised params of a tiny RCAN x2 with the non-local block."""
    return flax.core.unfreeze(init(RCAN(2, non_local=True, **TINY), jnp.zeros((1, 6, 6, 3)))["params"])


def test_rcan_x4_parameter_count_matches_official():
    # official RCAN_TrainCode x4 model: 15,592,379 numel, of which 2 x 12 are the fixed
    # MeanShift 1x1 convs (weights and biases) that jattn keeps as constants
    v = jax.eval_shape(RCAN(4).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert set(v) == {"params"}
    assert _count(v["params"]) == 15_592_379 - 24 == 15_592_355
    assert abs(_count(v["params"]) / 1e6 - 15.6) < 0.05  # the paper's "about 15.6 M"


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shapes_and_upsampler_layout(scale):
    model = RCAN(scale, **TINY)
    params = _abstract(model)["params"]
    out = jax.eval_shape(model.apply, {"params": params}, jnp.ones((2, 6, 5, 3)))
    assert out.shape == (2, 6 * scale, 5 * scale, 3) and out.dtype == jnp.float32
    ups = params["upsampler"]
    factors = upsampler_factors(scale)
    assert factors == {2: (2,), 3: (3,), 4: (2, 2)}[scale]
    assert sorted(ups) == [f"conv_{i}" for i in range(len(factors))]
    for i, r in enumerate(factors):
        assert ups[f"conv_{i}"]["kernel"].shape == (3, 3, 16, r * r * 16)
    # residual groups of RCABs with channel attention (1x1 convs C -> C/r -> C), a conv per group
    group = params["group_0"]
    assert sorted(group) == ["conv", "rcab_0", "rcab_1"]
    assert group["rcab_0"]["ca"]["reduce"]["kernel"].shape == (1, 1, 16, 4)
    assert group["rcab_0"]["ca"]["expand"]["kernel"].shape == (1, 1, 4, 16)
    assert {"head", "body_conv", "tail"} <= set(params)


def test_unsupported_scale_raises():
    with pytest.raises(ValueError, match="scales"):
        _abstract(RCAN(5, **TINY))


def test_pixel_shuffle_uses_pytorch_channel_order():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)  # C = 2 output channels, r = 2
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(y[0, :, :, 1], [[4, 5], [6, 7]])


def test_mean_shift_convention(nl_params):
    # with a zero tail conv the network adds nothing: out = m = 2 * DIV2K mean - 1
    params = {k: v for k, v in nl_params.items() if k != "non_local"}
    params["tail"] = jax.tree_util.tree_map(jnp.zeros_like, params["tail"])
    x = jax.random.uniform(jax.random.key(1), (1, 6, 6, 3), minval=-1, maxval=1)
    run = jit(lambda p, x, model: model.apply({"params": p}, x), static_argnums=2)
    out = run(params, x, RCAN(2, **TINY))
    expected = 2 * np.asarray(DIV2K_RGB_MEAN) - 1
    np.testing.assert_allclose(np.asarray(out[0, 3, 4]), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(run(params, x, RCAN(2, rgb_mean=None, **TINY))), 0.0, atol=1e-6)


def test_non_local_block_is_present_and_identity_at_init(nl_params):
    assert sorted(nl_params["non_local"]) == ["W", "g", "phi", "theta"]
    x = jax.random.uniform(jax.random.key(2), (2, 6, 6, 3), minval=-1, maxval=1)
    run = jit(lambda p, x, model: model.apply({"params": p}, x), static_argnums=2)
    out_nl = run(nl_params, x, RCAN(2, non_local=True, **TINY))
    out_plain = run({k: v for k, v in nl_params.items() if k != "non_local"}, x, RCAN(2, **TINY))
    np.testing.assert_allclose(np.asarray(out_nl), np.asarray(out_plain), atol=1e-5)
    # and the block does act once W is non-zero
    moved = {**nl_params, "non_local": {**nl_params["non_local"], "W": {"kernel": jnp.ones_like(nl_params["non_local"]["W"]["kernel"]),
                                                                       "bias": nl_params["non_local"]["W"]["bias"]}}}
    assert float(jnp.max(jnp.abs(run(moved, x, RCAN(2, non_local=True, **TINY)) - out_nl))) > 1e-3


def test_init_rcan_uses_pytorch_conv_variance(nl_params):
    # same key: every kernel is Flax's default divided by sqrt(3) (variance 1 / (3 fan_in)), the rest equal
    model = RCAN(2, non_local=True, **TINY)
    scaled = jit(lambda k: init_rcan(model, k, jnp.zeros((1, 6, 6, 3))))(init_key(0))["params"]
    flat = dict(jax.tree_util.tree_leaves_with_path(scaled))
    assert len(flat) == len(jax.tree_util.tree_leaves(nl_params))
    kernels = 0
    for path, ref in jax.tree_util.tree_leaves_with_path(nl_params):
        factor = 1 / math.sqrt(3) if path[-1].key == "kernel" else 1.0
        kernels += path[-1].key == "kernel"
        np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(ref) * factor, rtol=1e-6, err_msg=str(path))
    assert kernels == 1 + 2 * 4 + 1 + 1 + 1 + 1 + 4  # head, 2 RCABs x (2 convs + CA's 2), group, body, up, tail, non-local


@pytest.mark.slow
def test_full_rcan_starts_at_a_sane_scale():
    # the official 10 x 20 trunk: Flax's default variance blows the output up at init, PyTorch's does not
    model = RCAN(2)
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
    run = jit(lambda k, scaled: model.apply(init_rcan(model, k, x) if scaled else model.init(k, x), x), static_argnums=1)
    assert float(jnp.std(run(init_key(0), True))) < 2.0
    assert float(jnp.std(run(init_key(0), False))) > 1e3


def _smooth_images(n, size, seed=0):
    """Smooth random images in [-1, 1]: a few low-frequency sinusoids per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.zeros((n, size, size, 3), np.float32)
    for b in range(n):
        for c in range(3):
            for _ in range(3):
                fy, fx, ph = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6.3)]
                out[b, :, :, c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph) / 3
    return jnp.asarray(np.clip(out, -1, 1))


def _sr_batch(n=4, size=24, scale=2):
    hr = _smooth_images(n, size)
    return {"image": hr, "lowres": jax.image.resize(hr, (n, size // scale, size // scale, 3), "bicubic")}


def test_task_fits_a_batch_and_reports_sr_metrics():
    config = task_config({"name": "rcan", **TINY}, image_size=24, lr=2e-3, data={"scale": 2})
    task = build_task(config)
    assert task.fields == ("lowres",) and len(task.updates) == 1
    batch = _sr_batch()
    state, history = fit(task, batch, 25)
    losses = [h["model_loss"] for h in history]
    assert all(h["model_finite"] == 1.0 for h in history)
    assert losses[-1] < 0.5 * losses[0], losses
    out = jit(task.predict)(state.params, state.variables, batch)
    assert out["output"].shape == out["bicubic"].shape == batch["image"].shape
    assert float(jnp.max(jnp.abs(out["output"]))) <= 1.0
    np.testing.assert_allclose(np.asarray(out["bicubic"]), np.asarray(upscale_bicubic(batch["lowres"], (24, 24))))
    m = jit(task.eval_metrics)(out, batch)
    assert set(m) == {"psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y"}
    assert 10 < float(m["psnr_y"]) < PSNR_CAP and 10 < float(m["bicubic_psnr_y"]) < PSNR_CAP


def test_init_without_lowres_field_uses_the_image_shape():
    config = task_config({"name": "rcan", **TINY}, image_size=24, data={"scale": 3})
    task = build_task(config)
    params, _ = jax.eval_shape(task.init, jax.random.key(0), {"image": jnp.zeros((1, 24, 24, 3))})
    assert params["model"]["upsampler"]["conv_0"]["kernel"].shape == (3, 3, 16, 9 * 16)


def test_sr_metrics_hand_computed():
    # gray 127 vs gray 128 (8-bit) everywhere: Y differs by 219 / 255 (BT.601 studio swing)
    level = lambda q: jnp.full((2, 24, 24, 3), q / 127.5 - 1.0)  # noqa: E731
    m = sr_metrics(level(128), level(127), scale=2)
    d = 219.0 / 255.0
    assert float(m["psnr_y"]) == pytest.approx(10 * math.log10(255.0**2 / d**2), abs=1e-3)
    mu_a, mu_b, c1 = 16 + 219 * 128 / 255, 16 + 219 * 127 / 255, (0.01 * 255) ** 2
    assert float(m["ssim_y"]) == pytest.approx((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1), abs=1e-6)
    same = sr_metrics(level(40), level(40), scale=2, prefix="bicubic_")
    assert float(same["bicubic_psnr_y"]) == PSNR_CAP and float(same["bicubic_ssim_y"]) == pytest.approx(1.0)
    # the shave: an error confined to the 2-pixel border does not count
    a = np.full((1, 24, 24, 3), 0.2, np.float32)
    b = a.copy()
    b[:, :2] = -0.9
    assert float(sr_metrics(jnp.asarray(a), jnp.asarray(b), scale=2)["psnr_y"]) == PSNR_CAP
    assert float(sr_metrics(jnp.asarray(a), jnp.asarray(b), scale=1)["psnr_y"]) < 40
