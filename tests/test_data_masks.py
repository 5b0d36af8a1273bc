"""Masks: parameters, statistics, determinism, eval sets (numpy / PIL only, no TF)."""
import json
import logging
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from jattn.data import masks as M
from jattn.data.examples import ExampleMaker

H = W = 256


def _fractions(spec, n, seed=7):
    return np.array([M.mask_for_index(spec, (H, W), seed, i).mean() for i in range(n)])


def test_data_package_imports_without_tf_tfds_grain():
    code = ("import sys, jattn.data, jattn.data.masks, jattn.data.sources, jattn.data.examples, "
            "jattn.data.images, jattn.data.sharding\n"
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'grain') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_mask_convention_and_determinism(name):
    m = M.mask_for_index(name, (256, 192), 3, 11)
    assert m.shape == (256, 192, 1) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() > 0
    np.testing.assert_array_equal(m, M.mask_for_index(name, (256, 192), 3, 11))
    other = [M.mask_for_index(name, (256, 192), 3, i) for i in range(12, 16)]
    assert any(not np.array_equal(m, o) for o in other)
    assert not np.array_equal(m, M.mask_for_index(name, (256, 192), 4, 11))


def test_spec_forms_are_equivalent():
    as_dict = {"kind": "mixture", "components": [[2.0, {"kind": "box", "hole_size": [64, 96]}],
                                                 [1.0, "lama_thin"]]}
    as_list = [(2.0, M.BoxMask(hole_size=(64, 96))), (1.0, "lama_thin")]
    a, b = M.parse_mask_spec(as_dict), M.parse_mask_spec(as_list)
    assert a == b
    for i in range(5):
        np.testing.assert_array_equal(M.mask_for_index(as_dict, 128, 1, i),
                                      M.mask_for_index(as_list, 128, 1, i))


@pytest.mark.parametrize("bad, match", [
    ("nope", "unknown mask preset"),
    ({"kind": "circle"}, "kind"),
    ({"kind": "box", "hole": 3}, r"unknown parameter\(s\) \['hole'\]"),
    ({"kind": "lama_strokes", "coverage": (0.5, 0.2)}, "coverage"),
    ([(-1, "box")], "weights"),
    (42, "cannot interpret"),
])
def test_bad_specs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        M.parse_mask_spec(bad)


def test_box_does_not_fit_is_clear_error():
    with pytest.raises(ValueError, match="does not fit in a 64x64 image"):
        M.mask_for_index("box", 64, 0, 0)


def test_box_masks_match_deepfill_v1_parameters():
    spec = M.BoxMask(hole_size=(128, 96), margin=(10, 20), max_delta=(32, 16))
    shrink_h, shrink_w, areas = [], [], []
    for i in range(300):
        m = M.mask_for_index(spec, (H, W), 5, i)[..., 0] > 0
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert m.sum() == (b - t) * (r - l)  # a single filled rectangle
        dh, dw = (128 - (b - t)) / 2, (96 - (r - l)) / 2
        assert dh == int(dh) and 0 <= dh <= 16 and dw == int(dw) and 0 <= dw <= 8
        # The unshrunk box lies inside the margins.
        assert t - dh >= 10 and b + dh <= H - 10 and l - dw >= 20 and r + dw <= W - 20
        shrink_h.append(dh), shrink_w.append(dw), areas.append(m.mean())
    assert set(shrink_h) == set(range(17)) and set(shrink_w) == set(range(9))
    expected = (128 - 16) * (96 - 8) / (H * W)  # E[(128 - 2dh)(96 - 2dw)], dh ~ U{0..16}
    assert abs(np.mean(areas) - expected) < 0.006


def test_default_box_area_distribution():
    fr = _fractions("box", 300)
    assert fr.min() >= 96 * 96 / 65536 - 1e-9 and fr.max() <= 128 * 128 / 65536 + 1e-9
    assert abs(fr.mean() - 112 * 112 / 65536) < 0.005


def test_free_form_stroke_parameters():
    spec = M.FreeFormMask()
    r = math.sqrt(H * H + W * W) / 8
    lo, hi = 2 * math.pi / 5 - 2 * math.pi / 15, 2 * math.pi / 5 + 2 * math.pi / 15
    counts, verts, widths = set(), set(), []
    for i in range(300):
        strokes, _, _ = spec.strokes(M.mask_rng(9, i), (H, W))
        counts.add(len(strokes))
        for s in strokes:
            verts.add(len(s.points) - 1)
            widths.append(s.width)
            for k, ((x0, y0), (x1, y1)) in enumerate(zip(s.points, s.points[1:])):
                length = math.hypot(x1 - x0, y1 - y0)
                assert length <= 2 * r + 1.5
                touches_border = min(x1, y1) <= 0 or x1 >= W or y1 >= H
                if length > 30 and not touches_border:
                    angle = math.atan2(y1 - y0, x1 - x0) % (2 * math.pi)
                    if k % 2 == 0:  # even segments point the other way
                        angle = 2 * math.pi - angle
                    assert lo - 0.1 <= angle <= hi + 0.1, (i, k, angle)
    assert counts == {1, 2, 3}
    assert verts == set(range(4, 12))
    assert min(widths) >= 12 and max(widths) <= 39
    assert min(widths) <= 14 and max(widths) >= 37 and abs(np.mean(widths) - 25.5) < 2.5


def test_rendered_stroke_width_matches():
    for width in (12, 25, 40):
        stroke = M.Stroke(((30, 128), (220, 128), (220, 60)), width)
        m = M.render_strokes([stroke], (H, W))
        assert abs(int(m[:, 120].sum()) - width) <= 1  # across the straight segment
        assert abs(int(m[100, 150:].sum()) - width) <= 1  # across the vertical one
        edt = ndimage.distance_transform_edt(m)
        assert abs(2 * edt[128, 120] - width) <= 2.0
        # Round joints: the disk at the corner is filled.
        yy, xx = np.mgrid[:H, :W]
        disk = (yy - 60) ** 2 + (xx - 220) ** 2 <= (width // 2 - 1) ** 2
        assert m[disk].all()


def test_free_form_area_distribution():
    fr = _fractions("free_form", 200)
    assert fr.min() > 0 and fr.max() < 0.6
    assert 0.125 < fr.mean() < 0.18  # reference (2000 masks): 0.151 +- 0.079
    thin = _fractions({"kind": "free_form", "min_width": 12, "max_width": 13}, 100)
    thick = _fractions({"kind": "free_form", "min_width": 39, "max_width": 40}, 100)
    assert 2.0 < thick.mean() / thin.mean() < 3.5  # area grows ~ linearly with width


@pytest.mark.parametrize("name, max_width, mean_band", [
    ("lama_thin", 14, (0.22, 0.31)),      # reference: 0.266 +- 0.119
    ("lama_medium", 54, (0.24, 0.30)),    # reference: 0.270 +- 0.078
    ("lama_thick", 104, (0.34, 0.43)),    # reference: 0.385 +- 0.180
])
def test_lama_stroke_families(name, max_width, mean_band):
    spec = M.PRESETS[name]
    widths = [s.width for i in range(60) for s in spec.strokes(M.mask_rng(1, i), (H, W))]
    assert 5 <= min(widths) and max(widths) <= max_width
    fr = _fractions(name, 150)
    assert fr.min() > 0 and fr.max() <= 0.7  # default coverage range (0, 0.7]
    assert mean_band[0] < fr.mean() < mean_band[1]


def test_lama_boxes_inside_margin_and_sizes():
    spec = M.PRESETS["lama_box"]
    for i in range(200):
        boxes = spec.boxes(M.mask_rng(2, i), (H, W))
        assert 1 <= len(boxes) <= 3
        for t, l, b, r in boxes:
            assert t >= 10 and l >= 10 and b <= H - 10 and r <= W - 10
            assert 30 <= b - t < 150 and 30 <= r - l < 150
    fr = _fractions("lama_box", 200)
    assert 0.18 < fr.mean() < 0.25  # reference: 0.212 +- 0.105


def test_coverage_range_is_enforced():
    spec = {"kind": "lama_strokes", "coverage": [0.2, 0.3], "max_tries": 200}
    fr = _fractions(spec, 60)
    assert fr.min() >= 0.2 and fr.max() <= 0.3
    spec = {"kind": "lama_boxes", "coverage": [0.05, 0.1], "max_tries": 200}
    fr = _fractions(spec, 60)
    assert fr.min() >= 0.05 and fr.max() <= 0.1


def test_mixture_weights():
    mix = M.parse_mask_spec([(3.0, "box"), (1.0, "free_form")])
    rng = np.random.default_rng(0)
    picks = np.array([mix.choose(rng) for _ in range(4000)])
    assert abs(np.mean(picks == 0) - 0.75) < 0.03
    only_box = M.parse_mask_spec([(1.0, "box"), (0.0, "free_form")])
    for i in range(20):
        m = M.mask_for_index(only_box, H, 0, i)[..., 0]
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert m.sum() == len(rows) * len(cols)  # always a rectangle


def test_deepfill_v2_is_union_of_box_and_strokes():
    spec = M.PRESETS["deepfill_v2"]
    box, strokes = spec.parts
    for i in range(10):
        rng = M.mask_rng(4, i)
        a = box.sample(rng, (H, W))
        b = strokes.sample(rng, (H, W))
        np.testing.assert_array_equal(M.mask_for_index(spec, H, 4, i)[..., 0] > 0, a | b)


def test_eval_set_reloads_bit_identically(tmp_path):
    s = M.eval_set("free_form", 6, 64, seed=3, directory=tmp_path / "a")
    assert s.masks.shape == (6, 64, 64, 1) and s.masks.dtype == np.float32
    assert s.path.is_file() and json.loads(s.path.with_name(s.path.name + ".json").read_text())[
        "sha256"] == s.sha256 == M.file_sha256(s.path)
    expected = np.stack([M.mask_for_index("free_form", 64, 3, i) for i in range(6)])
    np.testing.assert_array_equal(s.masks, expected)
    again = M.load_eval_set(s.path, expected_sha256=s.sha256)
    np.testing.assert_array_equal(again.masks, s.masks)
    # Building it again (here or elsewhere) gives the same file, hash and masks.
    same = M.eval_set("free_form", 6, 64, seed=3, directory=tmp_path / "a")
    other = M.eval_set("free_form", 6, 64, seed=3, directory=tmp_path / "b")
    assert same.sha256 == other.sha256 == s.sha256
    assert s.path.read_bytes() == other.path.read_bytes()
    assert M.eval_set("free_form", 6, 64, seed=4, directory=tmp_path / "a").sha256 != s.sha256


def test_eval_set_hash_is_pinned(tmp_path):
    # Changing the mask generators changes evaluation sets: update deliberately.
    s = M.eval_set("deepfill_v2", 4, (256, 256), seed=0, directory=tmp_path)
    assert s.sha256 == PINNED_DEEPFILL_V2_SHA256
    s = M.eval_set("lama", 4, 256, seed=1, directory=tmp_path)
    assert s.sha256 == PINNED_LAMA_SHA256


PINNED_DEEPFILL_V2_SHA256 = "c24f7d3a55bdd8d770d3492971b196adf43e09d938b67ac34b62407987ab7080"
PINNED_LAMA_SHA256 = "ab79d8312c5b1837b3048415594f7f6793295591720a3bdca05aa430fefe01e1"


def test_eval_set_detects_corruption_and_mismatch(tmp_path):
    s = M.eval_set("box", 3, 256, seed=0, directory=tmp_path)
    with pytest.raises(ValueError, match="different parameters"):
        M.eval_set("box", 3, 256, seed=0, directory=tmp_path, spec={"kind": "box", "margin": 8})
    raw = bytearray(s.path.read_bytes())
    raw[-1] ^= 0xFF
    s.path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        M.load_eval_set(s.path)
    with pytest.raises(FileNotFoundError):
        M.load_eval_set(tmp_path / "missing.npy")


def test_eval_set_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("JATTN_CACHE_DIR", os.fspath(tmp_path))
    s = M.eval_set("lama_thin", 2, 32, seed=0)
    assert s.path.parent == tmp_path / "eval_masks"


# --------------------------------------------------------------------------- mask folders


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def _holes(h, w, box):
    """uint8 [h, w]: 255 inside box = (top, left, bottom, right), 0 elsewhere."""
    a = np.zeros((h, w), np.uint8)
    t, l, b, r = box
    a[t:b, l:r] = 255
    return a


def _corner_l(size=24):
    """An asymmetric hole (an L in the top-left corner): its 8 rotations/flips all differ."""
    a = np.zeros((size, size), np.uint8)
    a[2:14, 2:6] = 255
    a[10:14, 2:10] = 255
    return a


@pytest.fixture
def mask_dir(tmp_path):
    """Four 32x40 masks with different holes (file k has a (4 + 4k)-row box)."""
    d = tmp_path / "masks"
    for k in range(4):
        _png(d / f"m{k}.png", _holes(32, 40, (2, 3, 6 + 4 * k, 30)))
    return d


def _folder(path, **kw):
    return M.parse_mask_spec({"kind": "folder", "path": str(path), **kw})


def test_folder_masks_are_binary_float32_and_deterministic(mask_dir):
    spec = _folder(mask_dir)
    assert spec.files == ("m0.png", "m1.png", "m2.png", "m3.png")
    masks = [M.mask_for_index(spec, (24, 28), 5, i) for i in range(24)]
    for m in masks:
        assert m.shape == (24, 28, 1) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
    again = [M.mask_for_index({"kind": "folder", "path": str(mask_dir)}, (24, 28), 5, i) for i in range(24)]
    np.testing.assert_array_equal(np.stack(masks), np.stack(again))
    assert len({m.tobytes() for m in masks}) > 4  # files, crops, flips and rotations vary
    other_seed = [M.mask_for_index(spec, (24, 28), 6, i) for i in range(24)]
    assert not np.array_equal(np.stack(masks), np.stack(other_seed))


def test_folder_masks_do_not_depend_on_the_cache(mask_dir, monkeypatch):
    spec = _folder(mask_dir)
    M.clear_mask_cache()
    cold = M.masks_for_indices(spec, 24, 3, range(16))
    warm = M.masks_for_indices(spec, 24, 3, range(16))
    monkeypatch.setattr(M, "MASK_CACHE_BYTES", 1)  # evicts all but the last entry
    tiny = M.masks_for_indices(spec, 24, 3, range(16)[::-1])[::-1]
    np.testing.assert_array_equal(cold, warm)
    np.testing.assert_array_equal(cold, tiny)
    # A spec pickled to another process (grain workers) gives the same masks.
    np.testing.assert_array_equal(cold, M.masks_for_indices(pickle.loads(pickle.dumps(spec)), 24, 3, range(16)))
    # A file rewritten in place is decoded again (the cache is keyed by the file's bytes).
    _png(mask_dir / "m0.png", np.full((32, 40), 255, np.uint8))
    np.testing.assert_array_equal(M.mask_for_index(spec, (32, 40), 0, 0, train=False), 1.0)


def test_folder_file_order_does_not_depend_on_creation_order(tmp_path):
    arrays = {f"{name}.png": _holes(20, 20, (k, k, k + 6, k + 9)) for k, name in
              enumerate(["b", "A", "c", "sub/a", "d", "e"])}
    for d, names in ((tmp_path / "one", sorted(arrays)), (tmp_path / "two", sorted(arrays)[::-1])):
        for name in names:
            _png(d / name, arrays[name])
    one, two = _folder(tmp_path / "one"), _folder(tmp_path / "two")
    assert one.files == two.files == ("A.png", "b.png", "c.png", "d.png", "e.png", "sub/a.png")
    for train in (True, False):
        np.testing.assert_array_equal(M.masks_for_indices(one, 20, 1, range(12), train=train),
                                      M.masks_for_indices(two, 20, 1, range(12), train=train))


def test_folder_lists_supported_extensions_any_case(tmp_path):
    a = _holes(16, 16, (0, 0, 8, 8))
    for name in ("a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.webp"):
        Image.fromarray(a).save(tmp_path / name, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(
            name.rsplit(".", 1)[1].lower(), name.rsplit(".", 1)[1].upper()))
    (tmp_path / "notes.txt").write_text("not a mask")
    (tmp_path / "f.gif").write_bytes(b"GIF89a")
    spec = _folder(tmp_path)
    assert spec.files == ("a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.webp")
    for i in range(5):  # lossy files too: the threshold removes compression noise
        np.testing.assert_array_equal(M.mask_for_index(spec, 16, 0, i, train=False)[..., 0], a > 0)
    assert _folder(tmp_path, pattern="[bc]*").files == ("b.jpg", "c.JPEG")


def test_folder_invert_and_threshold(tmp_path):
    levels = np.array([[0, 60, 100, 127, 128, 200, 255, 255]], np.uint8).repeat(8, axis=0)
    _png(tmp_path / "m.png", levels)

    def read(**kw):
        return M.mask_for_index(_folder(tmp_path, **kw), (8, 8), 0, 0, train=False)[0, :, 0]

    np.testing.assert_array_equal(read(), [0, 0, 0, 0, 1, 1, 1, 1])  # > 127.5
    np.testing.assert_array_equal(read(threshold=0.0), [0, 1, 1, 1, 1, 1, 1, 1])  # nonzero
    np.testing.assert_array_equal(read(threshold=0.3), [0, 0, 1, 1, 1, 1, 1, 1])  # > 76.5
    np.testing.assert_array_equal(read(invert=True), [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(read(invert=True, threshold=0.0), [1, 0, 0, 0, 0, 0, 0, 0])


def test_folder_image_modes(tmp_path):
    want = _holes(12, 12, (2, 3, 9, 7)) > 0
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[want, 0] = 255  # red holes: a pixel's largest channel counts
    _png(tmp_path / "a_rgb.png", rgb)
    _png(tmp_path / "b_bilevel.png", want)  # mode "1"
    Image.fromarray(want.astype(np.uint16) * 65535).save(tmp_path / "c_16bit.png")
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but transparent outside the hole
    rgba[want, 3] = 255
    _png(tmp_path / "d_rgba.png", rgba)
    spec = _folder(tmp_path)
    for i in range(4):
        np.testing.assert_array_equal(M.mask_for_index(spec, 12, 0, i, train=False)[..., 0], want,
                                      err_msg=spec.files[i])


def test_folder_fit_crop_and_resize(tmp_path):
    big = np.random.default_rng(0).integers(0, 2, (40, 48)).astype(np.uint8) * 255
    _png(tmp_path / "big" / "m.png", big)
    spec = _folder(tmp_path / "big", flip=False, rotate=False)
    # Larger on both sides: a random crop in training, the centre in evaluation.
    offsets = set()
    for i in range(30):
        m = M.mask_for_index(spec, (16, 20), 0, i)[..., 0] > 0
        hits = [(t, l) for t in range(25) for l in range(29)
                if np.array_equal(m, big[t:t + 16, l:l + 20] > 0)]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 20
    np.testing.assert_array_equal(M.mask_for_index(spec, (16, 20), 0, 7, train=False)[..., 0],
                                  big[12:28, 14:34] > 0)
    # Smaller on a side (or fit="resize"): the whole mask, nearest-neighbour resized.
    for size, s in (((64, 24), spec), ((16, 20), _folder(tmp_path / "big", fit="resize", flip=False, rotate=False))):
        want = np.asarray(Image.fromarray(big).resize(size[::-1], Image.NEAREST)) > 127
        for train in (True, False):
            np.testing.assert_array_equal(M.mask_for_index(s, size, 0, 3, train=train)[..., 0], want)
    # Exactly the image size: unchanged.
    np.testing.assert_array_equal(M.mask_for_index(spec, (40, 48), 0, 1)[..., 0], big > 0)


def test_folder_flips_and_rotations(tmp_path):
    a = _corner_l()
    _png(tmp_path / "m.png", a)
    hole = a > 0
    group = {np.ascontiguousarray(t).tobytes() for k in range(4)
             for t in (np.rot90(hole, k), np.rot90(hole, k)[:, ::-1])}
    assert len(group) == 8

    def seen(**kw):
        ms = [M.mask_for_index(_folder(tmp_path, **kw), 24, 2, i)[..., 0] > 0 for i in range(64)]
        for m in ms:  # a rotation / flip of the file, with the same hole fraction
            assert m.tobytes() in group and m.sum() == hole.sum()
        return {m.tobytes() for m in ms}

    assert len(seen()) == 8  # all rotations and flips occur across indices
    assert seen(flip=False) == {np.ascontiguousarray(np.rot90(hole, k)).tobytes() for k in range(4)}
    assert len(seen(rotate=False)) == 4  # identity, left-right, up-down, both
    assert seen(flip=False, rotate=False) == {hole.tobytes()}
    # Evaluation never augments.
    for i in range(8):
        np.testing.assert_array_equal(M.mask_for_index(_folder(tmp_path), 24, 2, i, train=False)[..., 0], hole)


def test_folder_training_draws_every_file(mask_dir):
    spec = _folder(mask_dir, flip=False, rotate=False, fit="resize")
    sizes = [int(M.mask_for_index(spec, (32, 40), 4, i)[..., 0].any(1).sum()) for i in range(60)]
    assert set(sizes) == {4, 8, 12, 16}  # file k's box has 4 + 4k rows


def test_folder_eval_set_in_file_order_and_hashed(mask_dir, tmp_path):
    spec = {"kind": "folder", "path": str(mask_dir)}
    s = M.eval_set("nv", 6, (32, 40), seed=0, directory=tmp_path / "ev", spec=spec)
    files = [np.asarray(Image.open(mask_dir / f"m{k}.png")) > 127 for k in range(4)]
    want = np.stack([files[i % 4] for i in range(6)])[..., None].astype(np.float32)  # cycles
    np.testing.assert_array_equal(s.masks, want)
    # The eval pipelines give example i the same mask.
    maker = ExampleMaker(image_size=(32, 40), mask_spec=spec, seed=3, mask_seed=0, train=False)
    np.testing.assert_array_equal(np.stack([maker.mask(i) for i in range(6)]), s.masks)
    train_maker = ExampleMaker(image_size=(32, 40), mask_spec=spec, seed=3, mask_seed=0, train=True)
    np.testing.assert_array_equal(train_maker.mask(5), M.mask_for_index(spec, (32, 40), 0, 5))
    assert M.eval_set("nv", 6, (32, 40), seed=0, directory=tmp_path / "ev", spec=spec).sha256 == s.sha256
    # Changing a file's bytes changes the set, and an existing set is not silently reused.
    _png(mask_dir / "m1.png", _holes(32, 40, (0, 0, 32, 20)))
    changed = M.eval_set("nv", 6, (32, 40), seed=0, directory=tmp_path / "ev2", spec=spec)
    assert changed.sha256 != s.sha256
    with pytest.raises(M.EvalMaskError, match="mask files that have changed since") as err:
        M.eval_set("nv", 6, (32, 40), seed=0, directory=tmp_path / "ev", spec=spec)
    assert "\n" not in str(err.value)
    # Even a change to a file the set does not use (file 3 of a 2-mask set) is detected.
    small = M.eval_set("nv", 2, (32, 40), seed=0, directory=tmp_path / "ev2", spec=spec)
    _png(mask_dir / "m3.png", _holes(32, 40, (1, 1, 5, 5)))
    with pytest.raises(M.EvalMaskError, match="changed since"):
        M.eval_set("nv", 2, (32, 40), seed=0, directory=tmp_path / "ev2", spec=spec)
    assert M.eval_set("nv", 2, (32, 40), seed=0, directory=tmp_path / "ev3", spec=spec).sha256 == small.sha256


def test_folder_in_mixture_and_union(mask_dir):
    folder = {"kind": "folder", "path": str(mask_dir), "fit": "resize"}
    mix = M.parse_mask_spec({"kind": "mixture", "components": [[1.0, folder], [1.0, {"kind": "box", "hole_size": 8,
                                                                                       "max_delta": 0}]]})
    assert mix == M.parse_mask_spec([(1.0, folder), (1.0, M.BoxMask(hole_size=8, max_delta=0))])
    boxes = folders = 0
    for i in range(40):
        m = M.mask_for_index(mix, 24, 1, i)
        np.testing.assert_array_equal(m, M.mask_for_index(mix, 24, 1, i))
        if m.sum() == 64 and m[..., 0].any(1).sum() == 8:
            boxes += 1
        else:
            folders += 1
    assert boxes > 5 and folders > 5
    # In evaluation the chosen folder component still takes file index % n.
    chosen = [i for i in range(12) if mix.choose(M.mask_rng(1, i)) == 0]
    assert len(chosen) >= 3
    for i in chosen:
        want = M.mask_for_index(folder, 24, 0, i, train=False)
        np.testing.assert_array_equal(M.mask_for_index(mix, 24, 1, i, train=False), want)
    union = M.parse_mask_spec({"kind": "union", "parts": [folder, {"kind": "box", "hole_size": 8, "max_delta": 0}]})
    for i in range(5):
        rng = M.mask_rng(2, i)
        a = union.parts[0].sample(rng, (24, 24))
        b = union.parts[1].sample(rng, (24, 24))
        np.testing.assert_array_equal(M.mask_for_index(union, 24, 2, i)[..., 0] > 0, a | b)
    json_form = M._spec_to_json(mix)
    assert M.parse_mask_spec(json.loads(json.dumps(json_form))) == mix


def test_folder_json_round_trip(mask_dir):
    spec = _folder(mask_dir, invert=True, threshold=0.25, flip=False, rotate=True, fit="resize", pattern="m*")
    as_json = json.loads(json.dumps(M._spec_to_json(spec)))
    assert as_json == {"kind": "folder", "path": str(mask_dir), "invert": True, "threshold": 0.25,
                       "flip": False, "rotate": True, "fit": "resize", "pattern": "m*"}
    back = M.parse_mask_spec(as_json)
    assert back == spec and back.files == spec.files
    np.testing.assert_array_equal(M.masks_for_indices(back, 20, 0, range(6)),
                                  M.masks_for_indices(spec, 20, 0, range(6)))
    assert M.parse_mask_spec(spec) is spec


def test_folder_bad_files_are_skipped_deterministically(mask_dir, caplog):
    (mask_dir / "m1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    trunc = (mask_dir / "m2.png").read_bytes()
    (mask_dir / "m2.png").write_bytes(trunc[: len(trunc) // 2])
    spec = _folder(mask_dir, flip=False, rotate=False, fit="resize")
    assert len(spec.files) == 4  # listed; skipped when read
    with caplog.at_level(logging.WARNING, logger="jattn.data"):
        ev = [M.mask_for_index(spec, (32, 40), 0, i, train=False) for i in range(4)]
        M.clear_mask_cache()
        ev2 = [M.mask_for_index(spec, (32, 40), 0, i, train=False) for i in range(4)]
    # Files 1 and 2 are replaced by the next readable file, 3.
    for i, k in enumerate((0, 3, 3, 3)):
        np.testing.assert_array_equal(ev[i][..., 0], np.asarray(Image.open(mask_dir / f"m{k}.png")) > 127)
        np.testing.assert_array_equal(ev[i], ev2[i])
    warned = [r.getMessage() for r in caplog.records if "bad mask file" in r.getMessage()]
    assert sum("m1.png" in w for w in warned) == 1 and sum("m2.png" in w for w in warned) == 1
    train = M.masks_for_indices(spec, (32, 40), 0, range(30))
    assert {int(m[..., 0].any(1).sum()) for m in train} == {4, 16}  # only files 0 and 3
    np.testing.assert_array_equal(train, M.masks_for_indices(spec, (32, 40), 0, range(30)))


def _one_line_error(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        M.parse_mask_spec(spec)
    assert "\n" not in str(err.value)


def test_folder_bad_input_is_a_clear_error(tmp_path):
    _one_line_error({"kind": "folder", "path": str(tmp_path / "nope")}, "mask folder not found: .*nope")
    (tmp_path / "file.png").write_bytes(b"x")
    _one_line_error({"kind": "folder", "path": str(tmp_path / "file.png")}, "is not a folder")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("masks go here")
    _one_line_error({"kind": "folder", "path": str(empty)}, r"mask folder .*empty: no mask images \(.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"\xff\xd8 corrupt")
    _one_line_error({"kind": "folder", "path": str(bad)},
                    r"no readable mask image among its 2 file\(s\) .*a.png: empty")
    _one_line_error({"kind": "folder"}, "needs 'path'")
    _one_line_error({"kind": "folder", "path": str(bad), "holes": 1}, r"unknown parameter\(s\) \['holes'\]")
    _one_line_error({"kind": "folder", "path": "gs://bucket/masks"}, "only local folders")
    good = tmp_path / "good"
    _png(good / "a.png", _holes(8, 8, (0, 0, 4, 4)))
    for key, value, match in (("threshold", 1.0, "threshold"), ("threshold", "0.5", "threshold"),
                              ("invert", "yes", "'invert' must be true or false"), ("flip", 1, "'flip'"),
                              ("fit", "stretch", "'crop' or 'resize'"), ("pattern", "", "pattern")):
        _one_line_error({"kind": "folder", "path": str(good), key: value}, match)
    # In a mixture the error surfaces when the spec is parsed, and in the pipelines when
    # the example maker is made (before `jattn train` creates its workdir).
    _one_line_error([(1, "box"), (1, {"kind": "folder", "path": str(empty)})], "no mask images")
    with pytest.raises(ValueError, match="mask folder not found"):
        ExampleMaker(image_size=16, mask_spec={"kind": "folder", "path": str(tmp_path / "nope")},
                     seed=0, mask_seed=0, train=True)


def test_folder_eval_mode_needs_the_index(mask_dir):
    with pytest.raises(ValueError, match="index"):
        _folder(mask_dir).sample(np.random.default_rng(0), (8, 8), train=False)
