"""tf.data input pipeline for masked-image batches.

decode -> optional resize of the shorter side -> random (train: ``augment``'s crop) /
centre (eval) crop to ``image_size`` -> random flips / rotations (train) -> float32 in [-1, 1] -> mask -> batch of the
per-process batch size -> prefetch.  Batches are dicts of numpy arrays
``{"image": [B, H, W, 3] float32, "mask": [B, H, W, 1] float32}`` (1 = hole).

Random-access sources (folders, sample photos, TFDS ``array_record``) go through
:class:`jattn.data.examples.ExampleLoader` exactly as in the grain pipeline, so both
yield identical batches.  TFDS ``tfrecord`` datasets are read natively, sharded with
``tfds.split_for_jax_process`` and shuffled with seeded file / buffer shuffles; their
train mask index is ``k * process_count + process_index`` for the ``k``-th record of
the process's stream, their eval mask index the example's position in the split.  Bad
records there are dropped (not replaced).

Exact resume: :class:`TfDataIterator` has ``get_state()`` / ``set_state()`` like grain's
iterator (also through grain's orbax checkpoint handler).  The state is the process's
stream position after the last batch it returned (with the batches consumed, the
bad-data counts and a description of the pipeline).  Restoring rebuilds the pipeline at
that position: random-access sources start their index range there (the order is a pure
function of the position, nothing skipped is read); TFDS ``tfrecord`` data replays its
deterministic stream (seeded file and buffer shuffles, deterministic interleave) and
drops the records before the position without decoding them, which reads them again
(time linear in the records consumed).

Importing this module imports TensorFlow and hides all GPUs from it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from jattn import _require_extra  # noqa: E402

tf = _require_extra("tensorflow", "tf", "the tf.data loader (data.loader='tfdata')")

from jattn.data import examples as ex  # noqa: E402
from jattn.data import images as images_lib  # noqa: E402

__all__ = ["hide_gpus_from_tf", "build_dataset", "make_dataset", "TfDataIterator", "STATE_FORMAT"]

logger = logging.getLogger("jattn.data")

#: Per-example / per-batch key of the example's position in the process's stream (internal).
POSITION_KEY = "_position"
#: The ``format`` of a :class:`TfDataIterator` state (grain's states have none).
STATE_FORMAT = "jattn.tfdata"
_STATE_VERSION = 1


def hide_gpus_from_tf() -> None:
    """Keeps TensorFlow off all GPUs (the accelerators belong to JAX)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices
        if tf.config.get_visible_devices("GPU"):
            logger.warning("TensorFlow was initialised before jattn could hide the GPUs from it")


hide_gpus_from_tf()


class TfDataIterator(Iterator):
    """Iterates numpy batch dicts; ``bad_data`` counts skipped / converted / upscaled files.

    ``get_state()`` / ``set_state()`` save and restore the exact position (see the module
    docstring); ``set_state`` needs the ``build`` function :func:`make_dataset` passes:
    ``start position -> (dataset, read counter)``.  ``pipeline``: what the position means
    (source length, seed, batch size, process, ...), saved with it; a state saved for
    another pipeline is resumed at the same stream position with a warning (not exact).
    """

    def __init__(self, dataset: tf.data.Dataset, bad_data: ex.BadDataStats | None = None, *,
                 read_stats: ex.BadDataStats | None = None,
                 build: Callable[[int], tuple[tf.data.Dataset, ex.BadDataStats]] | None = None,
                 pipeline: dict[str, Any] | None = None, start: int = 0):
        self.dataset = dataset
        self.bad_data = ex.BadDataStats() if bad_data is None else bad_data
        self.boxes_truncated = 0  # detection: boxes dropped beyond max_boxes by this iterator (not in the state)
        self.pipeline = dict(pipeline or {})
        self._read = ex.BadDataStats() if read_stats is None else read_stats  # records dropped as read
        self._build = build
        self._position = int(start)  # stream position of the next example to return
        self._batches = 0  # batches returned (since the stream's start, across restores)
        self._skipped_at_build = self.bad_data.skipped
        self._closed = False
        # The numpy iterator is made on the first batch (a restore before it builds nothing).
        # Background tf.data threads that call back into Python (numpy_function) can hang
        # interpreter shutdown; drop the iterator at exit (or when this object dies).
        self._holder: list = []
        self._finalizer = weakref.finalize(self, self._holder.clear)

    def close(self) -> None:
        """Stops the pipeline and frees its buffers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("iterating a closed TfDataIterator")
        if not self._holder:
            self._holder.append(self.dataset.as_numpy_iterator())
        try:
            batch = next(self._holder[0])
        except StopIteration:
            # Records dropped after the last batch (TFDS tfrecord) are known only from the read count.
            self.bad_data.skipped = max(self.bad_data.skipped, self._skipped_at_build + self._read.skipped)
            logger.info("input pipeline exhausted; %s", self.bad_data.summary())
            raise
        counts = batch.pop(ex.BAD_DATA_KEY)
        if counts.any():
            self.bad_data.add(counts)
        truncated = batch.pop(ex.TRUNCATED_KEY, None)
        if truncated is not None:
            self.boxes_truncated += int(np.sum(truncated))
        positions = batch.pop(POSITION_KEY, None)
        if positions is not None and len(positions):
            end = int(positions[-1]) + 1
            # TFDS tfrecord pipelines drop bad records: the gaps in the positions count them.
            self.bad_data.skipped += end - self._position - len(positions)
            self._position = end
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned, as a JSON-able dict."""
        return {"format": STATE_FORMAT, "version": _STATE_VERSION, "position": self._position,
                "batches": self._batches, "bad_data": self.bad_data.as_dict(), "pipeline": self.pipeline}

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        """Continue after the batches of ``state`` (a ``get_state()``, or its JSON text /
        bytes as grain's checkpoint handler passes); ``ValueError`` (one line) for a state
        that is not a tf.data one, e.g. a grain iterator's."""
        if isinstance(state, (bytes, bytearray)):
            state = bytes(state).decode("utf-8", "replace")
        if isinstance(state, str):
            try:
                state = json.loads(state)
            except ValueError:
                state = None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("the saved data-iterator state is not a tf.data one (written by the grain "
                             "loader?); resume with the loader that wrote it")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"tf.data iterator state version {state.get('version')!r} is not supported "
                             f"(this jattn reads version {_STATE_VERSION})")
        if self._build is None:
            raise ValueError("this TfDataIterator cannot be restored: it was made without a build "
                             "function (use jattn.data.tfdata.make_dataset)")
        if self._closed:
            raise ValueError("restoring a closed TfDataIterator")
        saved = state.get("pipeline") or {}
        changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in self.pipeline.items() if saved.get(k) != v]
        if changed:
            logger.warning("the tf.data position was saved for another pipeline (%s): resuming at the same "
                           "stream position, not exactly where the saved run was", ", ".join(changed))
        position = int(state["position"])
        self._holder.clear()  # stops the current pipeline
        self.dataset, self._read = self._build(position)
        self._position = position
        self._batches = int(state["batches"])
        self.bad_data = ex.BadDataStats(**state["bad_data"])
        self._skipped_at_build = self.bad_data.skipped

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after ``set_state``: nothing to do, the
        pipeline starts on the next batch."""


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    return opts


def _element_spec(maker) -> dict[str, tf.TensorSpec]:
    """One example's tensors (the maker's fields, then the bad-data counts), in order."""
    spec = {k: tf.TensorSpec(shape, tf.as_dtype(dtype)) for k, (shape, dtype) in maker.element_spec().items()}
    spec[ex.BAD_DATA_KEY] = tf.TensorSpec([3], tf.int32)
    return spec


def _set_shapes(tensors, specs: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
    out = {}
    for t, (k, s) in zip(tensors, specs.items()):
        t.set_shape(s.shape)
        out[k] = t
    return out


def _random_access_dataset(source, maker, order, train, num_epochs, num_parallel_calls, start):
    """Positions ``start, start + 1, ...`` of the process's stream through the loader (which
    maps a position past the first epoch to its epoch's example, in eval too)."""
    loader = ex.ExampleLoader(source, maker, order)
    m = order.per_process
    if num_epochs:
        ds = tf.data.Dataset.range(start, m * num_epochs)
    elif train:
        ds = tf.data.Dataset.counter(start)
    else:
        ds = tf.data.Dataset.range(start, m)
    specs = _element_spec(maker)

    def load(k):
        out = loader(int(k))
        return tuple(out[key] for key in specs)

    def tf_load(k):
        tensors = tf.numpy_function(load, [k], [s.dtype for s in specs.values()], stateful=False)
        return {**_set_shapes(tensors, specs), POSITION_KEY: k}

    return ds.map(tf_load, num_parallel_calls=num_parallel_calls, deterministic=True)


def _tfds_eval_mask_index(builder, split: str, process_index: int, process_count: int):
    """``local position -> index in the whole split`` for the process's even subsplit."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import splits as splits_lib

    infos = builder.info.splits
    full = splits_lib.AbstractSplit.from_spec(split).to_absolute(infos)
    mine = tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count,
                                      drop_remainder=True).to_absolute(infos)

    def bounds(inst):
        lo = inst.from_ or 0
        hi = infos[inst.splitname].num_examples if inst.to is None else inst.to
        return lo, hi

    starts, offsets, local, cum, f = [], [], 0, 0, 0
    for inst in mine:
        lo, hi = bounds(inst)
        while True:  # pieces of `mine` are sub-ranges of `full`'s pieces, in order
            flo, fhi = bounds(full[f])
            if full[f].splitname == inst.splitname and flo <= lo and hi <= fhi:
                break
            cum += fhi - flo
            f += 1
        starts.append(local)
        offsets.append(cum + lo - flo)
        local += hi - lo
    starts, offsets, total = np.array(starts), np.array(offsets), local

    def index(k: int) -> int:
        k %= total
        piece = int(np.searchsorted(starts, k, side="right")) - 1
        return int(offsets[piece] + k - starts[piece])

    return index


def _tfds_record_dataset(source, maker, train, seed, shuffle_buffer, num_epochs,
                         process_index, process_count, num_parallel_calls, bad_data, start):
    """Native TFDS tfrecord reading; bad records are dropped and counted in ``bad_data`` as
    they are read.  The stream (seeded file and buffer shuffles, deterministic interleave) is
    the same in every build: ``start`` drops its first records before they are decoded."""
    import tensorflow_datasets as tfds

    builder = source.builder()
    split = tfds.split_for_jax_process(source.split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    read_config = tfds.ReadConfig(shuffle_seed=seed, options=_options(), add_tfds_id=True,
                                  **({} if train else {"interleave_cycle_length": 1}))
    ds = builder.as_dataset(split=split, shuffle_files=train, read_config=read_config,
                            decoders={source.image_key: tfds.decode.SkipDecoding()})
    label_key = getattr(source, "label_key", None)
    if "label" in maker.fields and label_key is None:
        raise ValueError(f"{source!r}: the dataset has no class labels, but the task needs them")
    if "segmentation" in maker.fields:
        raise ValueError(f"{source!r}: TFDS sources have no segmentation maps here; use a folder source "
                         "with segmentation_root")
    objects_key = getattr(source, "objects_key", None) if "boxes" in maker.fields else None
    if "boxes" in maker.fields and objects_key is None:
        raise ValueError(f"{source!r}: the dataset has no boxes (an 'objects' feature), but the task needs them")

    def fields_of(e):
        label = tf.cast(e[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
        if objects_key is None:
            return e[source.image_key], e["tfds_id"], label
        o = e[objects_key]
        n = tf.shape(o["bbox"])[0]
        return (e[source.image_key], e["tfds_id"], label, tf.cast(o["bbox"], tf.float32),
                tf.cast(o["label"], tf.int32),
                tf.cast(o["is_crowd"], tf.bool) if "is_crowd" in o else tf.zeros([n], tf.bool),
                tf.cast(o["area"], tf.float32) if "area" in o else tf.fill([n], -1.0),
                tf.cast(e["image/id"], tf.int64) if "image/id" in e else tf.constant(-1, tf.int64))

    def objects_of(extra, idx):
        """The record's Objects from the tensors of ``fields_of`` past the label (detection)."""
        if not extra:
            return None
        from jattn.data import detection

        bbox, cls, crowd, area, image_id = extra
        area = None if len(area) and area[0] < 0 else area
        return detection.tfds_objects({"objects": {"bbox": bbox, "label": cls, "is_crowd": crowd, "area": area},
                                       "image/id": image_id if image_id >= 0 else idx})

    ds = ds.map(fields_of)
    # Fail before training when nothing in the split decodes (stops at the first good one).
    first_error, probe = None, ds.as_numpy_iterator()
    for data, name, label, *extra in probe:
        try:
            maker.example(data, name.decode(), 0, int(label), objects=objects_of(extra, 0))
            break
        except Exception as e:  # noqa: BLE001 - reported below if nothing is readable
            first_error = first_error or e
    else:
        raise ValueError(f"no readable image in {source!r} (first error: {first_error})")
    del probe

    if train:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat(num_epochs)
        P, p = process_count, process_index

        def mask_index(k):
            return int(k) * P + p
    else:
        if num_epochs:
            ds = ds.repeat(num_epochs)
        mask_index = _tfds_eval_mask_index(builder, source.split, process_index, process_count)

    log = ex.BadDataLog()
    lock = threading.Lock()
    specs = _element_spec(maker)
    blank = tuple(np.zeros(s.shape, s.dtype.as_numpy_dtype) for s in specs.values())

    def make(k, data, name, label, *extra):
        idx = mask_index(k)
        try:
            out, conversion, upscaled = maker.example(data, name.decode(), idx, int(label),
                                                      objects=objects_of(extra, idx))
        except images_lib.BadImageError as e:
            log.warn(e.name, e.reason)
            with lock:
                bad_data.add([1, 0, 0])
            return (*blank, False)
        out[ex.BAD_DATA_KEY] = np.array([0, conversion is not None, upscaled], np.int32)
        return (*(out[key] for key in specs), True)

    def tf_make(k, element):
        *out, ok = tf.numpy_function(make, [k, *element],
                                     [s.dtype for s in specs.values()] + [tf.bool], stateful=False)
        ok.set_shape([])
        return {**_set_shapes(out, specs), POSITION_KEY: k, "ok": ok}

    ds = ds.enumerate()
    if start:
        ds = ds.skip(start)  # the records before the restored position, read but not decoded
    ds = ds.map(tf_make, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.filter(lambda e: e["ok"])
    return ds.map(lambda e: {k: v for k, v in e.items() if k != "ok"})


def build_dataset(source, *, image_size: int | Sequence[int], batch_size: int, mask_spec: Any = None,
                  seed: int, train: bool, shuffle_buffer: int = 10_000,
                  process_index: int | None = None, process_count: int | None = None,
                  resize_shorter: int | None = None, random_flip: bool = True,
                  max_upscale: float | None = 2.0, mask_seed: int | None = None,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  num_parallel_calls: int = tf.data.AUTOTUNE, prefetch: int = 2,
                  bad_data: ex.BadDataStats | None = None, fields: Sequence[str] = ("mask",),
                  scale: int | None = None, augment: Any = None, start: int = 0,
                  max_boxes: int = 50) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` of batch dicts (with the internal ``_bad_data`` counts and
    ``_position`` stream positions).

    Args:
      source: a source from :mod:`jattn.data.sources`.
      image_size: crop size ``H`` or ``(H, W)``.
      batch_size: the per-process batch (global batch / process count).
      mask_spec: a mask spec (:func:`jattn.data.masks.parse_mask_spec`).
      seed: shuffling / crop / flip seed (>= 0); ``mask_seed`` defaults to it.
      train: random crop + flip + shuffling + endless repetition, else centre crops in
        order, one pass.
      shuffle_buffer: shuffle buffer for TFDS ``tfrecord`` data (random-access sources
        are shuffled exactly); None: 10000.
      process_index, process_count: default to JAX's.
      resize_shorter: resize the shorter side to this before cropping.
      random_flip: random left-right flips in training.
      max_upscale: images needing more upscaling to fit the crop are skipped.
      num_epochs: number of passes (``None``: endless in training, one for eval).
      drop_remainder: drop the last partial batch.
      bad_data: where TFDS ``tfrecord`` pipelines count the bad records they drop as they
        are read (the batches carry the other counts).
      fields: what the examples hold beside "image" (:data:`jattn.data.examples.FIELDS`);
        ``mask_spec`` may be None without "mask".
      scale: the downscaling factor of the "lowres" field.
      augment: the training augmentation (:class:`jattn.data.images.Augment` or a config
        block such as ``{"crop": "inception"}``; None: uniform crop + left-right flip);
        eval ignores it.  ``random_flip=False`` turns the left-right flip off either way.
      start: position in the process's stream of the first example (a restored iterator's).
      max_boxes: boxes per example of the "boxes" field (detection,
        :mod:`jattn.data.detection`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    shuffle_buffer = 10_000 if shuffle_buffer is None else shuffle_buffer
    process_index, process_count = ex.process_info(process_index, process_count)
    maker = ex.ExampleMaker(
        image_size=ex.image_size_pair(image_size), mask_spec=mask_spec, seed=seed,
        mask_seed=seed if mask_seed is None else mask_seed, train=train,
        resize_shorter=resize_shorter, random_flip=random_flip, max_upscale=max_upscale,
        fields=tuple(fields), scale=scale, augment=augment, max_boxes=max_boxes)
    if getattr(source, "random_access", True):
        order = ex.ExampleOrder(len(source), seed, train, process_index, process_count, batch_size)
        ex.check_readable(source, maker)
        ds = _random_access_dataset(source, maker, order, train, num_epochs, num_parallel_calls,
                                    int(start))
    else:
        ds = _tfds_record_dataset(source, maker, train, seed, shuffle_buffer, num_epochs,
                                  process_index, process_count, num_parallel_calls,
                                  ex.BadDataStats() if bad_data is None else bad_data, int(start))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(prefetch).with_options(_options())


def make_dataset(source, *, image_size: int | Sequence[int], batch_size: int, mask_spec: Any = None,
                 seed: int, train: bool, shuffle_buffer: int | None = 10_000,
                 process_index: int | None = None, process_count: int | None = None,
                 **kwargs) -> TfDataIterator:
    """An iterator of numpy batch dicts ``{"image": [B, H, W, 3], "mask": [B, H, W, 1]}``.

    Same arguments as :func:`build_dataset`; ``iterator.bad_data`` holds the counts of
    skipped / converted / upscaled files, ``iterator.dataset`` the ``tf.data`` object and
    ``get_state()`` / ``set_state()`` the exact position.
    """
    if "bad_data" in kwargs or "start" in kwargs:
        raise TypeError("make_dataset takes no bad_data / start (the iterator keeps them)")
    process_index, process_count = ex.process_info(process_index, process_count)
    args = dict(image_size=image_size, batch_size=batch_size, mask_spec=mask_spec, seed=seed,
                train=train, shuffle_buffer=shuffle_buffer, process_index=process_index,
                process_count=process_count, **kwargs)

    def build(start: int) -> tuple[tf.data.Dataset, ex.BadDataStats]:
        read = ex.BadDataStats()
        return build_dataset(source, bad_data=read, start=start, **args), read

    dataset, read = build(0)
    random_access = getattr(source, "random_access", True)
    pipeline = {"source": "random_access" if random_access else "tfds_tfrecord",
                "num_records": len(source), "seed": int(seed), "train": bool(train),
                "batch_size": int(batch_size), "process_index": process_index,
                "process_count": process_count, "num_epochs": kwargs.get("num_epochs")}
    if not random_access:
        pipeline["shuffle_buffer"] = 10_000 if shuffle_buffer is None else int(shuffle_buffer)
    return TfDataIterator(dataset, read_stats=read, build=build, pipeline=pipeline)
