"""grain input pipeline for masked-image batches, with a checkpointable iterator.

Same outputs as :mod:`jattn.data.tfdata` (bit-identical batches for random-access
sources): ``{"image": [B, H, W, 3] float32 in [-1, 1], "mask": [B, H, W, 1] float32}``,
or the task's other ``fields`` (label, lowres, segmentation; see
:data:`jattn.data.examples.FIELDS`).
The pipeline is ``grain.MapDataset.range(examples per process)`` -> ``repeat`` (train) ->
``map_with_index`` (the shared :class:`jattn.data.examples.ExampleLoader`: per-process
slice of a seeded per-epoch permutation, decode, crop, mask) -> ``batch`` ->
``to_iter_dataset`` (thread prefetch) -> optional ``mp_prefetch`` workers.

:func:`make_dataset` returns a :class:`GrainBatchIterator`, a ``grain.DatasetIterator``
whose ``get_state()`` / ``set_state()`` restore the exact position (and the bad-data
counts), also through grain's orbax checkpoint handler.  Scripts that use worker
processes must guard their entry point with ``if __name__ == "__main__":`` (workers are
spawned).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jattn.data import examples as ex

__all__ = ["GrainBatchIterator", "build_dataset", "make_dataset"]

logger = logging.getLogger("jattn.data")


class _LoadAt:
    """``map_with_index`` function: stream position -> example dict (picklable)."""

    def __init__(self, loader: ex.ExampleLoader):
        self.loader = loader

    def __call__(self, index: int, element: Any) -> dict[str, np.ndarray]:
        del element
        return self.loader(index)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; unparsed flags would make them fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GrainBatchIterator(grain.DatasetIterator):
    """Batch iterator with ``bad_data`` counts and an exactly restorable state;
    ``boxes_truncated`` (detection) counts the boxes dropped beyond ``max_boxes`` by this
    iterator (not saved in the state)."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.bad_data = ex.BadDataStats()
        self.boxes_truncated = 0

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._parent)
        except StopIteration:
            logger.info("input pipeline exhausted; %s", self.bad_data.summary())
            raise
        batch = dict(batch)
        self.bad_data.add(batch.pop(ex.BAD_DATA_KEY))
        truncated = batch.pop(ex.TRUNCATED_KEY, None)
        if truncated is not None:
            self.boxes_truncated += int(np.sum(truncated))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "bad_data": self.bad_data.as_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.bad_data = ex.BadDataStats(**state["bad_data"])


def build_dataset(source, *, image_size: int | Sequence[int], batch_size: int, mask_spec: Any = None,
                  seed: int, train: bool, shuffle_buffer: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  resize_shorter: int | None = None, random_flip: bool = True,
                  max_upscale: float | None = 2.0, mask_seed: int | None = None,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  worker_count: int = 0, worker_buffer_size: int = 2,
                  read_threads: int = 8, read_buffer_size: int = 64,
                  fields: Sequence[str] = ("mask",), scale: int | None = None,
                  augment: Any = None, max_boxes: int = 50) -> grain.IterDataset:
    """The ``grain.IterDataset`` of batch dicts (with the internal ``_bad_data`` counts).

    Arguments as in :func:`jattn.data.tfdata.build_dataset` (``shuffle_buffer`` is unused:
    shuffling is an exact per-epoch permutation), plus ``worker_count`` ``mp_prefetch``
    worker processes (0: none) with ``worker_buffer_size`` batches each, and
    ``read_threads`` / ``read_buffer_size`` for the thread prefetch.  The source must be
    random access (folders, sample photos, TFDS ``array_record``).  ``max_boxes``: boxes
    per example of the "boxes" field (detection).
    """
    del shuffle_buffer
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not getattr(source, "random_access", True):
        raise ValueError(f"{source!r} is not random access; grain needs array_record TFDS "
                         "data (prepare it with file_format='array_record') or a folder")
    process_index, process_count = ex.process_info(process_index, process_count)
    maker = ex.ExampleMaker(
        image_size=ex.image_size_pair(image_size), mask_spec=mask_spec, seed=seed,
        mask_seed=seed if mask_seed is None else mask_seed, train=train,
        resize_shorter=resize_shorter, random_flip=random_flip, max_upscale=max_upscale,
        fields=tuple(fields), scale=scale, augment=augment, max_boxes=max_boxes)
    order = ex.ExampleOrder(len(source), seed, train, process_index, process_count, batch_size)
    ex.check_readable(source, maker)
    loader = ex.ExampleLoader(source, maker, order)

    ds = grain.MapDataset.range(order.per_process)
    if train or num_epochs:
        ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_LoadAt(loader))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=read_buffer_size))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
    return it_ds


def make_dataset(source, *, image_size: int | Sequence[int], batch_size: int, mask_spec: Any = None,
                 seed: int, train: bool, shuffle_buffer: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 **kwargs) -> GrainBatchIterator:
    """A checkpointable iterator of numpy batch dicts; see :func:`build_dataset`."""
    return GrainBatchIterator(iter(build_dataset(
        source, image_size=image_size, batch_size=batch_size, mask_spec=mask_spec, seed=seed,
        train=train, shuffle_buffer=shuffle_buffer, process_index=process_index,
        process_count=process_count, **kwargs)))
