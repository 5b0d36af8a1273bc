"""The Attention R-CNN task on the engine: the demo config's loss falls, an interrupted run
resumes bit for bit, COCO evaluation (and `jattn eval --save-outputs`), `jattn detect` and
its bad inputs. One small run (64 px synthetic shapes, the tiny model) serves every test."""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from jattn.cli import main
from jattn.config import load_config
from jattn.train.logging import read_metrics
from jattn.train.loop import train

pytest.importorskip("pycocotools")

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
STEPS = 24


def _config(total=STEPS, **extra):
    sets = [f"total_steps={total}", "data.image_size=64", "data.source.size=64", "data.source.num_examples=64",
            "data.eval_source.size=64", "data.eval_source.num_examples=16", "batch_size=8", "eval_images=16",
            "eval_batch_size=8", "log_every=1", "eval_every=0", "image_every=0", "checkpoint_every=0"]
    return load_config(CONFIGS / "demo_attention_rcnn.py", sets + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("rcnn") / "full"
    assert train(_config(), wd, progress=False)["step"] == STEPS
    return wd


def _losses(workdir):
    return [r["model_loss"] for r in read_metrics(workdir)]


def test_demo_loss_falls(workdir):
    losses = _losses(workdir)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.75 * np.mean(losses[:6]), losses


@pytest.mark.slow  # two more training runs (3 min on 2 cores); the loop's resume is in test_train_loop
def test_resumed_run_is_bitwise_identical(workdir, tmp_path):
    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import state_init_fn
    from jattn.train.task import build_task

    train(_config(total=STEPS // 2), tmp_path / "split", progress=False)  # "interrupted" halfway
    train(_config(), tmp_path / "split", progress=False)
    config = _config()
    shapes = jax.eval_shape(state_init_fn(build_task(config), config), jax.random.key(0))
    a = Checkpointer(workdir / "checkpoints").restore(shapes)
    b = Checkpointer(tmp_path / "split" / "checkpoints").restore(shapes)
    assert a.step == b.step == STEPS
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _losses(workdir) == _losses(tmp_path / "split")


def test_ground_truth_as_detections_scores_one():
    """The evaluation's plumbing (image ids, scales back to original pixels, category ids):
    detections equal to the batches' own boxes score an mAP of 1."""
    import jax.numpy as jnp

    from jattn.train.evaluate import eval_batches
    from jattn.train.sharding import make_mesh
    from jattn.train.tasks.detection import evaluate_detections

    config = _config(**{"data.image_size": 80})  # 64 px images upscaled to 80: scale 1.25
    config.data.eval_source.num_examples = 24
    config.eval_images = 24

    def detect(params, variables, batch):
        del params, variables
        return {"boxes": batch["boxes"], "scores": jnp.ones(batch["classes"].shape), "valid": batch["classes"] >= 0,
                "classes": jnp.maximum(batch["classes"], 0)}

    state = type("State", (), {"params": {}, "variables": {}})()
    result = evaluate_detections(detect, state, config, make_mesh(jax.devices()[:1]), eval_batches(config, ("boxes",)))
    assert result["eval_images"] == 24 and result["eval_detections"] > 24
    for k in ("eval_map", "eval_map50", "eval_map75"):
        assert result[k] == pytest.approx(1.0), result


def test_eval_writes_coco_files_that_rescore_to_the_same_numbers(workdir, tmp_path, capsys):
    from jattn.coco_eval import coco_metrics

    out = tmp_path / "outputs"
    assert main(["eval", "--workdir", str(workdir), "--save-outputs", str(out)]) == 0
    def strict(text):  # NaN / Infinity are not JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    result = strict(capsys.readouterr().out)
    assert result == strict((workdir / f"eval_{STEPS}.json").read_text())
    assert result["eval_images"] == 16 and result["eval_map_large"] is None  # no object over 96² px in 64 px images
    for k in ("eval_map", "eval_map50", "eval_map75", "eval_map_small", "eval_map_medium", "eval_map_large"):
        assert k in result
    truth = json.loads((out / "annotations.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert len(truth["images"]) == 16 and len(detections) == result["eval_detections"]
    assert {c["name"] for c in truth["categories"]} == {"square", "circle", "triangle", "cross", "ring"}
    rescored = coco_metrics(truth, detections)
    assert rescored["map"] == pytest.approx(result["eval_map"]) and rescored["map50"] == pytest.approx(result["eval_map50"])
    # a folder that is not empty is refused before anything runs, and kept as it is
    code = main(["eval", "--workdir", str(workdir), "--save-outputs", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "detections.json"]


def _images(folder, n=3, size=64):
    from jattn.data.detection import SyntheticShapesSource

    folder.mkdir(parents=True, exist_ok=True)
    source = SyntheticShapesSource(n, size, split="val")
    for i in range(n):
        Image.fromarray(source.draw(i).image).save(folder / f"img{i}.png")
    return source


def test_detect_cli_writes_coco_results_and_drawings(workdir, tmp_path, capsys):
    from jattn.export.detect import Detector

    _images(tmp_path / "in")
    big = np.asarray(Image.open(tmp_path / "in" / "img0.png").resize((160, 128)))  # another size and aspect
    Image.fromarray(big).save(tmp_path / "in" / "wide.jpg")
    out = tmp_path / "res" / "dets.json"
    assert main(["detect", "--checkpoint", str(workdir), "--image", str(tmp_path / "in"), "--output", str(out),
                 "--draw", str(tmp_path / "drawn"), "--score-threshold", "0.01", "--batch-size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    results = json.loads(out.read_text())
    assert summary["images"] == 4 and summary["detections"] == len(results) > 0
    names = ["img0.png", "img1.png", "img2.png", "wide.jpg"]
    assert {r["file_name"] for r in results} <= set(names)
    for r in results:
        assert r["file_name"] == names[r["image_id"]] and 1 <= r["category_id"] <= 5 and r["score"] >= 0.01
        x, y, w, h = r["bbox"]
        limit = (160, 128) if r["file_name"] == "wide.jpg" else (64, 64)
        assert w >= 0 and h >= 0 and x + w <= limit[0] + 1e-3 and y + h <= limit[1] + 1e-3
    for name in names:
        drawn = np.asarray(Image.open(tmp_path / "drawn" / (pathlib.Path(name).stem + ".png")))
        assert drawn.shape == ((128, 160, 3) if name == "wide.jpg" else (64, 64, 3))
    # the Python API gives the same detections, in the image's pixels
    detector = Detector.from_checkpoint(workdir)
    own = detector(np.asarray(Image.open(tmp_path / "in" / "wide.jpg")), score_threshold=0.01)  # the JPEG's pixels
    mine = [r for r in results if r["file_name"] == "wide.jpg"]
    assert len(own) == len(mine)
    for d, r in zip(own, mine):
        np.testing.assert_allclose(d["box"][:2], r["bbox"][:2], atol=1e-3)
        assert d["score"] == pytest.approx(r["score"], abs=1e-5)
        assert d["label"] == r["category_name"]


def test_detect_bad_inputs_are_one_line_and_write_nothing(workdir, tmp_path, capsys):
    _images(tmp_path / "in", n=1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    good = str(tmp_path / "in" / "img0.png")
    out = tmp_path / "out.json"
    cases = [
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(tmp_path / "bad.png")], "not a readable image"),
        (["--image", str(tmp_path / "empty")], "no images in this folder"),
        (["--image", good, "--score-threshold", "1.5"], "--score-threshold must be in [0, 1]"),
        (["--image", good, "--draw", str(tmp_path / "afile")], "is a file"),
        (["--image", good, "--output", str(tmp_path / "out.txt")], "must end in .json"),
        (["--image", good, "--checkpoint", str(tmp_path / "nowhere")], "checkpoint not found"),
    ]
    for args, message in cases:
        full = ["detect", "--checkpoint", str(workdir), "--output", str(out), *args]
        code = main(full[:1] + full[3:] if "--checkpoint" in args else full)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists() and not (tmp_path / "out.txt").exists()


def test_an_inpainting_checkpoint_is_not_a_detector(tmp_path, capsys):
    from toy import toy_config

    cfg = toy_config(total=1)
    cfg.image_every = 0
    train(cfg, tmp_path / "inpaint", progress=False)
    _images(tmp_path / "in", n=1)
    code = main(["detect", "--checkpoint", str(tmp_path / "inpaint"), "--image", str(tmp_path / "in"),
                 "--output", str(tmp_path / "o.json")])
    assert code == 2 and "not a detection model" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_export_safetensors_reproduces_the_detector(workdir, tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "det.safetensors"
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["network"] == "model" and float(meta["verified_max_abs_diff"]) == 0.0
    tensors = load_file(out)
    assert "params/proposal_attention/class_embeddings" in tensors and any(k.startswith("batch_stats/") for k in tensors)
    # the graph formats take the inpainting function only: a one-line refusal
    code = main(["export", "--workdir", str(workdir), "--format", "jax-export", "--output", str(tmp_path / "m.jax")])
    err = capsys.readouterr().err
    assert code == 2 and "not an inpainting model" in err and len(err.strip().splitlines()) == 1
