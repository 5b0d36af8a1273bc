"""Image sources: TFDS datasets, image folders, offline sample photos and synthetic shapes.

A *random-access source* has ``__len__`` and ``__getitem__(i) -> Record``; a record holds
encoded image bytes (or a uint8 array) and a name used in warnings, and where the source
has them a class label (sample photos: the photo; folders: the top-level subfolder; TFDS:
its ``label`` feature; shapes: the shape), a segmentation map (shapes; folders with a
``segmentation_root``) and object boxes (:class:`Objects`: COCO folders, synthetic shapes
and TFDS datasets with an ``objects`` feature such as ``coco/2017``; the detection sources
live in :mod:`jattn.data.detection`).  Folders, the sample
photos and TFDS datasets prepared as ``array_record`` are random access (usable by both
pipelines); TFDS ``tfrecord`` datasets are read by the tf.data pipeline only.

tensorflow-datasets is imported lazily, only by :class:`TfdsSource`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Record",
    "Objects",
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "SamplePhotosSource",
    "ShapesSource",
    "TfdsSource",
    "folder_source",
    "sample_photos_source",
    "shapes_source",
    "tfds_source",
    "coco_source",
    "synthetic_shapes_source",
    "source_from_config",
    "hash_split",
    "SAMPLE_PHOTOS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_TRAIN, _VAL = "train", "val"
_SPLIT_ALIASES = {None: None, "all": None, "train": _TRAIN, "val": _VAL, "validation": _VAL}


@dataclasses.dataclass(frozen=True, eq=False)
class Objects:
    """The objects of one image (detection sources).

    ``boxes`` float32 ``[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the original (decoded,
    not EXIF-rotated) image, or, with ``normalized``, as fractions of its width / height
    (TFDS); ``classes`` int32 ``[N]`` in ``[0, K)``; ``iscrowd`` bool ``[N]`` (crowd
    regions: kept for evaluation, never training targets); ``areas`` float32 ``[N]`` (COCO's
    ``area``, the ground truth's size for the small / medium / large metrics; None: the
    box areas); ``image_id`` (COCO's id, or the example index); ``size`` ``(height,
    width)`` of the original image where known.
    """

    boxes: np.ndarray
    classes: np.ndarray
    iscrowd: np.ndarray | None = None
    areas: np.ndarray | None = None
    image_id: int = 0
    size: tuple[int, int] | None = None
    normalized: bool = False

    def __post_init__(self):
        boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "classes", np.asarray(self.classes, np.int32).reshape(-1))
        n = len(boxes)
        crowd = np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool).reshape(-1)
        object.__setattr__(self, "iscrowd", crowd)
        if self.areas is not None:
            object.__setattr__(self, "areas", np.asarray(self.areas, np.float32).reshape(-1))
        if len(self.classes) != n or len(crowd) != n or (self.areas is not None and len(self.areas) != n):
            raise ValueError(f"objects of image {self.image_id}: {n} boxes but {len(self.classes)} classes, "
                             f"{len(crowd)} crowd flags")
        object.__setattr__(self, "image_id", int(self.image_id))
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    def __len__(self) -> int:
        return len(self.boxes)

    def in_pixels(self, height: int, width: int) -> Objects:
        """These objects with boxes in pixels of a ``height`` x ``width`` image (a no-op
        unless ``normalized``)."""
        if not self.normalized:
            return self
        return dataclasses.replace(self, boxes=self.boxes * np.float32([width, height, width, height]),
                                   normalized=False, size=(int(height), int(width)))


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw example: encoded bytes or a uint8 array ``[H, W, C]``, a name, and where
    the source has them a class label, a segmentation map (uint8 / int ``[H, W]``) and
    the image's :class:`Objects` (detection)."""

    data: bytes | np.ndarray
    name: str
    label: int | None = None
    segmentation: np.ndarray | None = None
    objects: Objects | None = None


def _split_name(split: str | None, where: str) -> str | None:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {split!r}; use None, 'train' or 'val'")
    return _SPLIT_ALIASES[split]


def hash_split(key: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` from a stable SHA-256 of ``key`` (a relative path)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return _VAL if h < val_fraction else _TRAIN


# --------------------------------------------------------------------------- folders


def _is_remote(path: str) -> bool:
    return "://" in path


def _walk(root: str):
    """Yields ``(dirpath, filenames)`` below ``root`` (local or ``gs://`` via etils.epath)."""
    if _is_remote(root):
        from etils import epath

        for dirpath, _, filenames in epath.Path(root).walk():
            yield os.fspath(dirpath), filenames
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            yield dirpath, filenames


class FolderSource:
    """All images below ``root`` (recursive; extensions in ``extensions``, any case).

    Files are sorted by relative path.  With ``split='train'`` / ``'val'`` a file belongs
    to ``val`` when a SHA-256 of its relative path falls below ``val_fraction``, so the
    split is stable when files are added or the folder moves.  Raises
    ``FileNotFoundError`` for a missing folder and ``ValueError`` when no image file is
    found.

    Labels: when every file sits in a subfolder, the sorted top-level subfolder names are
    the classes (``class_names``; the ImageFolder layout) and records carry their index.
    ``segmentation_root``: a folder with one PNG map per image at the same relative path
    (extension ``.png``), pixel value = class (0 = background).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, *,
                 val_fraction: float = 0.05, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 segmentation_root: str | os.PathLike | None = None):
        root = os.fspath(root)
        self.root = root.rstrip("/") if _is_remote(root) else os.path.abspath(root)
        self.split = _split_name(split, f"image folder {root}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        self.val_fraction = float(val_fraction)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if _is_remote(self.root):
            from etils import epath

            exists = epath.Path(self.root).is_dir()
        else:
            exists = os.path.isdir(self.root)
        if not exists:
            raise FileNotFoundError(f"image folder not found: {self.root}")
        rel = []
        for dirpath, filenames in _walk(self.root):
            for fn in filenames:
                if os.path.splitext(fn)[1].lower() in exts:
                    path = os.path.join(dirpath, fn)
                    rel.append(os.path.relpath(path, self.root).replace(os.sep, "/")
                               if not _is_remote(self.root) else path[len(self.root) + 1:])
        rel.sort()
        if not rel:
            raise ValueError(f"no image files ({', '.join(exts)}) under {self.root}")
        if self.split is not None:
            rel = [r for r in rel if hash_split(r, self.val_fraction) == self.split]
            if not rel:
                raise ValueError(f"image folder {self.root}: split {self.split!r} is empty "
                                 f"(val_fraction={self.val_fraction})")
        # Fixed-width bytes pickle compactly for multiprocess workers.
        self._rel = np.array([r.encode("utf-8") for r in rel], dtype=bytes)
        tops = [r.split("/", 1)[0] if "/" in r else None for r in rel]
        self.class_names = sorted(set(tops)) if None not in tops else None
        self._labels = (np.array([self.class_names.index(t) for t in tops], np.int32)
                        if self.class_names else None)
        self.segmentation_root = None
        if segmentation_root is not None:
            self.segmentation_root = os.path.abspath(os.fspath(segmentation_root))
            if not os.path.isdir(self.segmentation_root):
                raise FileNotFoundError(f"segmentation folder not found: {self.segmentation_root}")

    def __len__(self) -> int:
        return len(self._rel)

    def path(self, i: int) -> str:
        """Full path of file ``i``."""
        return self.root + "/" + self._rel[i].decode("utf-8")

    def __getitem__(self, i: int) -> Record:
        path = self.path(int(i))
        if _is_remote(path):
            from etils import epath

            data = epath.Path(path).read_bytes()
        else:
            with open(path, "rb") as f:
                data = f.read()
        label = None if self._labels is None else int(self._labels[int(i)])
        return Record(data, path, label, self._segmentation(int(i)))

    def _segmentation(self, i: int) -> np.ndarray | None:
        if self.segmentation_root is None:
            return None
        from PIL import Image

        rel = os.path.splitext(self._rel[i].decode("utf-8"))[0] + ".png"
        path = os.path.join(self.segmentation_root, rel)
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L") if im.mode not in ("L", "P") else im, np.uint8)
        except (OSError, ValueError) as e:
            from jattn.data.images import BadImageError

            raise BadImageError(path, f"segmentation map unreadable ({e})") from None

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, split={self.split!r}, {len(self)} files)"


def folder_source(root: str | os.PathLike, split: str | None = None, *,
                  val_fraction: float = 0.05,
                  extensions: Sequence[str] = IMAGE_EXTENSIONS,
                  segmentation_root: str | os.PathLike | None = None) -> FolderSource:
    """An image folder source; see :class:`FolderSource`."""
    return FolderSource(root, split, val_fraction=val_fraction, extensions=extensions,
                        segmentation_root=segmentation_root)


# --------------------------------------------------------------------------- sample photos

#: Colour photos shipped inside the scikit-image package (no download needed).
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field",
                 "immunohistochemistry", "retina", "rocket", "motorcycle")


def _load_skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        img = skimage.data.stereo_motorcycle()[0]
    else:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            raise ValueError(f"unknown scikit-image photo {name!r}")
        img = fn()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


class SamplePhotosSource:
    """Deterministic random square crops of scikit-image's bundled photos (offline).

    Crop ``i`` picks a photo uniformly, a side of ``crop_size * u`` pixels with ``u``
    uniform in ``scale_range`` (narrowed to the scales that fit the photo) at a uniform
    position, and resizes it to ``crop_size``; all from ``(seed, split, i)``, redrawn in
    the rare case of a duplicate, so all crops differ.  Records
    are uint8 arrays ``[crop_size, crop_size, 3]``.  ``'train'`` and ``'val'`` use
    different crops.
    """

    def __init__(self, num_examples: int = 4096, crop_size: int = 256, *, split: str | None = None,
                 seed: int = 0, photos: Sequence[str] = SAMPLE_PHOTOS,
                 scale_range: tuple[float, float] = (1.0, 2.0)):
        if num_examples <= 0 or crop_size <= 0:
            raise ValueError(f"sample photos need num_examples > 0 and crop_size > 0, "
                             f"got {num_examples}, {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.num_examples, self.crop_size, self.seed = int(num_examples), int(crop_size), int(seed)
        self.split = _split_name(split, "sample photos")
        self.photos = tuple(photos)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self._tag = 1 if self.split == _VAL else 0
        self._images: dict[str, np.ndarray] | None = None
        self._shapes = [self._image(n).shape[:2] for n in self.photos]  # validates names
        self._boxes = self._draw_boxes()

    def _image(self, name: str) -> np.ndarray:
        if self._images is None:
            self._images = {}
        if name not in self._images:
            self._images[name] = _load_skimage_photo(name)
        return self._images[name]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None  # reloaded lazily in each worker process
        return state

    def __len__(self) -> int:
        return self.num_examples

    def _draw_boxes(self) -> list[tuple[int, int, int, int]]:
        boxes, seen = [], set()
        for i in range(self.num_examples):
            rng = np.random.default_rng([self.seed, i, 3, self._tag])
            while True:  # redraw the rare duplicates so that all crops differ
                p = int(rng.integers(len(self.photos)))
                h, w = self._shapes[p]
                lo, hi = self.scale_range
                hi = max(lo, min(hi, min(h, w) / self.crop_size))  # scales that fit
                side = min(h, w, max(1, round(self.crop_size * rng.uniform(lo, hi))))
                box = (p, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)),
                       side)
                if box not in seen:
                    break
            seen.add(box)
            boxes.append(box)
        return boxes

    def crop_box(self, i: int) -> tuple[str, int, int, int]:
        """``(photo, top, left, side)`` of crop ``i``."""
        if not 0 <= i < self.num_examples:
            raise IndexError(f"sample photo index {i} out of range [0, {self.num_examples})")
        p, top, left, side = self._boxes[i]
        return self.photos[p], top, left, side

    def __getitem__(self, i: int) -> Record:
        from PIL import Image

        name, top, left, side = self.crop_box(int(i))
        patch = self._image(name)[top:top + side, left:left + side]
        if side != self.crop_size:
            patch = np.asarray(Image.fromarray(patch).resize(
                (self.crop_size, self.crop_size), Image.BICUBIC))
        return Record(np.ascontiguousarray(patch), f"skimage:{name}[{top}:{top + side},{left}:{left + side}]",
                      label=self._boxes[int(i)][0])

    def __repr__(self) -> str:
        return (f"SamplePhotosSource({self.num_examples} crops of {self.crop_size}px, "
                f"split={self.split!r}, seed={self.seed})")


def sample_photos_source(num_examples: int = 4096, crop_size: int = 256, *,
                         split: str | None = None, seed: int = 0,
                         photos: Sequence[str] = SAMPLE_PHOTOS,
                         scale_range: tuple[float, float] = (1.0, 2.0)) -> SamplePhotosSource:
    """The offline demo / test source; see :class:`SamplePhotosSource`."""
    return SamplePhotosSource(num_examples, crop_size, split=split, seed=seed, photos=photos,
                              scale_range=scale_range)


# --------------------------------------------------------------------------- TFDS


def _tfds():
    os.environ.setdefault("NO_GCE_CHECK", "true")
    from jattn import _require_extra

    return _require_extra("tensorflow_datasets", "tfds", "a TFDS data source")


def _keep_tf_off_gpus() -> None:
    """If tensorflow-datasets pulled in TensorFlow, hide the GPUs from it (they are JAX's)."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, AttributeError):  # already initialised, or a partial import
        pass


class TfdsSource:
    """A tensorflow-datasets dataset by ``name`` (``"places365_small"``, ``"celeb_a_hq/256"``,
    ``"div2k"`` with ``image_key="hr"``, ``"cifar10"``, ...) and ``split``.

    ``data_dir`` / ``manual_dir`` may be local paths or ``gs://`` URLs.  Nothing is
    downloaded unless ``download=True`` (then the dataset is prepared, with
    ``manual_dir`` for datasets that need manual downloads, in ``file_format``).
    Construction validates the name, that the dataset is prepared, the split and the
    image feature, raising ``ValueError`` / ``FileNotFoundError`` with the dataset name.

    Detection: a dataset with an ``objects_key`` feature holding ``bbox`` (TFDS's
    normalized ``[ymin, xmin, ymax, xmax]``) and ``label`` (``coco/2017``'s ``objects``,
    also ``is_crowd`` and ``area``) gives records :class:`Objects`
    (:func:`jattn.data.detection.tfds_objects`); ``class_names`` are the label's names and
    ``category_ids`` COCO's 80 ids for COCO datasets (TFDS numbers COCO's categories in
    id order), else ``1..K``.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None,
                 manual_dir: str | None = None, image_key: str = "image",
                 download: bool = False, file_format: str | None = None,
                 label_key: str | None = "label", objects_key: str | None = "objects"):
        self.name, self.split, self.image_key = name, split, image_key
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.manual_dir = os.fspath(manual_dir) if manual_dir is not None else None
        self.download, self.file_format_request = download, file_format
        self._builder = None
        self._data_source = None
        builder = self.builder()
        if image_key not in builder.info.features:
            raise ValueError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: "
                             f"{sorted(builder.info.features.keys())}")
        # class labels when the dataset has them ("label" for cifar10, imagenet2012, ...)
        self.label_key = label_key if label_key in builder.info.features else None
        self.objects_key, self.class_names, self.category_ids = None, None, None
        if objects_key is not None and objects_key in builder.info.features:
            from jattn.data import detection

            names = detection.tfds_object_classes(builder.info.features[objects_key])
            if names is not None:
                self.objects_key = objects_key
                self.class_names = names
                self.category_ids = detection.default_category_ids(name, len(names))
        try:
            self.num_examples = int(builder.info.splits[split].num_examples)
        except (KeyError, ValueError) as e:
            raise ValueError(f"TFDS dataset {name!r}: invalid split {split!r} ({e}); "
                             f"splits: {sorted(builder.info.splits.keys())}") from None
        if self.num_examples == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

    def builder(self):
        """The (prepared) ``tfds.core.DatasetBuilder``."""
        if self._builder is not None:
            return self._builder
        tfds = _tfds()
        kwargs = {"data_dir": self.data_dir}
        if self.download and self.file_format_request:
            kwargs["file_format"] = self.file_format_request
        try:
            builder = tfds.builder(self.name, **kwargs)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"unknown TFDS dataset {self.name!r} (data_dir={self.data_dir}); "
                             "check the name, e.g. 'places365_small', 'celeb_a_hq/256', "
                             "'div2k', 'cifar10'") from None
        if not builder.is_prepared():
            if not self.download:
                raise FileNotFoundError(
                    f"TFDS dataset {self.name!r} is not prepared in data_dir="
                    f"{builder.data_dir!r}; prepare it (e.g. `tfds build {self.name} "
                    f"--data_dir=... --manual_dir=...`) or pass download=True")
            config = tfds.download.DownloadConfig(manual_dir=self.manual_dir)
            builder.download_and_prepare(download_config=config)
        _keep_tf_off_gpus()
        self._builder = builder
        return builder

    @property
    def file_format(self) -> str:
        """``"tfrecord"`` or ``"array_record"``."""
        fmt = self.builder().info.file_format
        return getattr(fmt, "value", str(fmt))

    @property
    def random_access(self) -> bool:
        return self.file_format == "array_record"

    def _source(self):
        if self._data_source is None:
            if not self.random_access:
                raise ValueError(
                    f"TFDS dataset {self.name!r} is stored as {self.file_format!r}; random access "
                    "(grain) needs array_record: prepare it with file_format='array_record' "
                    "or use the tf.data pipeline")
            tfds = _tfds()
            self._data_source = self.builder().as_data_source(
                split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()})
            _keep_tf_off_gpus()
        return self._data_source

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> Record:
        example = self._source()[int(i)]
        label = None if self.label_key is None else int(example[self.label_key])
        objects = None
        if self.objects_key is not None:
            from jattn.data import detection

            objects = detection.tfds_objects(example, self.objects_key, index=int(i))
        return Record(example[self.image_key], f"{self.name}/{self.split}[{int(i)}]", label, objects=objects)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_builder"] = None  # rebuilt lazily in each worker process
        state["_data_source"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r})"


def tfds_source(name: str, split: str, data_dir: str | None = None,
                manual_dir: str | None = None, *, image_key: str = "image",
                download: bool = False, file_format: str | None = None,
                label_key: str | None = "label", objects_key: str | None = "objects") -> TfdsSource:
    """A TFDS source; see :class:`TfdsSource`."""
    return TfdsSource(name, split, data_dir=data_dir, manual_dir=manual_dir,
                      image_key=image_key, download=download, file_format=file_format,
                      label_key=label_key, objects_key=objects_key)


# --------------------------------------------------------------------------- shapes

#: Classes of :class:`ShapesSource` (label i; segmentation value i + 1).
SHAPE_CLASSES = ("circle", "square", "triangle")


class ShapesSource:
    """Synthetic images for classification and segmentation tests and demos (offline).

    Image ``i`` (``size`` x ``size``, uint8 RGB) has a smooth random background with noise
    and 1-3 filled shapes of one class, each in its own random colour, size and place; its
    label is the class (:data:`SHAPE_CLASSES`: 0 circle, 1 square, 2 triangle) and its
    segmentation map holds ``label + 1`` on the shapes' pixels, 0 elsewhere.  Everything
    is drawn from ``default_rng([seed, split, i, 5])``; ``'train'`` and ``'val'`` differ.
    """

    def __init__(self, num_examples: int = 1024, size: int = 64, *, split: str | None = None,
                 seed: int = 0):
        if num_examples <= 0 or size < 16:
            raise ValueError(f"shapes need num_examples > 0 and size >= 16, got {num_examples}, {size}")
        self.num_examples, self.size, self.seed = int(num_examples), int(size), int(seed)
        self.split = _split_name(split, "shapes")
        self._tag = 1 if self.split == _VAL else 0
        self.class_names = SHAPE_CLASSES

    def __len__(self) -> int:
        return self.num_examples

    def _draw(self, i: int) -> tuple[np.ndarray, int, np.ndarray]:
        n = self.size
        rng = np.random.default_rng([self.seed, self._tag, i, 5])
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy)[..., None]
        image = c0 * (1 - t) + c1 * t + rng.normal(0, 8, (n, n, 3))
        label = int(rng.integers(len(SHAPE_CLASSES)))
        seg = np.zeros((n, n), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.1, 0.22)
            cy, cx = rng.uniform(r, 1 - r, 2)
            if label == 0:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif label == 1:
                inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
            else:  # upward triangle: below the two slanted sides, above the base
                inside = (yy <= cy + r * 0.8) & (yy - (cy - r) >= 1.7 * np.abs(xx - cx))
            colour = rng.uniform(0, 255, 3)
            image[inside] = colour + rng.normal(0, 4, (int(inside.sum()), 3))
            seg[inside] = label + 1
        return np.clip(np.round(image), 0, 255).astype(np.uint8), label, seg

    def __getitem__(self, i: int) -> Record:
        if not 0 <= int(i) < self.num_examples:
            raise IndexError(f"shape image index {i} out of range [0, {self.num_examples})")
        image, label, seg = self._draw(int(i))
        return Record(image, f"shapes[{int(i)}]", label, seg)

    def __repr__(self) -> str:
        return f"ShapesSource({self.num_examples} images of {self.size}px, split={self.split!r}, seed={self.seed})"


def shapes_source(num_examples: int = 1024, size: int = 64, *, split: str | None = None,
                  seed: int = 0) -> ShapesSource:
    """Synthetic shapes with labels and segmentation maps; see :class:`ShapesSource`."""
    return ShapesSource(num_examples, size, split=split, seed=seed)


def coco_source(root: str | os.PathLike, annotations: str = "annotations.json", images: str = "images",
                **kwargs):
    """A COCO-format folder (instances json + images); see :class:`jattn.data.detection.CocoSource`."""
    from jattn.data import detection

    return detection.CocoSource(root, annotations, images, **kwargs)


def synthetic_shapes_source(num_examples: int = 1024, size: int = 128, classes: int = 5,
                            max_objects: int = 4, **kwargs):
    """Synthetic detection images; see :class:`jattn.data.detection.SyntheticShapesSource`."""
    from jattn.data import detection

    return detection.SyntheticShapesSource(num_examples, size, classes, max_objects, **kwargs)


def source_from_config(config: Mapping[str, Any]):
    """Builds a source from ``{"kind": "tfds" | "folder" | "sample_photos" | "shapes" | "coco" |
    "synthetic_shapes", ...kwargs}``."""
    params = dict(config)
    kind = params.pop("kind", None)
    makers = {"tfds": tfds_source, "folder": folder_source, "sample_photos": sample_photos_source,
              "shapes": shapes_source, "coco": coco_source, "synthetic_shapes": synthetic_shapes_source}
    if kind not in makers:
        raise ValueError(f"source config needs 'kind' in {sorted(makers)}, got {kind!r}")
    try:
        return makers[kind](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for a {kind!r} source: {e}") from None
