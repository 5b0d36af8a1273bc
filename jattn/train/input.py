"""A step's input: host batches -> one stacked global batch on the devices, prefetched.

Each step of a task takes one batch per update (DeepFill v1: 5 critic batches and a
generator batch), stacked along a new leading axis: `[n_updates, B, ...]` per field, B
split over the mesh's data axis. `StepBatches` reads them from the host iterator and puts
them on the devices `size` steps ahead (as big_vision's `prefetch_iterator`), so host
input work overlaps the device's compute of the previous steps.

Its `get_state()` is the position of the first batch *not yet consumed by a step* (not of
the prefetched ones), so a checkpoint saved with it resumes exactly.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jattn.data.sharding import to_global_array

__all__ = ["StepBatches", "stack_batches"]


def stack_batches(batches: list[dict]) -> dict:
    """[{field: [B, ...]}] * n -> {field: [n, B, ...]} (numpy)."""
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


class StepBatches:
    """Iterator of device batches `{field: [n, B, ...]}`, `size` steps ahead of the consumer.

    `host`: the process's batch iterator (grain's and tf.data's have `get_state`; one without
    it cannot be checkpointed); `first_host_batch`: the last host batch of the first step,
    kept for image summaries."""

    def __init__(self, host, updates_per_step: int, mesh: Mesh, size: int = 2):
        self._host = host
        self._n = int(updates_per_step)
        self._mesh = mesh
        self._size = max(int(size), 1)
        self._queue: collections.deque = collections.deque()
        self._stateful = hasattr(host, "get_state")
        self.first_host_batch: dict | None = None

    @property
    def bad_data(self):
        return getattr(self._host, "bad_data", None)

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            position = _encode(self._host.get_state()) if self._stateful else None
            host = [next(self._host) for _ in range(self._n)]
            if self.first_host_batch is None:
                self.first_host_batch = host[-1]
            self._queue.append((position, to_global_array(stack_batches(host), self._mesh, stacked=True)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._fill()
        _, batch = self._queue.popleft()
        try:
            self._fill()  # the next steps' input is read while the devices run this one
        except StopIteration:
            pass  # the host iterator ran out: the queued steps are still served
        return batch

    def get_state(self) -> bytes:
        """The host iterator's position before the next step's batches (for checkpoints;
        bytes, as grain's checkpoint handler takes from a non-grain iterator)."""
        if not self._stateful:
            raise AttributeError("the host iterator has no state to save")
        return self._queue[0][0] if self._queue else _encode(self._host.get_state())


def _encode(state: Any) -> bytes:
    """An iterator state as bytes, taken now (a later `next` cannot change it)."""
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()
