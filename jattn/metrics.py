"""Image-quality metrics (pure, jit-able JAX functions on NHWC batches ``[B, H, W, C]``).

Every metric returns one value per image, shape ``[B]``; callers average (or use
:func:`summarize`, which returns batch means). ``data_range`` is the difference between the
largest and smallest possible pixel value: 2.0 (the default) for jattn's images in
``[-1, 1]``, 1.0 for ``[0, 1]``, 255.0 for 8-bit images or for the Y channel of
:func:`rgb_to_y`.

* :func:`l1`, :func:`l2` -- mean absolute / squared error per image;
* :func:`psnr` -- ``10 log10(data_range**2 / l2)``, as
  ``skimage.metrics.peak_signal_noise_ratio``; ``+inf`` for identical images (no cap);
* :func:`ssim` -- Wang et al. 2004 SSIM with an 11-tap Gaussian window (sigma 1.5),
  equal to ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=..., channel_axis=-1)``;
* :func:`total_variation` -- anisotropic TV, mean absolute neighbour difference;
* :func:`rgb_to_y`, :func:`shave` -- super-resolution evaluation ("PSNR / SSIM on the Y
  channel with ``scale`` pixels shaved from each border");
* :func:`summarize` -- batch means of all of the above in a dict.

**Masks.** :func:`l1`, :func:`l2` and :func:`psnr` take an optional ``mask`` of shape
``[B, H, W, 1]`` (or ``[B, H, W, C]``), 1 on the pixels to score (for inpainting: the hole)
and 0 elsewhere. The per-image mean is then taken over the masked pixels only (all channels
of each masked pixel): ``sum(err * mask) / sum(mask broadcast to [H, W, C])``. A mask with
fractional values acts as per-pixel weights. An image whose mask is all zero gets ``nan``
(0 / 0); so does its PSNR.

**Dtypes.** Integer inputs (e.g. ``uint8``) are cast to float32 *before* any difference is
taken; half-precision inputs are computed in float32; float64 stays float64 (with x64 on).

**Validation.** Shapes are static under ``jit``, so the ``ValueError`` s for non-4D inputs,
mismatched shapes, masks of the wrong shape, or a filter larger than the image are raised at
trace time as well as eagerly. ``ssim``'s ``filter_size`` / ``filter_sigma`` and ``shave``'s
``border`` must be Python numbers (static); ``data_range`` may be traced.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "gaussian_kernel",
    "l1",
    "l2",
    "psnr",
    "rgb_to_y",
    "shave",
    "ssim",
    "summarize",
    "total_variation",
]

# MATLAB rgb2ycbcr (ITU-R BT.601, studio swing): Y = 16 + [65.481, 128.553, 24.966] . RGB,
# RGB in [0, 1], Y on the 0..255 scale (16 for black, 235 for white).
_Y_OFFSET = 16.0
_Y_COEFFS = (65.481, 128.553, 24.966)


# --------------------------------------------------------------------------- helpers


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    dt = jnp.result_type(*xs)
    if not jnp.issubdtype(dt, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dt, jnp.float32)


def _check_4d(name: str, what: str, x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: {what} must be 4-D [B, H, W, C], got shape {tuple(x.shape)}")


def _pair(name: str, a, b) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    _check_4d(name, "a", a)
    _check_4d(name, "b", b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    dt = _compute_dtype(a, b)
    return a.astype(dt), b.astype(dt)


def _check_data_range(name: str, data_range) -> None:
    if isinstance(data_range, (int, float, np.number)) and not data_range > 0:
        raise ValueError(f"{name}: data_range must be > 0, got {data_range}")


def _prepare_mask(name: str, mask, like: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.ndim != 4:
        raise ValueError(f"{name}: mask must be 4-D [B, H, W, 1], got shape {tuple(mask.shape)}")
    if mask.shape[:3] != like.shape[:3] or mask.shape[3] not in (1, like.shape[3]):
        raise ValueError(
            f"{name}: mask shape {tuple(mask.shape)} does not fit images of shape "
            f"{tuple(like.shape)} (expected [B, H, W, 1] or [B, H, W, C])"
        )
    return jnp.broadcast_to(mask.astype(like.dtype), like.shape)


@functools.partial(jax.jit, static_argnames=("squared",))
def _error_mean(a: jax.Array, b: jax.Array, mask: jax.Array | None, *, squared: bool) -> jax.Array:
    d = a - b
    err = d * d if squared else jnp.abs(d)
    if mask is None:
        return jnp.mean(err, axis=(1, 2, 3))
    return jnp.sum(err * mask, axis=(1, 2, 3)) / jnp.sum(mask, axis=(1, 2, 3))


# --------------------------------------------------------------------------- pixel errors


def l1(a, b, mask=None) -> jax.Array:
    """Mean absolute error per image: ``mean(|a - b|)`` over ``H, W, C``; ``[B]``.

    With ``mask`` (``[B, H, W, 1]``, 1 = scored pixel), the mean is over the masked pixels
    only (see the module docstring).
    """
    a, b = _pair("l1", a, b)
    m = None if mask is None else _prepare_mask("l1", mask, a)
    return _error_mean(a, b, m, squared=False)


def l2(a, b, mask=None) -> jax.Array:
    """Mean squared error per image: ``mean((a - b)**2)`` over ``H, W, C``; ``[B]``.

    With ``mask`` (``[B, H, W, 1]``, 1 = scored pixel), the mean is over the masked pixels
    only (see the module docstring).
    """
    a, b = _pair("l2", a, b)
    m = None if mask is None else _prepare_mask("l2", mask, a)
    return _error_mean(a, b, m, squared=True)


def psnr(a, b, data_range=2.0, mask=None) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(data_range**2 / l2(a, b))``.

    Same as ``skimage.metrics.peak_signal_noise_ratio(b, a, data_range=data_range)`` per
    image (it is symmetric in ``a, b``). Identical images give ``+inf`` (no cap is applied:
    the batch mean of a batch holding one is ``inf`` too). With ``mask``, the MSE is the
    masked mean of :func:`l2`.

    Returns:
      ``[B]`` in the compute dtype (float32 for float32 / integer inputs).
    """
    _check_data_range("psnr", data_range)
    mse = l2(a, b, mask)
    dr = jnp.asarray(data_range, mse.dtype)
    return 10.0 * jnp.log10(jnp.square(dr) / mse)


# --------------------------------------------------------------------------- SSIM


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``exp(-x**2 / (2 sigma**2))``, ``x = -r..r``, ``r = size // 2``.

    Same taps as ``scipy.ndimage.gaussian_filter1d`` with radius ``r`` (float64 numpy).
    """
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 != 1:
        raise ValueError(f"filter_size must be a positive odd int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"filter_sigma must be > 0, got {sigma!r}")
    r = size // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 / (sigma * sigma) * x * x)
    return k / k.sum()


def _depthwise_valid(x: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of every channel of ``x`` ``[B, H, W, N]`` with ``taps``."""
    n = x.shape[-1]
    k = taps.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda y, w: jax.lax.conv_general_dilated(  # noqa: E731
        y, w, window_strides=(1, 1), padding="VALID", dimension_numbers=dn,
        feature_group_count=n, precision=jax.lax.Precision.HIGHEST,
    )
    w_rows = jnp.broadcast_to(taps.reshape(k, 1, 1, 1), (k, 1, 1, n))
    w_cols = jnp.broadcast_to(taps.reshape(1, k, 1, 1), (1, k, 1, n))
    return conv(conv(x, w_rows), w_cols)


@functools.partial(jax.jit, static_argnames=("taps",))
def _ssim_core(a, b, data_range, k1, k2, *, taps: tuple[float, ...]) -> jax.Array:
    # jitted so that eager calls run as one program, not op by op
    dt = a.dtype
    taps = jnp.asarray(np.asarray(taps), dt)

    # Centre each image / channel: variances and the covariance are shift-invariant, and the
    # means are shifted back below. Avoids float32 cancellation in E[x^2] - E[x]^2.
    ca = jnp.mean(a, axis=(1, 2), keepdims=True)
    cb = jnp.mean(b, axis=(1, 2), keepdims=True)
    x = a - ca
    y = b - cb
    stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    f = _depthwise_valid(stacked, taps)
    fx, fy, fxx, fyy, fxy = jnp.split(f, 5, axis=-1)
    var_a = fxx - fx * fx
    var_b = fyy - fy * fy
    cov = fxy - fx * fy
    mu_a = fx + ca
    mu_b = fy + cb

    dr = jnp.asarray(data_range, dt)
    c1 = jnp.square(k1 * dr)
    c2 = jnp.square(k2 * dr)
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (jnp.square(mu_a) + jnp.square(mu_b) + c1) * (var_a + var_b + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def ssim(
    a,
    b,
    data_range=2.0,
    filter_size: int | None = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity (Wang et al. 2004) per image, mean over pixels and channels; ``[B]``.

    Per channel, with ``G`` the separable Gaussian window (``filter_size`` taps, std
    ``filter_sigma``, normalised to sum 1) applied in 'valid' mode::

        mu_a = G*a, mu_b = G*b,
        var_a = G*(a*a) - mu_a**2, var_b = G*(b*b) - mu_b**2, cov = G*(a*b) - mu_a*mu_b,
        S = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a**2 + mu_b**2 + C1)(var_a + var_b + C2)),
        C1 = (k1 data_range)**2, C2 = (k2 data_range)**2,

    (population (co)variances), and the result is the mean of ``S`` over the
    ``(H - filter_size + 1) x (W - filter_size + 1)`` valid positions and over the channels.

    This is exactly what ``skimage.metrics.structural_similarity(a[i], b[i],
    gaussian_weights=True, sigma=filter_sigma, use_sample_covariance=False,
    data_range=data_range, channel_axis=-1)`` computes: skimage filters the whole image
    (reflect padding) and then crops ``(win_size - 1) // 2`` pixels from every side of the
    SSIM map, which leaves exactly the positions whose window lies inside the image, i.e. the
    'valid' map; it averages per channel and then over channels (equal sizes, so the same as
    one mean). skimage's window radius is ``int(3.5 * sigma + 0.5)`` (5 for sigma 1.5, so 11
    taps); ``filter_size=None`` derives the size the same way, for other sigmas.

    The (co)variances are computed on per-image, per-channel mean-centred inputs
    (mathematically identical, since the window sums to 1), which keeps float32 results close
    to skimage's float64 ones even at ``data_range=255``. Convolutions use
    ``Precision.HIGHEST`` (no TF32 / bf16 passes on accelerators).

    Raises:
      ValueError: non-4-D or mismatched inputs, an even / non-positive ``filter_size``,
        ``filter_sigma <= 0``, or ``H`` or ``W`` smaller than ``filter_size``.
    """
    a, b = _pair("ssim", a, b)
    _check_data_range("ssim", data_range)
    if filter_size is None:
        if not filter_sigma > 0:
            raise ValueError(f"ssim: filter_sigma must be > 0, got {filter_sigma!r}")
        filter_size = 2 * int(3.5 * filter_sigma + 0.5) + 1
    try:
        taps_np = gaussian_kernel(filter_size, filter_sigma)
    except ValueError as e:
        raise ValueError(f"ssim: {e}") from None
    _, h, w, c = a.shape
    if h < filter_size or w < filter_size:
        raise ValueError(
            f"ssim: filter_size {filter_size} exceeds the image size {h}x{w}; use images of at "
            f"least {filter_size}x{filter_size} or a smaller filter"
        )
    return _ssim_core(a, b, data_range, k1, k2, taps=tuple(float(t) for t in taps_np))


# --------------------------------------------------------------------------- total variation


def total_variation(x) -> jax.Array:
    """Anisotropic total variation per image, as a mean; ``[B]``.

    ``tv = mean(|x[:, 1:, :, :] - x[:, :-1, :, :]|) + mean(|x[:, :, 1:, :] - x[:, :, :-1, :]|)``

    i.e. the mean absolute vertical neighbour difference (over its ``(H-1) * W * C`` terms)
    plus the mean absolute horizontal one (over its ``H * (W-1) * C`` terms). A 0/1
    checkerboard gives 2, a horizontal ramp with unit step gives 1, a constant image 0.
    (Not the sum-based TV of ``tf.image.total_variation``, nor the isotropic
    ``sqrt(dx**2 + dy**2)``.)

    Raises:
      ValueError: ``x`` not 4-D, or ``H < 2`` or ``W < 2``.
    """
    x = jnp.asarray(x)
    _check_4d("total_variation", "x", x)
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"total_variation: need H, W >= 2, got shape {tuple(x.shape)}")
    return _tv_core(x.astype(_compute_dtype(x)))


@jax.jit
def _tv_core(x: jax.Array) -> jax.Array:
    dy = jnp.abs(x[:, 1:, :, :] - x[:, :-1, :, :])
    dx = jnp.abs(x[:, :, 1:, :] - x[:, :, :-1, :])
    return jnp.mean(dy, axis=(1, 2, 3)) + jnp.mean(dx, axis=(1, 2, 3))


# --------------------------------------------------------------------------- super-resolution


def rgb_to_y(x, value_range: Sequence[float] = (-1.0, 1.0)) -> jax.Array:
    """BT.601 luma as MATLAB ``rgb2ycbcr`` computes it, on the 0..255 scale; ``[B, H, W, 1]``.

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with ``R, G, B`` rescaled to ``[0, 1]``
    from ``value_range`` (default ``(-1, 1)``, jattn's range; ``(0, 1)`` and ``(0, 255)`` are
    the other common ones). Black gives 16, white 235. Score the result with
    ``data_range=255.0``. No rounding is applied (as BasicSR's ``test_y_channel``); for
    parity with MATLAB's ``uint8`` pipeline, quantise the RGB inputs to 8 bits first.

    Raises:
      ValueError: ``x`` not 4-D with 3 channels, or ``value_range`` empty.
    """
    x = jnp.asarray(x)
    _check_4d("rgb_to_y", "x", x)
    if x.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: need 3 (RGB) channels, got shape {tuple(x.shape)}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(
            f"rgb_to_y: value_range must be (low, high) with high > low, got {value_range}"
        )
    x = x.astype(_compute_dtype(x))
    rgb = (x - lo) / (hi - lo)
    w = jnp.asarray(_Y_COEFFS, x.dtype)
    y = _Y_OFFSET + jnp.einsum("bhwc,c->bhw", rgb, w, precision=jax.lax.Precision.HIGHEST)
    return y[..., None]


def shave(x, border: int) -> jax.Array:
    """Crop ``border`` pixels from each side: ``x[:, b:H-b, b:W-b, :]``; ``border=0`` is a no-op.

    Raises:
      ValueError: ``x`` not 4-D, ``border`` negative / not an int, or nothing would remain.
    """
    x = jnp.asarray(x)
    _check_4d("shave", "x", x)
    if not isinstance(border, (int, np.integer)) or isinstance(border, bool) or border < 0:
        raise ValueError(f"shave: border must be a non-negative int, got {border!r}")
    _, h, w, _ = x.shape
    if 2 * border >= h or 2 * border >= w:
        raise ValueError(f"shave: border {border} leaves nothing of a {h}x{w} image")
    return x[:, border : h - border, border : w - border, :]


# --------------------------------------------------------------------------- summary


def summarize(a, b, mask=None, value_range: Sequence[float] = (-1.0, 1.0)) -> dict[str, jax.Array]:
    """Batch means of the metrics of prediction ``a`` against reference ``b``, both with
    pixel values in ``value_range`` (jattn's models work on ``[-1, 1]``).

    Returns ``{"psnr", "ssim", "l1", "l2", "tv"}`` (scalars). ``psnr`` and ``ssim`` are
    computed on the images mapped to ``[0, 1]`` with data range 1, the convention of
    scikit-image, dm-pix, tf.image and the papers' tables: SSIM's luminance term is not
    shift-invariant, so SSIM on ``[-1, 1]`` with range 2 is a different number. ``l1``, ``l2``
    and ``tv`` (:func:`total_variation` of ``a``) are on ``value_range`` itself. ``mask`` (if
    given) restricts ``psnr``, ``l1`` and ``l2``; ``ssim`` (11-tap Gaussian window, sigma 1.5,
    so ``H, W >= 11``) is over the whole image. ``psnr`` is the mean of the per-image dB
    values (``inf`` if any image is reproduced exactly).
    """
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"summarize: value_range must be (low, high) with high > low, got {tuple(value_range)!r}")
    a01, b01 = ((jnp.asarray(x, _compute_dtype(a, b)) - lo) / (hi - lo) for x in (a, b))
    return {
        "psnr": jnp.mean(psnr(a01, b01, data_range=1.0, mask=mask)),
        "ssim": jnp.mean(ssim(a01, b01, data_range=1.0)),
        "l1": jnp.mean(l1(a, b, mask=mask)),
        "l2": jnp.mean(l2(a, b, mask=mask)),
        "tv": jnp.mean(total_variation(a)),
    }
