"""The device mesh of a run and the shardings of its arrays.

jattn is data parallel: one mesh axis, `data`, spans every device of every process;
parameters and optimizer state are replicated, batches are split along `data`. The same
program runs on 1 CPU, 8 simulated CPU devices, one GPU host or a TPU pod slice: the
device count comes from the environment, never from the library.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jattn.data.sharding import data_sharding, stacked_data_sharding, to_global_array

__all__ = ["DATA_AXIS", "make_mesh", "replicated", "data_sharding", "stacked_data_sharding", "to_global_array",
           "replicate_tree", "shard_batch"]

DATA_AXIS = "data"


def make_mesh(devices: Any = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes), Auto axis type."""
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (axis_name,), axis_types=(AxisType.Auto,))
    return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (e.g. a freshly initialised state) replicated on `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(x: jax.Array, axis: int = 0) -> jax.Array:
    """Inside a step traced under `jax.set_mesh(mesh)`: constrain `x`'s `axis` (its batch) to
    the data axis. For arrays a task makes itself, such as latents drawn from a replicated
    key, which XLA would otherwise compute whole on every device. Without a mesh set (a
    loss called on its own) `x` is returned as it is."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    spec = [None] * x.ndim
    spec[axis] = DATA_AXIS
    return jax.lax.with_sharding_constraint(x, P(*spec))
