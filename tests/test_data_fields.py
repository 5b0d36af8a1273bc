"""The pipelines' task fields: labels, low-res inputs and segmentation maps."""
import numpy as np
import pytest
from PIL import Image

from jattn.data import make_dataset, sources
from jattn.data.examples import ExampleMaker
from jattn.data.images import to_float


def _batches(loader, source, n=2, **kw):
    it = make_dataset(source, loader=loader, batch_size=4, seed=1, train=True, **kw)
    return [next(it) for _ in range(n)]


def test_shapes_source_labels_match_segmentation():
    src = sources.ShapesSource(24, 32, seed=3)
    labels = set()
    for i in range(len(src)):
        r = src[i]
        assert r.data.shape == (32, 32, 3) and r.data.dtype == np.uint8
        assert set(np.unique(r.segmentation)) == {0, r.label + 1}
        labels.add(r.label)
        np.testing.assert_array_equal(r.data, src[i].data)  # deterministic
    assert labels == {0, 1, 2}
    assert not np.array_equal(src[0].data, sources.ShapesSource(24, 32, seed=3, split="val")[0].data)


@pytest.mark.parametrize("fields", [("label", "segmentation"), ("lowres", "label")])
def test_grain_and_tf_agree_on_fields(fields):
    src = {"kind": "shapes", "num_examples": 16, "size": 32}
    kw = dict(image_size=32, fields=fields, scale=2)
    for a, b in zip(_batches("grain", src, **kw), _batches("tf", src, **kw)):
        assert set(a) == set(b) == {"image", *fields}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["label"].dtype == np.int32 and a["label"].shape == (4,)


def test_segmentation_follows_crop_and_flip(tmp_path):
    """Images whose red channel encodes the map: after random crops and flips they agree."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    for i in range(8):
        seg = rng.integers(0, 4, (40, 48)).astype(np.uint8)
        img = np.stack([seg * 60, rng.integers(0, 255, (40, 48)), np.full((40, 48), i)], -1).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(seg).save(tmp_path / "seg" / f"{i}.png")
    src = {"kind": "folder", "root": str(tmp_path / "img"), "segmentation_root": str(tmp_path / "seg")}
    for b in _batches("grain", src, n=4, image_size=32, fields=("segmentation",)):
        np.testing.assert_array_equal(b["image"][..., 0], to_float((b["segmentation"] * 60).astype(np.uint8)))
    # the random crops really move and flip (else the check above is vacuous)
    maker = ExampleMaker((32, 32), None, seed=1, mask_seed=1, train=True, fields=("segmentation",))
    rec = sources.FolderSource(tmp_path / "img", segmentation_root=tmp_path / "seg")[0]
    outs = [maker.example(rec.data, rec.name, k, segmentation=rec.segmentation)[0]["segmentation"] for k in range(8)]
    assert len({o.tobytes() for o in outs}) > 4


def test_lowres_is_bicubic_of_the_crop():
    (b,) = _batches("grain", {"kind": "sample_photos", "num_examples": 8, "crop_size": 48}, n=1,
                    image_size=48, fields=("lowres",), scale=3)
    assert b["lowres"].shape == (4, 16, 16, 3)
    u8 = np.round((b["image"][0] + 1) * 127.5).astype(np.uint8)
    expect = np.asarray(Image.fromarray(u8).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(b["lowres"][0], to_float(expect))


def test_labels_of_sources(tmp_path):
    photos = sources.SamplePhotosSource(16, 32)
    for i in range(16):
        r = photos[i]
        assert r.name.startswith(f"skimage:{sources.SAMPLE_PHOTOS[r.label]}[")
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    folder = sources.FolderSource(tmp_path)
    assert folder.class_names == ["cat", "dog"]
    assert [folder[i].label for i in range(4)] == [0, 0, 1, 1]


def test_missing_fields_are_clear_errors(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    flat = {"kind": "folder", "root": str(tmp_path)}
    for loader in ("grain", "tf"):
        with pytest.raises(ValueError, match="no class labels"):
            make_dataset(flat, loader=loader, image_size=16, batch_size=2, seed=0, train=True, fields=("label",))
        with pytest.raises(ValueError, match="no segmentation maps"):
            make_dataset(flat, loader=loader, image_size=16, batch_size=2, seed=0, train=True, fields=("segmentation",))
    with pytest.raises(ValueError, match="scale"):
        make_dataset(flat, image_size=16, batch_size=2, seed=0, train=True, fields=("lowres",), scale=3)
    with pytest.raises(ValueError, match="unknown example field"):
        make_dataset(flat, image_size=16, batch_size=2, seed=0, train=True, fields=("depth",))
    with pytest.raises(ValueError, match="mask spec"):
        make_dataset(flat, image_size=16, batch_size=2, seed=0, train=True, fields=("mask",))
