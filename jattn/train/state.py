"""The train state: one pytree holding everything a run needs to continue exactly.

Networks are named ("generator", "critic"; or just "model" for supervised models). Each
has its parameters, its optimizer state and its non-parameter variables (e.g. the
spectral-norm vectors in `batch_stats`). The PRNG key is stored as raw key data (uint32)
so orbax saves it like any array; per-update keys are derived from it and the step with
`jax.random.fold_in`, never split statefully.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "create_state", "update_key"]


@flax.struct.dataclass
class TrainState:
    """step: int32 [] (completed steps); params / opt_state / variables: dicts by network
    name; key: uint32 raw PRNG key data."""

    step: jax.Array
    params: dict[str, Any]
    opt_state: dict[str, Any]
    variables: dict[str, Any]
    key: jax.Array


def create_state(
    params: Mapping[str, Any],
    optimizers: Mapping[str, optax.GradientTransformation],
    key: jax.Array,
    variables: Mapping[str, Any] | None = None,
) -> TrainState:
    """A step-0 state. `key` may be a typed key (`jax.random.key`) or raw key data."""
    missing = set(params) - set(optimizers)
    if missing:
        raise ValueError(f"create_state: no optimizer for network(s) {sorted(missing)}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    variables = {name: dict(v) for name, v in (variables or {}).items()}  # e.g. "generator_ema" too
    for name in params:
        variables.setdefault(name, {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=dict(params),
        opt_state={name: optimizers[name].init(p) for name, p in params.items()},
        variables=variables,
        key=jnp.asarray(key, jnp.uint32),
    )


def update_key(state: TrainState, update_index: jax.Array | int) -> jax.Array:
    """The PRNG key of one update: fold_in(fold_in(base, step), update_index)."""
    base = jax.random.wrap_key_data(state.key)
    return jax.random.fold_in(jax.random.fold_in(base, state.step), update_index)
