"""`jattn inpaint` and `jattn.inpaint`: any size and mode, known pixels kept, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

import jattn
from jattn.cli import main
from jattn.export.inference import InpaintError, Inpainter, read_image
from jattn.train.loop import train
from task_helpers import count_loads_and_compiles
from toy import toy_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    cfg = toy_config(total=2)
    cfg.image_every = 0
    train(cfg, wd, progress=False)
    return wd


def _write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _mask(h, w):
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2, w // 3 : 2 * w // 3] = 255
    return m


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_odd_sizes_and_modes_keep_known_pixels(workdir, tmp_path, mode):
    h, w = 37, 53
    rng = np.random.default_rng(0)
    if mode == "I;16":
        src = rng.integers(0, 65535, (h, w), dtype=np.uint16)
        img = Image.fromarray(src)
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "in.png")
    _write(tmp_path / "mask.png", _mask(h, w))
    code = main(["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")])
    assert code == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    ref = read_image(tmp_path / "in.png")
    assert out.shape == (h, w, 3) and ref.shape == (h, w, 3)
    known = _mask(h, w) == 0
    np.testing.assert_array_equal(out[known], ref[known])


def test_python_api_and_checkpoint_step_folder(workdir):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    hole = _mask(40, 48) > 0
    a = jattn.inpaint(workdir, image, hole)
    b = jattn.inpaint(workdir / "checkpoints" / "2", image, hole)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[~hole], image[~hole])
    assert not np.array_equal(a[hole], image[hole])  # the hole was filled by the model
    inpainter = Inpainter.from_checkpoint(workdir)
    np.testing.assert_array_equal(inpainter(image, hole), a)


def test_folder_mode_pairs_by_name(workdir, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    rng = np.random.default_rng(2)
    for name, (h, w) in {"a": (32, 32), "b": (45, 29), "c": (32, 32)}.items():
        _write(tmp_path / "img" / f"{name}.jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        _write(tmp_path / "msk" / f"{name}.png", _mask(h, w))
    code = main(["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "img"),
                 "--mask", str(tmp_path / "msk"), "--output", str(tmp_path / "out"), "--batch-size", "2"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "b.png")).shape == (45, 29, 3)
    # batched (a and c share a size) equals one image at a time
    inpainter = Inpainter.from_checkpoint(workdir)
    for name in ("a", "b", "c"):
        image = read_image(tmp_path / "img" / f"{name}.jpg")
        hole = np.asarray(Image.open(tmp_path / "msk" / f"{name}.png")) > 127
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), inpainter(image, hole))


def _run_bad(args, capsys):
    code = main(["inpaint", *args])
    err = capsys.readouterr().err
    return code, err


def test_bad_inputs_give_one_line_errors_and_no_output(workdir, tmp_path, capsys):
    good_img = _write(tmp_path / "in.png", np.zeros((32, 32, 3), np.uint8))
    good_mask = _write(tmp_path / "mask.png", _mask(32, 32))
    small_mask = _write(tmp_path / "small.png", _mask(16, 32))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "imgs").mkdir()
    _write(tmp_path / "imgs" / "x.png", np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "out.png"
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "checkpoint not found"),
        (["--checkpoint", str(tmp_path)], "not a jattn workdir"),
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(garbage)], "not a readable image"),
        (["--mask", str(small_mask)], "mask is 32x16 but the image is 32x32"),
        (["--mask", str(garbage)], "not a readable mask"),
        (["--image", str(tmp_path / "imgs"), "--mask", str(tmp_path / "empty")], "no mask images"),
    ]
    for override, message in cases:
        args = {"--checkpoint": str(workdir), "--image": str(good_img), "--mask": str(good_mask), "--output": str(out)}
        for k, v in zip(override[::2], override[1::2]):
            args[k] = v
        code, err = _run_bad([x for kv in args.items() for x in kv], capsys)
        assert code == 2, (override, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
        assert not list(tmp_path.glob(".*.tmp"))


def test_safetensors_export_matches_the_checkpoint(workdir, tmp_path, capsys):
    import json

    from safetensors.numpy import load_file

    from jattn.export.formats import load_safetensors

    out = tmp_path / "gen.safetensors"
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(out)]) == 0
    flat = load_file(str(out))  # plain NumPy, no jattn needed
    inpainter = Inpainter.from_checkpoint(workdir)
    params = inpainter.params["generator"]
    expected = {f"params/{layer}/{name}": np.asarray(v) for layer, d in params.items() for name, v in d.items()}
    assert set(flat) == set(expected)
    for k, v in expected.items():
        assert flat[k].dtype == np.float32
        np.testing.assert_array_equal(flat[k], v)
    nested, meta = load_safetensors(out)
    assert json.loads(meta["model"]) == {"name": "toy_gan"} and meta["step"] == "2" and meta["network"] == "generator"
    code = main(["export", "--workdir", str(tmp_path / "nowhere"), "--format", "safetensors", "--output", str(out)])
    assert code == 2 and "not a jattn workdir" in capsys.readouterr().err


def test_jax_export_runs_without_jattn_model_code(workdir, tmp_path):
    import jax

    out = tmp_path / "model.jax"
    assert main(["export", "--workdir", str(workdir), "--format", "jax-export", "--output", str(out)]) == 0
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    inpainter = Inpainter.from_checkpoint(workdir)
    rng = np.random.default_rng(5)
    for batch in (1, 3):  # the batch size is symbolic
        image = rng.integers(0, 255, (batch, 16, 16, 3), dtype=np.uint8)
        hole = np.zeros((batch, 16, 16), bool)
        hole[:, 4:10, 3:12] = True
        x = image.astype(np.float32) / 127.5 - 1.0
        got = np.asarray(exported.call(x, hole[..., None].astype(np.float32)))
        for i in range(batch):
            ref = inpainter.predict(image[i], hole[i])["output"]
            np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_inpaint_from_a_jax_export_of_any_size(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.jax"
    assert main(["export", "--workdir", str(workdir), "--format", "jax-export", "--output", str(out)]) == 0
    meta = json.loads((tmp_path / "model.jax.json").read_text())
    assert meta["spatial"] == "any" and meta["multiple"] == 8 and meta["verified_max_abs_diff"] <= 1e-5
    h, w = 37, 53  # padded to 40 x 56 by reflection: not the trained 16 x 16
    rng = np.random.default_rng(7)
    _write(tmp_path / "in.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    _write(tmp_path / "mask.png", _mask(h, w))
    args = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(["inpaint", "--checkpoint", str(out), *args, "--output", str(tmp_path / "a.png")]) == 0
    assert main(["inpaint", "--checkpoint", str(workdir), *args, "--output", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in "ab")
    assert a.shape == (h, w, 3) and np.abs(a - b).max() <= 1  # the export equals the checkpoint
    image = read_image(tmp_path / "in.png")
    np.testing.assert_array_equal(jattn.inpaint(str(out), image, _mask(h, w) > 0), a.astype(np.uint8))
    capsys.readouterr()
    # no flow in an export: refused before anything is written
    assert main(["inpaint", "--checkpoint", str(out), *args, "--output", str(tmp_path / "c.png"), "--save-flow"]) == 2
    assert "no attention flow" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    # a file that is not an export, and --config with an export
    (tmp_path / "junk.jax").write_bytes(b"not an export")
    assert main(["inpaint", "--checkpoint", str(tmp_path / "junk.jax"), *args, "--output", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert "not a jattn workdir, checkpoint folder or jax-export file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.png").exists()
    # an export's attention is compiled in: no memory budget; running out of memory is one line
    with pytest.raises(InpaintError, match="--max-memory applies to checkpoints only"):
        Inpainter.from_checkpoint(out, max_memory="1GB")
    assert main(["inpaint", "--checkpoint", str(out), *args, "--output", str(tmp_path / "e.png"), "--max-memory", "8GB"]) == 2
    assert "--max-memory applies to checkpoints only" in capsys.readouterr().err
    import jax

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 86000000000 bytes.")

    monkeypatch.setattr(jax.export.Exported, "call", exhausted)
    assert main(["inpaint", "--checkpoint", str(out), *args, "--output", str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"out of memory inpainting a {w}x{h} image (RESOURCE_EXHAUSTED" in err and "attention blocks are fixed" in err
    assert "--max-memory" in err and not (tmp_path / "e.png").exists()


def test_a_fixed_size_jax_export_takes_images_up_to_its_size(workdir, tmp_path, capsys):
    import jax

    out = tmp_path / "fixed.jax"
    assert main(["export", "--workdir", str(workdir), "--format", "jax-export", "--spatial", "fixed",
                 "--output", str(out)]) == 0
    assert jax.export.deserialize(bytearray(out.read_bytes())).in_avals[0].shape[1:] == (16, 16, 3)
    inpainter = Inpainter.from_checkpoint(out)
    rng = np.random.default_rng(8)
    image = rng.integers(0, 255, (11, 14, 3), dtype=np.uint8)
    hole = _mask(11, 14) > 0
    done = inpainter(image, hole)
    np.testing.assert_array_equal(done[~hole], image[~hole])
    with pytest.raises(InpaintError, match="at most 16x16"):
        inpainter(rng.integers(0, 255, (24, 16, 3), dtype=np.uint8), np.ones((24, 16), bool))
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--spatial", "fixed",
                 "--output", str(tmp_path / "w.safetensors")]) == 2
    assert "--spatial applies to jax-export" in capsys.readouterr().err


def test_a_config_that_does_not_match_the_checkpoint_is_one_line(workdir, tmp_path, capsys):
    rng = np.random.default_rng(2)
    _write(tmp_path / "in.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    _write(tmp_path / "mask.png", _mask(16, 16))
    cases = {
        "width": ("import toy\ndef get_config():\n    return toy.toy_config(width=16)\n", "does not match the config's model"),
        "name": ("import toy\ndef get_config():\n    c = toy.toy_config()\n    c.model.name = 'toy_classifier'\n    return c\n",
                 "the config is for model 'toy_classifier' but the checkpoint holds 'toy_gan'"),
    }
    import sys, pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.py").write_text(text)
        code = main(["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png"), "--config", str(tmp_path / f"{name}.py")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out.png").exists()


# --------------------------------------------------------------------------- memory


def _deepfill_checkpoint(root, cnum=4):
    """A DeepFill v1 workdir (checkpoint 0) with random weights of the model's shapes: what
    is tested here (memory, blocks, caching) does not depend on trained values."""
    import ml_collections

    from jattn.export.inference import write_random_checkpoint

    return write_random_checkpoint(root, ml_collections.ConfigDict({
        "model": {"name": "deepfill_v1", "cnum": cnum, "critic_cnum": 4, "local_size": 16},
        "data": {"image_size": 32}, "learning_rate": 1e-4, "seed": 0}))


@pytest.fixture(scope="module")
def deepfill_workdir(tmp_path_factory):
    return _deepfill_checkpoint(tmp_path_factory.mktemp("deepfill"))


def test_blocks_are_chosen_where_dense_attention_does_not_fit(deepfill_workdir):
    # 636 x 640 pads to 640 x 640: an 80 x 80 attention grid, whose dense scores dominate
    h, w = 636, 640
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    hole = _mask(h, w) > 0
    roomy = Inpainter.from_checkpoint(deepfill_workdir, max_memory="1TB")
    dense = roomy.plan(h, w)
    assert dense.block_size is None and dense.budget == 10**12 and dense.needed > 0
    expected = roomy.predict(image, hole)
    tight = Inpainter.from_checkpoint(deepfill_workdir, max_memory=dense.needed - 1)
    blocked = tight.plan(h, w)
    assert blocked.block_size is not None and blocked.needed <= blocked.budget == dense.needed - 1
    assert blocked.block_size % (w // 8) == 0  # whole rows of the attention grid
    got = tight.predict(image, hole)
    assert set(got) == set(expected) and {"output", "flow"} <= set(got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(tight(image, hole)[~hole], image[~hole])


def test_an_image_that_does_not_fit_is_one_line_naming_the_option(deepfill_workdir, workdir, tmp_path, capsys,
                                                                  monkeypatch):
    from jattn.export import inference

    _write(tmp_path / "in.png", np.zeros((64, 56, 3), np.uint8))
    _write(tmp_path / "mask.png", _mask(64, 56))
    monkeypatch.setattr(inference, "default_memory_budget", lambda device=None: 10**6)
    monkeypatch.setattr(inference, "default_memory_limit", lambda device=None: 10**6)
    code = main(["inpaint", "--checkpoint", str(deepfill_workdir), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "a 56x64 image needs" in err and "with the smallest attention blocks" in err and "over the 1 MB allowed" in err
    assert "--max-memory" in err and not (tmp_path / "out.png").exists()
    # --max-memory; a model without contextual attention is held to the budget too
    args = ["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "in.png"), "--mask",
            str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")]
    for size, message in (("1KB", "a 56x64 image needs"), ("1KB", "over the 1 KB allowed (--max-memory / max_memory=)"),
                          ("8XB", "--max-memory / max_memory='8XB' is not a memory size")):
        assert main([*args, "--max-memory", size]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(InpaintError, match=r"a 16x16 image needs .* over the 1 KB allowed .*max_memory="):
        Inpainter.from_checkpoint(workdir, max_memory=1000)(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16), bool))
    for bad in ("8XB", "-1GB", 0, "lots"):
        with pytest.raises(InpaintError, match="not a memory size"):
            Inpainter.from_checkpoint(workdir, max_memory=bad)


def test_an_image_over_the_default_budget_runs_with_the_smallest_blocks_within_the_limit(deepfill_workdir,
                                                                                      monkeypatch):
    from jattn.export import inference

    h, w = 64, 56
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    hole = _mask(h, w) > 0
    expected = Inpainter.from_checkpoint(deepfill_workdir, max_memory="1TB").predict(image, hole)
    monkeypatch.setattr(inference, "default_memory_budget", lambda device=None: 10**6)
    monkeypatch.setattr(inference, "default_memory_limit", lambda device=None: 10**12)
    inpainter = Inpainter.from_checkpoint(deepfill_workdir)
    plan = inpainter.plan(h, w)
    assert plan.block_size == w // 8 and plan.budget == 10**12 and 10**6 < plan.needed  # one row of the grid
    got = inpainter.predict(image, hole)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)
    # two images at once do not use the limit: they run one at a time
    with pytest.raises(InpaintError, match="inpainting 2 images of 56x64 at once needs .* over the 1 MB allowed"):
        inpainter.plan(h, w, batch=2)
    monkeypatch.setattr(inference, "default_memory_limit", lambda device=None: plan.needed - 1)
    with pytest.raises(InpaintError, match=r"a 56x64 image needs .* over the .* allowed \(the default: 0.67 of the"):
        Inpainter.from_checkpoint(deepfill_workdir).plan(h, w)


def test_a_batch_that_does_not_fit_runs_in_smaller_batches(workdir):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    holes = np.zeros((4, 16, 16), bool)
    holes[:, 4:12, 4:12] = True
    roomy = Inpainter.from_checkpoint(workdir, max_memory="1GB")
    two, four = roomy.plan(16, 16, batch=2).needed, roomy.plan(16, 16, batch=4).needed
    assert two < four
    tight = Inpainter.from_checkpoint(workdir, max_memory=(two + four) // 2)
    with pytest.raises(InpaintError, match="inpainting 4 images of 16x16 at once needs"):
        tight.plan(16, 16, batch=4)
    assert tight.plan(16, 16, batch=2).needed == two
    np.testing.assert_array_equal(tight.complete_batch(images, holes), roomy.complete_batch(images, holes))


def test_out_of_memory_while_running_is_one_line(workdir, tmp_path, capsys, monkeypatch):
    import jax

    _write(tmp_path / "in.png", np.zeros((16, 16, 3), np.uint8))
    _write(tmp_path / "mask.png", _mask(16, 16))

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 86000000000 bytes.")

    monkeypatch.setattr(jax.stages.Compiled, "__call__", exhausted)
    code = main(["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory inpainting a 16x16 image (RESOURCE_EXHAUSTED" in err and "--max-memory" in err
    assert not (tmp_path / "out.png").exists()


def test_repeated_python_api_calls_load_and_compile_once(workdir, tmp_path, monkeypatch):
    import shutil

    from jattn.export import inference

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    rng = np.random.default_rng(6)
    image = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    hole = _mask(24, 20) > 0
    with count_loads_and_compiles(inference, monkeypatch) as (restores, compiles):
        first = jattn.inpaint(wd, image, hole)
        assert len(restores) == 1 and compiles
        compiled = len(compiles)
        for _ in range(3):
            np.testing.assert_array_equal(jattn.inpaint(wd, image, hole), first)
        assert len(restores) == 1 and len(compiles) == compiled  # neither restored nor compiled again
        jattn.inpaint(wd / "checkpoints" / "2", image, hole)  # the same checkpoint by its folder
        assert len(restores) == 1 and len(compiles) == compiled
        # a newer checkpoint in the workdir is loaded anew
        shutil.copytree(wd / "checkpoints" / "2", wd / "checkpoints" / "4")
        np.testing.assert_array_equal(jattn.inpaint(wd, image, hole), first)
        assert len(restores) == 2
        jattn.inpaint(wd / "checkpoints" / "2", image, hole)
        assert len(restores) == 2
        # bounded: a third checkpoint pushes out the least recently used (4)
        shutil.copytree(wd / "checkpoints" / "2", wd / "checkpoints" / "6")
        jattn.inpaint(wd, image, hole)
        jattn.inpaint(wd / "checkpoints" / "2", image, hole)
        assert len(restores) == 3 and len(inference.LOADED) == 2
        jattn.inpaint(wd / "checkpoints" / "4", image, hole)
        assert len(restores) == 4
    with pytest.raises(InpaintError, match="max_memory applies to a path"):
        jattn.inpaint(Inpainter.from_checkpoint(workdir), image, hole, max_memory="1GB")
