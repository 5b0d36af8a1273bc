"""`export_saved_model`: a TF SavedModel of the inpainting function, served like the checkpoint."""

import json

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from jattn.export import formats  # noqa: E402
from jattn.export.formats import ExportError, export_saved_model  # noqa: E402
from jattn.train.loop import train
from jattn.train.setup import restore_for_eval  # noqa: E402
from toy import toy_config  # noqa: E402

SIZE = 16  # toy_config's data.image_size
# A loaded signature first tries its TensorSpecs (TypeError), then feeds the tensors to the
# graph, where the XlaCallModule op rejects shapes its StableHLO module was not made for.
WRONG_SHAPE = (ValueError, TypeError, tf.errors.InvalidArgumentError)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    cfg = toy_config(total=2)
    cfg.image_every = 0
    train(cfg, wd, progress=False)
    return wd


def _reference(workdir):
    """In-process `predict(image, mask) -> output` of the workdir's latest checkpoint."""
    import jax

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    task, state, _, _ = restore_for_eval(config, workdir)
    predict = jax.jit(task.predict)
    return lambda image, mask: np.asarray(predict(state.params, state.variables, {"image": image, "mask": mask})["output"])


def _batch(b, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    mask = np.zeros((b, size, size, 1), np.float32)
    mask[:, 4:11, 3:12] = 1.0
    return image, mask


def _serve(path):
    return tf.saved_model.load(str(path)).signatures["serving_default"]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_serving_signature_matches_predict_for_any_batch(workdir, tmp_path):
    out = tmp_path / "models" / "jattn" / "1"  # TF Serving's <base>/<version> layout
    meta = export_saved_model(workdir, out)
    assert meta["batch_size"] is None and meta["image_size"] == [SIZE, SIZE] and meta["step"] == 2
    assert meta["networks"] == ["generator"] and meta["verified_max_abs_diff"] <= 1e-5
    assert json.loads((out / "assets.extra" / "jattn_export.json").read_text())["format"] == "saved_model"
    loaded = tf.saved_model.load(str(out))
    # the generator's 4 weights (2 convs) are variables; the critic is not exported
    weights = tf.nest.flatten(loaded.params)
    assert all(isinstance(v, tf.Variable) and not v.trainable for v in weights)
    assert sorted(v.shape.as_list() for v in weights) == [[3], [3, 3, 3, 8], [3, 3, 8, 3], [8]]
    assert sorted(loaded.params["generator"]) == ["Conv_0", "Conv_1"]
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert {k: (v.shape.as_list(), v.dtype) for k, v in inputs.items()} == {
        "image": ([None, SIZE, SIZE, 3], tf.float32),
        "mask": ([None, SIZE, SIZE, 1], tf.float32),
    }
    reference = _reference(workdir)
    for b in (1, 3):
        image, mask = _batch(b, seed=b)
        got = serve(image=tf.constant(image), mask=tf.constant(mask))["output"].numpy()
        assert got.shape == (b, SIZE, SIZE, 3)
        np.testing.assert_allclose(got, reference(image, mask), atol=1e-5)
        np.testing.assert_array_equal(got[mask[..., 0] == 0], image[mask[..., 0] == 0])  # known pixels kept
    image, mask = _batch(2, size=8)
    with pytest.raises(WRONG_SHAPE):
        serve(image=tf.constant(image), mask=tf.constant(mask))
    image, _ = _batch(2)
    _, mask = _batch(3)
    with pytest.raises(tf.errors.InvalidArgumentError):  # image and mask must share the batch
        serve(image=tf.constant(image), mask=tf.constant(mask))
    assert _leftovers(out.parent) == []


def test_static_batch_and_atomic_replacement(workdir, tmp_path, monkeypatch):
    out = tmp_path / "sm"
    export_saved_model(workdir, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise ExportError("verification failed (simulated)")

    with monkeypatch.context() as m:  # a failing export keeps the earlier one and leaves nothing
        m.setattr(formats, "_verify", broken)
        with pytest.raises(ExportError, match="simulated"):
            export_saved_model(workdir, out, batch_size=2)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert _serve(out).structured_input_signature[1]["image"].shape.as_list() == [None, SIZE, SIZE, 3]
    assert _leftovers(tmp_path) == []

    meta = export_saved_model(workdir, out, batch_size=2)
    assert meta["batch_size"] == 2
    serve = _serve(out)
    assert serve.structured_input_signature[1]["mask"].shape.as_list() == [2, SIZE, SIZE, 1]
    image, mask = _batch(2)
    got = serve(image=tf.constant(image), mask=tf.constant(mask))["output"].numpy()
    np.testing.assert_allclose(got, _reference(workdir)(image, mask), atol=1e-5)
    image, mask = _batch(3)
    with pytest.raises(WRONG_SHAPE):
        serve(image=tf.constant(image), mask=tf.constant(mask))
    assert _leftovers(tmp_path) == []


def test_bad_workdir_output_or_batch_size_give_clear_errors(tmp_path, workdir):
    out = tmp_path / "sm"
    with pytest.raises(ExportError, match="not a jattn workdir"):
        export_saved_model(tmp_path / "nowhere", out)
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="batch_size must be a positive integer"):
        export_saved_model(workdir, out, batch_size=0)
    assert not out.exists()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a SavedModel"):
        export_saved_model(workdir, precious)
    assert (precious / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_deepfill_v1_with_contextual_attention(tmp_path):
    """DeepFill v1 (contextual attention inside) at init weights, polymorphic batch."""
    from jattn.config import load_config

    tiny = ["total_steps=0", "batch_size=2", "model.cnum=4", "model.critic_cnum=4", "model.local_size=16",
            "data.image_size=32", "data.source={'kind': 'sample_photos', 'num_examples': 4, 'crop_size': 32}",
            "data.mask={'kind': 'box', 'hole_size': [16, 16], 'margin': [2, 2], 'max_delta': [4, 4]}",
            "eval_every=0", "image_every=0"]
    import pathlib

    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py", tiny)
    train(config, tmp_path / "run", progress=False)
    export_saved_model(tmp_path / "run", tmp_path / "sm")
    serve = _serve(tmp_path / "sm")
    reference = _reference(tmp_path / "run")
    for b in (1, 2):
        image, mask = _batch(b, size=32, seed=b)
        mask[:, 8:24, 8:24] = 1.0
        got = serve(image=tf.constant(image), mask=tf.constant(mask))["output"].numpy()
        np.testing.assert_allclose(got, reference(image, mask), atol=1e-5)


def test_cli_export_saved_model(workdir, tmp_path, capsys):
    import json

    import tensorflow as tf

    from jattn.cli import main

    assert main(["export", "--workdir", str(workdir), "--format", "saved_model", "--output", str(tmp_path / "sm"),
                 "--batch-size", "2"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["written"] == str(tmp_path / "sm")
    sig = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    assert sig.structured_input_signature[1]["image"].shape[0] == 2
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(tmp_path / "w.st"),
                 "--batch-size", "2"]) == 2
    assert "--batch-size applies to saved_model and onnx" in capsys.readouterr().err
