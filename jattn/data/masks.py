"""Inpainting hole masks: DeepFill v1 boxes, DeepFill v2 brush strokes, LaMa-style masks.

Convention everywhere: a mask is float32 ``[H, W, 1]`` with 1 = hole, 0 = known pixel.

A mask family is described by a *spec*: a preset name (``"free_form"``), a dict
``{"kind": "box", "hole_size": 96, ...}``, a list of ``(weight, spec)`` pairs (a
mixture, one component drawn per mask) or one of the dataclasses below.  Masks are pure
functions of a ``numpy.random.Generator``; the pipelines build it from
``(seed, example index)`` with :func:`mask_rng`, so the same example gets the same mask
in tf.data, in grain and in :func:`eval_set`.

``{"kind": "folder", "path": DIR}`` (:class:`FolderMask`) reads masks from image files
(white / nonzero = hole): in training a random file per example, randomly rotated, flipped
and cropped; in evaluation (``train=False``) file ``i`` for example ``i``, unaugmented.

Only numpy and PIL are used here (no TensorFlow, no grain).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from jattn.data.images import BadImageError, decoding_errors

Size = tuple[int, int]

__all__ = [
    "BoxMask",
    "FreeFormMask",
    "LamaStrokeMask",
    "LamaBoxMask",
    "MixtureMask",
    "UnionMask",
    "FolderMask",
    "MASK_EXTENSIONS",
    "clear_mask_cache",
    "Stroke",
    "PRESETS",
    "parse_mask_spec",
    "mask_rng",
    "sample_mask",
    "mask_for_index",
    "masks_for_indices",
    "hole_fraction",
    "render_strokes",
    "EvalMaskSet",
    "eval_set",
    "load_eval_set",
    "EvalMaskError",
    "file_sha256",
]


# --------------------------------------------------------------------------- helpers


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(3, 4) -> (3, 4)`` (height first)."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    vals = tuple(int(v) for v in value)
    if len(vals) != 2:
        raise ValueError(f"{what} must be an int or a (height, width) pair, got {value!r}")
    return vals  # type: ignore[return-value]


def _size(size: int | Sequence[int]) -> Size:
    h, w = _pair(size, "mask size")
    if h <= 0 or w <= 0:
        raise ValueError(f"mask size must be positive, got {(h, w)}")
    return h, w


def mask_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of the mask of example ``index`` under ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


def hole_fraction(mask: np.ndarray) -> float:
    """Fraction of hole pixels of a mask ``[H, W]`` or ``[H, W, 1]``."""
    return float(np.mean(np.asarray(mask) > 0.5))


@dataclasses.dataclass(frozen=True)
class Stroke:
    """One brush stroke: a polyline of integer ``(x, y)`` points drawn ``width`` wide."""

    points: tuple[tuple[int, int], ...]
    width: int


def render_strokes(strokes: Sequence[Stroke], size: Size) -> np.ndarray:
    """Draws strokes with round joints and caps; returns bool ``[H, W]``."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        if len(stroke.points) > 1:
            draw.line(list(stroke.points), fill=1, width=stroke.width)
        r = stroke.width // 2
        for x, y in stroke.points:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=1)
    return np.asarray(canvas, dtype=np.uint8) > 0


def _check_range(lo: float, hi: float, what: str, minimum: float = 0) -> None:
    if not (minimum <= lo <= hi):
        raise ValueError(f"{what}: need {minimum} <= min <= max, got ({lo}, {hi})")


def _coverage(value: Sequence[float] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"coverage must be (min, max) with 0 <= min <= max <= 1, got {value!r}")
    return lo, hi


def _with_coverage(draw_fn, rng: np.random.Generator, size: Size,
                   coverage: tuple[float, float] | None, max_tries: int) -> np.ndarray:
    """Redraws until the hole fraction lies in ``coverage`` (and is > 0).

    After ``max_tries`` draws the non-empty mask closest to the range is returned.
    """
    if coverage is None:
        return draw_fn(rng, size)
    lo, hi = coverage
    best, best_gap = None, math.inf
    for _ in range(max_tries):
        mask = draw_fn(rng, size)
        frac = float(mask.mean())
        if frac > 0 and lo <= frac <= hi:
            return mask
        gap = (lo - frac if frac < lo else frac - hi) if frac > 0 else math.inf
        if best is None or gap < best_gap:
            best, best_gap = mask, gap
    return best


# --------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class BoxMask:
    """DeepFill v1 training box (``random_bbox`` + ``bbox2mask``).

    A ``hole_size`` box is placed uniformly with its top-left corner in
    ``[margin, size - margin - hole_size]`` (inclusive); then the top and bottom sides are
    each moved in by the same random ``dh`` in ``0..max_delta_h // 2`` and the left and
    right sides by ``dw`` in ``0..max_delta_w // 2``, as in the official code.  Pairs are
    ``(height, width)``; an int means both.  Defaults: 128x128 hole in a 256x256 image.
    """

    hole_size: Size = (128, 128)
    margin: Size = (0, 0)
    max_delta: Size = (32, 32)

    def __post_init__(self):
        object.__setattr__(self, "hole_size", _pair(self.hole_size, "hole_size"))
        object.__setattr__(self, "margin", _pair(self.margin, "margin"))
        object.__setattr__(self, "max_delta", _pair(self.max_delta, "max_delta"))
        if min(self.hole_size) <= 0 or min(self.margin) < 0 or min(self.max_delta) < 0:
            raise ValueError(f"box mask needs hole_size > 0, margin >= 0, max_delta >= 0: {self}")
        for d, s in zip(self.max_delta, self.hole_size):
            if 2 * (d // 2) >= s:
                raise ValueError(f"box mask max_delta {self.max_delta} can erase hole {self.hole_size}")

    def box(self, rng: np.random.Generator, size: Size) -> tuple[int, int, int, int]:
        """Random ``(top, left, bottom, right)`` of the hole (bottom/right exclusive)."""
        (H, W), (h, w), (mv, mh) = size, self.hole_size, self.margin
        if H - 2 * mv < h or W - 2 * mh < w:
            raise ValueError(f"box hole {self.hole_size} with margin {self.margin} "
                             f"does not fit in a {H}x{W} image")
        t = int(rng.integers(mv, H - mv - h + 1))
        l = int(rng.integers(mh, W - mh - w + 1))
        dh = int(rng.integers(0, self.max_delta[0] // 2 + 1))
        dw = int(rng.integers(0, self.max_delta[1] // 2 + 1))
        return t + dh, l + dw, t + h - dh, l + w - dw

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        t, l, b, r = self.box(rng, size)
        mask = np.zeros(size, bool)
        mask[t:b, l:r] = True
        return mask


@dataclasses.dataclass(frozen=True)
class FreeFormMask:
    """DeepFill v2 free-form brush strokes (``brush_stroke_mask`` of the official code).

    ``min_strokes..max_strokes`` strokes (inclusive); each starts at a uniform pixel and
    has ``min_vertices..max_vertices`` (inclusive) segments whose directions alternate
    around ``mean_angle`` +- up to ``angle_range``; segment lengths ~ N(r, r *
    ``radius_std``) clipped to ``[0, 2r]`` with ``r = sqrt(H^2 + W^2) * radius_fraction``;
    widths ``int(uniform(min_width, max_width))`` with round joints.  The mask is then
    flipped left-right / up-down with probability 1/2 each.
    """

    min_strokes: int = 1
    max_strokes: int = 3
    min_vertices: int = 4
    max_vertices: int = 11
    mean_angle: float = 2 * math.pi / 5
    angle_range: float = 2 * math.pi / 15
    radius_fraction: float = 1 / 8
    radius_std: float = 0.5
    min_width: float = 12
    max_width: float = 40

    def __post_init__(self):
        _check_range(self.min_strokes, self.max_strokes, "free_form strokes", 1)
        _check_range(self.min_vertices, self.max_vertices, "free_form vertices", 1)
        _check_range(self.min_width, self.max_width, "free_form width", 1)
        if self.radius_fraction <= 0 or self.radius_std < 0 or self.angle_range < 0:
            raise ValueError(f"free_form needs radius_fraction > 0, radius_std >= 0, "
                             f"angle_range >= 0: {self}")

    def strokes(self, rng: np.random.Generator, size: Size) -> tuple[list[Stroke], bool, bool]:
        """Random strokes and the (left-right, up-down) flips; see the class docstring."""
        H, W = size
        radius = math.sqrt(H * H + W * W) * self.radius_fraction
        strokes = []
        for _ in range(int(rng.integers(self.min_strokes, self.max_strokes + 1))):
            n = int(rng.integers(self.min_vertices, self.max_vertices + 1))
            a_min = self.mean_angle - rng.uniform(0, self.angle_range)
            a_max = self.mean_angle + rng.uniform(0, self.angle_range)
            angles = [2 * math.pi - rng.uniform(a_min, a_max) if i % 2 == 0
                      else rng.uniform(a_min, a_max) for i in range(n)]
            points = [(int(rng.integers(0, W)), int(rng.integers(0, H)))]
            for angle in angles:
                r = float(np.clip(rng.normal(radius, radius * self.radius_std), 0, 2 * radius))
                x = float(np.clip(points[-1][0] + r * math.cos(angle), 0, W))
                y = float(np.clip(points[-1][1] + r * math.sin(angle), 0, H))
                points.append((int(x), int(y)))
            width = int(rng.uniform(self.min_width, self.max_width))
            strokes.append(Stroke(tuple(points), width))
        return strokes, bool(rng.normal() > 0), bool(rng.normal() > 0)

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        strokes, flip_lr, flip_ud = self.strokes(rng, size)
        mask = render_strokes(strokes, size)
        if flip_lr:
            mask = mask[:, ::-1]
        if flip_ud:
            mask = mask[::-1, :]
        return np.ascontiguousarray(mask)


@dataclasses.dataclass(frozen=True)
class LamaStrokeMask:
    """LaMa ``make_random_irregular_mask`` strokes (the thin / medium / thick families).

    ``min_times..max_times`` strokes (inclusive); each is ``1..5`` segments from a uniform
    start, direction ``0.01 + randint(max_angle)`` radians (mirrored for even strokes),
    length ``10 + randint(max_len)``, width ``5 + randint(max_width)``, drawn with round
    caps.  With ``coverage=(lo, hi)`` masks are redrawn (up to ``max_tries``) until
    their hole fraction is in ``[lo, hi]`` and non-zero.
    """

    min_times: int = 4
    max_times: int = 5
    max_width: int = 50
    max_angle: int = 4
    max_len: int = 100
    max_segments: int = 5
    coverage: tuple[float, float] | None = (0.0, 0.7)
    max_tries: int = 50

    def __post_init__(self):
        _check_range(self.min_times, self.max_times, "lama strokes times", 0)
        if min(self.max_width, self.max_angle, self.max_len, self.max_segments, self.max_tries) < 1:
            raise ValueError(f"lama strokes need max_width, max_angle, max_len, max_segments, "
                             f"max_tries >= 1: {self}")
        object.__setattr__(self, "coverage", _coverage(self.coverage))

    def strokes(self, rng: np.random.Generator, size: Size) -> list[Stroke]:
        """Random strokes (one :class:`Stroke` per segment, as each has its own width)."""
        H, W = size
        strokes = []
        for i in range(int(rng.integers(self.min_times, self.max_times + 1))):
            x, y = int(rng.integers(W)), int(rng.integers(H))
            for _ in range(1 + int(rng.integers(self.max_segments))):
                angle = 0.01 + int(rng.integers(self.max_angle))
                if i % 2 == 0:
                    angle = 2 * math.pi - angle
                length = 10 + int(rng.integers(self.max_len))
                width = 5 + int(rng.integers(self.max_width))
                ex = int(np.clip(int(x + length * math.sin(angle)), 0, W))
                ey = int(np.clip(int(y + length * math.cos(angle)), 0, H))
                strokes.append(Stroke(((x, y), (ex, ey)), width))
                x, y = ex, ey
        return strokes

    def _draw(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        return render_strokes(self.strokes(rng, size), size)

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        return _with_coverage(self._draw, rng, size, self.coverage, self.max_tries)


@dataclasses.dataclass(frozen=True)
class LamaBoxMask:
    """LaMa ``make_random_rectangle_mask``: ``min_times..max_times`` random boxes.

    Box sides are ``bbox_min_size..min(bbox_max_size, size - 2 * margin) - 1``, placed
    inside ``margin``.  ``coverage`` / ``max_tries`` as in :class:`LamaStrokeMask`.
    """

    margin: int = 10
    bbox_min_size: int = 30
    bbox_max_size: int = 150
    min_times: int = 1
    max_times: int = 3
    coverage: tuple[float, float] | None = (0.0, 0.7)
    max_tries: int = 50

    def __post_init__(self):
        _check_range(self.min_times, self.max_times, "lama boxes times", 0)
        _check_range(self.bbox_min_size, self.bbox_max_size, "lama boxes size", 1)
        if self.margin < 0 or self.max_tries < 1:
            raise ValueError(f"lama boxes need margin >= 0 and max_tries >= 1: {self}")
        object.__setattr__(self, "coverage", _coverage(self.coverage))

    def boxes(self, rng: np.random.Generator, size: Size) -> list[tuple[int, int, int, int]]:
        """Random ``(top, left, bottom, right)`` boxes (bottom/right exclusive)."""
        H, W = size
        max_size = min(self.bbox_max_size, H - 2 * self.margin, W - 2 * self.margin)
        if max_size <= self.bbox_min_size:
            raise ValueError(f"lama boxes of at least {self.bbox_min_size} px with margin "
                             f"{self.margin} do not fit in a {H}x{W} image")
        out = []
        for _ in range(int(rng.integers(self.min_times, self.max_times + 1))):
            bw = int(rng.integers(self.bbox_min_size, max_size))
            bh = int(rng.integers(self.bbox_min_size, max_size))
            x = int(rng.integers(self.margin, W - self.margin - bw + 1))
            y = int(rng.integers(self.margin, H - self.margin - bh + 1))
            out.append((y, x, y + bh, x + bw))
        return out

    def _draw(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        mask = np.zeros(size, bool)
        for t, l, b, r in self.boxes(rng, size):
            mask[t:b, l:r] = True
        return mask

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        return _with_coverage(self._draw, rng, size, self.coverage, self.max_tries)


@dataclasses.dataclass(frozen=True)
class MixtureMask:
    """One component per mask, drawn with probability proportional to its weight."""

    components: tuple[tuple[float, Any], ...]

    def __post_init__(self):
        comps = tuple((float(w), parse_mask_spec(s)) for w, s in self.components)
        if not comps or any(w < 0 for w, _ in comps) or sum(w for w, _ in comps) <= 0:
            raise ValueError(f"mixture needs >= 1 component and non-negative weights with a "
                             f"positive sum, got weights {[w for w, _ in comps]}")
        object.__setattr__(self, "components", comps)

    @property
    def probabilities(self) -> np.ndarray:
        w = np.array([w for w, _ in self.components], np.float64)
        return w / w.sum()

    def choose(self, rng: np.random.Generator) -> int:
        """Index of the component used for the next mask."""
        return int(rng.choice(len(self.components), p=self.probabilities))

    def sample(self, rng: np.random.Generator, size: Size, index: int | None = None,
               train: bool = True) -> np.ndarray:
        return _draw(self.components[self.choose(rng)][1], rng, size, index, train)


@dataclasses.dataclass(frozen=True)
class UnionMask:
    """Union of holes of several specs (DeepFill v2 trains on box OR strokes)."""

    parts: tuple[Any, ...]

    def __post_init__(self):
        parts = tuple(parse_mask_spec(p) for p in self.parts)
        if not parts:
            raise ValueError("union mask needs at least one part")
        object.__setattr__(self, "parts", parts)

    def sample(self, rng: np.random.Generator, size: Size, index: int | None = None,
               train: bool = True) -> np.ndarray:
        mask = np.zeros(size, bool)
        for part in self.parts:
            mask |= _draw(part, rng, size, index, train)
        return mask


# --------------------------------------------------------------------------- mask folders

#: Extensions of mask image files (any case).
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: Bytes of bit-packed masks kept per process by the decoded-mask cache (LRU).
MASK_CACHE_BYTES = 64 << 20

logger = logging.getLogger("jattn.data")

_cache: OrderedDict = OrderedDict()  # (content digest, threshold, invert) -> (bits, width) | reason
_cache_bytes = 0
_cache_lock = threading.Lock()
_warned: set[str] = set()


def clear_mask_cache() -> None:
    """Empties this process's cache of decoded mask files (results never depend on it)."""
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0


def _warn_bad_mask(name: str, reason: str) -> None:
    with _cache_lock:
        if name in _warned:
            return
        _warned.add(name)
    logger.warning("skipping bad mask file %s: %s", name, reason)


def _decode_gray(data: bytes, name: str) -> np.ndarray:
    """Encoded image -> uint8 ``[h, w]``: each pixel's largest channel (16-bit scaled to 8
    bits, transparent pixels black); raises :class:`BadImageError`."""
    if not data:
        raise BadImageError(name, "empty file")
    with decoding_errors(name), Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated data
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode in ("1", "L"):
            arr = np.asarray(im.convert("L"))
        elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            raw = np.asarray(im).astype(np.float64)
            scale = 65535.0 if mode != "I" or (raw.size and raw.max() > 255) else 255.0
            arr = np.clip(np.round(raw / scale * 255.0), 0, 255).astype(np.uint8)
        else:
            if "A" in mode or "a" in mode or (mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, rgba)
            arr = np.asarray(im.convert("RGB")).max(axis=2)
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise BadImageError(name, f"unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _load_mask_file(path: str, threshold: float, invert: bool) -> np.ndarray:
    """bool ``[h, w]`` (True = hole) of a mask file; raises :class:`BadImageError`.

    The decoded mask is cached by a digest of the file's bytes, so a changed file is
    decoded again and the result never depends on the cache."""
    global _cache_bytes
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(path, f"cannot read ({e.strerror or e})") from None
    key = (hashlib.blake2b(data, digest_size=16).digest(), float(threshold), bool(invert))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if isinstance(hit, str):
        raise BadImageError(path, hit)
    if hit is not None:
        bits, width = hit
        return np.unpackbits(bits, axis=-1, count=width).astype(bool)
    try:
        hole = _decode_gray(data, path) > threshold * 255.0
    except BadImageError as e:
        entry, mask = e.reason, None
    else:
        if invert:
            hole = ~hole
        entry, mask = (np.packbits(hole, axis=-1), hole.shape[1]), hole
    with _cache_lock:
        if key not in _cache:
            _cache[key] = entry
            _cache_bytes += 64 if isinstance(entry, str) else entry[0].nbytes
            while _cache_bytes > MASK_CACHE_BYTES and len(_cache) > 1:
                _, old = _cache.popitem(last=False)
                _cache_bytes -= 64 if isinstance(old, str) else old[0].nbytes
    if mask is None:
        raise BadImageError(path, entry)
    return mask


def _list_mask_files(path: str, pattern: str) -> tuple[str, list[str]]:
    """``(absolute root, sorted relative posix paths)`` of the mask images below ``path``."""
    if "://" in path:
        raise ValueError(f"mask folder {path}: only local folders are supported (copy the masks to each host)")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(root):
        raise ValueError(f"mask folder not found: {root}")
    if not os.path.isdir(root):
        raise ValueError(f"mask folder {root} is not a folder")
    pat = pattern.lower()
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            low = fn.lower()
            if os.path.splitext(low)[1] in MASK_EXTENSIONS and fnmatch.fnmatchcase(low, pat):
                rel.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
    rel.sort()
    if not rel:
        which = "" if pattern == "*" else f" matching {pattern!r}"
        raise ValueError(f"mask folder {root}: no mask images{which} "
                         f"({', '.join(MASK_EXTENSIONS)}, any case)")
    return root, rel


def _fit(mask: np.ndarray, size: Size, rng: np.random.Generator | None, fit: str) -> np.ndarray:
    """bool ``[h, w]`` -> ``[H, W]``: with ``fit="crop"`` a mask at least as large as the
    image on both sides is cropped (at random with ``rng``, else centred); any other
    mask is resized (nearest neighbour) to exactly ``size``."""
    (H, W), (h, w) = size, mask.shape
    if fit == "crop" and h >= H and w >= W:
        if rng is None:
            top, left = (h - H) // 2, (w - W) // 2
        else:
            top, left = int(rng.integers(0, h - H + 1)), int(rng.integers(0, w - W + 1))
        mask = mask[top:top + H, left:left + W]
    elif (h, w) != (H, W):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((W, H), Image.NEAREST)) > 0
    return np.ascontiguousarray(mask, dtype=bool)


@dataclasses.dataclass(frozen=True)
class FolderMask:
    """Masks read from the image files below ``path`` (recursive).

    Files: extensions in :data:`MASK_EXTENSIONS` (any case) whose name matches ``pattern``
    (``fnmatch``, any case), sorted by relative path -- the order does not depend on the
    filesystem.  A pixel's value is its largest channel (16-bit images scaled to 8 bits,
    transparent pixels count as black); it is a hole when ``value > threshold * 255``
    (white / nonzero = hole), or ``<=`` with ``invert=True`` (black = hole).

    Training (``train=True``): file ``rng.integers(n)``, then (with the same generator) a
    rotation by a random multiple of 90 degrees (``rotate``), random left-right and
    up-down flips with probability 1/2 each (``flip``), and the fit to the image size.
    Evaluation (``train=False``): file ``index % n`` (cycling when there are fewer files
    than examples), no rotation or flip, centred fit.

    Fit (``fit="crop"``): a mask at least as large as the image on both sides is cropped
    (random position in training, centred in evaluation); otherwise it is resized to the
    image size with nearest neighbour (aspect ratio not kept).  ``fit="resize"``: always
    resized, so the whole mask (and its hole fraction) is kept.

    A file that cannot be decoded is skipped: it is replaced by the next readable file in
    order (one warning per file and process, logger ``jattn.data``).  Making the spec
    lists the folder and decodes the first readable file: a missing folder, a folder
    without mask images, or one whose files are all unreadable is a ``ValueError``.
    """

    path: str = ""
    invert: bool = False
    threshold: float = 0.5
    flip: bool = True
    rotate: bool = True
    fit: str = "crop"
    pattern: str = "*"

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"folder mask needs 'path', a folder of mask images, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))
        for name in ("invert", "flip", "rotate"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"folder mask {name!r} must be true or false, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.number)) \
                or not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"folder mask threshold must be a number in [0, 1), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.fit not in ("crop", "resize"):
            raise ValueError(f"folder mask fit must be 'crop' or 'resize', got {self.fit!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"folder mask pattern must be a non-empty string, got {self.pattern!r}")
        root, files = _list_mask_files(self.path, self.pattern)
        # Not dataclass fields: equality, repr and the JSON form are the parameters only.
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_files", tuple(files))
        self.load(0)  # a folder without one readable mask fails here, before training

    @property
    def root(self) -> str:
        """Absolute path of the folder."""
        return self._root

    @property
    def files(self) -> tuple[str, ...]:
        """Relative paths (``/``-separated) of the mask files, in the order used."""
        return self._files

    def file_path(self, j: int) -> str:
        return os.path.join(self._root, *self._files[j].split("/"))

    def load(self, j: int) -> np.ndarray:
        """bool ``[h, w]`` (True = hole) of file ``j``, or of the next readable file after it
        (cyclically) when it cannot be decoded."""
        n = len(self._files)
        first = None
        for step in range(n):
            try:
                return _load_mask_file(self.file_path((j + step) % n), self.threshold, self.invert)
            except BadImageError as e:
                _warn_bad_mask(e.name, e.reason)
                first = first or e
        raise ValueError(f"mask folder {self._root}: no readable mask image among its {n} file(s) "
                         f"(first error: {first})")

    def sample(self, rng: np.random.Generator, size: Size, index: int | None = None,
               train: bool = True) -> np.ndarray:
        n = len(self._files)
        if train:
            mask = self.load(int(rng.integers(n)))
            if self.rotate:
                mask = np.rot90(mask, int(rng.integers(4)))
            if self.flip:
                if rng.random() < 0.5:
                    mask = mask[:, ::-1]
                if rng.random() < 0.5:
                    mask = mask[::-1, :]
            return _fit(mask, size, rng, self.fit)
        if index is None:
            raise ValueError("folder masks in evaluation take file index % n: pass the example index "
                             "(mask_for_index(..., train=False))")
        return _fit(self.load(int(index) % n), size, None, self.fit)


def _draw(spec: Any, rng: np.random.Generator, size: Size, index: int | None, train: bool) -> np.ndarray:
    """``spec.sample``, passing the example index and the mode to the specs that use them."""
    if isinstance(spec, (FolderMask, MixtureMask, UnionMask)):
        return spec.sample(rng, size, index=index, train=train)
    return spec.sample(rng, size)


def _folder_masks(spec: Any) -> list[FolderMask]:
    if isinstance(spec, FolderMask):
        return [spec]
    if isinstance(spec, MixtureMask):
        return [f for _, s in spec.components for f in _folder_masks(s)]
    if isinstance(spec, UnionMask):
        return [f for p in spec.parts for f in _folder_masks(p)]
    return []


def _folder_digest(folder: FolderMask) -> str:
    """SHA-256 over the relative paths and SHA-256s of a mask folder's files."""
    digest = hashlib.sha256()
    for j, rel in enumerate(folder.files):
        try:
            file_hash = file_sha256(folder.file_path(j))
        except OSError as e:
            file_hash = f"unreadable ({e.strerror or e})"
        digest.update(f"{rel}\0{file_hash}\n".encode("utf-8"))
    return digest.hexdigest()


MaskSpec = Union[BoxMask, FreeFormMask, LamaStrokeMask, LamaBoxMask, MixtureMask, UnionMask,
                 FolderMask]

_KINDS = {
    "box": BoxMask,
    "free_form": FreeFormMask,
    "lama_strokes": LamaStrokeMask,
    "lama_boxes": LamaBoxMask,
    "mixture": MixtureMask,
    "union": UnionMask,
    "folder": FolderMask,
}

def parse_mask_spec(spec: Any) -> MaskSpec:
    """Turns a preset name, a ``{"kind": ...}`` dict, a ``[(weight, spec), ...]`` list
    or a spec dataclass into a spec dataclass (errors name the offending key)."""
    if isinstance(spec, tuple(_KINDS.values())):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown mask preset {spec!r}; known: {sorted(PRESETS)}")
        return PRESETS[spec]
    if isinstance(spec, Mapping):
        params = dict(spec)
        kind = params.pop("kind", None)
        if kind not in _KINDS:
            raise ValueError(f"mask spec needs 'kind' in {sorted(_KINDS)}, got {kind!r} in {spec!r}")
        cls = _KINDS[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for mask kind {kind!r}; "
                             f"known: {sorted(names)}")
        for key in ("hole_size", "margin", "max_delta", "coverage"):
            if isinstance(params.get(key), list):
                params[key] = tuple(params[key])
        if kind == "mixture":
            params["components"] = tuple(tuple(c) for c in params.get("components", ()))
        if kind == "union":
            params["parts"] = tuple(params.get("parts", ()))
        return cls(**params)
    if isinstance(spec, Sequence) and spec and all(
            isinstance(c, Sequence) and not isinstance(c, str) and len(c) == 2 for c in spec):
        return MixtureMask(tuple(tuple(c) for c in spec))
    raise ValueError(f"cannot interpret mask spec {spec!r}: use a preset name "
                     f"({sorted(PRESETS)}), a dict with 'kind', or a list of (weight, spec)")


_LAMA_THIN = LamaStrokeMask(min_times=4, max_times=50, max_width=10, max_len=40)
_LAMA_MEDIUM = LamaStrokeMask(min_times=4, max_times=5, max_width=50, max_len=100)
_LAMA_THICK = LamaStrokeMask(min_times=1, max_times=5, max_width=100, max_len=200)
_LAMA_BOX = LamaBoxMask(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=3)

#: Named specs (parameters for 256x256 images).
PRESETS: dict[str, MaskSpec] = {
    "box": BoxMask(),
    "deepfill_v1": BoxMask(),
    "free_form": FreeFormMask(),
    "deepfill_v2": UnionMask((BoxMask(), FreeFormMask())),
    "lama_thin": _LAMA_THIN,
    "lama_medium": _LAMA_MEDIUM,
    "lama_thick": _LAMA_THICK,
    "lama_box": _LAMA_BOX,
    "lama": MixtureMask(((1.0, _LAMA_THIN), (1.0, _LAMA_MEDIUM), (1.0, _LAMA_THICK),
                         (1.0, _LAMA_BOX))),
}


def sample_mask(spec: Any, size: int | Sequence[int], rng: np.random.Generator, *,
                index: int | None = None, train: bool = True) -> np.ndarray:
    """One mask ``[H, W, 1]`` float32 (1 = hole) drawn from ``spec`` with ``rng``.

    ``index`` (the example's) and ``train`` matter to folder masks only: evaluation
    (``train=False``) takes file ``index % n``, unaugmented."""
    hw = _size(size)
    mask = _draw(parse_mask_spec(spec), rng, hw, index, train)
    return mask.astype(np.float32)[:, :, None]


def mask_for_index(spec: Any, size: int | Sequence[int], seed: int, index: int, *,
                   train: bool = True) -> np.ndarray:
    """The mask ``[H, W, 1]`` of example ``index`` under ``seed``: a pure function.

    ``train=False`` (evaluation) changes folder masks only (file ``index % n``, no
    augmentation); generated masks are the same in both modes."""
    return sample_mask(spec, size, mask_rng(seed, index), index=int(index), train=train)


def masks_for_indices(spec: Any, size: int | Sequence[int], seed: int,
                      indices: Sequence[int], *, train: bool = True) -> np.ndarray:
    """Masks ``[N, H, W, 1]`` of the given example indices."""
    spec = parse_mask_spec(spec)
    hw = _size(size)
    out = np.zeros((len(indices), *hw, 1), np.float32)
    for k, i in enumerate(indices):
        out[k] = mask_for_index(spec, hw, seed, i, train=train)
    return out


# --------------------------------------------------------------------------- eval sets

_EVAL_FORMAT = "jattn-eval-masks-v1"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class EvalMaskSet:
    """A fixed evaluation mask set: ``masks`` ``[N, H, W, 1]`` float32, 1 = hole."""

    masks: np.ndarray
    sha256: str
    path: pathlib.Path
    metadata: dict


def _default_mask_dir() -> pathlib.Path:
    root = os.environ.get("JATTN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jattn")
    return pathlib.Path(root) / "eval_masks"


def _spec_to_json(spec: MaskSpec) -> Any:
    if isinstance(spec, MixtureMask):
        return {"kind": "mixture", "components": [[w, _spec_to_json(s)] for w, s in spec.components]}
    if isinstance(spec, UnionMask):
        return {"kind": "union", "parts": [_spec_to_json(p) for p in spec.parts]}
    kind = next(k for k, c in _KINDS.items() if isinstance(spec, c))
    return {"kind": kind, **{k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in dataclasses.asdict(spec).items()}}


class EvalMaskError(ValueError):
    """An eval mask set on disk that cannot be used (corrupt, unreadable, or built with other
    parameters); the message names the file."""


def load_eval_set(path: str | os.PathLike, expected_sha256: str | None = None) -> EvalMaskSet:
    """Loads an eval mask set written by :func:`eval_set`, verifying its SHA-256.

    The ``.npy`` file holds the bit-packed masks; ``<file>.json`` holds the metadata and
    the hash.  Raises ``EvalMaskError`` when the metadata cannot be read or the file does
    not match the recorded (or the ``expected_sha256``) hash.
    """
    path = pathlib.Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"eval mask set {path} (or its metadata {meta_path.name}) not found")
    rebuild = f"remove {path.name} and {meta_path.name} to rebuild it"
    try:
        meta = json.loads(meta_path.read_text())
        n, h, w = meta["n"], meta["height"], meta["width"]
    except (ValueError, KeyError, TypeError) as err:
        raise EvalMaskError(f"eval mask set {path}: unreadable metadata {meta_path.name} ({err}); {rebuild}") from None
    digest = file_sha256(path)
    for want in (meta.get("sha256"), expected_sha256):
        if want is not None and want != digest:
            raise EvalMaskError(f"eval mask set {path} has SHA-256 {digest}, expected {want}: "
                                f"the file is corrupt or was regenerated differently; {rebuild}")
    if meta.get("format") != _EVAL_FORMAT:
        raise EvalMaskError(f"{path}: unknown eval mask format {meta.get('format')!r}")
    bits = np.load(path, allow_pickle=False)
    masks = np.unpackbits(bits, axis=-1, count=w).reshape(n, h, w, 1).astype(np.float32)
    return EvalMaskSet(masks=masks, sha256=digest, path=path, metadata=meta)


def eval_set(name: str, n: int, size: int | Sequence[int], seed: int, *,
             directory: str | os.PathLike | None = None, spec: Any = None) -> EvalMaskSet:
    """Builds (or reloads) a fixed eval mask set of ``n`` masks ``[n, H, W, 1]``.

    Mask ``i`` is ``mask_for_index(spec, size, seed, i, train=False)`` -- the same mask
    the pipelines give the example with index ``i`` in eval mode with this mask seed (for
    generated masks the same as in training; folder masks take file ``i % n_files``,
    unaugmented).  ``spec`` defaults to the preset ``name``.  The set is saved as
    ``<directory>/<name>_n<n>_<H>x<W>_seed<seed>.npy`` (packed bits; deterministic bytes)
    plus ``.npy.json`` with the metadata and the file's SHA-256, then re-read from disk;
    an existing file is loaded and verified instead of rebuilt.  ``directory`` defaults
    to ``$JATTN_CACHE_DIR/eval_masks`` or ``~/.cache/jattn/eval_masks``.

    For specs with mask folders the metadata also records ``mask_files``: per folder, a
    SHA-256 over its files' relative paths and SHA-256s (every file is read once per
    call), so an existing set built from files that have changed since is an
    :class:`EvalMaskError`, not silently reused.
    """
    if n <= 0:
        raise ValueError(f"eval mask set size must be positive, got n={n}")
    hw = _size(size)
    parsed = parse_mask_spec(name if spec is None else spec)
    directory = pathlib.Path(directory) if directory is not None else _default_mask_dir()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = directory / f"{safe}_n{n}_{hw[0]}x{hw[1]}_seed{seed}.npy"
    meta = {"format": _EVAL_FORMAT, "name": name, "n": n, "height": hw[0], "width": hw[1],
            "seed": seed, "spec": _spec_to_json(parsed)}
    folders = _folder_masks(parsed)
    if folders:
        meta["mask_files"] = {f.path: _folder_digest(f) for f in folders}
    if path.exists():
        loaded = load_eval_set(path)
        stored = {k: loaded.metadata.get(k) for k in meta}
        if json.dumps(stored, sort_keys=True) != json.dumps(meta, sort_keys=True):
            rebuild = f"remove {path.name} and {path.name}.json to rebuild it"
            if {k: v for k, v in stored.items() if k != "mask_files"} == \
                    {k: v for k, v in meta.items() if k != "mask_files"}:
                changed = sorted(k for k, v in meta["mask_files"].items()
                                 if (stored.get("mask_files") or {}).get(k) != v)
                raise EvalMaskError(f"eval mask set {path} was built from mask files that have changed "
                                    f"since (in {', '.join(changed)}); {rebuild}")
            raise EvalMaskError(f"eval mask set {path} exists but was built with different "
                             f"parameters: {stored} != {meta}")
        return loaded
    masks = masks_for_indices(parsed, hw, seed, range(n), train=False)
    bits = np.packbits(masks[..., 0] > 0.5, axis=-1)  # [n, H, ceil(W / 8)] uint8
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes may build it at once
    with open(tmp, "wb") as f:
        np.save(f, bits, allow_pickle=False)
    meta["sha256"] = file_sha256(tmp)
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return load_eval_set(path)
