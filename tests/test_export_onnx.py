"""`export_onnx`: the inpainting function as ONNX (optional extra `jattn[onnx]`), run in onnxruntime."""

import json
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from jattn.export.formats import ExportError, export_onnx
from jattn.train.loop import train
from jattn.train.setup import restore_for_eval
from toy import toy_config

SIZE = 16  # toy_config's data.image_size
NEEDS_EXTRA = "ONNX export needs the optional extra: pip install 'jattn[onnx]'"


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("jax2onnx", reason=NEEDS_EXTRA)
    return pytest.importorskip("onnxruntime", reason=NEEDS_EXTRA)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ort):
    wd = tmp_path_factory.mktemp("run")
    cfg = toy_config(total=2)
    cfg.image_every = 0
    train(cfg, wd, progress=False)
    return wd


def _reference(workdir):
    """In-process `predict(image, mask) -> output` of the workdir's latest checkpoint."""
    import jax

    config = ml_collections.ConfigDict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
    task, state, _, _ = restore_for_eval(config, workdir)
    predict = jax.jit(task.predict)
    return lambda image, mask: np.asarray(predict(state.params, state.variables, {"image": image, "mask": mask})["output"])


def _batch(b, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    mask = np.zeros((b, size, size, 1), np.float32)
    mask[:, size // 4 : size - size // 4, size // 5 : size - size // 5] = 1.0
    return image, mask


def _session(ort, path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'jattn\[onnx\]'"):
        export_onnx(tmp_path / "any", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_static_batch_matches_predict_in_onnxruntime(workdir, tmp_path, ort):
    out = tmp_path / "model.onnx"
    meta = export_onnx(workdir, out, batch_size=2)
    assert meta["inputs"] == {"image": [2, SIZE, SIZE, 3], "mask": [2, SIZE, SIZE, 1]} and meta["step"] == 2
    session = _session(ort, out)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", [2, SIZE, SIZE, 3]), ("mask", [2, SIZE, SIZE, 1])]
    assert json.loads(session.get_modelmeta().custom_metadata_map["jattn"])["model"] == {"name": "toy_gan"}
    image, mask = _batch(2)
    got = session.run(["output"], {"image": image, "mask": mask})[0]
    np.testing.assert_allclose(got, _reference(workdir)(image, mask), atol=1e-5)
    for b, size in ((3, SIZE), (2, 8)):  # wrong batch or size
        image, mask = _batch(b, size)
        with pytest.raises(Exception, match="(?i)invalid|dimension"):
            session.run(["output"], {"image": image, "mask": mask})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_dynamic_batch_where_jax2onnx_can(workdir, tmp_path, ort):
    """The toy generator (no nested jit) converts with a symbolic batch."""
    out = tmp_path / "dyn.onnx"
    export_onnx(workdir, out, batch_size=None)
    session = _session(ort, out)
    reference = _reference(workdir)
    for b in (1, 3):
        image, mask = _batch(b, seed=b)
        np.testing.assert_allclose(session.run(["output"], {"image": image, "mask": mask})[0], reference(image, mask), atol=1e-5)


def test_missing_workdir_gives_clear_error_and_no_file(tmp_path, ort):
    with pytest.raises(ExportError, match="not a jattn workdir"):
        export_onnx(tmp_path / "nowhere", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_deepfill_v1_with_contextual_attention(tmp_path, ort):
    """DeepFill v1 at init weights: static batch converts and matches; a dynamic batch is
    refused with the jax2onnx lowering that failed (lax.rem on a symbolic batch)."""
    from jattn.config import load_config

    tiny = ["total_steps=0", "batch_size=2", "model.cnum=4", "model.critic_cnum=4", "model.local_size=16",
            "data.image_size=32", "data.source={'kind': 'sample_photos', 'num_examples': 4, 'crop_size': 32}",
            "data.mask={'kind': 'box', 'hole_size': [16, 16], 'margin': [2, 2], 'max_delta': [4, 4]}",
            "eval_every=0", "image_every=0"]
    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py", tiny)
    train(config, tmp_path / "run", progress=False)
    export_onnx(tmp_path / "run", tmp_path / "df.onnx", batch_size=2)
    image, mask = _batch(2, size=32)
    got = _session(ort, tmp_path / "df.onnx").run(["output"], {"image": image, "mask": mask})[0]
    np.testing.assert_allclose(got, _reference(tmp_path / "run")(image, mask), atol=1e-5)
    with pytest.raises(ExportError, match="dynamic batch"):
        export_onnx(tmp_path / "run", tmp_path / "dyn.onnx", batch_size=None)
    assert not (tmp_path / "dyn.onnx").exists()
