"""jattn.ops.activations.elu equals jax.nn.elu in value and derivatives."""

import jax
import jax.numpy as jnp
import numpy as np

from jattn.ops.activations import elu


def test_value_and_gradients_equal_jax_elu():
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 601), jnp.array([0.0, -0.0, 1e-30, -1e-30, 90.0])])
    np.testing.assert_array_equal(np.asarray(elu(x)), np.asarray(jax.nn.elu(x)))
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32))
    first = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights))  # noqa: E731
    np.testing.assert_allclose(np.asarray(first(elu)(x)), np.asarray(first(jax.nn.elu)(x)), rtol=1e-6, atol=1e-7)
    second = lambda f: jax.grad(lambda x: jnp.sum(first(f)(x) ** 2))  # noqa: E731  (reverse over reverse)
    np.testing.assert_allclose(np.asarray(second(elu)(x)), np.asarray(second(jax.nn.elu)(x)), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(first(elu)(x))).all()


def test_bfloat16_and_jit():
    x = jnp.linspace(-4, 4, 64, dtype=jnp.bfloat16)
    y, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(elu(x).astype(jnp.float32))))(x)
    assert g.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: jnp.sum(jax.nn.elu(x).astype(jnp.float32)))(x)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=1e-2)
