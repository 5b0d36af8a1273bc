"""jattn.ops.conv: `conv2d`'s CPU kernels equal XLA's convolution in value and derivatives
(forward and reverse mode, second order), and the compiled CPU programs use them;
conv2d_im2col equals XLA's TF-'SAME' convolution, values and gradients (2nd order too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops.conv import conv2d, conv2d_im2col, same_padding


def _ref(x, k, s):
    return jax.lax.conv_general_dilated(x, k, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size,ksize,stride", [(16, 5, 2), (15, 5, 2), (16, 3, 1), (17, 3, 2), (8, 4, 2), (9, 1, 1)])
def test_equals_xla_conv(size, ksize, stride):
    rng = np.random.default_rng(size + ksize)
    x = jnp.asarray(rng.standard_normal((2, size, size + 3, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((ksize, ksize, 4, 6)), jnp.float32)
    np.testing.assert_allclose(np.asarray(conv2d_im2col(x, k, stride)), np.asarray(_ref(x, k, stride)), atol=1e-4)


def test_first_and_second_order_gradients_equal_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, 5, 3, 4)), jnp.float32) * 0.2

    def penalty(conv):
        f = lambda x, k: jnp.sum(jax.nn.leaky_relu(conv(x, k, 2), 0.2))  # noqa: E731
        return lambda k, x: jnp.sum(jax.grad(f)(x, k) ** 2)

    for argnums in (0, 1):
        g_ref = jax.grad(lambda x, k: jnp.sum(jnp.tanh(_ref(x, k, 2))), argnums)(x, k)
        g_new = jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv2d_im2col(x, k, 2))), argnums)(x, k)
        np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_ref), atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(jax.grad(penalty(conv2d_im2col))(k, x)), np.asarray(jax.grad(penalty(_ref))(k, x)), rtol=1e-4, atol=1e-3
    )


def test_same_padding_and_errors():
    assert same_padding(256, 5, 2) == (1, 2) and same_padding(64, 4, 2) == (1, 1) and same_padding(64, 3, 1) == (1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_im2col(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 4, 2)))


@pytest.mark.parametrize("size,ksize,stride,padding", [
    ((16, 16), 3, 2, "SAME"), ((15, 17), 3, 2, "SAME"), ((16, 16), 5, 2, "SAME"), ((12, 12), 4, 2, "SAME"),
    ((13, 11), 3, 2, "VALID"), ((16, 16), 1, 2, "SAME"), ((18, 18), 3, 3, "SAME"), ((10, 12), 3, 2, ((1, 2), (0, 1))),
])
@pytest.mark.parametrize("channels", [3, 17])  # merged phases below 16 input channels, separate above
def test_strided_conv2d_equals_xla_in_value_and_derivatives(size, ksize, stride, padding, channels):
    """The value is XLA's (bit-equal); the polyphase input gradient and the forward-mode
    tangent equal XLA's up to float32 rounding."""
    from jattn.ops.conv import MERGE_PHASES_BELOW_CHANNELS

    assert 3 < MERGE_PHASES_BELOW_CHANNELS <= 17
    rng = np.random.default_rng(ksize + stride)
    x = jnp.asarray(rng.standard_normal((2, *size, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((ksize, ksize, channels, 4)), jnp.float32)
    ref_conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = lambda x, k: conv2d(x, k, stride, padding=padding)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(conv(x, k)), np.asarray(ref_conv(x, k)))
    loss = lambda conv: lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * 1.3)  # noqa: E731
    got = jax.jit(jax.grad(loss(conv), (0, 1)))(x, k)
    ref = jax.grad(loss(ref_conv), (0, 1))(x, k)
    for a, b in zip(got, ref):  # the input gradient sums in another order: float32 rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-6)
    tangents = (x[::-1] * 0.7, k * 0.5)
    got = jax.jit(lambda a, b: jax.jvp(conv, (a, b), tangents))(x, k)
    for a, b in zip(got, jax.jvp(ref_conv, (x, k), tangents)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-6)


@pytest.mark.parametrize("channels", [3, 17])
def test_strided_conv2d_second_order_equals_xla(channels):
    """The WGAN-GP penalty's gradient (grad of a function of the input gradient) through
    the polyphase input gradient equals XLA's native convolution differentiated twice,
    and so does forward over reverse (a Hessian-vector product in the input)."""

    rng = np.random.default_rng(channels)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, 5, channels, 8)) * 0.2, jnp.float32)
    ref_conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def penalty(conv):
        def critic(k, x):
            y = jax.nn.leaky_relu(conv(x, k), 0.2)
            return jnp.sum(jnp.sin(y) * y)

        def gp(k, x):
            g = jax.grad(critic, argnums=1)(k, x)
            return jnp.mean((jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3))) - 1.0) ** 2)

        return gp

    conv = lambda x, k: conv2d(x, k, 2)  # noqa: E731
    got = jax.jit(jax.grad(penalty(conv), (0, 1)))(k, x)
    ref = jax.jit(jax.grad(penalty(ref_conv), (0, 1)))(k, x)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-6)
    hvp = lambda c: jax.jit(lambda x, v: jax.jvp(jax.grad(lambda x_: penalty(c)(k, x_)), (x,), (v,))[1])  # noqa: E731
    a, b = hvp(conv)(x, x[::-1]), hvp(ref_conv)(x, x[::-1])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-6)


@pytest.mark.parametrize("shape,ksize,stride,padding", [
    ((2, 64, 64, 12), 5, 2, "SAME"),          # DeepFill's critics: 5x5 at stride 2
    ((1, 70, 67, 12), 5, 2, "VALID"),         # odd sizes, cropped tiles
    ((1, 66, 68, 12), 6, 2, ((1, 3), (2, 0))),  # explicit padding, even kernel
    ((1, 98, 99, 6), 7, 3, "SAME"),           # stride 3: 3 taps per axis after space-to-depth
])
def test_strided_conv2d_is_space_to_depth_winograd_on_cpu(shape, ksize, stride, padding):
    """A kernel of 3 taps per axis after space-to-depth, on maps Winograd fits, is the
    Winograd 3x3 convolution of the space-to-depth image on CPU: no convolution in the
    compiled forward pass, its gradients or the WGAN-GP penalty's gradient, and all of them
    equal XLA's native strided convolution within Winograd's rounding."""
    from jattn.ops.conv import WINOGRAD_MIN_CHANNELS

    c, o = shape[-1], WINOGRAD_MIN_CHANNELS
    assert stride * stride * c >= WINOGRAD_MIN_CHANNELS
    kx, kw, kg = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kw, (ksize, ksize, c, o)) / np.sqrt(ksize * ksize * c)
    ref_conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = ref_conv(x, k)
    conv = lambda a, b: conv2d(a, b, stride, padding=padding)  # noqa: E731
    fwd = jax.jit(conv)
    y = fwd(x, k)
    assert y.shape == ref.shape and min(ref.shape[1:3]) >= 32
    assert _relmax(ref, y) < 2e-5
    on_cpu = jax.default_backend() == "cpu"
    assert not on_cpu or " convolution(" not in fwd.lower(x, k).compile().as_text()

    g = jax.random.normal(kg, ref.shape)
    grads = jax.jit(lambda a, b: jax.vjp(conv, a, b)[1](g))
    for exact, got in zip(jax.vjp(ref_conv, x, k)[1](g), grads(x, k)):
        assert exact.shape == got.shape and _relmax(exact, got) < 2e-5
    assert not on_cpu or " convolution(" not in grads.lower(x, k).compile().as_text()
    tangent = jax.jit(lambda a, b: jax.jvp(conv, (a, b), (a[::-1], b * 0.3))[1])  # forward mode
    assert _relmax(jax.jvp(ref_conv, (x, k), (x[::-1], k * 0.3))[1], tangent(x, k)) < 2e-5

    def penalty(conv):  # grad of a function of the input gradient, as WGAN-GP
        def gp(k, x):
            d = jax.grad(lambda x_: jnp.sum(jnp.sin(jax.nn.leaky_relu(conv(x_, k), 0.2))))(x)
            return jnp.mean((jnp.sqrt(jnp.sum(d**2, axis=(1, 2, 3))) - 1.0) ** 2)
        return jax.jit(jax.grad(gp, (0, 1)))

    got_gp = penalty(conv)
    for exact, got in zip(penalty(ref_conv)(k, x), got_gp(k, x)):
        assert _relmax(exact, got) < 1e-4
    assert not on_cpu or " convolution(" not in got_gp.lower(k, x).compile().as_text()


def test_strided_conv2d_keeps_xla_where_winograd_does_not_fit():
    """Narrow (after space-to-depth), small, bfloat16 or 3x3-at-stride-2 layers keep
    XLA's convolution for the value (bit-equal to it)."""

    cases = [((1, 64, 64, 8), 5, jnp.float32),     # 4 * 8 = 32 channels after space-to-depth
             ((1, 32, 32, 16), 5, jnp.float32),    # 16 x 16 output
             ((1, 64, 64, 16), 5, jnp.bfloat16),
             ((1, 64, 64, 16), 3, jnp.float32)]    # 2 taps per axis after space-to-depth
    for shape, ksize, dtype in cases:
        x = jax.random.normal(jax.random.key(7), shape).astype(dtype)
        k = (jax.random.normal(jax.random.key(8), (ksize, ksize, shape[-1], 48)) * 0.1).astype(dtype)
        fwd = jax.jit(lambda a, b: conv2d(a, b, 2))
        assert " convolution(" in fwd.lower(x, k).compile().as_text()
        ref = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_array_equal(np.asarray(fwd(x, k), np.float32), np.asarray(ref, np.float32))


def test_strided_conv2d_penalty_gradient_keeps_the_kernel_layout():
    """The polyphase sub-kernels are slices of the kernel in its own layout (read as HWOI),
    so the penalty's kernel gradient has no transpose of the kernel: XLA:CPU used to fuse
    the transposed parts into each optimizer fusion, re-reading them across the cache.
    (Below 16 input channels the phases are merged into one kernel, a rearrangement of a
    small kernel.)"""

    x = jnp.ones((2, 16, 16, 17), jnp.float32)
    k = jnp.ones((5, 5, 17, 24), jnp.float32)

    def gp(k, x):
        g = jax.grad(lambda x_: jnp.sum(jnp.sin(conv2d(x_, k, 2))))(x)
        return jnp.sum(g**2)

    jaxpr = str(jax.make_jaxpr(jax.grad(gp))(k, x))  # every sub-jaxpr, the CPU branch included
    assert "conv_general_dilated" in jaxpr
    assert "transpose[" not in jaxpr


def test_strided_conv2d_bfloat16_and_errors():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 6)) * 0.3, jnp.bfloat16)
    gx = jax.grad(lambda x: jnp.sum(conv2d(x, k, 2, preferred_element_type=jnp.float32) ** 2))(x)
    assert gx.dtype == jnp.bfloat16 and gx.shape == x.shape
    ref = jax.grad(lambda x: jnp.sum(jax.lax.conv_general_dilated(
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32) ** 2))(x)
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(gx, np.float32), ref, atol=1e-2 * np.abs(ref).max())
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(x, k[:, :, :3], 2)
    with pytest.raises(ValueError, match="stride and rate"):
        conv2d(x, k, 0)
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, k, 2, padding="SYMMETRIC")


@pytest.mark.parametrize("padding", ["SAME", "VALID", "SYMMETRIC", "REFLECT", ((-1, 0), (1, -1))])
@pytest.mark.parametrize("size", [(5, 7), (8, 8)])
def test_upsample_conv3x3_equals_resize_then_conv(padding, size):
    """Four 2x2 convolutions of the input equal TF1 2x nearest upsampling followed by the
    3x3 conv (with that padding of the upsampled image, explicit pads of -1..1 too), in
    value and both gradients and in forward mode; so does `conv2d(..., upsample=True)`."""
    from jattn.ops.conv import upsample_conv3x3
    from jattn.ops.resize import resize_nearest_align_corners

    rng = np.random.default_rng(len(padding) + size[0])
    x = jnp.asarray(rng.standard_normal((2, *size, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 5, 6)) / np.sqrt(45), jnp.float32)  # outputs of order 1

    def ref(x, k):
        up = resize_nearest_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
        if padding in ("SYMMETRIC", "REFLECT"):
            up = jnp.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=padding.lower())
        pads = padding if padding in ("SAME", "VALID") or not isinstance(padding, str) else "VALID"
        return jax.lax.conv_general_dilated(up, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    convs = [lambda x, k: upsample_conv3x3(x, k, padding)]
    if not isinstance(padding, str) or padding in ("SAME", "VALID"):
        convs.append(lambda x, k: conv2d(x, k, padding=padding, upsample=True))
    want = ref(x, k)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for conv in convs:
        got = conv(x, k)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        for a, b in zip(jax.vjp(conv, x, k)[1](g), jax.vjp(ref, x, k)[1](g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))))
        a, b = jax.jvp(conv, (x, k), (x * 0.5, k[::-1]))[1], jax.jvp(ref, (x, k), (x * 0.5, k[::-1]))[1]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_upsample_conv2d_is_four_2x2_convolutions_on_cpu():
    """On CPU an upsampling 3x3 conv2d runs on the input (four 2x2 convolutions, no
    upsampled image); other kernels resize first and equal XLA's convolution of it."""
    from jattn.ops.resize import resize_nearest_align_corners

    x = jax.random.normal(jax.random.key(20), (1, 6, 5, 4))
    for ksize, convs in ((3, 4), (5, 1)):
        k = jax.random.normal(jax.random.key(21), (ksize, ksize, 4, 6))
        fwd = jax.jit(lambda a, b: conv2d(a, b, upsample=True))
        up = resize_nearest_align_corners(x, 12, 10)
        want = jax.lax.conv_general_dilated(up, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert _relmax(want, fwd(x, k)) < 1e-6
        if jax.default_backend() == "cpu":
            hlo = fwd.lower(x, k).compile().as_text()
            assert hlo.count(" convolution(") == convs
            assert ksize == 5 or "f32[1,12,10,4]" not in hlo  # no upsampled image


def test_upsample_conv3x3_errors():
    from jattn.ops.conv import upsample_conv3x3

    with pytest.raises(ValueError, match="3x3 kernel"):
        upsample_conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((5, 5, 3, 2)))
    with pytest.raises(ValueError, match="padding"):
        upsample_conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)), "CIRCULAR")
    with pytest.raises(ValueError, match="within -1..1"):
        upsample_conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)), ((2, 2), (1, 1)))


# --------------------------------------------------------------------------- Winograd


def _dilated(x, w, rate, padding="VALID"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=(rate, rate),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")


def _relmax(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("shape,rate", [
    ((2, 18, 18, 5), 1),     # output 16: whole tiles
    ((1, 13, 11, 3), 1),     # output 11 x 9: partial tiles, cropped
    ((2, 21, 20, 4), 3),     # dilated, sizes not multiples of the rate
    ((1, 40, 40, 6), 16),    # DeepFill's largest rate: one tile per sub-grid
    ((1, 7, 9, 2), 2),
])
def test_winograd_conv3x3_matches_the_convolution(shape, rate):
    from jattn.ops.conv import winograd_conv3x3

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (3, 3, shape[-1], 7)) / np.sqrt(9 * shape[-1])
    ref = _dilated(x, w, rate)
    y = winograd_conv3x3(x, w, rate)
    assert y.shape == ref.shape
    assert _relmax(ref, y) < 2e-5
    g = jax.random.normal(kg, ref.shape)
    dx_ref, dw_ref = jax.vjp(lambda a, b: _dilated(a, b, rate), x, w)[1](g)
    dx, dw = jax.vjp(lambda a, b: winograd_conv3x3(a, b, rate), x, w)[1](g)
    assert _relmax(dx_ref, dx) < 2e-5
    assert _relmax(dw_ref, dw) < 2e-5


def test_winograd_conv3x3_errors():
    from jattn.ops.conv import winograd_conv3x3

    with pytest.raises(ValueError, match="not a 3x3 kernel"):
        winograd_conv3x3(jnp.zeros((1, 8, 8, 3)), jnp.zeros((5, 5, 3, 4)))
    with pytest.raises(ValueError, match="rate must be >= 1"):
        winograd_conv3x3(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), 0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        winograd_conv3x3(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), 4)


@pytest.mark.parametrize("padding,rate", [("SAME", 1), ("SAME", 4), ("VALID", 2), (((2, 0), (1, 3)), 1)])
def test_wide_3x3_conv2d_is_winograd_on_cpu(padding, rate):
    """A wide 3x3 float32 conv2d is Winograd's on CPU, value and gradients (no
    convolution in the compiled programs), within Winograd's rounding of XLA's; forward
    mode too, and the backward pass keeps only the input and the kernel (jax.checkpoint)."""
    from jattn.ops.conv import WINOGRAD_MIN_CHANNELS

    c = WINOGRAD_MIN_CHANNELS
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    size = 32 + (2 * rate if padding == "VALID" else 0)
    x = jax.random.normal(kx, (2, size, size, c))
    w = jax.random.normal(kw, (3, 3, c, c)) / np.sqrt(9 * c)
    ref = _dilated(x, w, rate, padding)
    conv = lambda a, b: conv2d(a, b, 1, rate, padding)  # noqa: E731
    fwd = jax.jit(conv)
    y = fwd(x, w)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
    # On CPU the value is Winograd's too: the compiled forward pass has no convolution.
    assert jax.default_backend() != "cpu" or " convolution(" not in fwd.lower(x, w).compile().as_text()
    g = jax.random.normal(kg, ref.shape)
    grads = jax.jit(lambda a, b: jax.vjp(conv, a, b)[1](g))
    for exact, got in zip(jax.vjp(lambda a, b: _dilated(a, b, rate, padding), x, w)[1](g), grads(x, w)):
        assert _relmax(exact, got) < 2e-5
    # On CPU the gradients are Winograd's: the compiled backward pass has no convolution.
    hlo = grads.lower(x, w).compile().as_text()
    assert jax.default_backend() != "cpu" or " convolution(" not in hlo
    tangent = jax.jit(lambda a, b: jax.jvp(conv, (a, b), (a[::-1], b * 0.3))[1])
    exact = jax.jvp(lambda a, b: _dilated(a, b, rate, padding), (x, w), (x[::-1], w * 0.3))[1]
    assert _relmax(exact, tangent(x, w)) < 2e-5
    # The backward pass keeps nothing larger than the input (Winograd's transformed input
    # is 2.25x its size): it is recomputed.
    saved = [a for a in jax.tree.leaves(jax.vjp(conv, x, w)[1]) if hasattr(a, "shape")]
    assert max(a.size for a in saved) <= x.size, [a.shape for a in saved]


def test_winograd_tiles_fit():
    from jattn.ops.conv import _tiles_fit

    assert all(_tiles_fit(64, r) for r in (1, 2, 4, 8, 16))  # DeepFill at 256 x 256
    assert _tiles_fit(128, 1) and _tiles_fit(33, 1) and _tiles_fit(40, 2)
    assert not _tiles_fit(16, 1)  # too small: slower there
    assert not _tiles_fit(32, 16) and not _tiles_fit(36, 8)  # tiles would cover 2x / 1.8x the output


def test_3x3_conv2d_keeps_xla_for_small_or_bfloat16_layers():
    x = jax.random.normal(jax.random.key(2), (1, 12, 12, 8))
    w = jax.random.normal(jax.random.key(3), (3, 3, 8, 8))
    g = jnp.ones((1, 12, 12, 8))
    for xs, ws in ((x, w), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))):
        grads = jax.jit(lambda a, b: jax.vjp(lambda p, q: conv2d(p, q), a, b)[1](g.astype(a.dtype)))
        assert " convolution(" in grads.lower(xs, ws).compile().as_text()
        exact = jax.vjp(lambda a, b: _dilated(a, b, 1, "SAME"), xs, ws)[1](g.astype(xs.dtype))
        for e, got in zip(exact, grads(xs, ws)):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(e, np.float32), rtol=2e-2, atol=2e-2)
    # Wide enough, but rate 16 on 16 x 16 would compute 4 x 4 tiles for 1 x 1 sub-grids.
    wide = jnp.ones((1, 16, 16, 64))
    grads = jax.jit(lambda a, b: jax.grad(lambda p, q: conv2d(p, q, 1, 16).sum(), argnums=(0, 1))(a, b))
    assert " convolution(" in grads.lower(wide, jnp.ones((3, 3, 64, 64))).compile().as_text()


def test_winograd_conv2d_exports_with_symbolic_sizes():
    from jattn.ops.conv import WINOGRAD_MIN_CHANNELS

    c = WINOGRAD_MIN_CHANNELS
    w = jax.random.normal(jax.random.key(4), (3, 3, c, c)) / np.sqrt(9 * c)
    b, h, wd = jax.export.symbolic_shape("b, h, w")
    exp = jax.export.export(jax.jit(lambda x: conv2d(x, w, 1, 2)))(jax.ShapeDtypeStruct((b, h, wd, c), jnp.float32))
    x = jax.random.normal(jax.random.key(5), (1, 12, 10, c))
    np.testing.assert_allclose(exp.call(x), _dilated(x, w, 2, "SAME"), rtol=0, atol=1e-5 * float(jnp.abs(x).max()))


# --------------------------------------------------------------------------- few channels

def _xla(x, k, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _convolutions(fn, *args) -> int:
    return fn.lower(*args).compile().as_text().count(" convolution(")


@pytest.mark.parametrize("ksize,padding", [
    ((3, 3), "SAME"), ((5, 5), "SAME"), ((5, 5), "VALID"), ((1, 1), "SAME"), ((3, 5), "SAME"),
    ((4, 4), "SAME"), ((3, 3), ((0, 2), (3, 1))), ((3, 3), ((9, 9), (0, 0))),
])
@pytest.mark.parametrize("cin,cout", [(16, 3), (5, 12)])
def test_few_channel_conv2d_equals_xla_in_value_and_derivatives(ksize, padding, cin, cout):
    """Few output channels: the value is planes + shifted sums; few input channels: the
    input gradient is. Both equal XLA's convolution up to float32 rounding, for odd, even,
    rectangular kernels and SAME, VALID and explicit (asymmetric, larger than the map)
    padding, in forward mode and to second order too; the compiled CPU program has no
    convolution where the planes are used."""
    kx, kk, kg = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (2, 7, 9, cin))
    k = jax.random.normal(kk, ksize + (cin, cout)) / np.sqrt(np.prod(ksize) * cin)
    ref = _xla(x, k, padding)
    conv = lambda a, b: conv2d(a, b, padding=padding)  # noqa: E731
    fwd = jax.jit(conv)
    y = fwd(x, k)
    assert y.shape == ref.shape and _relmax(ref, y) < 1e-6
    g = jax.random.normal(kg, ref.shape)
    grads = jax.jit(lambda a, b: jax.vjp(conv, a, b)[1](g))
    for exact, got in zip(jax.vjp(lambda p, q: _xla(p, q, padding), x, k)[1](g), grads(x, k)):
        assert exact.shape == got.shape and _relmax(exact, got) < 1e-6
    tangents = (x[::-1], k * 0.3)
    exact = jax.jvp(lambda p, q: _xla(p, q, padding), (x, k), tangents)[1]
    assert _relmax(exact, jax.jit(lambda a, b: jax.jvp(conv, (a, b), tangents)[1])(x, k)) < 1e-6

    def penalty(c):  # the gradient of a function of the input gradient
        return jax.grad(lambda b, a: jnp.sum(jax.grad(lambda p: jnp.sum(jnp.sin(c(p, b))))(a) ** 2), (0, 1))

    for exact, got in zip(penalty(lambda p, q: _xla(p, q, padding))(k, x), jax.jit(penalty(conv))(k, x)):
        assert _relmax(exact, got) < 1e-5
    if jax.default_backend() == "cpu":
        dx_only = jax.jit(lambda a, b: jax.grad(lambda p: jnp.vdot(conv(p, b), g))(a))
        assert _convolutions(fwd if cout == 3 else dx_only, x, k) == 0


def test_few_channel_conv2d_input_gradient_of_a_concatenation():
    """DeepFill's first layers read [image, ones, mask]: the gradient for the image through
    the concatenation equals XLA's; on CPU the input gradient is one product to the
    planes per image channel and their shifted sums (XLA drops the constant channels'; no
    convolution but the kernel gradient's), and an input that is not differentiated gets
    none."""
    kx, km, kk, kg = jax.random.split(jax.random.key(12), 4)
    image = jax.random.normal(kx, (2, 12, 12, 3))
    mask = (jax.random.uniform(km, (2, 12, 12, 1)) > 0.5).astype(jnp.float32)
    ones = jnp.ones_like(mask)
    k = jax.random.normal(kk, (5, 5, 5, 8)) / 10.0
    g = jax.random.normal(kg, (2, 12, 12, 8))

    def loss(conv, argnums=(0, 1)):
        return jax.jit(jax.grad(lambda im, k_: jnp.vdot(conv(jnp.concatenate([im, ones, mask], -1), k_), g), argnums))

    got, exact = loss(conv2d), loss(lambda x, k_: _xla(x, k_, "SAME"))
    for e, r in zip(exact(image, k), got(image, k)):
        assert e.shape == r.shape and _relmax(e, r) < 1e-6
    if jax.default_backend() == "cpu":
        hlo = got.lower(image, k).compile().as_text()
        assert hlo.count(" convolution(") == 1  # the kernel gradient
        planes = [line for line in hlo.splitlines() if " dot(" in line and "f32[288,25]" in line]
        assert len(planes) == 3, planes  # one product per image channel, none for ones / mask
        hlo = loss(conv2d, 1).lower(image, k).compile().as_text()  # the kernel's gradient alone
        assert hlo.count(" convolution(") == 1 and " dot(" not in hlo


def test_few_channel_conv2d_keeps_xla_for_wide_and_bfloat16():
    from jattn.ops.conv import NARROW_MAX_CHANNELS

    x = jax.random.normal(jax.random.key(13), (1, 8, 8, NARROW_MAX_CHANNELS + 1))
    k = jax.random.normal(jax.random.key(14), (3, 3, NARROW_MAX_CHANNELS + 1, NARROW_MAX_CHANNELS + 1))
    assert np.array_equal(conv2d(x, k), _xla(x, k, "SAME"))  # wide: XLA's, bit-equal
    xb, kb = x[..., :3].astype(jnp.bfloat16), k[:, :, :3, :3].astype(jnp.bfloat16)
    assert np.array_equal(conv2d(xb, kb), _xla(xb, kb, "SAME"))


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 3))])
def test_few_channel_conv2d_exports_with_symbolic_sizes(padding):
    """With symbolic sizes (jax.export) the planes are used too, so an exported model
    computes bit for bit what the jitted one does at each concrete size; "VALID" (an
    output smaller than the input) exports as XLA's convolution, equal within rounding."""

    kernel = jax.random.normal(jax.random.key(15), (3, 5, 16, 3)) / 10.0
    b, h, w = jax.export.symbolic_shape("b, h, w")
    fn = jax.jit(lambda x: conv2d(x, kernel, padding=padding))
    exp = jax.export.export(fn)(jax.ShapeDtypeStruct((b, h, w, 16), jnp.float32))
    for shape in ((1, 9, 11, 16), (2, 6, 7, 16)):
        x = jax.random.normal(jax.random.key(16), shape)
        got = exp.call(x)
        if padding != "VALID":
            np.testing.assert_array_equal(got, fn(x))
        assert _relmax(fn(x), got) < 1e-6 and _relmax(_xla(x, kernel, padding), got) < 1e-6
