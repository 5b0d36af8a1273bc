"""Tests of the Flax modules in jattn.nn.{attention, channel, conv}."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.nn.attention import (
    AdditiveAttention,
    AttentionGate,
    MultiHeadAttention2D,
    NonLocalBlock,
    SelfAttention2D,
)
from jattn.nn.channel import CBAM, RCAB, ChannelAttention, SqueezeExcitation
from jattn.nn.conv import GatedConv, GenConv, GenDeconv, SNConv, SNDense
from jattn.ops import attention as ops
from jattn.ops import cpu_kernels
from jattn.ops.resize import resize_nearest_align_corners

KEY = jax.random.PRNGKey(0)
B, H, W, C = 2, 8, 8, 16


def _rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


X = _rand(0, B, H, W, C)
G = _rand(1, B, H // 2, W // 2, 12)
SEQ = (_rand(2, B, 5, 6), _rand(3, B, 7, 4), _rand(4, B, 7, 3))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _c1(x, p):
    """1x1 conv reference (float64)."""
    out = np.einsum("bhwc,cd->bhwd", np.asarray(x, np.float64), np.asarray(p["kernel"][0, 0], np.float64))
    return out + np.asarray(p["bias"], np.float64) if "bias" in p else out


def _flat(a):
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _perturb(tree, seed=7, scale=0.1):
    """Adds ``scale * N(0, 1)`` noise (numpy: no JAX random kernels to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (np.asarray(a) + scale * rng.standard_normal(np.shape(a))).astype(a.dtype), tree
    )


def _init(model, *inputs, seed=7, **kw):
    """Random variables shaped like ``model.init``'s, drawn with numpy.

    ``jax.eval_shape`` gives the tree without running the initialisers (compiling a
    JAX random kernel per parameter shape takes ~0.4 s each on a busy 2-core CPU).
    Weights get std ``1 / sqrt(fan_in)``, vectors and scalars std 0.3.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(KEY, *inputs, **kw))

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0
        std = 1 / np.sqrt(fan_in) if fan_in else 0.3
        return (std * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map(draw, shapes)


def _apply(model, variables, *args, **kw):
    """``model.apply`` under jit: one compile is much cheaper here than op-by-op dispatch."""
    static = {k: a for k, a in kw.items() if a is None or isinstance(a, (bool, str))}
    dynamic = {k: a for k, a in kw.items() if k not in static}
    return jax.jit(lambda v, a, d: model.apply(v, *a, **d, **static))(variables, args, dynamic)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# name -> (constructor(**dtype_kwargs), inputs, call kwargs, output shape)
CASES = {
    "SelfAttention2D": (lambda **kw: SelfAttention2D(**kw), (X,), {}, (B, H, W, C)),
    "MultiHeadAttention2D": (
        lambda **kw: MultiHeadAttention2D(4, relative_position_bias=True, residual=True, **kw),
        (X,), {}, (B, H, W, C),
    ),
    "AdditiveAttention": (lambda **kw: AdditiveAttention(8, **kw), SEQ, {}, (B, 5, 3)),
    "NonLocalBlock": (lambda **kw: NonLocalBlock(sub_sample=True, **kw), (X,), {}, (B, H, W, C)),
    "AttentionGate": (lambda **kw: AttentionGate(**kw), (X, G), {}, (B, H, W, C)),
    "SqueezeExcitation": (lambda **kw: SqueezeExcitation(4, **kw), (X,), {}, (B, H, W, C)),
    "ChannelAttention": (lambda **kw: ChannelAttention(4, **kw), (X,), {}, (B, H, W, C)),
    "RCAB": (lambda **kw: RCAB(4, **kw), (X,), {}, (B, H, W, C)),
    "CBAM": (lambda **kw: CBAM(4, **kw), (X,), {}, (B, H, W, C)),
    "GenConv": (lambda **kw: GenConv(8, 3, rate=2, **kw), (X,), {}, (B, H, W, 8)),
    "GatedConv": (lambda **kw: GatedConv(8, 3, stride=2, **kw), (X,), {}, (B, H // 2, W // 2, 8)),
    "GenDeconv": (lambda **kw: GenDeconv(8, **kw), (X,), {}, (B, 2 * H, 2 * W, 8)),
    "SNConv": (lambda **kw: SNConv(8, 3, strides=2, **kw), (X,), {"update_stats": False}, (B, H // 2, W // 2, 8)),
    "SNDense": (lambda **kw: SNDense(8, **kw), (X,), {"update_stats": False}, (B, H, W, 8)),
}


@pytest.fixture(scope="module")
def initialised():
    """name -> random variables (float32; no block is trivially the identity)."""
    return {name: _init(make(), *inputs, **kw) for name, (make, inputs, kw, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_bf16_and_grads(name, initialised):
    make, inputs, kw, shape = CASES[name]
    variables = initialised[name]

    def loss(params):
        y = _first(make().apply({**variables, "params": params}, *inputs, **kw))
        return jnp.mean(y**2), y

    @jax.jit  # one compile for all three: far cheaper than op-by-op dispatch
    def run(v, args):
        (_, y32), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
        y16 = _first(make(dtype=jnp.bfloat16).apply(v, *args, **kw))  # bf16 compute, f32 params
        return y32, grads, y16

    out32, grads, out16 = run(variables, inputs)
    assert out32.shape == shape and out32.dtype == jnp.float32
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)
    assert out16.shape == shape and out16.dtype == jnp.bfloat16
    out16 = np.asarray(out16, np.float32)
    assert np.all(np.isfinite(out16))
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 5e-2, rel


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("AdditiveAttention", "SNDense")])
def test_rank_value_error(name):
    make, inputs, kw, _ = CASES[name]
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        make().init(KEY, inputs[0][0], *inputs[1:], **kw)


# --------------------------------------------------------------------------- SAGAN
def test_self_attention_identity_at_init():
    model = SelfAttention2D()
    v = jax.jit(model.init)(KEY, X)
    assert v["params"]["gamma"] == 0
    assert v["params"]["query"]["kernel"].shape == (1, 1, C, C // 8)
    assert v["params"]["value"]["kernel"].shape == (1, 1, C, C)
    np.testing.assert_array_equal(_apply(model, v, X), X)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_self_attention_matches_einsum_reference(scale):
    model = SelfAttention2D(scale=scale, return_weights=True)
    p = {**_init(model, X)["params"], "gamma": jnp.asarray(0.7)}
    y, weights = _apply(model, {"params": p}, X)
    q, k, val = (_flat(_c1(X, p[n])) for n in ("query", "key", "value"))
    w_ref = _softmax(np.einsum("btd,bsd->bts", q, k) * scale)
    y_ref = 0.7 * np.einsum("bts,bsc->btc", w_ref, val).reshape(X.shape) + X
    assert weights.shape == (B, H * W, H * W)
    np.testing.assert_allclose(weights, w_ref, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)


def test_self_attention_reduction_error():
    with pytest.raises(ValueError, match="reduction"):
        SelfAttention2D(reduction=32).init(KEY, X)


# --------------------------------------------------------------------------- multi-head
@pytest.mark.parametrize("rel", [False, True])
def test_multi_head_attention_2d_matches_reference(rel):
    n = 4
    model = MultiHeadAttention2D(n, relative_position_bias=rel)
    v = _init(model, X)
    p = dict(v["params"])
    if rel:
        assert p["relative_position_bias_table"].shape == ((2 * H - 1) * (2 * W - 1), n)
        p["relative_position_bias_table"] = jnp.asarray(_rand(5, *p["relative_position_bias_table"].shape))
    y = _apply(model, {"params": p}, X)
    xs = _flat(X).astype(np.float64)
    split = lambda a: a.reshape(B, H * W, n, C // n)  # noqa: E731
    q, k, val = (split(xs @ np.asarray(p["w_" + s]) + np.asarray(p["b_" + s])) for s in "qkv")
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(C // n)
    if rel:
        table = np.asarray(p["relative_position_bias_table"])
        bias = np.zeros((n, H * W, H * W))
        for i in range(H * W):
            for j in range(H * W):
                dy, dx = i // W - j // W, i % W - j % W
                bias[:, i, j] = table[(dy + H - 1) * (2 * W - 1) + dx + W - 1]
        logits = logits + bias
    o = np.einsum("bnts,bsnh->btnh", _softmax(logits), val).reshape(B, H * W, C)
    ref = (o @ np.asarray(p["w_o"]) + np.asarray(p["b_o"])).reshape(X.shape)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
    res = _apply(MultiHeadAttention2D(n, relative_position_bias=rel, residual=True), {"params": p}, X)
    np.testing.assert_allclose(res, X + y, atol=1e-6)


def test_multi_head_attention_2d_heads_error():
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        MultiHeadAttention2D(3).init(KEY, X)


# --------------------------------------------------------------------------- additive
def test_additive_attention_module():
    model = AdditiveAttention(8)
    q, k, val = SEQ
    mask = np.random.default_rng(9).random((B, 5, 7)) > 0.5
    mask[..., 0] = True
    v = _init(model, q, k, val)
    assert set(v["params"]) == {"w_q", "w_k", "v"}
    out, w = _apply(model, v, q, k, val, mask=mask)
    p = v["params"]
    ref_out, ref_w = ops.additive_attention(q, k, val, p["w_q"], p["w_k"], p["v"], mask=mask)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(w)[~mask] == 0)
    with pytest.raises(ValueError, match="query must be"):
        model.init(KEY, q[0], k, val)


# --------------------------------------------------------------------------- non-local
def test_non_local_identity_at_init():
    model = NonLocalBlock()
    v = jax.jit(model.init)(KEY, X)
    assert v["params"]["theta"]["kernel"].shape == (1, 1, C, C // 2)
    np.testing.assert_array_equal(_apply(model, v, X), X)


@pytest.mark.parametrize("sub_sample", [False, True])
def test_non_local_matches_reference(sub_sample):
    model = NonLocalBlock(sub_sample=sub_sample)
    p = _init(model, X)["params"]
    y = _apply(model, {"params": p}, X)
    theta, phi, g = (_c1(X, p[n]) for n in ("theta", "phi", "g"))
    if sub_sample:
        pool = lambda a: a.reshape(B, H // 2, 2, W // 2, 2, -1).max((2, 4))  # noqa: E731
        phi, g = pool(phi), pool(g)
    w = _softmax(np.einsum("btc,bsc->bts", _flat(theta), _flat(phi)))
    z = _c1(np.einsum("bts,bsc->btc", w, _flat(g)).reshape(B, H, W, -1), p["W"]) + X
    np.testing.assert_allclose(y, z, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- attention gate
@pytest.mark.parametrize("g_size", [H // 2, H, 3])
def test_attention_gate(g_size):
    g = _rand(11, B, g_size, g_size, 12)
    model = AttentionGate(inter_channels=6, return_alpha=True)
    p = _init(model, X, g)["params"]
    y, alpha = _apply(model, {"params": p}, X, g)
    assert y.shape == X.shape and alpha.shape == (B, H, W, 1)
    assert np.all((np.asarray(alpha) > 0) & (np.asarray(alpha) < 1))
    np.testing.assert_allclose(y, X * np.asarray(alpha), atol=1e-6)
    # reference
    xs = X[:, ::2, ::2] if g_size == H // 2 else X
    theta = _c1(xs, p["theta_x"])
    phi = _c1(g, p["phi_g"])
    if phi.shape[1:3] != theta.shape[1:3]:
        phi = np.asarray(jax.image.resize(phi, theta.shape, "bilinear"))
    a = _sigmoid(_c1(np.maximum(theta + phi, 0), p["psi"]))
    if a.shape[1:3] != (H, W):
        a = np.asarray(jax.image.resize(a, (B, H, W, 1), "bilinear"))
    np.testing.assert_allclose(alpha, a, atol=1e-5)


def test_attention_gate_batch_error():
    with pytest.raises(ValueError, match="batch sizes differ"):
        AttentionGate().init(KEY, X, G[:1])


# --------------------------------------------------------------------------- channel attention
def test_squeeze_excitation_reference():
    model = SqueezeExcitation(reduction=4, return_scales=True)
    p = _init(model, X)["params"]
    y, s = _apply(model, {"params": p}, X)
    assert p["reduce"]["kernel"].shape == (C, C // 4)
    assert s.shape == (B, C) and np.all((np.asarray(s) > 0) & (np.asarray(s) < 1))
    hid = np.maximum(X.mean((1, 2)) @ p["reduce"]["kernel"] + p["reduce"]["bias"], 0)
    s_ref = _sigmoid(hid @ p["expand"]["kernel"] + p["expand"]["bias"])
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    np.testing.assert_allclose(y, X * s_ref[:, None, None, :], atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcitation(reduction=32).init(KEY, X)


def test_channel_attention_reference():
    model = ChannelAttention(reduction=4, return_scales=True)
    p = _init(model, X)["params"]
    y, s = _apply(model, {"params": p}, X)
    s_ref = _sigmoid(_c1(np.maximum(_c1(X.mean((1, 2), keepdims=True), p["reduce"]), 0), p["expand"]))
    assert s.shape == (B, 1, 1, C)
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    np.testing.assert_allclose(y, X * s_ref, atol=1e-6)


def test_rcab_residual():
    model = RCAB(reduction=4)
    p = _init(model, X)["params"]
    y = _apply(model, {"params": p}, X)
    assert y.shape == X.shape and not np.allclose(y, X)
    half = _apply(RCAB(reduction=4, res_scale=0.5), {"params": p}, X)
    np.testing.assert_allclose(half - X, 0.5 * (y - X), atol=1e-5)
    zero = {**p, "conv2": jax.tree_util.tree_map(jnp.zeros_like, p["conv2"])}
    np.testing.assert_array_equal(_apply(model, {"params": zero}, X), X)


def test_cbam_reference():
    model = CBAM(reduction=4, return_attention=True)
    p = _init(model, X)["params"]
    y, (ch, sp) = _apply(model, {"params": p}, X)
    assert y.shape == X.shape and ch.shape == (B, C) and sp.shape == (B, H, W, 1)
    assert p["spatial"]["kernel"].shape == (7, 7, 2, 1)
    mlp = lambda d: np.maximum(d @ p["mlp_reduce"]["kernel"] + p["mlp_reduce"]["bias"], 0) @ p["mlp_expand"]["kernel"] + p["mlp_expand"]["bias"]  # noqa: E731,E501
    ch_ref = _sigmoid(mlp(X.mean((1, 2))) + mlp(X.max((1, 2))))
    x1 = X * ch_ref[:, None, None, :]
    maps = np.concatenate([x1.mean(-1, keepdims=True), x1.max(-1, keepdims=True)], -1).astype(np.float32)
    conv = jax.lax.conv_general_dilated(
        maps, p["spatial"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    sp_ref = _sigmoid(np.asarray(conv) + np.asarray(p["spatial"]["bias"]))
    np.testing.assert_allclose(ch, ch_ref, atol=1e-6)
    np.testing.assert_allclose(sp, sp_ref, atol=1e-5)
    np.testing.assert_allclose(y, x1 * sp_ref, atol=1e-5)


# --------------------------------------------------------------------------- DeepFill convs
def _conv_ref(x, p, stride=1, rate=1, padding="SAME"):
    return np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(x), p["kernel"], (stride, stride), padding, rhs_dilation=(rate, rate),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )) + np.asarray(p["bias"])


@pytest.mark.parametrize("stride, rate", [(1, 1), (2, 1), (1, 2), (1, 4)])
def test_gen_conv_matches_lax(stride, rate):
    model = GenConv(8, 3, stride=stride, rate=rate)
    p = _init(model, X)["params"]
    assert set(p) == {"kernel", "bias"}
    assert p["kernel"].shape == (3, 3, C, 8)
    y = _apply(model, {"params": p}, X)
    assert y.shape == (B, -(-H // stride), -(-W // stride), 8)
    np.testing.assert_allclose(y, _elu(_conv_ref(X, p, stride, rate)), atol=1e-5)


def test_gen_conv_symmetric_padding_and_no_activation():
    model = GenConv(8, 5, rate=2, padding="SYMMETRIC", activation=None)
    p = _init(model, X)["params"]
    y = _apply(model, {"params": p}, X)
    xp = np.pad(X, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="symmetric")
    np.testing.assert_allclose(y, _conv_ref(xp, p, rate=2, padding="VALID"), atol=1e-5)
    # features == 3: DeepFill's output layer has no activation (values below ELU's -1)
    out = GenConv(3, 3)
    p3 = _perturb(_init(out, X)["params"], scale=1.0)
    y3 = _apply(out, {"params": p3}, X)
    np.testing.assert_allclose(y3, _conv_ref(X, p3), atol=1e-5)
    assert np.min(y3) < -1
    with pytest.raises(ValueError, match="padding"):
        GenConv(8, 3, padding="CIRCULAR").init(KEY, X)


def test_gated_conv_matches_reference():
    model = GatedConv(8, 3, rate=2)
    p = _init(model, X)["params"]
    assert set(p) == {"kernel", "bias"}
    assert p["kernel"].shape == (3, 3, C, 16)
    y = _apply(model, {"params": p}, X)
    raw = _conv_ref(X, p, rate=2)
    np.testing.assert_allclose(y, _elu(raw[..., :8]) * _sigmoid(raw[..., 8:]), atol=1e-5)
    last = GatedConv(3, 3)
    v3 = _init(last, X)
    assert v3["params"]["kernel"].shape == (3, 3, C, 3)
    np.testing.assert_allclose(_apply(last, v3, X), _conv_ref(X, v3["params"]), atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_gen_deconv(gated):
    model = GenDeconv(8, gated=gated)
    v = _init(model, X)
    assert v["params"]["conv"]["kernel"].shape == (3, 3, C, 16 if gated else 8)
    y = _apply(model, v, X)
    assert y.shape == (B, 2 * H, 2 * W, 8)
    layer = GatedConv(8, 3) if gated else GenConv(8, 3)
    up = resize_nearest_align_corners(X, 2 * H, 2 * W)
    # GenDeconv convolves X itself with sums of the kernel's taps (upsample_conv3x3):
    # the same values up to float32 rounding of the re-associated sums
    np.testing.assert_allclose(y, _apply(layer, {"params": v["params"]["conv"]}, up), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("padding", ["SYMMETRIC", "REFLECT"])
@pytest.mark.parametrize("ksize", [3, 5])
def test_upsampling_gen_conv_pads_the_upsampled_image(padding, ksize):
    """With ``upsample``, "SYMMETRIC" / "REFLECT" pad the upsampled image (a 3x3 conv does
    it from x's edge pixels, without building the upsampled image on CPU)."""
    model = GenConv(8, ksize, padding=padding, upsample=True)
    p = _init(model, X)["params"]
    up = np.asarray(resize_nearest_align_corners(X, 2 * H, 2 * W))
    pad = (ksize - 1) // 2
    xp = np.pad(up, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=padding.lower())
    np.testing.assert_allclose(_apply(model, {"params": p}, X), _elu(_conv_ref(xp, p, padding="VALID")), atol=1e-5)


@pytest.mark.parametrize("layer", [GenConv(8, 3, stride=2), GatedConv(3, 5), GenDeconv(8, gated=True)])
def test_conv_layers_forward_mode(layer):
    """jax.jvp through the layers (conv2d's and elu's custom derivatives are forward-mode
    too) equals plain XLA's (the CPU kernels off)."""
    v = _init(layer, X)
    t = jnp.asarray(_rand(9, *X.shape))
    tangents = []
    for on in (True, False):
        with cpu_kernels(on):
            tangents.append(jax.jit(lambda x: jax.jvp(lambda x_: layer.apply(v, x_), (x,), (t,))[1])(X))
    np.testing.assert_allclose(tangents[0], tangents[1], rtol=1e-5, atol=1e-5 * float(jnp.abs(tangents[1]).max()))


# --------------------------------------------------------------------------- spectral norm
def _power_iterate(model, x, variables, steps):
    step = jax.jit(lambda v: model.apply(v, x, update_stats=True, mutable=["batch_stats"]))
    for _ in range(steps):
        _, upd = step(variables)
        variables = {**variables, "batch_stats": upd["batch_stats"]}
    return variables


def test_sn_conv_converges_and_normalises():
    model = SNConv(6, 3)
    x = _rand(20, 1, 6, 6, 4)
    v = _init(model, x, update_stats=False)
    kernel = np.asarray(v["params"]["conv"]["kernel"])
    sigma_true = np.linalg.svd(kernel.reshape(-1, 6), compute_uv=False)[0]
    # update_stats=False leaves batch_stats untouched; True changes them
    _, same = model.apply(v, x, update_stats=False, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, same["batch_stats"], v["batch_stats"])
    _, moved = model.apply(v, x, update_stats=True, mutable=["batch_stats"])
    assert not np.array_equal(moved["batch_stats"]["sn"]["conv/kernel/u"], v["batch_stats"]["sn"]["conv/kernel/u"])

    v = _power_iterate(model, x, v, 40)
    sigma = float(v["batch_stats"]["sn"]["conv/kernel/sigma"])
    normalised = kernel.reshape(-1, 6) / sigma
    assert abs(np.linalg.svd(normalised, compute_uv=False)[0] - 1) < 1e-2
    # the layer really convolves with kernel / sigma_max
    y = model.apply(v, x, update_stats=False)
    ref = _conv_ref(x, {"kernel": kernel / sigma_true, "bias": v["params"]["conv"]["bias"]})
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_sn_dense_converges():
    model = SNDense(5)
    x = _rand(21, 3, 7)
    v = _init(model, x, update_stats=False)
    v = _power_iterate(model, x, v, 30)
    kernel = np.asarray(v["params"]["dense"]["kernel"])
    sigma = float(v["batch_stats"]["sn"]["dense/kernel/sigma"])
    assert abs(np.linalg.svd(kernel / sigma, compute_uv=False)[0] - 1) < 1e-2
    # on the identity the output is the normalised kernel (plus the bias)
    y = model.apply(v, np.eye(7, dtype=np.float32), update_stats=False)
    np.testing.assert_allclose(y - v["params"]["dense"]["bias"], kernel / sigma, atol=1e-4)


# --------------------------------------------------------------------------- transforms
def test_module_jit_and_vmap():
    model = SqueezeExcitation(reduction=4)
    v = _init(model, X)
    y = model.apply(v, X)
    np.testing.assert_allclose(jax.jit(model.apply)(v, X), y, atol=1e-6)
    xs = np.stack([X, 2 * X])
    ys = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(v, xs)
    np.testing.assert_allclose(ys[0], y, atol=1e-6)
    np.testing.assert_allclose(ys[1], model.apply(v, 2 * X), atol=1e-5)


def test_spectral_norm_layers_keep_float32_params_with_bf16_compute():
    from jattn.nn import SNConv, SNDense

    x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
    for layer, inp in ((SNConv(4, 3, dtype=jnp.bfloat16), x), (SNDense(4, dtype=jnp.bfloat16), x.reshape(1, -1))):
        variables = layer.init(jax.random.key(0), inp, update_stats=True)
        assert {p.dtype for p in jax.tree_util.tree_leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
        y, _ = layer.apply(variables, inp, update_stats=True, mutable=["batch_stats"])
        assert y.dtype == jnp.bfloat16
