"""Process-local batches -> global ``jax.Array`` sharded over the mesh's data axis."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["data_sharding", "stacked_data_sharding", "per_process_batch_size", "to_global_array"]


def data_sharding(mesh: Mesh, data_axis: str | Sequence[str] = "data") -> NamedSharding:
    """Sharding of ``[B, ...]`` arrays: batch split over ``data_axis``, rest replicated."""
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"data axis {missing} not in mesh axes {mesh.axis_names}")
    return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def stacked_data_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
    """Sharding of stacked batches ``[n, B, ...]`` (one per update of a step): B split."""
    data_sharding(mesh, data_axis)  # checks the axis
    return NamedSharding(mesh, P(None, data_axis))


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """``global_batch_size / process_count``, which must divide evenly."""
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of "
                         f"the process count {process_count}")
    return global_batch_size // process_count


def to_global_array(local_batch: Any, mesh: Mesh, data_axis: str | Sequence[str] = "data", *,
                    stacked: bool = False) -> Any:
    """Turns this process's batch (a pytree of ``[b, ...]`` arrays) into global
    ``jax.Array`` s ``[b * process_count, ...]`` sharded over ``data_axis``; ``stacked``:
    the arrays are ``[n, b, ...]`` (a step's batches) and become ``[n, b * process_count, ...]``.

    Uses ``jax.make_array_from_process_local_data``; every process must call it with its
    own (equally sized) batch.
    """
    sharding = stacked_data_sharding(mesh, data_axis) if stacked else data_sharding(mesh, data_axis)

    def convert(x):
        x = np.asarray(x)
        if x.ndim < (2 if stacked else 1):
            raise ValueError("to_global_array needs arrays with a leading batch dimension")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(convert, local_batch)
