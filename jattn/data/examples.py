"""The pipeline core shared by tf.data and grain: example order, example making, bad data.

For a random-access source both pipelines call the same :class:`ExampleLoader` with the
process-local position ``k`` of an example in the stream, so they yield bit-identical
batches for the same arguments.

* Order (:class:`ExampleOrder`).  The stream is cut into *global* batches of
  ``B = batch_size * process_count`` examples and process ``p`` reads the contiguous slice
  ``[p * batch_size, (p + 1) * batch_size)`` of each, so a global batch holds the same
  examples in the same order whatever the number of processes (a run on 2 hosts x 4
  devices sees exactly the batches of 1 host x 8 devices).  Train: an epoch is
  ``G = len(source) // B`` global batches (the remainder is dropped); epoch ``e`` uses the
  permutation ``default_rng([seed, e, 2]).permutation(len(source))``; global slot
  ``s = g * B + p * batch_size + r`` reads ``perm[s]`` and its mask index is the global
  stream position ``e * G * B + s``.  Eval: the same slots without a permutation (source
  index = slot = mask index, so eval masks do not depend on the number of processes),
  then the remainder split evenly over the processes.
* Example (:class:`ExampleMaker`).  ``image`` always; the task's ``fields`` add
  ``mask`` = ``masks.mask_for_index(spec, image_size, mask_seed, mask_index, train=train)``, ``label``
  (the record's class), ``lowres`` (bicubic downscale of the crop by ``scale``) and
  ``segmentation`` (the record's map, cropped and flipped with the image); the training
  crop, flips and rotations (``augment``, :class:`jattn.data.images.Augment`) use
  ``default_rng([seed, mask_index, 1])`` and come before ``lowres`` is derived from the
  crop, so the low-res input is always the downscaled (augmented) image.  Eval: a centre
  crop, no augmentation.  ``boxes`` (detection, :mod:`jattn.data.detection`) replaces the
  crop by an aspect-preserving resize + bottom / right padding (and the flips, drawn from
  the same generator) and brings ``classes``, ``image_id`` and ``scale``.
* Bad data.  A record that cannot be decoded or is too small is skipped: its slot takes
  the next readable record in source order, one warning is logged per file (per process)
  and the per-example ``_bad_data`` vector ``[skipped, converted, upscaled]`` describing
  the slot's own file is summed by the pipeline iterators into :class:`BadDataStats`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from jattn.data import images as images_lib
from jattn.data import masks as masks_lib

__all__ = [
    "FIELDS",
    "BAD_DATA_KEY",
    "TRUNCATED_KEY",
    "BadDataStats",
    "ExampleMaker",
    "ExampleOrder",
    "ExampleLoader",
    "BadDataLog",
    "check_readable",
    "process_info",
    "image_size_pair",
]

logger = logging.getLogger("jattn.data")

#: Per-example / per-batch key of the ``[skipped, converted, upscaled]`` counts.
BAD_DATA_KEY = "_bad_data"
#: Per-example / per-batch key (detection) of the boxes dropped beyond ``max_boxes``.
TRUNCATED_KEY = "_boxes_truncated"

#: Example fields a task may ask for beside "image" [H, W, 3] float32 in [-1, 1]:
#: "mask" [H, W, 1] float32 (1 = hole), "label" [] int32, "lowres" [H/s, W/s, 3] float32
#: (bicubic downscale by ``scale``), "segmentation" [H, W] int32 (0 = background), "boxes"
#: (detection: "boxes" [M, 4] float32, "classes" [M] int32, "image_id" [] int32, "scale" []
#: float32, M = ``max_boxes``; :mod:`jattn.data.detection`).
FIELDS = ("mask", "label", "lowres", "segmentation", "boxes")


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``256 -> (256, 256)``; ``(H, W)`` unchanged; must be positive."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Defaults to ``jax.process_index()`` / ``jax.process_count()``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got "
                         f"{process_index}, {process_count}")
    return int(process_index), int(process_count)


@dataclasses.dataclass
class BadDataStats:
    """Counts of examples skipped (bad file), converted to RGB, and upscaled."""

    skipped: int = 0
    converted: int = 0
    upscaled: int = 0

    def add(self, counts: Any) -> None:
        """Adds ``[skipped, converted, upscaled]`` (an array ``[..., 3]`` is summed)."""
        c = np.asarray(counts, np.int64).reshape(-1, 3).sum(0)
        self.skipped += int(c[0])
        self.converted += int(c[1])
        self.upscaled += int(c[2])

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (f"bad data: {self.skipped} skipped, {self.converted} converted to RGB, "
                f"{self.upscaled} upscaled")


class BadDataLog:
    """Logs one warning per bad file (per process); thread-safe, picklable."""

    def __init__(self):
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        del state
        self.__init__()

    def warn(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self._seen:
                return
            self._seen.add(name)
        logger.warning("skipping bad image %s: %s", name, reason)


@dataclasses.dataclass(frozen=True)
class ExampleMaker:
    """Record -> ``{"image": [H, W, 3] float32 in [-1, 1], <fields>}`` (see :data:`FIELDS`)."""

    image_size: tuple[int, int]
    mask_spec: Any
    seed: int
    mask_seed: int
    train: bool
    resize_shorter: int | None = None
    random_flip: bool = True
    max_upscale: float | None = 2.0
    fields: tuple[str, ...] = ("mask",)
    scale: int | None = None
    augment: Any = None  # training augmentation: an images.Augment or a config block (None: the default)
    max_boxes: int = 50  # detection ("boxes"): boxes per example (config data.max_boxes)

    def __post_init__(self):
        object.__setattr__(self, "image_size", image_size_pair(self.image_size))
        augment = images_lib.parse_augment(self.augment)
        object.__setattr__(self, "augment", augment)
        if augment.rot90 and self.image_size[0] != self.image_size[1]:
            h, w = self.image_size
            raise ValueError(f"data.augment.rot90 needs a square crop (data.image_size), got {w}x{h}")
        object.__setattr__(self, "fields", tuple(self.fields))
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"unknown example field(s) {unknown}; known: {list(FIELDS)}")
        if "boxes" in self.fields:
            m = self.max_boxes
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
                raise ValueError(f"data.max_boxes: expected a whole number >= 1, got {m!r}")
            object.__setattr__(self, "max_boxes", int(m))
            if augment.crop != "random" or augment.rot90:
                raise ValueError("detection examples (the 'boxes' field) are resized and padded, not cropped: "
                                 "data.augment.crop must be 'random' (the default, unused) and rot90 off; "
                                 f"got crop={augment.crop!r}, rot90={augment.rot90}")
            if self.resize_shorter is not None:
                raise ValueError("detection examples (the 'boxes' field) are resized to fit data.image_size; "
                                 f"resize_shorter / data.eval_resize_shorter must be unset, got {self.resize_shorter}")
        if self.seed < 0 or self.mask_seed < 0:
            raise ValueError(f"seeds must be >= 0, got seed={self.seed}, mask_seed={self.mask_seed}")
        if "mask" in self.fields:
            if self.mask_spec is None:
                raise ValueError("the 'mask' field needs a mask spec (config data.mask)")
            object.__setattr__(self, "mask_spec", masks_lib.parse_mask_spec(self.mask_spec))
            self.mask(0)  # a spec that does not fit the image size fails here, before training
        if "lowres" in self.fields:
            h, w = self.image_size
            if not self.scale or int(self.scale) < 1 or h % int(self.scale) or w % int(self.scale):
                raise ValueError(f"the 'lowres' field needs an integer scale (config data.scale) that divides "
                                 f"the image size {w}x{h}, got {self.scale!r}")
            object.__setattr__(self, "scale", int(self.scale))

    def image(self, data: bytes | np.ndarray, name: str, mask_index: int
              ) -> tuple[np.ndarray, str | None, bool]:
        """Decoded, resized, cropped, flipped image; raises ``BadImageError``."""
        out, conversion, upscaled = self.example(data, name, mask_index)
        return out["image"], conversion, upscaled

    def example(self, data: bytes | np.ndarray, name: str, mask_index: int, label: int | None = None,
                segmentation: np.ndarray | None = None, objects: Any = None
                ) -> tuple[dict[str, np.ndarray], str | None, bool]:
        """``(example dict, conversion or None, upscaled)``; raises ``BadImageError`` for
        a bad image and ``ValueError`` when the record lacks a field the task needs
        (``objects``: the record's :class:`jattn.data.sources.Objects`, for "boxes")."""
        want_seg = "segmentation" in self.fields
        if want_seg and segmentation is None:
            raise ValueError(f"{name}: the source has no segmentation maps, but the task needs them")
        rng = np.random.default_rng([self.seed, int(mask_index), 1]) if self.train else None
        if "boxes" in self.fields:
            from jattn.data import detection

            if objects is None:
                raise ValueError(f"{name}: the source has no boxes, but the task needs them")
            rgb, conversion = images_lib.decode_rgb(data, name, exif=False)
            out, dropped = detection.preprocess(
                rgb, objects, self.image_size, rng=rng, flip_lr=self.random_flip and self.augment.flip_lr,
                flip_ud=self.augment.flip_ud, max_boxes=self.max_boxes,
                segmentation=segmentation if want_seg else None, name=name)
            out["image_id"] = np.asarray(objects.image_id, np.int32)
            out[TRUNCATED_KEY] = np.asarray(dropped, np.int32)
            upscaled = False
        else:
            rgb, conversion = images_lib.decode_rgb(data, name)
            result = images_lib.preprocess(
                rgb, name, self.image_size, resize_shorter=self.resize_shorter, rng=rng,
                random_flip=self.random_flip, max_upscale=self.max_upscale,
                segmentation=segmentation if want_seg else None, augment=self.augment)
            out = {"image": result[0]}
            if want_seg:
                out["segmentation"] = result[2]
            upscaled = result[1]
        if "mask" in self.fields:
            out["mask"] = self.mask(mask_index)
        if "label" in self.fields:
            if label is None:
                raise ValueError(f"{name}: the source has no class labels, but the task needs them")
            out["label"] = np.asarray(label, np.int32)
        if "lowres" in self.fields:
            out["lowres"] = images_lib.downscale(out["image"], self.scale)
        return out, conversion, upscaled

    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{key: (shape, dtype)}`` of one example, keys in a fixed order."""
        h, w = self.image_size
        spec = {"image": ((h, w, 3), np.dtype(np.float32))}
        m = self.max_boxes
        shapes = {"mask": ((h, w, 1), np.float32), "label": ((), np.int32),
                  "lowres": ((h // (self.scale or 1), w // (self.scale or 1), 3), np.float32),
                  "segmentation": ((h, w), np.int32), "boxes": ((m, 4), np.float32), "classes": ((m,), np.int32),
                  "image_id": ((), np.int32), "scale": ((), np.float32), TRUNCATED_KEY: ((), np.int32)}
        for f in FIELDS:
            if f in self.fields:
                keys = ("boxes", "classes", "image_id", "scale", TRUNCATED_KEY) if f == "boxes" else (f,)
                for k in keys:
                    spec[k] = (shapes[k][0], np.dtype(shapes[k][1]))
        return spec

    def mask(self, mask_index: int) -> np.ndarray:
        # train=False: folder masks take file mask_index % n unaugmented, as eval_set does.
        return masks_lib.mask_for_index(self.mask_spec, self.image_size, self.mask_seed,
                                        int(mask_index), train=self.train)


@dataclasses.dataclass(frozen=True)
class ExampleOrder:
    """Maps a process-local stream position to ``(source index, mask index)``."""

    num_records: int
    seed: int
    train: bool
    process_index: int
    process_count: int
    batch_size: int = 1  # per process

    def __post_init__(self):
        if self.per_process < 1:
            raise ValueError(f"source has {self.num_records} examples, fewer than one global batch "
                             f"of {self.batch_size} x {self.process_count} processes")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch."""
        return self.num_records // self.global_batch

    @property
    def per_process(self) -> int:
        """Examples per process and epoch (eval also reads its share of the remainder)."""
        whole = self.batches_per_epoch * self.batch_size
        if self.train:
            return whole
        return whole + (self.num_records - self.batches_per_epoch * self.global_batch) // self.process_count

    def permutation(self, epoch: int) -> np.ndarray:
        dtype = np.int32 if self.num_records < 2**31 else np.int64
        return np.random.default_rng([self.seed, int(epoch), 2]).permutation(
            self.num_records).astype(dtype)

    def slot(self, j: int) -> int:
        """Global slot (position in the epoch) of this process's j-th example of the epoch."""
        b, p = self.batch_size, self.process_index
        g, r = divmod(j, b)
        if g < self.batches_per_epoch:
            return g * self.global_batch + p * b + r
        share = (self.num_records - self.batches_per_epoch * self.global_batch) // self.process_count
        return self.batches_per_epoch * self.global_batch + p * share + (j - self.batches_per_epoch * b)

    def __call__(self, k: int, perm_cache: list | None = None) -> tuple[int, int]:
        epoch, j = divmod(int(k), self.per_process)
        slot = self.slot(j)
        if not self.train:  # repeated eval passes revisit the same examples and masks
            return slot, slot
        perm = None
        if perm_cache is not None:
            cached = perm_cache[0]  # (epoch, permutation); replaced atomically
            if cached is not None and cached[0] == epoch:
                perm = cached[1]
        if perm is None:
            perm = self.permutation(epoch)
            if perm_cache is not None:
                perm_cache[0] = (epoch, perm)
        return int(perm[slot]), epoch * self.batches_per_epoch * self.global_batch + slot


class ExampleLoader:
    """``k -> {"image", <fields>, "_bad_data"}`` for a random-access source (picklable)."""

    def __init__(self, source, maker: ExampleMaker, order: ExampleOrder):
        self.source, self.maker, self.order = source, maker, order
        self.log = BadDataLog()
        self._perm_cache: list = [None]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perm_cache"] = [None]
        return state

    def _try(self, i: int, mask_index: int):
        try:
            record = self.source[i]
            return self.maker.example(record.data, record.name, mask_index, record.label,
                                      record.segmentation, getattr(record, "objects", None)), None
        except images_lib.BadImageError as e:
            return None, (e.name, e.reason)
        except Exception as e:  # noqa: BLE001 - unreadable record: never kill a long run
            name = getattr(e, "filename", None) or f"record {i} of {self.source!r}"
            return None, (name, f"cannot read ({type(e).__name__}: {e})")

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        src_index, mask_index = self.order(int(k), self._perm_cache)
        n = self.order.num_records
        counts = np.zeros(3, np.int32)
        result, error = self._try(src_index, mask_index)
        if result is None:
            self.log.warn(*error)
            counts[0] = 1
            for step in range(1, n):
                result, error = self._try((src_index + step) % n, mask_index)
                if result is None:
                    self.log.warn(*error)
                else:
                    break
            if result is None:
                raise ValueError(f"no readable image in {self.source!r}")
        else:
            counts[1] = result[1] is not None
            counts[2] = result[2]
        return {**result[0], BAD_DATA_KEY: counts}


def check_readable(source, maker: ExampleMaker, max_records: int | None = None) -> int:
    """Index of the first usable record of a random-access source (a clear error if none)."""
    n = len(source) if max_records is None else min(len(source), max_records)
    first_error = None
    for i in range(n):
        record = None
        try:
            record = source[i]
            maker.example(record.data, record.name, 0, record.label, record.segmentation,
                          getattr(record, "objects", None))
            return i
        except images_lib.BadImageError as e:
            first_error = first_error or e
        except ValueError as e:
            if record is not None and "the source has no" in str(e):
                raise ValueError(f"{source!r}: {e}") from None
            first_error = first_error or e
        except Exception as e:  # noqa: BLE001 - reported below if nothing is readable
            first_error = first_error or e
    raise ValueError(f"no readable image in {source!r} (tried {n} records; first error: "
                     f"{first_error})")
