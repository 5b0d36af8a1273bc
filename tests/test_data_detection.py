"""Detection data: synthetic shapes, COCO folders, TFDS objects, the box-carrying transforms and
the pipelines' "boxes" field (grain and tf.data alike)."""
import io
import json
import os
import pickle

os.environ.setdefault("NO_GCE_CHECK", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from jattn.data import detection as D  # noqa: E402
from jattn.data import make_dataset, sources  # noqa: E402
from jattn.data.examples import ExampleMaker  # noqa: E402
from jattn.data.sources import Objects  # noqa: E402

DET_KEYS = {"image", "boxes", "classes", "image_id", "scale"}


def _tight(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# --------------------------------------------------------------------------- synthetic shapes


def test_synthetic_shapes_are_deterministic_and_boxes_are_exact():
    src = sources.source_from_config({"kind": "synthetic_shapes", "num_examples": 24, "size": 64,
                                      "classes": 5, "max_objects": 4, "seed": 3})
    assert isinstance(src, D.SyntheticShapesSource) and src.class_names == D.SYNTHETIC_CLASSES
    classes, sides = set(), []
    for i in range(len(src)):
        d, again, rec = src.draw(i), src.draw(i), src[i]
        np.testing.assert_array_equal(d.image, again.image)
        np.testing.assert_array_equal(d.boxes, again.boxes)
        np.testing.assert_array_equal(rec.data, d.image)
        np.testing.assert_array_equal(rec.objects.boxes, d.boxes)
        assert rec.objects.image_id == i and rec.objects.size == (64, 64)
        assert 1 <= len(d.boxes) <= 4
        # shapes are flat and bright, the background never as bright
        shapes = d.instances > 0
        assert (d.image[~shapes].max() <= 170) and (d.image[shapes].max(-1) >= 200).all()
        for j, (box, colour) in enumerate(zip(d.boxes, d.colours)):
            pixels = np.all(d.image == colour, -1)  # the object's pixels, found in the image
            np.testing.assert_array_equal(pixels, d.instances == j + 1)
            np.testing.assert_array_equal(box, _tight(pixels), err_msg=f"image {i} object {j}")
            sides.append(max(box[2] - box[0], box[3] - box[1]))
        classes.update(d.classes.tolist())
    assert classes == set(range(5))
    assert min(sides) <= 12 and max(sides) >= 24  # small and large objects
    val = D.SyntheticShapesSource(24, 64, seed=3, split="val")
    assert not np.array_equal(val.draw(0).image, src.draw(0).image)
    assert not np.array_equal(D.SyntheticShapesSource(24, 64, seed=4).draw(0).image, src.draw(0).image)


def test_synthetic_shapes_bad_arguments():
    with pytest.raises(ValueError, match="classes must be in 1..5"):
        D.SyntheticShapesSource(4, 64, classes=6)
    with pytest.raises(ValueError, match="bad parameters for a 'synthetic_shapes' source"):
        sources.source_from_config({"kind": "synthetic_shapes", "colours": 3})


# --------------------------------------------------------------------------- COCO folders


def _png(img):
    b = io.BytesIO()
    Image.fromarray(img).save(b, "PNG")
    return b.getvalue()


def make_coco(root, beside=False):
    """Three images (ids 30, 10, 20 in the json; 20 is corrupt), categories 11, 3, 7."""
    root.mkdir(parents=True, exist_ok=True)
    images = root if beside else root / "images"
    images.mkdir(exist_ok=True)
    a = np.zeros((60, 80, 3), np.uint8)
    a[10:30, 20:50] = (255, 0, 0)
    b = np.zeros((40, 50, 3), np.uint8)
    b[5:25, 5:15] = (0, 255, 0)
    (images / "a.png").write_bytes(_png(a))
    (images / "b.png").write_bytes(_png(b))
    (images / "c.png").write_bytes(b"not an image at all" * 4)
    data = {
        "images": [{"id": 30, "file_name": "a.png", "height": 60, "width": 80},
                   {"id": 10, "file_name": "b.png", "height": 40, "width": 50},
                   {"id": 20, "file_name": "c.png", "height": 40, "width": 50}],
        "categories": [{"id": 11, "name": "eleven"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 1, "image_id": 30, "category_id": 7, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 30, "category_id": 3, "bbox": [60, 40, 15, 12.5], "area": 150, "iscrowd": 1},
            {"id": 3, "image_id": 30, "category_id": 11, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 4, "image_id": 10, "category_id": 11, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 5, "image_id": 20, "category_id": 3, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 6, "image_id": 10, "category_id": 3, "bbox": [30.5, 2.25, 19.5, 30], "area": 500, "iscrowd": 0},
        ],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    return root


def test_coco_folder_source(tmp_path):
    src = sources.source_from_config({"kind": "coco", "root": str(make_coco(tmp_path / "c"))})
    assert len(src) == 3
    assert src.category_ids == (3, 7, 11) and src.class_names == ("three", "seven", "eleven")
    assert src.skipped_boxes == 1  # the 0.5-pixel-wide box
    ids = [src[i].objects.image_id for i in range(3)]
    assert ids == [10, 20, 30]  # in id order
    o = src[2].objects
    np.testing.assert_array_equal(o.boxes, [[20, 10, 50, 30], [60, 40, 75, 52.5]])
    np.testing.assert_array_equal(o.classes, [1, 0])
    np.testing.assert_array_equal(o.iscrowd, [False, True])
    np.testing.assert_array_equal(o.areas, [600, 150])
    assert o.size == (60, 80) and src[2].name.endswith("images/a.png")
    np.testing.assert_array_equal(src[0].objects.classes, [2, 0])
    again = pickle.loads(pickle.dumps(src))  # grain's worker processes get a pickled copy
    assert again[2].data == src[2].data and again[2].objects.image_id == 30
    # images beside the json
    beside = sources.coco_source(make_coco(tmp_path / "b", beside=True))
    assert beside.images == str(tmp_path / "b") and beside[0].data == src[0].data


def test_coco_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO folder not found"):
        D.CocoSource(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="COCO annotations not found"):
        D.CocoSource(tmp_path)
    root = make_coco(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="COCO image folder not found"):
        D.CocoSource(root, images="pictures")
    data = json.loads((root / "annotations.json").read_text())
    data["annotations"][0]["category_id"] = 99
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 99"):
        D.CocoSource(root, "bad.json")
    (root / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        D.CocoSource(root, "broken.json")
    assert len(D.CocoSource(root, skip_empty=True)) == 3  # all three have a non-crowd box


def test_coco_folder_pipeline_skips_the_corrupt_image_and_drops_crowd_targets(tmp_path):
    src = {"kind": "coco", "root": str(make_coco(tmp_path / "c"))}
    it = make_dataset(src, loader="grain", image_size=100, batch_size=3, seed=0, train=False, num_epochs=1,
                      fields=("boxes",), max_boxes=4)
    (batch,) = list(it)
    assert set(batch) == DET_KEYS
    assert it.bad_data.skipped == 1  # c.png; its slot takes the next readable image
    np.testing.assert_array_equal(batch["image_id"], [10, 30, 30])
    np.testing.assert_allclose(batch["scale"], [2.0, 1.25, 1.25])
    b = batch["boxes"][1] / batch["scale"][1]
    np.testing.assert_allclose(b[:1], [[20, 10, 50, 30]], rtol=1e-6)  # the crowd box is no target
    np.testing.assert_array_equal(batch["classes"][1], [1, -1, -1, -1])
    np.testing.assert_array_equal(batch["boxes"][1, 1:], 0)
    np.testing.assert_allclose(batch["boxes"][0, :2] / 2.0, [[5, 5, 15, 25], [30.5, 2.25, 50, 32.25]], rtol=1e-6)
    np.testing.assert_array_equal(batch["classes"][0], [2, 0, -1, -1])


# --------------------------------------------------------------------------- transforms


def _reference(boxes, h, w, image_size, flip):
    """NumPy reference of the box transform."""
    H, W = image_size
    s = min(H / h, W / w)
    nh, nw = int(np.floor(h * s + 1e-6)), int(np.floor(w * s + 1e-6))
    b = np.asarray(boxes, np.float64) * s
    if flip:
        b = np.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], 1)
    b = np.clip(b, 0, [nw, nh, nw, nh])
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep], keep, s, (nh, nw)


@pytest.mark.parametrize("hw,image_size", [((60, 80), (100, 100)), ((90, 40), (64, 96)), ((33, 47), (50, 50)),
                                            ((300, 200), (128, 128))])
def test_boxes_follow_resize_pad_and_flip(hw, image_size):
    rng = np.random.default_rng(hw[0])
    h, w = hw
    xy = rng.uniform(-10, [w + 5, h + 5], (12, 2))
    wh = rng.uniform(0.5, 30, (12, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[0] = [w + 1, 2, w + 9, 9]  # entirely outside: dropped
    classes = np.arange(12) % 3
    obj = Objects(boxes, classes, image_id=7)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    flips = set()
    for k in range(8):
        flip = np.random.default_rng([5, k, 1]).random() < 0.5
        flips.add(flip)
        out, dropped = D.preprocess(rgb, obj, image_size, rng=np.random.default_rng([5, k, 1]), max_boxes=16)
        ref, keep, s, (nh, nw) = _reference(boxes, h, w, image_size, flip)
        assert dropped == 0 and not keep[0]
        n = len(ref)
        np.testing.assert_allclose(out["boxes"][:n], ref, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(out["boxes"][n:], 0)
        np.testing.assert_array_equal(out["classes"][:n], classes[keep])
        np.testing.assert_array_equal(out["classes"][n:], -1)
        assert out["scale"] == np.float32(s) and out["image"].shape == (*image_size, 3)
        assert out["image"].dtype == np.float32
        np.testing.assert_array_equal(out["image"][nh:], 0)  # padding: bottom / right
        np.testing.assert_array_equal(out["image"][:, nw:], 0)
    assert flips == {True, False}
    eval_out, _ = D.preprocess(rgb, obj, image_size, rng=None, max_boxes=16)
    ref, *_ = _reference(boxes, h, w, image_size, False)
    np.testing.assert_allclose(eval_out["boxes"][:len(ref)], ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_drawn_region_moves_with_its_box(flip):
    """A red rectangle on black: after resize (x2), flip and pad, the pixels above mid-red
    are exactly the transformed box."""
    img = np.zeros((40, 50, 3), np.uint8)
    img[5:17, 11:30] = (255, 0, 0)
    obj = Objects([[11, 5, 30, 17]], [0])
    maker = ExampleMaker((100, 100), None, seed=0, mask_seed=0, train=True, fields=("boxes",), max_boxes=3)
    for k in range(20):
        if (np.random.default_rng([0, k, 1]).random() < 0.5) == flip:
            break
    out, _, _ = maker.example(img, "red", k, objects=obj)
    assert out["scale"] == 2.0
    box = out["boxes"][0]
    np.testing.assert_array_equal(box, [100 - 60, 10, 100 - 22, 34] if flip else [22, 10, 60, 34])
    red = out["image"][..., 0] > 0
    np.testing.assert_array_equal(_tight(red), box)
    assert out["image"][80:].max() == 0 and (out["image"][:80] != 0).any()  # 40x50 -> 80x100, padded below
    seg = (img[..., 0] > 0).astype(np.uint8) * 3  # a map goes the same way (nearest), padded with 0
    rng = np.random.default_rng([0, k, 1])
    with_seg, _ = D.preprocess(img, obj, (100, 100), rng=rng, segmentation=seg, max_boxes=3)
    assert with_seg["segmentation"].dtype == np.int32 and set(np.unique(with_seg["segmentation"])) == {0, 3}
    np.testing.assert_array_equal(_tight(with_seg["segmentation"] > 0), box)
    np.testing.assert_array_equal(with_seg["image"], out["image"])


def test_truncation_keeps_the_largest_in_order():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 3, 3], [0, 0, 10, 10], [0, 0, 5, 5]], np.float32)
    out_boxes, out_classes, dropped = D.select_boxes(boxes, np.arange(5), 3)
    assert dropped == 2
    np.testing.assert_array_equal(out_classes, [1, 3, 4])
    np.testing.assert_array_equal(out_boxes, boxes[[1, 3, 4]])
    out_boxes, out_classes, dropped = D.select_boxes(boxes[:0], np.arange(0), 2)
    assert dropped == 0 and (out_boxes == 0).all() and (out_classes == -1).all()


def test_pipeline_counts_truncated_boxes():
    src = D.SyntheticShapesSource(8, 64, max_objects=6, seed=1)
    total = sum(max(0, len(src.draw(i).boxes) - 2) for i in range(8))
    assert total > 0
    for loader in ("grain", "tf"):
        it = make_dataset(src, loader=loader, image_size=64, batch_size=4, seed=0, train=False, num_epochs=1,
                          fields=("boxes",), max_boxes=2)
        batches = list(it)
        assert it.boxes_truncated == total and all(b["boxes"].shape == (4, 2, 4) for b in batches)


def test_detection_maker_errors():
    with pytest.raises(ValueError, match="data.max_boxes"):
        ExampleMaker(64, None, 0, 0, True, fields=("boxes",), max_boxes=0)
    with pytest.raises(ValueError, match="resized and padded, not cropped"):
        ExampleMaker(64, None, 0, 0, True, fields=("boxes",), augment={"crop": "inception"})
    with pytest.raises(ValueError, match="eval_resize_shorter"):
        ExampleMaker(64, None, 0, 0, False, fields=("boxes",), resize_shorter=80)
    with pytest.raises(ValueError, match="the source has no boxes"):
        make_dataset({"kind": "shapes", "num_examples": 8, "size": 32}, loader="grain", image_size=32, batch_size=2,
                     seed=0, train=True, fields=("boxes",))


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("train", [True, False])
def test_grain_and_tf_give_identical_detection_batches(tmp_path, train):
    kw = dict(image_size=(96, 80), batch_size=4, seed=2, train=train, fields=("boxes",), max_boxes=5,
              num_epochs=None if train else 1)
    for src in ({"kind": "synthetic_shapes", "num_examples": 12, "size": 72, "max_objects": 6},
                {"kind": "coco", "root": str(make_coco(tmp_path / "c"))}):
        a = make_dataset(src, loader="grain", **{**kw, "batch_size": 2 if src["kind"] == "coco" else 4})
        b = make_dataset(src, loader="tf", **{**kw, "batch_size": 2 if src["kind"] == "coco" else 4})
        n = 0
        for x, y in zip(a, b):
            assert set(x) == set(y) == DET_KEYS
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            assert x["boxes"].dtype == np.float32 and x["classes"].dtype == np.int32
            assert x["image_id"].dtype == np.int32 and x["scale"].dtype == np.float32
            n += 1
            if n == 4:
                break
        assert n >= 1
        b.close()


def test_training_flips_follow_the_seed():
    src = D.SyntheticShapesSource(8, 64, seed=0)
    kw = dict(loader="grain", image_size=64, batch_size=8, train=True, fields=("boxes",))
    first = next(make_dataset(src, seed=1, **kw))
    again = next(make_dataset(src, seed=1, **kw))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # every example's boxes are its drawing's, flipped or not
    flipped = 0
    for i, image_id in enumerate(first["image_id"]):
        d = src.draw(int(image_id))
        n = len(d.boxes)
        got = first["boxes"][i, :n]
        mirrored = np.stack([64 - d.boxes[:, 2], d.boxes[:, 1], 64 - d.boxes[:, 0], d.boxes[:, 3]], 1)
        assert np.array_equal(got, d.boxes) or np.array_equal(got, mirrored)
        flipped += not np.array_equal(got, d.boxes)
    assert 0 < flipped < 8


def test_eval_batches_map_back_to_the_original_boxes():
    src = D.SyntheticShapesSource(6, 50, max_objects=5, seed=7)
    it = make_dataset(src, loader="grain", image_size=(128, 96), batch_size=3, seed=0, train=False,
                      num_epochs=1, fields=("boxes",))
    seen = []
    for batch in it:
        for i, image_id in enumerate(batch["image_id"]):
            d = src.draw(int(image_id))
            n = len(d.boxes)
            assert batch["scale"][i] == np.float32(96 / 50)
            np.testing.assert_allclose(batch["boxes"][i, :n] / batch["scale"][i], d.boxes, rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(batch["classes"][i, :n], d.classes)
            np.testing.assert_array_equal(batch["classes"][i, n:], -1)
            seen.append(int(image_id))
    assert seen == list(range(6))


# --------------------------------------------------------------------------- TFDS


def test_tfds_objects_mapping_of_a_coco_example():
    example = {"image": b"...", "image/id": np.int64(397133),
               "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], np.float32),
                           "label": np.array([44, 0]), "is_crowd": np.array([False, True]),
                           "area": np.array([1234, 99999])}}
    o = D.tfds_objects(example)
    assert o.normalized and o.image_id == 397133
    np.testing.assert_allclose(o.boxes, [[0.2, 0.1, 0.6, 0.5], [0, 0, 1, 1]])
    p = o.in_pixels(200, 400)
    np.testing.assert_allclose(p.boxes, [[80, 20, 240, 100], [0, 0, 400, 200]])
    assert p.size == (200, 400) and not p.normalized
    np.testing.assert_array_equal(p.classes, [44, 0])
    np.testing.assert_array_equal(p.iscrowd, [False, True])
    np.testing.assert_array_equal(p.areas, [1234, 99999])
    assert D.default_category_ids("coco/2017", 80)[44] == 50
    assert len(set(D.COCO_2017_CATEGORY_IDS)) == 80 and D.COCO_2017_CATEGORY_IDS[-1] == 90
    assert D.default_category_ids("voc", 3) == (1, 2, 3)


try:
    import tensorflow_datasets as tfds
except ImportError:  # the tfds extra: only the TFDS test is skipped
    tfds = None
TINY = "jattn_test_tiny_coco"


class JattnTestTinyCoco(tfds.core.GeneratorBasedBuilder if tfds else object):
    """coco/2017's features (image, image/id, objects: bbox, label, is_crowd, area); 6 images."""

    VERSION = tfds.core.Version("1.0.0") if tfds else None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "area": np.int64, "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "kite"]), "is_crowd": np.bool_})}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            h, w = 40 + 4 * i, 64
            img = np.zeros((h, w, 3), np.uint8)
            objects = []
            for j in range(i % 3 + 1):
                x, y, bw, bh = 4 + 12 * j, 3 + j, 10, 8 + j
                img[y:y + bh, x:x + bw] = 255
                objects.append({"area": bw * bh, "label": (i + j) % 3, "is_crowd": j == 2,
                                "bbox": tfds.features.BBox(ymin=y / h, xmin=x / w, ymax=(y + bh) / h,
                                                           xmax=(x + bw) / w)})
            yield i, {"image": img, "image/id": 1000 + i, "objects": objects}


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    if tfds is None:
        pytest.skip("tensorflow-datasets is not installed (the tfds extra)")
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds_coco")
    for fmt in ("tfrecord", "array_record"):
        JattnTestTinyCoco(data_dir=os.fspath(root / fmt), file_format=fmt).download_and_prepare()
    return root


def test_tfds_detection_source_in_both_pipelines(tiny_coco):
    ra = sources.tfds_source(TINY, "validation", data_dir=os.fspath(tiny_coco / "array_record"))
    assert ra.objects_key == "objects" and ra.class_names == ("cat", "dog", "kite")
    assert ra.category_ids == (1, 2, 3)
    ids = [ra[i].objects.image_id for i in range(len(ra))]
    assert sorted(ids) == list(range(1000, 1006))  # TFDS stores them in its own order
    rec = ra[ids.index(1002)]
    o = rec.objects.in_pixels(48, 64)
    assert o.image_id == 1002
    np.testing.assert_allclose(o.boxes, [[4, 3, 14, 11], [16, 4, 26, 13], [28, 5, 38, 15]], atol=1e-4)
    np.testing.assert_array_equal(o.iscrowd, [False, False, True])
    np.testing.assert_array_equal(o.classes, [2, 0, 1])
    kw = dict(image_size=96, batch_size=3, seed=0, train=False, num_epochs=1, fields=("boxes",), max_boxes=4)
    grain_batches = list(make_dataset(ra, loader="grain", **kw))
    tf_ra = list(make_dataset(ra, loader="tf", **kw))
    rec_src = sources.tfds_source(TINY, "validation", data_dir=os.fspath(tiny_coco / "tfrecord"))
    tf_rec = list(make_dataset(rec_src, loader="tf", **kw))
    assert len(grain_batches) == len(tf_ra) == len(tf_rec) == 2
    for a, b, c in zip(grain_batches, tf_ra, tf_rec):
        assert set(a) == set(c) == DET_KEYS
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            np.testing.assert_allclose(a[k], c[k], atol=1e-5, err_msg=k)
    batch = np.concatenate([b["image_id"] for b in grain_batches])
    np.testing.assert_array_equal(batch, ids)
    k = ids.index(1002)
    b = grain_batches[k // 3]
    np.testing.assert_allclose(b["boxes"][k % 3, :2] / b["scale"][k % 3], o.boxes[:2], atol=1e-4)
    np.testing.assert_array_equal(b["classes"][k % 3], [2, 0, -1, -1])  # the crowd box is no target
