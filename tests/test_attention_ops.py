"""Tests of jattn.ops.attention and jattn.ops.resize against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops import attention as A
from jattn.ops.resize import nearest_align_corners_indices, resize_nearest_align_corners


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _ref_weights(q, k, scale=None, bias=None, mask=None):
    """numpy float64 softmax(scale q k^T + bias) for [B, T, N, H] inputs -> [B, N, T, S]."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -1e30)
    return _softmax(logits)


def _ref_attention(q, k, v, **kw):
    return np.einsum("bnts,bsnh->btnh", _ref_weights(q, k, **kw), v.astype(np.float64))


B, T, S, N, H = 2, 5, 7, 3, 4


@pytest.fixture(scope="module")
def qkv():
    return _rand(0, B, T, N, H), _rand(1, B, S, N, H), _rand(2, B, S, N, H)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_dot_product_attention_4d_matches_reference(qkv, use_mask, use_bias):
    q, k, v = qkv
    mask = np.random.default_rng(3).random((B, 1, T, S)) > 0.3 if use_mask else None
    if mask is not None:
        mask[..., 0] = True  # no fully masked rows
    bias = _rand(4, 1, N, T, S) if use_bias else None
    out = A.dot_product_attention(q, k, v, mask=mask, bias=bias)
    assert out.shape == (B, T, N, H)
    np.testing.assert_allclose(out, _ref_attention(q, k, v, mask=mask, bias=bias), atol=1e-5)
    w = A.attention_weights(q, k, mask=mask, bias=bias)
    assert w.shape == (B, N, T, S)
    np.testing.assert_allclose(w, _ref_weights(q, k, mask=mask, bias=bias), atol=1e-5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    if mask is not None:
        assert np.all(np.asarray(w)[np.broadcast_to(~mask, w.shape)] == 0)


def test_dot_product_attention_scale(qkv):
    q, k, v = qkv
    out = A.dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out, _ref_attention(q, k, v, scale=1.0), atol=1e-5)
    # the default really is 1 / sqrt(H): it differs from the unscaled result
    assert not np.allclose(A.dot_product_attention(q, k, v), out, atol=1e-3)


@pytest.mark.parametrize("dv", [6, 3, 12])
def test_dot_product_attention_3d(dv):
    d = 6
    q, k, v = _rand(5, B, T, d), _rand(6, B, S, d), _rand(7, B, S, dv)
    mask = np.random.default_rng(8).random((B, T, S)) > 0.4
    mask[..., -1] = True
    bias = _rand(9, B, T, S)
    out = A.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.7)
    assert out.shape == (B, T, dv)
    ref = _ref_attention(
        q[:, :, None], k[:, :, None], v[:, :, None],
        mask=mask[:, None], bias=bias[:, None], scale=0.7,
    )[:, :, 0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    w = A.attention_weights(q, k, mask=mask, bias=bias, scale=0.7)
    assert w.shape == (B, 1, T, S)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.einsum("bts,bsd->btd", w[:, 0], v), out, atol=1e-5)


def test_cudnn_on_cpu_raises(qkv):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv)
    assert jax.default_backend() == "cpu"
    with pytest.raises(RuntimeError):
        A.dot_product_attention(q, k, v, implementation="cudnn")


def test_dot_product_attention_jit_vmap_grad(qkv):
    q, k, v = qkv
    ref = A.dot_product_attention(q, k, v)
    np.testing.assert_allclose(jax.jit(A.dot_product_attention)(q, k, v), ref, atol=1e-6)
    # vmap over the batch of single-example calls
    per = jax.jit(jax.vmap(lambda a, b, c: A.dot_product_attention(a[None], b[None], c[None])[0]))
    np.testing.assert_allclose(per(q, k, v), ref, atol=1e-6)
    g = jax.jit(jax.grad(lambda a: jnp.sum(A.dot_product_attention(a, k, v) ** 2)))(q)
    assert g.shape == q.shape and np.all(np.isfinite(g)) and np.any(g != 0)


def test_dot_product_attention_bf16(qkv):
    q, k, v = qkv
    out = A.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _ref_attention(q, k, v), atol=5e-2)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((B, T), (B, S), (B, S)), "rank"),
        (((B, T, N, H), (B, S, H), (B, S, H)), "same rank"),
        (((B, T, N, H), (B, S, N, H + 1), (B, S, N, H + 1)), "feature dims"),
        (((B, T, N, H), (B + 1, S, N, H), (B + 1, S, N, H)), "batch"),
        (((B, T, N, H), (B, S, N + 1, H), (B, S, N + 1, H)), "head counts"),
        (((B, T, N, H), (B, S, N, H), (B, S + 1, N, H)), "must share"),
    ],
)
def test_dot_product_attention_value_errors(shapes, match):
    arrays = [jnp.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        A.dot_product_attention(*arrays)


def test_mask_rank_error(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="mask"):
        A.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 1, T, S), bool))
    with pytest.raises(ValueError, match="bias"):
        A.attention_weights(q[:, :, 0], k[:, :, 0], bias=jnp.ones((1, B, T, S)))


# --------------------------------------------------------------------------- additive
def _ref_additive(q, k, v, w_q, w_k, vv, mask=None):
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    hidden = np.tanh((q @ w_q)[:, :, None, :] + (k @ w_k)[:, None, :, :])
    scores = hidden @ vv
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    w = _softmax(scores)
    return w @ v, w


@pytest.fixture(scope="module")
def additive_args():
    return (_rand(10, B, T, 3), _rand(11, B, S, 5), _rand(12, B, S, 4),
            _rand(13, 3, 6), _rand(14, 5, 6), _rand(15, 6))


def test_additive_attention_matches_reference(additive_args):
    out, w = A.additive_attention(*additive_args)
    ref_out, ref_w = _ref_additive(*additive_args)
    assert out.shape == (B, T, 4) and w.shape == (B, T, S)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_additive_attention_mask(additive_args):
    mask = np.random.default_rng(16).random((B, T, S)) > 0.5
    mask[..., 2] = True
    out, w = A.additive_attention(*additive_args, mask=mask)
    ref_out, ref_w = _ref_additive(*additive_args, mask=mask)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    assert np.all(np.asarray(w)[~mask] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_additive_attention_vmap(additive_args):
    q, k, v, *params = additive_args
    stacked = [np.stack([a, 2 * a]) for a in (q, k, v)]
    out, _ = jax.jit(jax.vmap(lambda a, b, c: A.additive_attention(a, b, c, *params)))(*stacked)
    np.testing.assert_allclose(out[1], A.additive_attention(2 * q, 2 * k, 2 * v, *params)[0], atol=1e-6)


@pytest.mark.parametrize(
    "index, shape, match",
    [
        (0, (B, T), "query must have rank 3"),
        (2, (B, S + 1, 4), "must share"),
        (3, (4, 6), "w_q"),
        (4, (5, 7), "attention dims"),
        (5, (6, 1), "v must have rank 1"),
    ],
)
def test_additive_attention_value_errors(additive_args, index, shape, match):
    args = list(additive_args)
    args[index] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=match):
        A.additive_attention(*args)


# --------------------------------------------------------------------------- multi-head
def _ref_mha(x_q, x_kv, w_q, w_k, w_v, w_o, num_heads, b=None, mask=None):
    b = b or {}
    q = x_q @ w_q + b.get("q", 0)
    k = x_kv @ w_k + b.get("k", 0)
    v = x_kv @ w_v + b.get("v", 0)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, -1)  # noqa: E731
    o = _ref_attention(split(q), split(k), split(v), mask=mask)
    return o.reshape(o.shape[0], o.shape[1], -1) @ w_o + b.get("o", 0)


@pytest.mark.parametrize("with_bias_and_mask", [False, True])
def test_multi_head_attention_matches_reference(with_bias_and_mask):
    x_q, x_kv = _rand(20, B, T, 6), _rand(21, B, S, 5)
    w = dict(w_q=_rand(22, 6, 8), w_k=_rand(23, 5, 8), w_v=_rand(24, 5, 8), w_o=_rand(25, 8, 7))
    b, mask, kw = None, None, {}
    if with_bias_and_mask:
        b = dict(q=_rand(26, 8), k=_rand(27, 8), v=_rand(28, 8), o=_rand(29, 7))
        mask = np.random.default_rng(30).random((B, 1, T, S)) > 0.3
        mask[..., 0] = True
        kw = dict(b_q=b["q"], b_k=b["k"], b_v=b["v"], b_o=b["o"], mask=mask)
    out = A.multi_head_attention(x_q, x_kv, **w, num_heads=2, **kw)
    assert out.shape == (B, T, 7)
    ref = _ref_mha(x_q, x_kv, *w.values(), num_heads=2, b=b, mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)


def test_multi_head_attention_value_errors():
    x = np.zeros((B, T, 6), np.float32)
    w = np.zeros((6, 8), np.float32)
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        A.multi_head_attention(x, x, w, w, w, w.T, num_heads=3)
    with pytest.raises(ValueError, match="w_k"):
        A.multi_head_attention(x, x, w, np.zeros((5, 8)), w, w.T, num_heads=2)
    with pytest.raises(ValueError, match="projection widths"):
        A.multi_head_attention(x, x, w, w, w, np.zeros((4, 6)), num_heads=2)
    with pytest.raises(ValueError, match="x_q must have rank 3"):
        A.multi_head_attention(x[0], x, w, w, w, w.T, num_heads=2)


def test_relative_position_index():
    h, w = 3, 4
    idx = A.relative_position_index(h, w)
    assert idx.shape == (h * w, h * w)
    assert idx.min() == 0 and idx.max() == (2 * h - 1) * (2 * w - 1) - 1
    assert np.all(np.diag(idx) == (h - 1) * (2 * w - 1) + (w - 1))
    # position (0, 0) vs (2, 3): dy = -2, dx = -3 -> (0, 0) entry of the table
    assert idx[0, 2 * w + 3] == 0
    # same offset, same entry
    assert idx[1, 0] == idx[w + 1, w]
    with pytest.raises(ValueError):
        A.relative_position_index(0, 3)


# --------------------------------------------------------------------------- resize
def test_nearest_align_corners_indices():
    np.testing.assert_array_equal(
        nearest_align_corners_indices(32, 16),
        [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31],
    )
    np.testing.assert_array_equal(
        nearest_align_corners_indices(64, 32),
        list(range(0, 31, 2)) + list(range(33, 64, 2)),
    )
    np.testing.assert_array_equal(nearest_align_corners_indices(16, 32), np.arange(32) // 2)
    # exact halves round away from zero (roundf), not to even: 3 -> 5 has scale 0.5
    np.testing.assert_array_equal(nearest_align_corners_indices(3, 5), [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(nearest_align_corners_indices(7, 1), [0])


def test_resize_nearest_align_corners():
    x = jnp.asarray(_rand(40, 2, 32, 64, 3))
    y = resize_nearest_align_corners(x, 16, 32)
    assert y.shape == (2, 16, 32, 3)
    rows = nearest_align_corners_indices(32, 16)
    cols = nearest_align_corners_indices(64, 32)
    np.testing.assert_array_equal(y, np.asarray(x)[:, rows][:, :, cols])
    up = resize_nearest_align_corners(x[:, :16, :16], 32, 32)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(x[:, :16, :16], 2, 1), 2, 2))
    assert jax.jit(resize_nearest_align_corners, static_argnums=(1, 2))(x, 16, 32).shape == y.shape
    with pytest.raises(ValueError, match="NHWC|\\[B, H, W, C\\]"):
        resize_nearest_align_corners(x[0], 4, 4)


def test_exact_doubling_is_a_repeat_and_its_gradient_sums_blocks():
    """n -> 2n picks i // 2 (so it is computed as a repeat): every n up to 2048 here, the
    module checked up to its stated bound; one axis doubled and one not match the indices."""
    from jattn.ops import resize

    for n in range(1, 2049):
        np.testing.assert_array_equal(nearest_align_corners_indices(n, 2 * n), np.arange(2 * n) // 2)
    assert resize._REPEAT_CHECKED_UP_TO >= 2048
    x = jnp.asarray(_rand(41, 2, 12, 9, 3))
    y = resize_nearest_align_corners(x, 24, 14)  # rows doubled, columns gathered
    np.testing.assert_array_equal(y, np.asarray(x)[:, np.arange(24) // 2][:, :, nearest_align_corners_indices(9, 14)])
    g = jax.grad(lambda x: jnp.sum(resize_nearest_align_corners(x, 24, 18) * jnp.arange(18.0)[:, None]))(x)
    # column j feeds output columns 2j, 2j+1 of two output rows each: 2 (2j + 2j + 1)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to((8.0 * np.arange(9) + 2)[:, None], x.shape))
