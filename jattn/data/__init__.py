"""Input pipelines: masks, sources, tf.data and grain loaders of image batches (with masks,
labels, low-res inputs, segmentation maps or detection boxes as the task needs).

This package imports neither TensorFlow, tensorflow-datasets nor grain; the pipelines
live in :mod:`jattn.data.tfdata` and :mod:`jattn.data.grain` (imported on use).
"""
from __future__ import annotations

import importlib
from typing import Any

from jattn.data import detection
from jattn.data import masks
from jattn.data import sources
from jattn.data.detection import DETECTION_KEYS, CocoSource, SyntheticShapesSource
from jattn.data.examples import FIELDS, BadDataStats
from jattn.data.images import BadImageError
from jattn.data.masks import eval_set, load_eval_set, mask_for_index, parse_mask_spec, sample_mask
from jattn.data.sharding import data_sharding, per_process_batch_size, to_global_array
from jattn.data.sources import (
    FolderSource,
    Objects,
    SamplePhotosSource,
    ShapesSource,
    TfdsSource,
    coco_source,
    folder_source,
    sample_photos_source,
    shapes_source,
    source_from_config,
    synthetic_shapes_source,
    tfds_source,
)

__all__ = [
    "detection",
    "masks",
    "sources",
    "FIELDS",
    "DETECTION_KEYS",
    "BadDataStats",
    "BadImageError",
    "eval_set",
    "load_eval_set",
    "mask_for_index",
    "parse_mask_spec",
    "sample_mask",
    "data_sharding",
    "per_process_batch_size",
    "to_global_array",
    "FolderSource",
    "SamplePhotosSource",
    "ShapesSource",
    "TfdsSource",
    "Objects",
    "CocoSource",
    "SyntheticShapesSource",
    "coco_source",
    "synthetic_shapes_source",
    "folder_source",
    "sample_photos_source",
    "shapes_source",
    "source_from_config",
    "tfds_source",
    "make_dataset",
]

_LOADERS = {"tf": "jattn.data.tfdata", "tfdata": "jattn.data.tfdata", "grain": "jattn.data.grain"}


def make_dataset(source: Any, *, loader: str = "grain", **kwargs):
    """Batch iterator from ``loader`` ``"grain"`` or ``"tf"``; ``source`` may be a source or a
    ``{"kind": ...}`` config.  Keyword arguments as in ``jattn.data.grain.make_dataset``."""
    if loader not in _LOADERS:
        raise ValueError(f"unknown loader {loader!r}; use one of {sorted(_LOADERS)}")
    if isinstance(source, dict):
        source = source_from_config(source)
    return importlib.import_module(_LOADERS[loader]).make_dataset(source, **kwargs)
