"""jattn.metrics: parity with scikit-image / numpy, known values, jit, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from jattn import metrics as M

ATOL = 1e-4


def _pair(seed, shape=(3, 24, 29, 3), smooth=False, noise=0.3):
    """Reference `b` in [-1, 1] and a noisy / clipped prediction `a`, float64."""
    rng = np.random.default_rng(seed)
    b = rng.uniform(-1, 1, shape)
    if smooth:
        b = np.stack([gaussian_filter(x, (2.0, 2.0, 0.0)) for x in b])
        b = b / np.abs(b).max()
    a = np.clip(b + noise * rng.normal(size=shape), -1, 1)
    return a, b


def _to_range(x, data_range):
    """Map [-1, 1] to [0, data_range] (or leave it for data_range 2)."""
    return x if data_range == 2.0 else (x + 1.0) * (data_range / 2.0)


def _sk_ssim(a, b, data_range, sigma=1.5):
    return np.array([
        sk_ssim(x, y, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                data_range=data_range, channel_axis=-1)
        for x, y in zip(a, b)
    ])


def _f32(x):
    return np.asarray(x, np.float32)


# --------------------------------------------------------------------------- skimage parity


@pytest.mark.parametrize("data_range", [2.0, 1.0, 255.0])
@pytest.mark.parametrize("smooth", [False, True])
def test_ssim_psnr_match_skimage(data_range, smooth):
    a, b = _pair(int(data_range) + smooth, smooth=smooth)
    a, b = _to_range(a, data_range), _to_range(b, data_range)
    ours = np.asarray(M.ssim(_f32(a), _f32(b), data_range=data_range))
    ref = _sk_ssim(a, b, data_range)
    assert ours.shape == (3,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    assert np.ptp(ref) > 1e-3  # per-image values, not a batch mean
    p = np.asarray(M.psnr(_f32(a), _f32(b), data_range=data_range))
    pr = np.array([sk_psnr(y, x, data_range=data_range) for x, y in zip(a, b)])
    np.testing.assert_allclose(p, pr, rtol=0, atol=ATOL)


def test_ssim_grayscale_small_variance_and_scaled_copy():
    # one channel, smoothed (small variances, where C1/C2 matter), b an affine copy of a
    a, _ = _pair(7, shape=(2, 17, 11, 1), smooth=True, noise=0.0)
    a = _to_range(a * 0.2, 255.0)
    b = 0.9 * a + 10.0
    np.testing.assert_allclose(
        np.asarray(M.ssim(_f32(a), _f32(b), data_range=255.0)), _sk_ssim(a, b, 255.0), atol=ATOL)


def test_ssim_other_sigma_matches_skimage():
    # skimage's window radius is int(3.5 * sigma + 0.5): 9 taps for sigma 1; filter_size=None
    # derives the same, an explicit 9 too.
    a, b = _pair(3, shape=(2, 20, 21, 3))
    ref = _sk_ssim(a, b, 2.0, sigma=1.0)
    for size in (None, 9):
        ours = M.ssim(_f32(a), _f32(b), filter_size=size, filter_sigma=1.0)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL)


def test_ssim_image_equal_to_filter_size():
    a, b = _pair(4, shape=(2, 11, 11, 2))
    np.testing.assert_allclose(np.asarray(M.ssim(_f32(a), _f32(b))), _sk_ssim(a, b, 2.0), atol=ATOL)


def test_gaussian_kernel_is_scipys():
    k = M.gaussian_kernel(11, 1.5)
    impulse = np.zeros(11)
    impulse[5] = 1.0
    ref = gaussian_filter(impulse, 1.5, truncate=3.5, mode="constant")  # radius 5
    np.testing.assert_allclose(k, ref[::-1], atol=1e-15)
    assert abs(k.sum() - 1.0) < 1e-12


def test_identical_images():
    a, _ = _pair(5)
    a = _f32(a)
    s = np.asarray(M.ssim(a, a))
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    p = np.asarray(M.psnr(a, a))
    assert np.all(np.isposinf(p))
    np.testing.assert_array_equal(np.asarray(M.l1(a, a)), 0.0)
    np.testing.assert_array_equal(np.asarray(M.l2(a, a)), 0.0)


def test_psnr_known_value():
    a = np.zeros((1, 4, 4, 3), np.float32)
    b = np.full_like(a, 0.1)  # mse 0.01, data_range 2 -> 10 log10(400)
    np.testing.assert_allclose(np.asarray(M.psnr(a, b)), [10 * np.log10(400.0)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(M.psnr(a, b, data_range=1.0)), [20.0], rtol=1e-6)


# --------------------------------------------------------------------------- l1 / l2 / masks


def test_l1_l2_against_numpy():
    a, b = _pair(6, shape=(4, 9, 7, 3))
    np.testing.assert_allclose(np.asarray(M.l1(_f32(a), _f32(b))), np.abs(a - b).mean(axis=(1, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(M.l2(_f32(a), _f32(b))), ((a - b) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-5)


def test_uint8_inputs_do_not_wrap():
    a = np.full((1, 4, 4, 3), 10, np.uint8)
    b = np.full((1, 4, 4, 3), 250, np.uint8)
    assert float(M.l1(a, b)[0]) == 240.0 and float(M.l1(b, a)[0]) == 240.0
    assert float(M.l2(a, b)[0]) == 240.0**2
    np.testing.assert_allclose(float(M.psnr(a, b, data_range=255.0)[0]),
                               sk_psnr(a[0], b[0], data_range=255), atol=ATOL)


@pytest.mark.parametrize("channels_in_mask", [1, 3])
def test_masked_metrics_against_numpy(channels_in_mask):
    a, b = _pair(8, shape=(3, 12, 10, 3))
    rng = np.random.default_rng(9)
    mask = (rng.uniform(size=(3, 12, 10, 1)) < 0.3).astype(np.float32)
    mask[1] = 0.0
    mask[1, 2:5, 3:8] = 1.0  # a box hole
    m = np.broadcast_to(mask, (3, 12, 10, channels_in_mask))
    ref_l1, ref_l2 = [], []
    for i in range(3):
        sel = np.broadcast_to(mask[i], a[i].shape) == 1
        ref_l1.append(np.abs(a[i] - b[i])[sel].mean())
        ref_l2.append(((a[i] - b[i]) ** 2)[sel].mean())
    ref_l2 = np.array(ref_l2)
    np.testing.assert_allclose(np.asarray(M.l1(_f32(a), _f32(b), mask=m)), ref_l1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(M.l2(_f32(a), _f32(b), mask=m)), ref_l2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(M.psnr(_f32(a), _f32(b), mask=m)),
                               10 * np.log10(4.0 / ref_l2), atol=ATOL)
    # the unmasked region does not matter
    a2 = np.where(mask == 1, a, 5.0)
    np.testing.assert_allclose(np.asarray(M.l1(_f32(a2), _f32(b), mask=m)), ref_l1, rtol=1e-5)


def test_empty_mask_gives_nan():
    a, b = _pair(10, shape=(2, 5, 5, 3))
    mask = np.zeros((2, 5, 5, 1), np.float32)
    mask[0, 0, 0] = 1.0
    out = np.asarray(M.l2(_f32(a), _f32(b), mask=mask))
    assert np.isfinite(out[0]) and np.isnan(out[1])


# --------------------------------------------------------------------------- total variation


def test_total_variation_known_patterns():
    i, j = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    checker = ((i + j) % 2).astype(np.float32)[None, :, :, None]
    ramp = np.broadcast_to(j.astype(np.float32)[None, :, :, None], (1, 6, 8, 2))
    vert = (3.0 * i).astype(np.float32)[None, :, :, None]
    const = np.full((1, 6, 8, 3), 0.7, np.float32)
    x = np.concatenate([np.repeat(p, 2, axis=-1)[..., :2] for p in (checker, ramp, vert, const)])
    np.testing.assert_allclose(np.asarray(M.total_variation(x)), [2.0, 1.0, 3.0, 0.0], atol=1e-6)


def test_total_variation_against_numpy():
    x, _ = _pair(11, shape=(3, 7, 5, 2))
    ref = (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
           + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(np.asarray(M.total_variation(_f32(x))), ref, rtol=1e-5)


# --------------------------------------------------------------------------- super-resolution


def test_rgb_to_y_known_colours():
    # black, white, red, green, blue, mid grey in jattn's [-1, 1]
    cols = np.array([[-1, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [0, 0, 0]],
                    np.float32)
    x = cols[None, None]  # [1, 1, 6, 3]
    y = np.asarray(M.rgb_to_y(x))
    assert y.shape == (1, 1, 6, 1)
    np.testing.assert_allclose(
        y[0, 0, :, 0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 219.0 / 2],
        atol=1e-4)
    # other input ranges give the same luma
    np.testing.assert_allclose(np.asarray(M.rgb_to_y((x + 1) / 2, value_range=(0, 1))), y, atol=1e-4)
    np.testing.assert_allclose(np.asarray(M.rgb_to_y((x + 1) * 127.5, value_range=(0, 255))), y,
                               atol=1e-4)


def test_rgb_to_y_matches_skimage_rgb2ycbcr():
    rgb = np.random.default_rng(12).uniform(0, 1, (2, 5, 6, 3))
    ref = np.stack([rgb2ycbcr(im)[..., :1] for im in rgb])
    np.testing.assert_allclose(np.asarray(M.rgb_to_y(_f32(rgb), value_range=(0, 1))), ref, atol=1e-4)


def test_shave_shapes_and_values():
    x = np.arange(2 * 10 * 12 * 3, dtype=np.float32).reshape(2, 10, 12, 3)
    assert M.shave(x, 0).shape == (2, 10, 12, 3)
    s = M.shave(x, 4)
    assert s.shape == (2, 2, 4, 3)
    np.testing.assert_array_equal(np.asarray(s), x[:, 4:6, 4:8])


def test_y_channel_psnr_ssim_with_shave_matches_skimage():
    a, b = _pair(13, shape=(2, 30, 30, 3), smooth=True, noise=0.1)
    ya, yb = M.rgb_to_y(_f32(a)), M.rgb_to_y(_f32(b))
    ya, yb = M.shave(ya, 4), M.shave(yb, 4)
    ra = np.stack([rgb2ycbcr((im + 1) / 2)[4:-4, 4:-4, :1] for im in a])
    rb = np.stack([rgb2ycbcr((im + 1) / 2)[4:-4, 4:-4, :1] for im in b])
    np.testing.assert_allclose(np.asarray(M.psnr(ya, yb, data_range=255.0)),
                               [sk_psnr(x, y, data_range=255.0) for x, y in zip(rb, ra)], atol=1e-3)
    np.testing.assert_allclose(np.asarray(M.ssim(ya, yb, data_range=255.0)),
                               _sk_ssim(ra, rb, 255.0), atol=ATOL)


# --------------------------------------------------------------------------- jit / summarize


def test_jit_matches_eager():
    a, b = _pair(14, shape=(2, 16, 16, 3))
    a, b = _f32(a), _f32(b)
    mask = np.zeros((2, 16, 16, 1), np.float32)
    mask[:, 4:12, 4:12] = 1.0
    eager = M.summarize(a, b, mask=mask)
    jitted = jax.jit(M.summarize)(a, b, mask)
    assert set(eager) == {"psnr", "ssim", "l1", "l2", "tv"}
    for k in eager:
        assert jitted[k].shape == () and jitted[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(eager["l1"]), float(jnp.mean(M.l1(a, b, mask))), rtol=1e-6)
    np.testing.assert_allclose(float(eager["tv"]), float(jnp.mean(M.total_variation(a))), rtol=1e-6)
    ssim_small = jax.jit(M.ssim, static_argnames=("filter_size", "filter_sigma"))
    np.testing.assert_allclose(np.asarray(ssim_small(a, b, filter_size=7, filter_sigma=1.0)),
                               np.asarray(M.ssim(a, b, filter_size=7, filter_sigma=1.0)), rtol=1e-5)
    y = jax.jit(lambda x: M.shave(M.rgb_to_y(x), 2))(a)
    assert y.shape == (2, 12, 12, 1)


def test_summarize_scores_minus_one_to_one_images_on_zero_to_one():
    """Models work on [-1, 1]; the reported SSIM and PSNR are the standard ones, those of the
    images on [0, 1] with data range 1 (skimage), not SSIM on [-1, 1] with range 2, whose
    luminance term differs."""
    a, b = _pair(21, shape=(3, 24, 24, 3), smooth=True)
    a, b = _to_range(a, 2.0), _to_range(b, 2.0)  # [-1, 1]
    out = M.summarize(_f32(a), _f32(b))
    a01, b01 = (a + 1) / 2, (b + 1) / 2
    np.testing.assert_allclose(float(out["ssim"]), _sk_ssim(a01, b01, 1.0).mean(), atol=ATOL)
    assert abs(float(out["ssim"]) - _sk_ssim(a, b, 2.0).mean()) > 10 * ATOL  # the two conventions differ here
    psnr01 = np.mean([sk_psnr(y, x, data_range=1.0) for x, y in zip(a01, b01)])
    np.testing.assert_allclose(float(out["psnr"]), psnr01, atol=ATOL)
    np.testing.assert_allclose(float(out["l1"]), np.abs(a - b).mean(), rtol=1e-5)  # on the images' own range
    same = M.summarize(_f32(a01), _f32(b01), value_range=(0.0, 1.0))
    for k in ("psnr", "ssim"):
        np.testing.assert_allclose(float(same[k]), float(out[k]), rtol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="value_range"):
        M.summarize(_f32(a), _f32(b), value_range=(1.0, 1.0))


def test_ssim_is_differentiable():
    a, b = _pair(15, shape=(1, 12, 12, 1))
    g = jax.jit(jax.grad(lambda x: M.ssim(x, _f32(b))[0]))(_f32(a))
    assert g.shape == a.shape and np.all(np.isfinite(np.asarray(g)))


# --------------------------------------------------------------------------- errors


def test_errors():
    x = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        M.l1(x, x[:, :, :15])
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(x, x[:1])
    with pytest.raises(ValueError, match="4-D"):
        M.ssim(x[0], x[0])
    with pytest.raises(ValueError, match="4-D"):
        M.l2(x, x[..., 0])
    with pytest.raises(ValueError, match="4-D"):
        M.total_variation(x[0])
    with pytest.raises(ValueError, match="exceeds the image"):
        M.ssim(x[:, :10], x[:, :10])
    with pytest.raises(ValueError, match="exceeds the image"):
        jax.jit(M.ssim)(x[:, :, :8], x[:, :, :8])  # raised at trace time too
    with pytest.raises(ValueError, match="odd"):
        M.ssim(x, x, filter_size=4)
    with pytest.raises(ValueError, match="filter_sigma"):
        M.ssim(x, x, filter_sigma=0.0)
    with pytest.raises(ValueError, match="data_range"):
        M.psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="mask"):
        M.l1(x, x, mask=np.ones((2, 16, 16, 2), np.float32))
    with pytest.raises(ValueError, match="mask"):
        M.psnr(x, x, mask=np.ones((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="H, W >= 2"):
        M.total_variation(x[:, :1])
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        M.rgb_to_y(x[..., :1])
    with pytest.raises(ValueError, match="border"):
        M.shave(x, -1)
    with pytest.raises(ValueError, match="leaves nothing"):
        M.shave(x, 8)
