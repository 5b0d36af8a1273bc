"""COCO box metrics (pycocotools' ``COCOeval``, bbox): ground truth from a detection source,
results from batched detections, and the six AP numbers.

* :func:`coco_ground_truth` builds a COCO-format dict (``images``, ``annotations`` in the
  original image's pixels with ``iscrowd`` and ``area``, ``categories``) from a detection
  source (:class:`jattn.data.CocoSource`, :class:`jattn.data.SyntheticShapesSource`, a TFDS
  source with ``objects``) or from records.  For COCO itself the official instances json
  (loaded) is also a valid ground truth: image and category ids are COCO's.
* :func:`coco_results` turns a batch of detections (in input-image pixels, the batch's
  ``image_id`` and ``scale``) into COCO result entries (original pixels, ``[x, y, w, h]``).
* :func:`coco_metrics` runs ``COCOeval`` with its prints silenced: ``{"map", "map50",
  "map75", "map_small", "map_medium", "map_large"}`` (AP at IoU .50:.95, .50, .75 and by
  ground-truth area: < 32², 32²..96², > 96²; up to 100 detections per image).  Empty results
  score 0; a number without ground truth (e.g. ``map_large`` when there are no large
  objects, or no annotations at all) is NaN (pycocotools' -1).

pycocotools is the ``coco`` extra (``pip install 'jattn[coco]'``), imported on use.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["METRICS", "coco_ground_truth", "coco_results", "coco_metrics"]

#: The keys of :func:`coco_metrics`, in ``COCOeval.stats`` order.
METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def _pycocotools():
    from jattn import _require_extra

    _require_extra("pycocotools", "coco", "the COCO metrics (jattn.coco_eval)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _image_size(data: Any) -> tuple[int, int]:
    """``(height, width)`` of encoded bytes (the header only, no EXIF rotation) or an array."""
    if isinstance(data, np.ndarray):
        return int(data.shape[0]), int(data.shape[1])
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return int(im.size[1]), int(im.size[0])


def coco_ground_truth(examples: Any, *, indices: Iterable[int] | None = None,
                      category_ids: Sequence[int] | None = None,
                      class_names: Sequence[str] | None = None) -> dict:
    """The COCO-format ground truth of an evaluation set.

    ``examples``: a detection source (random access; its ``category_ids`` /
    ``class_names`` are the defaults; a source with an ``objects(i)`` method is read
    without decoding images), or an iterable of :class:`jattn.data.sources.Record` /
    :class:`jattn.data.sources.Objects`.  ``indices``: the source's examples to include
    (default all; the evaluation loop's are ``range(number evaluated)``).  Crowd boxes are
    included (``iscrowd: 1``: COCOeval ignores detections matched to them); ``area`` is the
    source's (COCO's segment area) or else the box's.  ``category_ids[k]`` is class ``k``'s
    id (default ``1..K``).  A duplicate image id is a ``ValueError``.
    """
    if category_ids is None:
        category_ids = getattr(examples, "category_ids", None)
    if class_names is None:
        class_names = getattr(examples, "class_names", None)
    random_access = hasattr(examples, "__getitem__") and hasattr(examples, "__len__") and not isinstance(
        examples, (list, tuple))
    if random_access:
        idx = range(len(examples)) if indices is None else indices
        get = getattr(examples, "objects", None)
        items = ((get(i) if get is not None else examples[i]) for i in idx)
    else:
        items = iter(examples) if indices is None else (list(examples)[i] for i in indices)
    images, annotations, seen, max_class = [], [], set(), -1
    for item in items:
        objects = getattr(item, "objects", item)
        if objects is None or not hasattr(objects, "boxes"):
            raise ValueError(f"{getattr(item, 'name', item)!r} has no objects (boxes)")
        if objects.normalized or objects.size is None:
            if not hasattr(item, "data"):
                raise ValueError(f"image {objects.image_id}: objects without the image size need the record")
            objects = objects.in_pixels(*_image_size(item.data))
        h, w = objects.size
        image_id = int(objects.image_id)
        if image_id in seen:
            raise ValueError(f"duplicate image id {image_id} in the ground truth")
        seen.add(image_id)
        entry = {"id": image_id, "height": h, "width": w}
        if hasattr(item, "name"):
            entry["file_name"] = str(item.name)
        images.append(entry)
        for k in range(len(objects)):
            x1, y1, x2, y2 = (float(v) for v in objects.boxes[k])
            cls = int(objects.classes[k])
            max_class = max(max_class, cls)
            area = (x2 - x1) * (y2 - y1) if objects.areas is None else float(objects.areas[k])
            annotations.append({"image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area,
                                "iscrowd": int(objects.iscrowd[k]), "category_id": cls})
    if category_ids is None:
        n = len(class_names) if class_names is not None else max_class + 1
        category_ids = tuple(range(1, n + 1))
    category_ids = [int(c) for c in category_ids]
    if max_class >= len(category_ids):
        raise ValueError(f"class {max_class} has no category id ({len(category_ids)} given)")
    for i, a in enumerate(annotations):
        a["category_id"] = category_ids[a["category_id"]]
        a["id"] = i + 1
    names = list(class_names) if class_names is not None else [str(c) for c in category_ids]
    categories = [{"id": c, "name": str(n)} for c, n in zip(category_ids, names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(image_ids: Any, boxes: Any, scores: Any, classes: Any, valid: Any, scale: Any,
                 category_ids: Sequence[int], sizes: Any = None) -> list[dict]:
    """COCO result entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of a
    batch of detections.

    ``image_ids`` ``[B]`` and ``scale`` ``[B]`` as in the batch; ``boxes`` ``[B, D, 4]``
    ``(x1, y1, x2, y2)`` in input-image pixels, mapped back by ``/ scale``; ``scores``,
    ``classes`` (class indices) and ``valid`` (None: all) ``[B, D]``; ``category_ids[k]``
    is class ``k``'s COCO id; ``sizes`` ``[B, 2]``: each original image's ``(height, width)``,
    to clip the boxes to (a box reaching into the input's padding ends at the image's
    border; None: no clipping).
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    b = len(image_ids)
    boxes = np.asarray(boxes, np.float64).reshape(b, -1, 4)
    d = boxes.shape[1]
    scores = np.asarray(scores, np.float64).reshape(b, d)
    classes = np.asarray(classes).reshape(b, d).astype(np.int64)
    valid = np.ones((b, d), bool) if valid is None else np.asarray(valid, bool).reshape(b, d)
    scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (b,))
    ids = np.asarray([int(c) for c in category_ids], np.int64)
    chosen = classes[valid]
    if chosen.size and (chosen.min() < 0 or chosen.max() >= len(ids)):
        raise ValueError(f"detection classes must be in [0, {len(ids)}), got {chosen.min()}..{chosen.max()}")
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise ValueError(f"scale must be positive, got {scale}")
    limits = None if sizes is None else np.asarray(sizes, np.float64).reshape(b, 2)[:, ::-1]  # (width, height)
    out = []
    for i, j in zip(*np.nonzero(valid)):
        box = boxes[i, j] / scale[i]
        if limits is not None:
            box = np.clip(box, 0.0, np.tile(limits[i], 2))
        x1, y1, x2, y2 = box
        out.append({"image_id": int(image_ids[i]), "category_id": int(ids[classes[i, j]]),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(scores[i, j])})
    return out


def coco_metrics(ground_truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *,
                 image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """``{"map", "map50", "map75", "map_small", "map_medium", "map_large"}`` of ``results``
    (:func:`coco_results` entries) against ``ground_truth`` (:func:`coco_ground_truth`, or
    a loaded COCO instances json); ``image_ids``: evaluate those images only (default: all of
    the ground truth's).  Result image ids outside the ground truth are a ``ValueError``."""
    COCO, COCOeval = _pycocotools()
    gt_dict = dict(copy.deepcopy(ground_truth))
    gt_dict.setdefault("annotations", [])
    for key in ("images", "categories"):
        if key not in gt_dict:
            raise ValueError(f"the ground truth has no {key!r}")
    known = {int(im["id"]) for im in gt_dict["images"]}
    unknown = sorted({int(r["image_id"]) for r in results} - known)
    if unknown:
        raise ValueError(f"results for image ids not in the ground truth: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        if results:
            dt = gt.loadRes(copy.deepcopy(list(results)))
        else:  # loadRes refuses an empty list: an empty result set by hand
            dt = COCO()
            dt.dataset = {"images": list(gt_dict["images"]), "categories": copy.deepcopy(gt_dict["categories"]),
                          "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[:len(METRICS)]]
    return {k: (v if v >= 0 else math.nan) for k, v in zip(METRICS, stats)}
