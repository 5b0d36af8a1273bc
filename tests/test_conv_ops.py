"""conv2d_im2col equals XLA's TF-'SAME' convolution, values and gradients (2nd order too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops.conv import conv2d_im2col, same_padding


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
