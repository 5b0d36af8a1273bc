"""Masks: parameters, statistics, determinism, eval sets (numpy / PIL only, no TF)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jattn.data import masks as M

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
