"""jattn.ops.activations.elu equals jax.nn.elu in value (to float32 rounding) and
derivatives; its expm1 is within 2 ulp of float64's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops.activations import elu, expm1_nonpositive


def _ulp_error(got, ref64):
    """|got - ref| in units of float32's spacing at ref (0 where both are 0)."""
    got = np.asarray(got, np.float64)
    spacing = np.spacing(np.abs(ref64).astype(np.float32)).astype(np.float64)
    return np.where(ref64 == 0, np.abs(got) / np.spacing(np.float32(0)), np.abs(got - ref64) / spacing)


def test_expm1_nonpositive_is_within_2_ulp_of_float64():
    """Across [-100, 0] (log-spaced magnitudes down to 1e-30, both sides of the switch at
    -1/2): at most 2 ulp from float64's expm1. (XLA's float32 expm1 is off by 5 ulp near
    -0.03 on this CPU.)"""
    z = np.concatenate([-np.logspace(-30, 2, 400001), [0.0, -0.5, -0.49999997, -0.50000006, -1e-45]]).astype(np.float32)
    got = jax.jit(expm1_nonpositive)(jnp.asarray(z))
    assert got.dtype == jnp.float32
    err = _ulp_error(got, np.expm1(z.astype(np.float64)))
    assert err.max() <= 2.0, (err.max(), z[np.argmax(err)])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_expm1_nonpositive_low_precision_is_float32_rounded(dtype):
    z = jnp.linspace(-8.0, 0.0, 257).astype(dtype)
    got = expm1_nonpositive(z)
    assert got.dtype == dtype
    ref = np.expm1(np.asarray(z, np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(ref).astype(dtype)))


def test_expm1_nonpositive_float64_is_jnp_expm1():
    with jax.enable_x64(True):
        z = jnp.linspace(-3.0, 0.0, 101, dtype=jnp.float64)
        np.testing.assert_array_equal(np.asarray(expm1_nonpositive(z)), np.asarray(jnp.expm1(z)))


def test_value_and_gradients_equal_jax_elu():
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 601), jnp.array([0.0, -0.0, 1e-30, -1e-30, 90.0])])
    y = np.asarray(elu(x))
    np.testing.assert_array_equal(y[x > 0], np.asarray(x)[x > 0])  # the identity side is exact
    assert _ulp_error(y, np.asarray(jax.nn.elu(x.astype(jnp.float32)), np.float64)).max() <= 6.0  # jax's own is 5 ulp off
    assert _ulp_error(y, np.where(np.asarray(x) > 0, np.asarray(x, np.float64), np.expm1(np.minimum(np.asarray(x, np.float64), 0)))).max() <= 2.0
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32))
    first = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights))  # noqa: E731
    np.testing.assert_allclose(np.asarray(first(elu)(x)), np.asarray(first(jax.nn.elu)(x)), rtol=1e-6, atol=1e-7)
    second = lambda f: jax.grad(lambda x: jnp.sum(first(f)(x) ** 2))  # noqa: E731  (reverse over reverse)
    np.testing.assert_allclose(np.asarray(second(elu)(x)), np.asarray(second(jax.nn.elu)(x)), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(first(elu)(x))).all()


def test_backward_pass_keeps_the_output_alone():
    """Reverse mode keeps elu's output for the backward pass, nothing else (not x, not
    a mask), and forward mode works (custom JVP)."""
    x = jnp.linspace(-3.0, 3.0, 31)
    y, vjp = jax.vjp(elu, x)
    saved = jax.tree.leaves(vjp)
    assert len(saved) == 1 and np.array_equal(np.asarray(saved[0]), np.asarray(y))
    t = jnp.cos(x)
    np.testing.assert_allclose(jax.jvp(elu, (x,), (t,))[1], jax.jvp(jax.nn.elu, (x,), (t,))[1], rtol=1e-6, atol=1e-7)


def test_bfloat16_and_jit():
    x = jnp.linspace(-4, 4, 64, dtype=jnp.bfloat16)
    y, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(elu(x).astype(jnp.float32))))(x)
    assert g.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: jnp.sum(jax.nn.elu(x).astype(jnp.float32)))(x)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=1e-2)
