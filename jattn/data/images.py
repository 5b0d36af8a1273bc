"""Image decoding and preprocessing with PIL / numpy (shared by the tf.data and grain pipelines).

Everything here is a pure function of its inputs (plus a ``numpy.random.Generator`` for
the random crop / flip and the training augmentation, :class:`Augment`), so both
pipelines produce bit-identical examples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BadImageError",
    "decode_rgb",
    "resize_shorter_side",
    "crop",
    "to_float",
    "preprocess",
    "Augment",
    "AUGMENT_CROPS",
    "PAD_MODES",
    "parse_augment",
    "inception_box",
]

#: The training crops of :class:`Augment`: "random" (uniform position, the default),
#: "inception" (random size and aspect ratio, resized to the crop size), "pad" (pad, then a
#: uniform crop).
AUGMENT_CROPS = ("random", "inception", "pad")
#: How the "pad" crop pads: "zero" (black, uint8 0 = -1 in [-1, 1], as torchvision's
#: ``RandomCrop(padding=4)``) or "reflect" (mirrored without the edge pixel, ``np.pad``'s).
PAD_MODES = ("zero", "reflect")


@dataclasses.dataclass(frozen=True)
class Augment:
    """The training augmentation (config ``data.augment``); eval ignores it (centre crops).

    * ``crop``: "random" (a uniform ``image_size`` crop), "inception" (Szegedy et al.'s
      random-size crop, torchvision's ``RandomResizedCrop``: a box of ``area`` times the
      image's area and aspect ratio (width / height) log-uniform in ``ratio``, resized to
      ``image_size`` with PIL's bicubic; see :func:`inception_box`) or "pad" (``pad``
      pixels added on every side, ``pad_mode``, then a uniform crop: the CIFAR ResNets').
    * ``flip_lr`` / ``flip_ud``: left-right / up-down flips with probability 1/2;
      ``rot90``: a rotation by k x 90 degrees, k uniform in 0..3 (with ``flip_lr``, each of
      the 8 symmetries of the square equally likely; needs a square ``image_size``).

    The defaults are the pipeline's original augmentation (uniform crop, left-right flip).
    """

    crop: str = "random"
    pad: int = 4
    pad_mode: str = "zero"
    area: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_lr: bool = True
    flip_ud: bool = False
    rot90: bool = False


def _pair(value: Any, key: str, low: float, high: float | None) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if ok:
        lo, hi = float(value[0]), float(value[1])
        ok = low < lo <= hi and (high is None or hi <= high)
    if not ok:
        bound = f"0 < min <= max <= {high:g}" if high is not None else "0 < min <= max"
        raise ValueError(f"{key}: expected [min, max] with {bound}, got {value!r}")
    return lo, hi


def parse_augment(spec: Augment | Mapping[str, Any] | None, key: str = "data.augment") -> Augment:
    """An :class:`Augment` from a config block (a dict with some of its fields; None: the
    defaults); a one-line ``ValueError`` naming ``key.<field>`` for a bad value."""
    if spec is None:
        return Augment()
    if isinstance(spec, Augment):
        spec = dataclasses.asdict(spec)
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key}: expected a block of keys (crop, pad, pad_mode, area, ratio, flip_lr, flip_ud, "
                         f"rot90), got {spec!r}")
    names = [f.name for f in dataclasses.fields(Augment)]
    unknown = [k for k in spec if k not in names]
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(names)}")
    values = {**dataclasses.asdict(Augment()), **dict(spec)}
    if values["crop"] not in AUGMENT_CROPS:
        raise ValueError(f"{key}.crop: expected one of {', '.join(AUGMENT_CROPS)}, got {values['crop']!r}")
    if values["pad_mode"] not in PAD_MODES:
        raise ValueError(f"{key}.pad_mode: expected one of {', '.join(PAD_MODES)}, got {values['pad_mode']!r}")
    pad = values["pad"]
    if isinstance(pad, float) and pad.is_integer():
        pad = int(pad)
    if not isinstance(pad, numbers.Integral) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"{key}.pad: expected a whole number >= 0, got {values['pad']!r}")
    area = _pair(values["area"], f"{key}.area", 0.0, 1.0)
    ratio = _pair(values["ratio"], f"{key}.ratio", 0.0, None)
    flags = {}
    for name in ("flip_lr", "flip_ud", "rot90"):
        v = values[name]
        if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Integral) and v in (0, 1))):
            raise ValueError(f"{key}.{name}: expected True or False, got {v!r}")
        flags[name] = bool(v)
    return Augment(crop=values["crop"], pad=int(pad), pad_mode=values["pad_mode"], area=area, ratio=ratio,
                   **flags)


def inception_box(shape: Sequence[int], rng: np.random.Generator, area: Sequence[float] = (0.08, 1.0),
                  ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random-size crop of an image of ``shape = (H, W, ...)``,
    as torchvision's ``RandomResizedCrop.get_params``: up to ``attempts`` draws of an area
    fraction uniform in ``area`` and an aspect ratio (width / height) log-uniform in
    ``ratio``; the first box that fits is placed uniformly.  If none fits, the whole image
    with its aspect ratio clamped into ``ratio``, centred."""
    H, W = int(shape[0]), int(shape[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = H * W * rng.uniform(area[0], area[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, max(1, min(H, int(round(W / min(ratio)))))
    elif in_ratio > max(ratio):
        h, w = H, max(1, min(W, int(round(H * max(ratio)))))
    else:
        h, w = H, W
    return (H - h) // 2, (W - w) // 2, h, w


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short phrase, ``name`` the file."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _gray16_to_rgb8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit (or 32-bit integer) grayscale ``[H, W]`` -> uint8 ``[H, W, 3]``."""
    arr = arr.astype(np.float64)
    peak = arr.max() if arr.size else 0
    scale = 65535.0 if sixteen_bit or peak > 255 else 255.0
    out = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)


def _array_to_rgb(arr: np.ndarray, name: str) -> tuple[np.ndarray, str | None]:
    """uint8/uint16 ``[H, W]``, ``[H, W, 1|3|4]`` arrays -> uint8 ``[H, W, 3]``."""
    conversion = None
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        conversion = "16-bit"
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise BadImageError(name, f"unsupported array dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) == 0:
        raise BadImageError(name, f"unsupported array shape {arr.shape}")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2), conversion or "grayscale"
    if arr.shape[2] == 4:
        return _flatten_alpha(Image.fromarray(arr, "RGBA")), conversion or "RGBA"
    return np.ascontiguousarray(arr), conversion


def _flatten_alpha(im: Image.Image) -> np.ndarray:
    """Composites an image with alpha over white; returns uint8 ``[H, W, 3]``."""
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(background, im).convert("RGB"))


def decode_rgb(data: bytes | np.ndarray, name: str = "<image>", *, exif: bool = True
               ) -> tuple[np.ndarray, str | None]:
    """Decodes encoded bytes (jpg/png/webp/bmp/...) or an array to uint8 ``[H, W, 3]``.

    Returns ``(rgb, conversion)`` where ``conversion`` names what was converted
    (``"grayscale"``, ``"RGBA"``, ``"palette"``, ``"16-bit"``, ``"CMYK"``, ...) or is
    ``None``.  Transparent images are composited over white; EXIF orientation is applied
    unless ``exif=False`` (detection: COCO's boxes are in the stored pixels' frame).
    Raises :class:`BadImageError` for truncated, corrupt or unsupported data.
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data, name)
    if not data:
        raise BadImageError(name, "empty file")
    with decoding_errors(name), Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        if exif:
            im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im), None
        if mode in ("L", "1"):
            return np.asarray(im.convert("RGB")), "grayscale"
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            return _gray16_to_rgb8(np.asarray(im), mode != "I"), "16-bit"
        if mode == "P":
            if "transparency" in im.info:
                return _flatten_alpha(im), "palette"
            return np.asarray(im.convert("RGB")), "palette"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            return _flatten_alpha(im), "RGBA" if mode.startswith("RGB") else "grayscale"
        if mode == "CMYK":
            return np.asarray(im.convert("RGB")), "CMYK"
        return np.asarray(im.convert("RGB")), mode


@contextlib.contextmanager
def decoding_errors(name: str):
    """Decoding an image file inside the block: any decoder failure becomes a
    :class:`BadImageError` naming the file (a BadImageError passes through)."""
    try:
        yield
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(name, f"too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
        raise BadImageError(name, f"corrupt or truncated image ({e})") from None


def resize_shorter_side(img: np.ndarray, target: int) -> np.ndarray:
    """Resizes uint8 ``[H, W, 3]`` so that its shorter side is ``target`` (bicubic, antialiased)."""
    h, w = img.shape[:2]
    s = target / min(h, w)
    new_h, new_w = max(target, round(h * s)), max(target, round(w * s))
    if (new_h, new_w) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))


def crop_offset(shape: Sequence[int], size: tuple[int, int], rng: np.random.Generator | None
                ) -> tuple[int, int]:
    """``(top, left)`` of a ``size = (h, w)`` crop of ``shape = (H, W, ...)``: uniform with
    ``rng``, else centred."""
    H, W = shape[:2]
    h, w = size
    if rng is None:
        return (H - h) // 2, (W - w) // 2
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))


def crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator | None) -> np.ndarray:
    """Crops ``size = (h, w)`` from ``[H, W, C]``: uniform position with ``rng``, else centre."""
    top, left = crop_offset(img.shape, size, rng)
    return img[top:top + size[0], left:left + size[1]]


def downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [-1, 1] (a uint8 image's values) -> ``[H/s, W/s, 3]``: the
    uint8 image downscaled by PIL's bicubic (antialiased, like MATLAB's ``imresize``, the
    super-resolution benchmarks' degradation), back in [-1, 1]."""
    h, w = image.shape[:2]
    u8 = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(u8).resize((w // scale, h // scale), Image.BICUBIC))
    return to_float(small)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _resize(img: np.ndarray, size_wh: tuple[int, int], nearest: bool) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == tuple(size_wh):
        return img
    return np.asarray(Image.fromarray(img).resize(size_wh, Image.NEAREST if nearest else Image.BICUBIC))


def preprocess(rgb: np.ndarray, name: str, image_size: Sequence[int], *,
               resize_shorter: int | None = None, rng: np.random.Generator | None = None,
               random_flip: bool = True, max_upscale: float | None = 2.0,
               segmentation: np.ndarray | None = None, augment: Augment | None = None,
               ) -> tuple[np.ndarray, bool] | tuple[np.ndarray, bool, np.ndarray]:
    """uint8 ``[h, w, 3]`` -> float32 ``[H, W, 3]`` in [-1, 1] and whether it was upscaled.

    Optionally resizes the shorter side to ``resize_shorter``; an image smaller than the
    crop is upscaled to fit (counted as upscaled) unless that needs more than
    ``max_upscale`` times (``None``: no limit), which raises :class:`BadImageError`
    ("too small").  Without ``rng`` (eval): a centre crop, nothing else.  With ``rng``
    (train): the crop of ``augment`` (default :class:`Augment`: a uniform crop), then a
    left-right flip with probability 1/2 when ``random_flip`` and ``augment.flip_lr``, an
    up-down flip (``flip_ud``) and a rotation by k x 90 degrees (``rot90``).  The draws
    from ``rng`` are the crop's (two integers for "random" and "pad"; the box's for
    "inception", :func:`inception_box`), then one ``random()`` per flip, then
    ``integers(4)`` for the rotation, each only when enabled (the defaults draw exactly
    what the pipeline always drew).
    A ``segmentation`` map (uint8 / int ``[h, w]``) goes through the same resize (nearest),
    crop and flips and is returned third as int32 ``[H, W]`` (zero padding pads it with 0,
    the background).
    """
    H, W = int(image_size[0]), int(image_size[1])
    h, w = rgb.shape[:2]
    if segmentation is not None and segmentation.shape[:2] != (h, w):
        raise BadImageError(name, f"segmentation map is {segmentation.shape[1]}x{segmentation.shape[0]} "
                                  f"but the image is {w}x{h}")
    short = min(h, w)
    target = resize_shorter
    upscaled = h < H or w < W
    if upscaled:
        need = max(H / h, W / w) * short  # shorter side that makes the crop fit
        target = max(target or 0, int(np.ceil(need)))
    if target is not None:
        if max_upscale is not None and target > short * max_upscale:
            raise BadImageError(name, f"too small ({w}x{h}) for a {W}x{H} crop "
                                      f"(needs more than {max_upscale}x upscaling)")
        rgb = resize_shorter_side(rgb, target)
        # Non-square crops may still need one more pixel along one axis after rounding.
        if rgb.shape[0] < H or rgb.shape[1] < W:
            rgb = _resize(rgb, (max(W, rgb.shape[1]), max(H, rgb.shape[0])), nearest=False)
        if segmentation is not None:
            segmentation = _resize(np.asarray(segmentation, np.uint8), (rgb.shape[1], rgb.shape[0]), nearest=True)
    seg = None if segmentation is None else np.asarray(segmentation)
    aug = augment if augment is not None else Augment()
    if rng is None:
        out, seg = _box(rgb, seg, crop_offset(rgb.shape, (H, W), None), (H, W))
    elif aug.crop == "inception":
        top, left, bh, bw = inception_box(rgb.shape, rng, aug.area, aug.ratio)
        out, seg = _box(rgb, seg, (top, left), (bh, bw))
        out = _resize(np.ascontiguousarray(out), (W, H), nearest=False)
        if seg is not None:
            seg = _resize(np.ascontiguousarray(seg, np.uint8), (W, H), nearest=True)
    else:
        if aug.crop == "pad" and aug.pad:
            rgb, seg = _pad(rgb, seg, aug.pad, aug.pad_mode)
        out, seg = _box(rgb, seg, crop_offset(rgb.shape, (H, W), rng), (H, W))
    if rng is not None:
        ops = []
        if random_flip and aug.flip_lr and rng.random() < 0.5:
            ops.append(lambda a: a[:, ::-1])
        if aug.flip_ud and rng.random() < 0.5:
            ops.append(lambda a: a[::-1])
        if aug.rot90:
            k = int(rng.integers(0, 4))
            if k:
                ops.append(lambda a: np.rot90(a, k, axes=(0, 1)))
        for op in ops:
            out = op(out)
            seg = None if seg is None else op(seg)
    image = to_float(np.ascontiguousarray(out))
    if segmentation is None:
        return image, upscaled
    return image, upscaled, np.ascontiguousarray(seg, dtype=np.int32)


def _box(rgb: np.ndarray, seg: np.ndarray | None, top_left: tuple[int, int], size: tuple[int, int]):
    top, left = top_left
    box = (slice(top, top + size[0]), slice(left, left + size[1]))
    return rgb[box], None if seg is None else seg[box]


def _pad(rgb: np.ndarray, seg: np.ndarray | None, pad: int, mode: str):
    """``pad`` pixels on every side of the image (and map): zeros or a reflection."""
    kind = "constant" if mode == "zero" else "reflect"
    rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode=kind)
    if seg is not None:
        seg = np.pad(seg, ((pad, pad), (pad, pad)), mode=kind)
    return rgb, seg
