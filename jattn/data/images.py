"""Image decoding and preprocessing with PIL / numpy (shared by the tf.data and grain pipelines).

Everything here is a pure function of its inputs (plus a ``numpy.random.Generator`` for
the random crop / flip), so both pipelines produce bit-identical examples.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BadImageError",
    "decode_rgb",
    "resize_shorter_side",
    "crop",
    "to_float",
    "preprocess",
]


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


def decode_rgb(data: bytes | np.ndarray, name: str = "<image>") -> tuple[np.ndarray, str | None]:
    """Decodes encoded bytes (jpg/png/webp/bmp/...) or an array to uint8 ``[H, W, 3]``.

    Returns ``(rgb, conversion)`` where ``conversion`` names what was converted
    (``"grayscale"``, ``"RGBA"``, ``"palette"``, ``"16-bit"``, ``"CMYK"``, ...) or is
    ``None``.  Transparent images are composited over white; EXIF orientation is applied.
    Raises :class:`BadImageError` for truncated, corrupt or unsupported data.
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data, name)
    if not data:
        raise BadImageError(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
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
               segmentation: np.ndarray | None = None,
               ) -> tuple[np.ndarray, bool] | tuple[np.ndarray, bool, np.ndarray]:
    """uint8 ``[h, w, 3]`` -> float32 ``[H, W, 3]`` in [-1, 1] and whether it was upscaled.

    Optionally resizes the shorter side to ``resize_shorter``; an image smaller than the
    crop is upscaled to fit (counted as upscaled) unless that needs more than
    ``max_upscale`` times (``None``: no limit), which raises :class:`BadImageError`
    ("too small").  Crops at random with ``rng`` (train) or at the centre (``rng=None``),
    and flips left-right with probability 1/2 when ``rng`` is given and ``random_flip``.
    A ``segmentation`` map (uint8 / int ``[h, w]``) goes through the same resize (nearest),
    crop and flip and is returned third as int32 ``[H, W]``.
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
    top, left = crop_offset(rgb.shape, (H, W), rng)
    out = rgb[top:top + H, left:left + W]
    flip = rng is not None and random_flip and rng.random() < 0.5
    if flip:
        out = out[:, ::-1]
    image = to_float(np.ascontiguousarray(out))
    if segmentation is None:
        return image, upscaled
    seg = np.asarray(segmentation)[top:top + H, left:left + W]
    if flip:
        seg = seg[:, ::-1]
    return image, upscaled, np.ascontiguousarray(seg, dtype=np.int32)
