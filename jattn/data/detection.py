"""Detection data: COCO-format folders, TFDS ``objects``, synthetic shapes, and the box-carrying
transforms shared by the tf.data and grain pipelines.

The batch interface (the pipelines' ``"boxes"`` field; asking for it brings the other three):

* ``"boxes"`` float32 ``[B, M, 4]`` ``(x1, y1, x2, y2)`` in pixels of the network's input
  image (after the resize and the padding), ``M = max_boxes`` (config ``data.max_boxes``,
  default 50); padding rows are zeros;
* ``"classes"`` int32 ``[B, M]``: the class index in ``[0, K)`` (COCO's category ids in
  sorted order, :attr:`CocoSource.category_ids`), ``-1`` on padding rows;
* ``"image_id"`` int32 ``[B]``: COCO's image id (TFDS: ``image/id``), or the example index
  for synthetic data;
* ``"scale"`` float32 ``[B]``: input pixels per original pixel, so ``boxes / scale`` are in
  the original image's pixels (COCO results, :mod:`jattn.coco_eval`).

The transform (:func:`preprocess`): the image is resized, aspect preserved, so that it fits
``image_size`` (the longer side, relative to the crop, fills it: ``scale = min(H / h,
W / w)``), with PIL's antialiased bicubic over exactly the source region ``[0, nw / scale] x
[0, nh / scale]`` so that ``boxes * scale`` is exact, then padded bottom / right to
``image_size`` with 0.0 (mid-grey in [-1, 1]).  Training flips the resized image left-right
with probability 1/2 (``flip_lr``; ``flip_ud`` also up-down) before the padding, so the
padding stays bottom / right; boxes follow.  Crowd boxes are never targets (they stay in the
evaluation ground truth, :func:`jattn.coco_eval.coco_ground_truth`); boxes are clipped to
the image and dropped when empty; more than ``max_boxes`` keep the ``max_boxes`` largest
(by area after the transform, ties in source order; the rest counted in the iterators'
``boxes_truncated``), in source order.  The flips draw from the example's
``default_rng([seed, index, 1])``, as the other augmentations, so batches are a function of
(seed, index), the same in grain and tf.data.  Images are decoded without EXIF rotation
(COCO's boxes are in the stored pixels' frame).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jattn.data.sources import Objects, Record, _split_name, _VAL

__all__ = [
    "DETECTION_KEYS",
    "TRUNCATED_KEY",
    "COCO_2017_CATEGORY_IDS",
    "SYNTHETIC_CLASSES",
    "CocoSource",
    "SyntheticShapesSource",
    "SyntheticDrawing",
    "fit_size",
    "resize_exact",
    "transform_boxes",
    "select_boxes",
    "preprocess",
    "tfds_objects",
    "tfds_object_classes",
    "default_category_ids",
]

logger = logging.getLogger("jattn.data")

#: The batch entries the ``"boxes"`` field brings, in order.
DETECTION_KEYS = ("boxes", "classes", "image_id", "scale")
#: Per-example / per-batch key (internal) of the boxes dropped beyond ``max_boxes``.
TRUNCATED_KEY = "_boxes_truncated"

#: COCO's 80 category ids (of 1..90), in order: class k of ``coco/2017`` (TFDS) is id ``[k]``.
COCO_2017_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)


def default_category_ids(dataset_name: str, num_classes: int) -> tuple[int, ...]:
    """COCO's ids for a TFDS COCO dataset with its 80 classes, else ``1..K``."""
    if dataset_name.split("/")[0] == "coco" and num_classes == len(COCO_2017_CATEGORY_IDS):
        return COCO_2017_CATEGORY_IDS
    return tuple(range(1, num_classes + 1))


# --------------------------------------------------------------------------- transforms


def fit_size(height: int, width: int, image_size: Sequence[int]) -> tuple[float, int, int]:
    """``(scale, new_height, new_width)``: ``scale = min(H / height, W / width)`` and the
    whole pixels of ``image * scale`` that fit in ``image_size = (H, W)``."""
    H, W = int(image_size[0]), int(image_size[1])
    s = min(H / height, W / width)
    nh = min(H, max(1, math.floor(height * s + 1e-6)))
    nw = min(W, max(1, math.floor(width * s + 1e-6)))
    return s, nh, nw


def resize_exact(img: np.ndarray, scale: float, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``[h, w, ...]`` uint8 -> ``size = (nh, nw)``: output pixel ``(x, y)`` covers the source
    region ``[x / scale, (x + 1) / scale)`` (PIL's resize over the box ``(0, 0, nw / scale,
    nh / scale)``; bicubic, antialiased, or nearest), so coordinates map by exactly ``scale``."""
    h, w = img.shape[:2]
    nh, nw = size
    box = (0.0, 0.0, min(float(w), nw / scale), min(float(h), nh / scale))
    if (nh, nw) == (h, w) and box == (0.0, 0.0, float(w), float(h)):
        return img
    resample = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(Image.fromarray(img).resize((nw, nh), resample, box=box))


def transform_boxes(boxes: np.ndarray, scale: float, size: tuple[int, int], *, flip_lr: bool = False,
                    flip_ud: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel boxes ``[N, 4]`` -> ``(boxes of the resized, flipped (nh, nw) image,
    clipped to it, float32 [N, 4]; whether each is non-empty [N])``."""
    nh, nw = size
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * scale
    if flip_lr:
        b = np.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], axis=1)
    if flip_ud:
        b = np.stack([b[:, 0], nh - b[:, 3], b[:, 2], nh - b[:, 1]], axis=1)
    b = np.clip(b, 0.0, [nw, nh, nw, nh])
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b.astype(np.float32), valid


def select_boxes(boxes: np.ndarray, classes: np.ndarray, max_boxes: int
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(boxes [M, 4] float32 (zero rows padding), classes [M] int32 (-1 padding), number
    dropped)``: at most ``M = max_boxes``, the largest by area (ties in order), kept in
    their order."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    n = len(boxes)
    dropped = max(0, n - max_boxes)
    if dropped:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
        boxes, classes = boxes[keep], classes[keep]
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_classes = np.full((max_boxes,), -1, np.int32)
    out_boxes[:len(boxes)] = boxes
    out_classes[:len(classes)] = classes
    return out_boxes, out_classes, dropped


_truncation_warned = threading.Event()


def preprocess(rgb: np.ndarray, objects: Objects, image_size: Sequence[int], *,
               rng: np.random.Generator | None = None, flip_lr: bool = True, flip_ud: bool = False,
               max_boxes: int = 50, segmentation: np.ndarray | None = None, name: str = "<image>"
               ) -> tuple[dict[str, np.ndarray], int]:
    """uint8 ``[h, w, 3]`` and its objects -> ``({"image" float32 [H, W, 3] in [-1, 1],
    "boxes", "classes", "scale" (see the module docstring), "segmentation" int32 [H, W] with
    a map}, boxes dropped beyond max_boxes)``.  Flips only with ``rng`` (training): one
    ``rng.random()`` for ``flip_lr``, then one for ``flip_ud``, each only when enabled."""
    from jattn.data.images import BadImageError, to_float

    H, W = int(image_size[0]), int(image_size[1])
    h, w = rgb.shape[:2]
    if segmentation is not None and segmentation.shape[:2] != (h, w):
        raise BadImageError(name, f"segmentation map is {segmentation.shape[1]}x{segmentation.shape[0]} "
                                  f"but the image is {w}x{h}")
    objects = objects.in_pixels(h, w)
    scale, nh, nw = fit_size(h, w, (H, W))
    img = resize_exact(rgb, scale, (nh, nw))
    seg = None if segmentation is None else resize_exact(np.asarray(segmentation, np.uint8), scale, (nh, nw),
                                                         nearest=True)
    lr = rng is not None and flip_lr and rng.random() < 0.5
    ud = rng is not None and flip_ud and rng.random() < 0.5
    if lr:
        img = img[:, ::-1]
        seg = None if seg is None else seg[:, ::-1]
    if ud:
        img = img[::-1]
        seg = None if seg is None else seg[::-1]
    image = np.zeros((H, W, 3), np.float32)
    image[:nh, :nw] = to_float(np.ascontiguousarray(img))
    targets = ~objects.iscrowd
    boxes, valid = transform_boxes(objects.boxes[targets], scale, (nh, nw), flip_lr=lr, flip_ud=ud)
    boxes, classes, dropped = select_boxes(boxes[valid], objects.classes[targets][valid], int(max_boxes))
    if dropped and not _truncation_warned.is_set():
        _truncation_warned.set()
        logger.warning("%s has %d boxes, more than max_boxes=%d: the %d largest kept (boxes dropped are "
                       "counted in the iterator's boxes_truncated; warned once)", name, dropped + max_boxes,
                       max_boxes, max_boxes)
    out = {"image": image, "boxes": boxes, "classes": classes, "scale": np.asarray(scale, np.float32)}
    if seg is not None:
        full = np.zeros((H, W), np.int32)
        full[:nh, :nw] = seg
        out["segmentation"] = full
    return out, dropped


# --------------------------------------------------------------------------- TFDS


def tfds_object_classes(feature: Any) -> tuple[str, ...] | None:
    """The class names of a TFDS ``Sequence({"bbox", "label", ...})`` feature, or None when
    it is not one (no ``bbox`` or no class-label ``label``)."""
    try:
        feature["bbox"]
        names = feature["label"].names
    except (KeyError, TypeError, AttributeError):
        return None
    return tuple(str(n) for n in names)


def tfds_objects(example: Mapping[str, Any], objects_key: str = "objects", *, index: int = 0) -> Objects:
    """A TFDS example's objects (``coco/2017``: ``objects`` ``{"bbox": [N, 4] normalized
    (ymin, xmin, ymax, xmax), "label": [N], "is_crowd": [N], "area": [N]}``, ``image/id``)
    as normalized :class:`Objects` ``(x1, y1, x2, y2)``; ``image_id`` is ``image/id``, else
    ``index``."""
    obj = example[objects_key]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
    crowd = obj.get("is_crowd") if hasattr(obj, "get") else None
    area = obj.get("area") if hasattr(obj, "get") else None
    image_id = example.get("image/id", index) if hasattr(example, "get") else index
    return Objects(bbox[:, [1, 0, 3, 2]], np.asarray(obj["label"]).astype(np.int32),
                   None if crowd is None else np.asarray(crowd, bool),
                   None if area is None else np.asarray(area, np.float32),
                   image_id=int(np.asarray(image_id)), normalized=True)


# --------------------------------------------------------------------------- COCO folders


class CocoSource:
    """A COCO-format folder: an instances json (``images``, ``annotations`` with ``bbox``
    ``[x, y, w, h]``, ``category_id``, ``iscrowd``, ``area``; ``categories``) and its images.

    ``annotations``: the json, relative to ``root`` (or absolute); ``images``: the image
    folder (``file_name`` is relative to it), relative to ``root``; when the default
    ``"images"`` subfolder does not exist, the images are beside the json.  Images are in
    the order of their ids; classes are the categories in the order of their ids
    (``category_ids[k]`` is class ``k``'s COCO id, ``class_names[k]`` its name).  Boxes
    with a width or height below 1 pixel are skipped (counted in ``skipped_boxes``);
    crowd boxes are kept in the records (evaluation) and never become training targets.
    ``skip_empty=True`` leaves out images without a non-crowd box (training).  A missing or
    unreadable image file is a bad record, skipped by the pipelines like any other.
    """

    def __init__(self, root: str | os.PathLike, annotations: str | os.PathLike = "annotations.json",
                 images: str | os.PathLike = "images", *, skip_empty: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"COCO folder not found: {self.root}")
        self.annotations = os.path.join(self.root, os.fspath(annotations))
        if not os.path.isfile(self.annotations):
            raise FileNotFoundError(f"COCO annotations not found: {self.annotations}")
        self.images = os.path.join(self.root, os.fspath(images))
        if not os.path.isdir(self.images):
            if os.fspath(images) != "images":
                raise FileNotFoundError(f"COCO image folder not found: {self.images}")
            self.images = os.path.dirname(self.annotations)
        try:
            with open(self.annotations, encoding="utf-8") as f:
                data = json.load(f)
            self._parse(data, bool(skip_empty))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"COCO annotations {self.annotations}: {type(e).__name__}: {e}") from None

    def _parse(self, data: Mapping[str, Any], skip_empty: bool) -> None:
        cats = sorted(data.get("categories") or [], key=lambda c: int(c["id"]))
        if not cats:
            raise ValueError("no categories")
        self.category_ids = tuple(int(c["id"]) for c in cats)
        if len(set(self.category_ids)) != len(cats):
            raise ValueError("duplicate category ids")
        self.class_names = tuple(str(c.get("name", c["id"])) for c in cats)
        cls_of = {cid: k for k, cid in enumerate(self.category_ids)}
        images = sorted(data.get("images") or [], key=lambda im: int(im["id"]))
        ids = [int(im["id"]) for im in images]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate image ids")
        per_image: dict[int, list] = {i: [] for i in ids}
        self.skipped_boxes = 0
        for a in data.get("annotations") or []:
            image_id, cid = int(a["image_id"]), int(a["category_id"])
            if cid not in cls_of:
                raise ValueError(f"annotation {a.get('id')} has category_id {cid}, not in the categories")
            if image_id not in per_image:
                raise ValueError(f"annotation {a.get('id')} is of image {image_id}, not in the images")
            x, y, bw, bh = (float(v) for v in a["bbox"])
            if not (bw >= 1 and bh >= 1):
                self.skipped_boxes += 1
                continue
            per_image[image_id].append(((x, y, x + bw, y + bh), cls_of[cid], bool(a.get("iscrowd", 0)),
                                        float(a.get("area", bw * bh))))
        if skip_empty:
            images = [im for im in images if any(not o[2] for o in per_image[int(im["id"])])]
        if not images:
            raise ValueError("no images" + (" with boxes (skip_empty)" if skip_empty else ""))
        self._ids = np.array([int(im["id"]) for im in images], np.int64)
        self._files = np.array([str(im["file_name"]).encode("utf-8") for im in images], dtype=bytes)
        self._sizes = np.array([(int(im.get("height", 0)), int(im.get("width", 0))) for im in images], np.int64)
        objs = [per_image[int(i)] for i in self._ids]
        self._offsets = np.cumsum([0] + [len(o) for o in objs]).astype(np.int64)
        flat = [o for os_ in objs for o in os_]
        self._boxes = np.array([o[0] for o in flat], np.float32).reshape(-1, 4)
        self._classes = np.array([o[1] for o in flat], np.int32)
        self._crowd = np.array([o[2] for o in flat], bool)
        self._areas = np.array([o[3] for o in flat], np.float32)
        if self.skipped_boxes:
            logger.info("COCO annotations %s: %d boxes narrower or lower than 1 pixel skipped",
                        self.annotations, self.skipped_boxes)

    def __len__(self) -> int:
        return len(self._ids)

    def path(self, i: int) -> str:
        return os.path.join(self.images, self._files[int(i)].decode("utf-8"))

    def objects(self, i: int) -> Objects:
        """Image ``i``'s objects (without reading the image)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"COCO image index {i} out of range [0, {len(self)})")
        lo, hi = self._offsets[i], self._offsets[i + 1]
        h, w = (int(v) for v in self._sizes[i])
        return Objects(self._boxes[lo:hi], self._classes[lo:hi], self._crowd[lo:hi], self._areas[lo:hi],
                       image_id=int(self._ids[i]), size=(h, w) if h > 0 and w > 0 else None)

    def __getitem__(self, i: int) -> Record:
        objects = self.objects(i)
        path = self.path(i)
        with open(path, "rb") as f:
            data = f.read()
        return Record(data, path, objects=objects)

    def __repr__(self) -> str:
        return f"CocoSource({self.annotations!r}, {len(self)} images, {len(self.category_ids)} classes)"


# --------------------------------------------------------------------------- synthetic shapes

#: Classes of :class:`SyntheticShapesSource`, in order (``classes=K`` uses the first K).
SYNTHETIC_CLASSES = ("square", "circle", "triangle", "cross", "ring")


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticDrawing:
    """One synthetic image: uint8 ``image [S, S, 3]``, float32 ``boxes [N, 4]`` (the tight
    bounds of each object's visible pixels, ``x2 = last column + 1``), int32 ``classes
    [N]``, uint8 ``colours [N, 3]`` (each object is flat in its colour) and int32
    ``instances [S, S]`` (``j + 1`` on object j's visible pixels, 0 elsewhere)."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    colours: np.ndarray
    instances: np.ndarray


def _shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "triangle":  # apex up, base at the bottom as wide as the shape
        return (dy <= r) & (2 * np.abs(dx) <= dy + r)
    if kind == "cross":
        t = r / 3
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 > (0.55 * r) ** 2)
    raise ValueError(kind)


def _hsv_colour(rng: np.random.Generator) -> np.ndarray:
    """A bright saturated colour: its largest channel is >= 200 (backgrounds stay <= 170)."""
    import colorsys

    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.8, 1.0))
    return np.round(np.asarray(rgb) * 255).astype(np.uint8)


class SyntheticShapesSource:
    """Synthetic detection images (offline, for demos and tests).

    Image ``i`` (``size`` x ``size`` RGB) has a textured background (noise, a gradient,
    stripes or soft blobs, every channel <= 170) and 1..``max_objects`` shapes of the first
    ``classes`` of :data:`SYNTHETIC_CLASSES` (square, circle, triangle, cross, ring), each
    flat in a bright saturated colour (a channel >= 200), of a side log-uniform in
    ``[min_object, max_object]`` pixels (default ``[8, size / 2]``), placed at random so
    that every shape keeps at least 80% of its pixels visible.  Boxes are the tight bounds of each
    shape's visible pixels (exact); ``image_id`` is ``i``.  Everything is drawn from
    ``default_rng([seed, split, i, 11])``: ``'train'`` and ``'val'`` differ.
    """

    def __init__(self, num_examples: int = 1024, size: int = 128, classes: int = 5, max_objects: int = 4, *,
                 split: str | None = None, seed: int = 0, min_object: int = 8, max_object: int | None = None):
        if num_examples <= 0 or size < 16:
            raise ValueError(f"synthetic shapes need num_examples > 0 and size >= 16, got {num_examples}, {size}")
        if not 1 <= classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"synthetic shapes: classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {classes}")
        max_object = size // 2 if max_object is None else int(max_object)
        if not 4 <= min_object <= max_object <= size:
            raise ValueError(f"synthetic shapes need 4 <= min_object <= max_object <= size, got "
                             f"{min_object}, {max_object}, {size}")
        if max_objects < 1:
            raise ValueError(f"synthetic shapes need max_objects >= 1, got {max_objects}")
        self.num_examples, self.size, self.seed = int(num_examples), int(size), int(seed)
        self.num_classes, self.max_objects = int(classes), int(max_objects)
        self.min_object, self.max_object = int(min_object), int(max_object)
        self.split = _split_name(split, "synthetic shapes")
        self._tag = 1 if self.split == _VAL else 0
        self.class_names = SYNTHETIC_CLASSES[:self.num_classes]
        self.category_ids = tuple(range(1, self.num_classes + 1))

    def __len__(self) -> int:
        return self.num_examples

    def _background(self, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        n = self.size
        c0, c1 = rng.uniform(20, 150, 3), rng.uniform(20, 150, 3)
        kind = int(rng.integers(4))
        if kind == 0:  # noise around one colour
            img = c0 + rng.normal(0, 18, (n, n, 3))
        elif kind == 1:  # linear gradient
            a = rng.uniform(0, 2 * np.pi)
            t = ((np.cos(a) * xx + np.sin(a) * yy) / n + 1) / 2
            img = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 6, (n, n, 3))
        elif kind == 2:  # stripes
            a, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
            t = (np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period) + 1) / 2
            img = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 4, (n, n, 3))
        else:  # soft blobs: a few low-frequency waves
            t = np.zeros((n, n))
            for _ in range(3):
                f, a, ph = rng.uniform(0.5, 3), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
                t += np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy) / n + ph)
            t = (t / 3 + 1) / 2
            img = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 5, (n, n, 3))
        return np.clip(np.round(img), 0, 170).astype(np.uint8)

    def draw(self, i: int) -> SyntheticDrawing:
        """Image ``i`` with its boxes, classes, colours and instance map."""
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"synthetic shapes index {i} out of range [0, {self.num_examples})")
        n = self.size
        rng = np.random.default_rng([self.seed, self._tag, i, 11])
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5  # pixel centres
        image = self._background(rng, xx, yy)
        instances = np.zeros((n, n), np.int32)
        areas, classes, colours = [], [], []
        lo, hi = math.log(self.min_object), math.log(self.max_object)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(30):
                side = math.exp(rng.uniform(lo, hi))
                r = side / 2
                cls = int(rng.integers(self.num_classes))
                cx, cy = rng.uniform(r, n - r, 2)
                mask = _shape_mask(SYNTHETIC_CLASSES[cls], xx, yy, cx, cy, r)
                if mask.sum() < 12:
                    continue
                visible = np.bincount(instances.ravel(), minlength=len(areas) + 1)[1:]
                hidden = np.bincount(instances[mask], minlength=len(areas) + 1)[1:]
                if all(visible[j] - hidden[j] >= 0.8 * areas[j] for j in range(len(areas))):
                    break
            else:
                continue
            colour = _hsv_colour(rng)
            instances[mask] = len(areas) + 1
            image[mask] = colour
            areas.append(int(mask.sum()))
            classes.append(cls)
            colours.append(colour)
        boxes = np.zeros((len(areas), 4), np.float32)
        for j in range(len(areas)):
            ys, xs = np.nonzero(instances == j + 1)
            boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        return SyntheticDrawing(image, boxes, np.asarray(classes, np.int32),
                                np.asarray(colours, np.uint8).reshape(-1, 3), instances)

    def objects(self, i: int) -> Objects:
        d = self.draw(i)
        return Objects(d.boxes, d.classes, image_id=int(i), size=(self.size, self.size))

    def __getitem__(self, i: int) -> Record:
        d = self.draw(i)
        return Record(d.image, f"synthetic_shapes[{int(i)}]",
                      objects=Objects(d.boxes, d.classes, image_id=int(i), size=(self.size, self.size)))

    def __repr__(self) -> str:
        return (f"SyntheticShapesSource({self.num_examples} images of {self.size}px, {self.num_classes} classes, "
                f"split={self.split!r}, seed={self.seed})")
