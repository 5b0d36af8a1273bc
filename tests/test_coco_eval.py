"""COCO box metrics: ground truth from sources, results from batches, pycocotools' COCOeval."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from jattn import coco_eval as C  # noqa: E402
from jattn.data import detection as D  # noqa: E402
from jattn.data import make_dataset  # noqa: E402
from jattn.data.sources import Objects, Record  # noqa: E402


def _gt(boxes_per_image, classes_per_image=None, crowd_per_image=None, category_ids=(1,)):
    """A ground truth from lists of xyxy boxes per image (ids 1, 2, ...)."""
    objs = []
    for i, boxes in enumerate(boxes_per_image):
        n = len(boxes)
        cls = [0] * n if classes_per_image is None else classes_per_image[i]
        crowd = None if crowd_per_image is None else crowd_per_image[i]
        objs.append(Objects(np.array(boxes, np.float32).reshape(-1, 4), cls, crowd, image_id=i + 1, size=(400, 400)))
    return C.coco_ground_truth(objs, category_ids=category_ids)


def _perfect_results(src, image_size, n):
    """Detections equal to the ground truth through the eval pipeline's batches."""
    results = []
    it = make_dataset(src, loader="grain", image_size=image_size, batch_size=2, seed=0, train=False,
                      num_epochs=1, fields=("boxes",), max_boxes=8)
    for b in it:
        valid = b["classes"] >= 0
        results += C.coco_results(b["image_id"], b["boxes"], np.where(valid, 0.9, 0.0), np.maximum(b["classes"], 0),
                                  valid, b["scale"], src.category_ids)
    return results


def test_ground_truth_of_a_source():
    src = D.SyntheticShapesSource(6, 64, seed=0)
    gt = C.coco_ground_truth(src)
    assert [im["id"] for im in gt["images"]] == list(range(6))
    assert gt["categories"] == [{"id": k + 1, "name": n} for k, n in enumerate(D.SYNTHETIC_CLASSES)]
    d = src.draw(3)
    anns = [a for a in gt["annotations"] if a["image_id"] == 3]
    assert len(anns) == len(d.boxes)
    for a, box, cls in zip(anns, d.boxes, d.classes):
        x1, y1, x2, y2 = box.tolist()
        assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1] and a["area"] == (x2 - x1) * (y2 - y1)
        assert a["category_id"] == cls + 1 and a["iscrowd"] == 0
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    assert [im["id"] for im in C.coco_ground_truth(src, indices=range(2))["images"]] == [0, 1]
    with pytest.raises(ValueError, match="duplicate image id 0"):
        C.coco_ground_truth([src[0], src[0]])


def test_perfect_predictions_score_one():
    src = D.SyntheticShapesSource(10, 128, max_objects=4, seed=2)
    gt = C.coco_ground_truth(src)
    m = C.coco_metrics(gt, _perfect_results(src, (160, 120), 10))
    assert set(m) == set(C.METRICS)
    for k in ("map", "map50", "map75", "map_small", "map_medium"):
        assert m[k] == pytest.approx(1.0), k
    assert math.isnan(m["map_large"])  # no object above 96x96 pixels: no ground truth there


def test_shifted_boxes_ap50_one_ap75_zero():
    """100x100 boxes predicted 20 pixels to the right: IoU 80/120 = 0.667, a match at
    IoU .50 .. .65 (4 of the 10 thresholds), none from .70."""
    boxes = [[[10, 10, 110, 110]], [[200, 150, 300, 250], [20, 250, 120, 350]]]
    gt = _gt(boxes)
    results = [{"image_id": i + 1, "category_id": 1, "bbox": [b[0] + 20, b[1], 100, 100], "score": 0.5 + 0.1 * j}
               for i, bs in enumerate(boxes) for j, b in enumerate(bs)]
    m = C.coco_metrics(gt, results)
    assert m["map50"] == pytest.approx(1.0) and m["map75"] == 0.0
    assert m["map"] == pytest.approx(0.4) and m["map_large"] == pytest.approx(0.4)
    assert math.isnan(m["map_small"]) and math.isnan(m["map_medium"])


def test_empty_results_and_empty_ground_truth():
    gt = _gt([[[0, 0, 10, 10], [50, 50, 100, 100]], [[0, 0, 200, 200]]])  # small, medium, large
    m = C.coco_metrics(gt, [])
    assert m == {k: 0.0 for k in C.METRICS}
    m = C.coco_metrics(_gt([[], []]), [])
    assert all(math.isnan(v) for v in m.values())
    empty_batch = C.coco_results([1, 2], np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros((2, 3), int),
                                 np.zeros((2, 3), bool), [1.0, 1.0], [1])
    assert empty_batch == []


def test_crowd_regions_are_ignored_and_image_subsets():
    gt = _gt([[[10, 10, 60, 60], [100, 100, 300, 300]], [[0, 0, 40, 40]]], crowd_per_image=[[False, True], [False]])
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1, 0]
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5},
               {"image_id": 1, "category_id": 1, "bbox": [110, 110, 150, 150], "score": 0.9},  # on the crowd
               {"image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.5}]
    assert C.coco_metrics(gt, perfect)["map"] == pytest.approx(1.0)
    # image 2 missed: half the objects found; evaluated on image 1 only: all of them
    assert C.coco_metrics(gt, perfect[:2])["map"] < 0.6
    assert C.coco_metrics(gt, perfect[:2], image_ids=[1])["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[7\]"):
        C.coco_metrics(gt, [{**perfect[0], "image_id": 7}])


def test_category_ids_round_trip(tmp_path):
    """A COCO folder with category ids 3, 7, 11: classes 0..2 in the batches, COCO's ids in the
    results, perfect predictions score 1; a wrong mapping scores 0."""
    from test_data_detection import make_coco

    src = D.CocoSource(make_coco(tmp_path / "c"))
    gt = C.coco_ground_truth(src)
    assert [c["id"] for c in gt["categories"]] == [3, 7, 11]
    assert [c["name"] for c in gt["categories"]] == ["three", "seven", "eleven"]
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [60.0, 40.0, 15.0, 12.5] and crowd[0]["area"] == 150
    assert {im["id"]: (im["height"], im["width"]) for im in gt["images"]} == {10: (40, 50), 20: (40, 50),
                                                                           30: (60, 80)}
    results = _perfect_results(src, 96, 3)
    assert {r["category_id"] for r in results} == {3, 7, 11}
    for r in results:  # boxes back in original pixels
        match = [a for a in gt["annotations"] if a["image_id"] == r["image_id"] and a["category_id"] == r["category_id"]]
        assert any(np.allclose(a["bbox"], r["bbox"], atol=1e-4) for a in match)
    # c.png (id 20) is unreadable: its slot was filled with the next image, so evaluate the others
    m = C.coco_metrics(gt, results, image_ids=[10, 30])
    assert m["map"] == pytest.approx(1.0)
    wrong = [{**r, "category_id": {3: 7, 7: 11, 11: 3}[r["category_id"]]} for r in results]
    assert C.coco_metrics(gt, wrong, image_ids=[10, 30])["map"] == 0.0


def test_results_json_round_trip_through_load_res():
    from pycocotools.coco import COCO

    gt = _gt([[[10, 20, 50, 80]], [[5.5, 6.25, 30, 40]]], category_ids=(5,))
    boxes = np.array([[[20, 40, 100, 160], [0, 0, 0, 0]], [[11, 12.5, 60, 80], [1, 1, 3, 3]]], np.float32)
    results = C.coco_results(np.array([1, 2], np.int32), boxes, np.array([[0.9, 0.1], [0.8, 0.3]]),
                             np.zeros((2, 2), np.int32), np.array([[True, False], [True, True]]),
                             np.array([2.0, 2.0], np.float32), [5])
    assert len(results) == 3 and all(r["category_id"] == 5 for r in results)
    assert results[0]["bbox"] == [10.0, 20.0, 40.0, 60.0] and results[0]["score"] == pytest.approx(0.9)
    loaded = json.loads(json.dumps(results))
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    res = coco.loadRes(loaded)
    anns = [res.anns[i] for i in sorted(res.anns)]
    assert [a["bbox"] for a in anns] == [r["bbox"] for r in results]
    assert anns[1]["area"] == pytest.approx(24.5 * 33.75)
    assert C.coco_metrics(gt, loaded)["map50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"detection classes must be in \[0, 1\)"):
        C.coco_results([1], boxes[:1], [[0.5, 0.5]], [[1, 0]], None, [1.0], [5])


def test_ground_truth_from_records_without_sizes():
    """Records whose objects are normalized (TFDS) take the size from the image header."""
    from PIL import Image
    import io

    b = io.BytesIO()
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(b, "PNG")
    rec = Record(b.getvalue(), "x.png", objects=Objects([[0.25, 0.5, 0.75, 1.0]], [1], image_id=9, normalized=True))
    gt = C.coco_ground_truth([rec], category_ids=[4, 8])
    assert gt["images"] == [{"id": 9, "height": 40, "width": 80, "file_name": "x.png"}]
    assert gt["annotations"][0]["bbox"] == [20.0, 20.0, 40.0, 20.0] and gt["annotations"][0]["category_id"] == 8
