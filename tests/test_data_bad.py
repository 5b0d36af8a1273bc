"""Bad data: each kind of bad file is converted, upscaled or skipped + counted, once warned."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from jattn.data import images as I
from jattn.data import sources as S

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (60, 72, 3), dtype=np.uint8)


def encode(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _palette_with_transparency():
    p = Image.fromarray(RGB).convert("P", palette=Image.ADAPTIVE, colors=8)
    return encode(p, "PNG", transparency=0)


# name -> (bytes, expected outcome: None (plain), conversion name, "upscaled" or "skip")
def bad_files():
    jpg, png = encode(Image.fromarray(RGB), "JPEG", quality=95), encode(Image.fromarray(RGB), "PNG")
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    gray16 = (np.arange(60 * 72).reshape(60, 72) * 15).astype(np.uint16)
    return {
        "good.jpg": (jpg, None),
        "good.png": (png, None),
        "lossless.webp": (encode(Image.fromarray(RGB), "WEBP", lossless=True), None),
        "plain.bmp": (encode(Image.fromarray(RGB), "BMP"), None),
        "gray.png": (encode(Image.fromarray(RGB[..., 0]), "PNG"), "grayscale"),
        "gray.jpg": (encode(Image.fromarray(RGB[..., 1]), "JPEG"), "grayscale"),
        "rgba.png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA"),
        "palette.png": (encode(Image.fromarray(RGB).convert("P"), "PNG"), "palette"),
        "palette_alpha.png": (_palette_with_transparency(), "palette"),
        "gray16.png": (encode(Image.fromarray(gray16), "PNG"), "16-bit"),
        "cmyk.jpg": (encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", quality=95), "CMYK"),
        "small.png": (encode(Image.fromarray(RGB[:20, :24]), "PNG"), "upscaled"),
        "tiny.png": (encode(Image.fromarray(RGB[:6, :6]), "PNG"), "skip"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "skip"),
        "truncated.png": (png[: len(png) // 2], "skip"),
        "corrupt.jpg": (RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(), "skip"),
        "text.png": (b"this is not an image\n" * 5, "skip"),
        "empty.png": (b"", "skip"),
    }


CROP = 32  # 20x24 "small" needs 1.6x (allowed), 6x6 "tiny" 5.3x (> max_upscale=2)
N_SKIP = sum(v[1] == "skip" for v in bad_files().values())
N_CONVERTED = sum(v[1] not in (None, "skip", "upscaled") for v in bad_files().values())


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "bad"
    for k, (name, (data, _)) in enumerate(sorted(bad_files().items())):
        path = root / f"d{k % 3}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_decode_and_preprocess_each_kind(name):
    data, outcome = bad_files()[name]
    if outcome == "skip" and name != "tiny.png":
        with pytest.raises(I.BadImageError) as e:
            I.decode_rgb(data, name)
        assert e.value.name == name and e.value.reason
        return
    rgb, conversion = I.decode_rgb(data, name)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert conversion == (outcome if outcome not in ("upscaled", "skip") else None)
    if outcome == "skip":  # too small to upscale meaningfully
        with pytest.raises(I.BadImageError, match="too small"):
            I.preprocess(rgb, name, (CROP, CROP), max_upscale=2.0)
        return
    out, upscaled = I.preprocess(rgb, name, (CROP, CROP), rng=np.random.default_rng(0))
    assert out.shape == (CROP, CROP, 3) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    assert upscaled == (outcome == "upscaled")


def test_conversions_are_correct():
    files = bad_files()
    rgb, _ = I.decode_rgb(files["good.png"][0])
    np.testing.assert_array_equal(rgb, RGB)
    gray, _ = I.decode_rgb(files["gray.png"][0])
    np.testing.assert_array_equal(gray, np.repeat(RGB[..., :1], 3, axis=2))
    rgba, _ = I.decode_rgb(files["rgba.png"][0])
    assert (rgba[:10, :10] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(rgba[20:], RGB[20:])
    g16, _ = I.decode_rgb(files["gray16.png"][0])
    expect = np.round((np.arange(60 * 72).reshape(60, 72) * 15) / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(g16[..., 0], expect)
    cmyk, _ = I.decode_rgb(files["cmyk.jpg"][0])
    assert np.abs(cmyk.astype(int) - [0, 255, 255]).max() <= 3  # pure cyan
    pal, _ = I.decode_rgb(files["palette.png"][0])
    assert np.abs(pal.astype(int) - RGB).mean() < 40
    arr16, conv = I.decode_rgb(np.full((4, 5), 65535, np.uint16))
    assert conv == "16-bit" and (arr16 == 255).all() and arr16.shape == (4, 5, 3)


def test_upscale_limit_is_configurable():
    rgb = RGB[:6, :6]
    out, upscaled = I.preprocess(rgb, "tiny", (CROP, CROP), max_upscale=None)
    assert upscaled and out.shape == (CROP, CROP, 3)
    out, upscaled = I.preprocess(RGB[:20, :30], "wide", (24, 40))  # non-square crop
    assert upscaled and out.shape == (24, 40, 3)


def _pipeline_kw(**kw):
    args = dict(image_size=CROP, batch_size=1, mask_spec={"kind": "box", "hole_size": 8, "max_delta": 4},
                seed=0, train=False, process_index=0, process_count=1, drop_remainder=False)
    args.update(kw)
    return args


def test_grain_pipeline_survives_bad_files_with_one_warning_each(bad_folder, caplog):
    from jattn.data import grain as jgrain

    src = S.folder_source(bad_folder)
    assert len(src) == len(bad_files())
    with caplog.at_level(logging.WARNING, logger="jattn.data"):
        it = jgrain.make_dataset(src, **_pipeline_kw(num_epochs=2))
        batches = list(it)
    assert len(batches) == 2 * len(src)  # bad slots take the next readable file
    assert all(np.isfinite(b["image"]).all() for b in batches)
    assert it.bad_data.as_dict() == {"skipped": 2 * N_SKIP, "converted": 2 * N_CONVERTED,
                                     "upscaled": 2}
    warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(warned) == N_SKIP  # one warning per file, not per epoch
    for name, (_, outcome) in bad_files().items():
        assert (sum(name in w for w in warned) == 1) == (outcome == "skip"), name
    assert "too small" in next(w for w in warned if "tiny.png" in w)
    assert it.bad_data.summary().startswith(f"bad data: {2 * N_SKIP} skipped")


def test_tfdata_pipeline_survives_bad_files_in_training(bad_folder):
    from jattn.data import grain as jgrain
    from jattn.data import tfdata

    src = S.folder_source(bad_folder)
    kw = _pipeline_kw(train=True, batch_size=4, drop_remainder=True)
    it = tfdata.make_dataset(src, **kw)
    batches = [next(it) for _ in range(10)]  # > 2 epochs
    it.close()
    assert it.bad_data.skipped >= N_SKIP
    reference = jgrain.make_dataset(src, **kw)
    for b in batches:
        r = next(reference)
        np.testing.assert_array_equal(b["image"], r["image"])
        np.testing.assert_array_equal(b["mask"], r["mask"])
    assert reference.bad_data == it.bad_data


def test_no_readable_image_is_an_error_before_training(tmp_path):
    from jattn.data import grain as jgrain
    from jattn.data import tfdata

    root = tmp_path / "junk"
    root.mkdir()
    for name, (data, outcome) in bad_files().items():
        if outcome == "skip" and name != "tiny.png":
            (root / name).write_bytes(data)
    src = S.folder_source(root)
    for loader in (jgrain, tfdata):
        with pytest.raises(ValueError, match="no readable image in FolderSource"):
            loader.make_dataset(src, **_pipeline_kw())


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(Image.fromarray(RGB), "JPEG", exif=exif)
    rgb, conversion = I.decode_rgb(data, "rotated.jpg")
    assert rgb.shape == (72, 60, 3) and conversion is None
