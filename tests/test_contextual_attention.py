"""Contextual attention: parity with the official DeepFill op, blocked == dense, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops.contextual import contextual_attention
from jattn.ops.flow import flow_to_color

GOLDEN_CASES = [
    "ca_32x32x16_r1_mask_fuse",
    "ca_32x32x16_r1_nomask_fuse",
    "ca_32x32x16_r2_fullmask_fuse",
    "ca_32x32x16_r2_mask_fuse",
    "ca_32x32x16_r2_mask_nofuse",
    "ca_64x64x8_r1_mask_fuse",
    "ca_64x64x8_r2_mask_fuse",
]


def _load_case(golden_dir, name):
    path = golden_dir / "contextual_attention" / f"{name}.npz"
    assert path.is_file(), f"golden file missing: {path}"
    data = np.load(path)
    cfg = json.loads(str(data["config_json"]))
    mask = data["mask"] if bool(data["has_mask"]) else None
    return data, cfg, mask


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_matches_official_op(golden_dir, name):
    data, cfg, mask = _load_case(golden_dir, name)
    y, offsets = jax.jit(lambda f, b, m: contextual_attention(f, b, m, **cfg))(data["f"], data["b"], mask)
    atol = 2e-4 if data["f"].shape[-1] >= 128 else 1e-4
    np.testing.assert_allclose(np.asarray(y), data["y"], atol=atol, rtol=0)
    np.testing.assert_array_equal(np.asarray(offsets), data["offsets_rel"])
    assert offsets.dtype == jnp.int32


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_blocked_matches_official_op(golden_dir, name):
    data, cfg, mask = _load_case(golden_dir, name)
    w = data["f"].shape[2] // cfg["rate"]
    y, offsets = contextual_attention(data["f"], data["b"], mask, block_size=w, **cfg)
    np.testing.assert_allclose(np.asarray(y), data["y"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(offsets), data["offsets_rel"])


@pytest.mark.parametrize("name", GOLDEN_CASES)
@pytest.mark.parametrize("version,upsample", [("v1", "nearest"), ("v2", "bilinear")])
def test_flow_matches_official_picture(golden_dir, name, version, upsample):
    data, cfg, _ = _load_case(golden_dir, name)
    img = np.asarray(flow_to_color(jnp.asarray(data["offsets_rel"]), cfg["rate"], upsample))
    ref = data[f"flow_{version}"]
    assert img.shape == ref.shape
    assert np.abs(img - ref).max() * 127.5 <= 1.0 + 1e-4  # within one uint8 step


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_in_model_case_matches_official(golden_dir, version):
    """The op inside the official network: 64x64 features, C = 128 (v1) / 96 (v2), rate 2."""
    path = golden_dir / "deepfill_official" / f"{version}_seed1" / "intermediates.npz"
    assert path.is_file(), f"golden file missing: {path}"
    data = np.load(path)
    y, _ = contextual_attention(data["ca_f"], data["ca_f"], data["mask_s"], rate=2)
    np.testing.assert_allclose(np.asarray(y), data["ca_y"], atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- own behaviour


def _inputs(seed=0, batch=2, size=32, channels=4):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    masks = np.zeros((batch, size, size, 1), np.float32)
    masks[0, size // 4 : size // 2, size // 4 : 3 * size // 4] = 1
    if batch > 1:
        masks[1, : size // 3, : size // 2] = 1
    return f, masks


BLOCK_CASES = [
    # size, rate, fuse_k, fuse, block_size
    (32, 1, 3, True, 64),
    pytest.param(32, 1, 3, True, 1, marks=pytest.mark.slow),  # one-row blocks (CI time: slow)
    (64, 2, 3, True, 64),
    pytest.param(48, 2, 3, True, 96, marks=pytest.mark.slow),
    pytest.param(32, 1, 5, True, 64, marks=pytest.mark.slow),
    (32, 1, 4, True, 64),  # even fuse_k: asymmetric offsets
    (32, 2, 3, False, 16),
]


@pytest.mark.parametrize("size,rate,fuse_k,fuse,block_size", BLOCK_CASES)
def test_blocked_equals_dense_value_and_gradient(size, rate, fuse_k, fuse, block_size):
    f, masks = _inputs(size=size)
    b = f[::-1] * 0.5 + 0.1  # b different from f
    kw = dict(rate=rate, fuse_k=fuse_k, fuse=fuse)
    yd, od = contextual_attention(f, b, masks, **kw)
    yb, ob = contextual_attention(f, b, masks, block_size=block_size, **kw)
    np.testing.assert_allclose(np.asarray(yb), np.asarray(yd), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(ob), np.asarray(od))

    weights = jnp.asarray(np.random.default_rng(1).standard_normal(f.shape).astype(np.float32))

    def loss(f, b, block):
        y, _ = contextual_attention(f, b, masks, block_size=block, **kw)
        return jnp.mean(y * weights) * 100.0

    gd = jax.grad(loss, argnums=(0, 1))(f, b, None)
    gb = jax.grad(loss, argnums=(0, 1))(f, b, block_size)
    for d, bl in zip(gd, gb):
        assert np.isfinite(np.asarray(d)).all()
        np.testing.assert_allclose(np.asarray(bl), np.asarray(d), atol=1e-5, rtol=0)


def test_blocked_path_really_blocks():
    """A small block must split the scores: the jaxpr runs a loop over blocks."""
    f, masks = _inputs(size=64)
    jaxpr = jax.make_jaxpr(lambda f: contextual_attention(f, f, masks, rate=2, block_size=64))(f)
    assert "scan" in str(jaxpr) or "while" in str(jaxpr)
    dense = jax.make_jaxpr(lambda f: contextual_attention(f, f, masks, rate=2))(f)
    assert "scan" not in str(dense)


@pytest.mark.parametrize("rows", [1, 2])
def test_blocked_path_memory_is_a_few_copies_of_a_blocks_scores(rows):
    """XLA's memory analysis of the blocked program (compiled, not run): a block of `rows`
    query rows holds the window products of its rows + 4 rows and the scores of its
    rows + 2 rows (the fuse step's reach), then its own rows' fused scores, attention and
    paste; everything else is smaller. So its temporaries stay within 4 arrays of rows + 2
    rows of scores and 2 of its own rows (one row: [B, w, L] float32)."""
    size, channels = 256, 32
    h = w = size // 2
    f = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
    fn = jax.jit(lambda f, m: contextual_attention(f, f, m, rate=2, block_size=rows * w))
    temp = fn.lower(f, mask).compile().memory_analysis().temp_size_in_bytes
    row = w * (h * w) * 4
    assert temp <= (4 * (rows + 2) + 2 * rows) * row, temp / row


@pytest.mark.parametrize("rate", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_per_image_masks_equal_running_each_image_alone(rate):
    f, masks = _inputs(batch=3, size=32)
    masks[2, 20:, 5:30] = 1
    y, off = contextual_attention(f, f, masks, rate=rate)
    for i in range(3):
        yi, oi = contextual_attention(f[i : i + 1], f[i : i + 1], masks[i : i + 1], rate=rate)
        np.testing.assert_allclose(np.asarray(y[i : i + 1]), np.asarray(yi), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(off[i : i + 1]), np.asarray(oi))


def test_shared_mask_equals_tiled_mask():
    f, masks = _inputs(batch=2)
    shared = masks[:1]
    y1, o1 = contextual_attention(f, f, shared, rate=2)
    y2, o2 = contextual_attention(f, f, np.repeat(shared, 2, axis=0), rate=2)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-7, rtol=0)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))


def test_mask_changes_the_result_and_full_hole_gives_zero():
    f, masks = _inputs(batch=1)
    y_nomask, _ = contextual_attention(f, f, None, rate=2)
    y_mask, off = contextual_attention(f, f, masks, rate=2)
    assert np.abs(np.asarray(y_nomask - y_mask)).max() > 1e-3
    y_full, _ = contextual_attention(f, f, np.ones_like(masks), rate=2)
    assert np.abs(np.asarray(y_full)).max() == 0.0
    # offsets never point at a patch that touches the hole (every valid patch is hole-free)
    h = w = 16
    arg_y = np.asarray(off[0, ..., 0]) + np.arange(h)[:, None]
    arg_x = np.asarray(off[0, ..., 1]) + np.arange(w)[None, :]
    assert (arg_y >= 0).all() and (arg_y < h).all() and (arg_x >= 0).all() and (arg_x < w).all()


def test_gradient_matches_finite_differences():
    from jax.test_util import check_grads

    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        f = jnp.asarray(rng.standard_normal((1, 8, 8, 2)))
        b = jnp.asarray(rng.standard_normal((1, 8, 8, 2)))
        mask = np.zeros((1, 8, 8, 1))
        mask[:, 2:4, 2:5] = 1

        def fn(f, b):
            return contextual_attention(f, b, mask, rate=2, softmax_scale=2.0)[0]

        # forward and reverse mode, to second order (the dense fuse step's custom JVP)
        check_grads(fn, (f, b), order=2, modes=["fwd", "rev"], eps=1e-4, atol=1e-5, rtol=1e-5)


def test_jit_and_vmap():
    f, masks = _inputs(batch=2)
    fn = lambda f: contextual_attention(f, f, masks[:1], rate=2)  # noqa: E731
    y, off = fn(f)
    yj, oj = jax.jit(fn)(f)
    np.testing.assert_allclose(np.asarray(yj), np.asarray(y), atol=1e-6)
    stacked = np.stack([f, f[::-1]])  # [2, B, H, W, C]
    yv, ov = jax.vmap(fn)(stacked)
    np.testing.assert_allclose(np.asarray(yv[0]), np.asarray(y), atol=1e-6)
    np.testing.assert_allclose(np.asarray(yv[1]), np.asarray(fn(f[::-1])[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ov[0]), np.asarray(off))


def test_bfloat16_runs_and_is_close():
    f, masks = _inputs(batch=2, channels=8)
    y32, _ = contextual_attention(f, f, masks, rate=2)
    fb = jnp.asarray(f, jnp.bfloat16)
    y16, off = contextual_attention(fb, fb, masks, rate=2)
    assert y16.dtype == jnp.bfloat16 and off.dtype == jnp.int32
    y16 = np.asarray(y16.astype(jnp.float32))
    assert np.isfinite(y16).all()
    assert np.abs(y16 - np.asarray(y32)).max() < 0.1 * np.abs(np.asarray(y32)).max()


def test_output_shapes():
    f, masks = _inputs(batch=2, size=32, channels=4)
    y, off = contextual_attention(f, f, masks, rate=2)
    assert y.shape == f.shape and y.dtype == jnp.float32
    assert off.shape == (2, 16, 16, 2)
    wide = np.random.default_rng(0).standard_normal((1, 16, 24, 3)).astype(np.float32)
    y, off = contextual_attention(wide, wide, rate=2)
    assert y.shape == wide.shape and off.shape == (1, 8, 12, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(f=np.zeros((4, 4, 3), np.float32)), "4-D"),
        (dict(b=np.zeros((1, 16, 8, 3), np.float32)), "same shape"),
        (dict(f=np.zeros((1, 15, 16, 3), np.float32), b=np.zeros((1, 15, 16, 3), np.float32), rate=2), "divisible by rate"),
        (dict(mask=np.zeros((1, 8, 8, 1), np.float32)), "mask size"),
        (dict(mask=np.zeros((3, 16, 16, 1), np.float32)), "mask batch"),
        (dict(mask=np.zeros((16, 16), np.float32)), "mask must be"),
        (dict(stride=2), "stride"),
        (dict(block_size=0), "block_size"),
        (dict(rate=0), "rate"),
        (dict(f=np.zeros((1, 16, 16, 3), np.int32), b=np.zeros((1, 16, 16, 3), np.int32)), "float"),
    ],
)
def test_errors_name_the_problem(kwargs, match):
    args = dict(f=np.zeros((2, 16, 16, 3), np.float32), b=np.zeros((2, 16, 16, 3), np.float32), mask=None)
    args.update(kwargs)
    f, b, mask = args.pop("f"), args.pop("b"), args.pop("mask")
    with pytest.raises(ValueError, match=match):
        contextual_attention(f, b, mask, **args)


def test_flow_to_color_basics():
    zero = jnp.zeros((1, 4, 4, 2), jnp.int32)
    img = flow_to_color(zero)
    assert img.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(np.asarray(img), 1.0)  # no motion: white
    off = jnp.asarray(np.random.default_rng(0).integers(-5, 6, (2, 8, 8, 2)), jnp.int32)
    img = flow_to_color(off, rate=2, upsample="bilinear")
    assert img.shape == (2, 16, 16, 3)
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    with pytest.raises(ValueError, match="upsample"):
        flow_to_color(off, rate=2, upsample="cubic")
    with pytest.raises(ValueError, match="offsets"):
        flow_to_color(off[..., :1])
