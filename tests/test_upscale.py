"""`jattn upscale`: whole images and tiles agree, folder mode, clear errors."""

import numpy as np
import pytest
from PIL import Image

from jattn.cli import main
from jattn.export.upscale import Upscaler
from jattn.train.loop import train
from task_helpers import count_loads_and_compiles
from toy import toy_config, train_toy_sr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sr")
    assert train_toy_sr(wd, total=3)["step"] == 3
    return wd


def test_tiles_equal_the_whole_image(workdir):
    up = Upscaler.from_checkpoint(workdir)
    image = np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)
    whole = up(image)
    assert whole.shape == (74, 100, 3) and whole.dtype == np.uint8
    # overlap >= the network's receptive radius: tiles reproduce the whole exactly
    np.testing.assert_array_equal(up(image, tile=16, overlap=4), whole)
    # no overlap: the tile borders differ (the check above is not vacuous)
    assert not np.array_equal(up(image, tile=16, overlap=0), whole)


def test_cli_file_and_folder(workdir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for name, size in (("a", (20, 24)), ("b", (17, 9))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
    assert main(["upscale", "--checkpoint", str(workdir), "--image", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == (40, 48, 3)
    assert np.asarray(Image.open(tmp_path / "out" / "b.png")).shape == (34, 18, 3)
    assert main(["upscale", "--checkpoint", str(workdir), "--image", str(tmp_path / "in" / "a.png"),
                 "--output", str(tmp_path / "one.png"), "--tile", "8"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "out" / "a.png")))
    capsys.readouterr()


def test_bad_inputs(workdir, tmp_path, capsys):
    from toy import toy_config as cfg  # noqa: F401  (an inpainting checkpoint for the wrong-model case)

    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases = [
        (["--checkpoint", str(workdir), "--image", str(tmp_path / "missing.png")], "image not found"),
        (["--checkpoint", str(workdir), "--image", str(tmp_path / "bad.png")], "not a readable image"),
        (["--checkpoint", str(tmp_path / "nowhere"), "--image", str(tmp_path / "bad.png")], "checkpoint not found"),
    ]
    for args, message in cases:
        code = main(["upscale", *args, "--output", str(tmp_path / "out.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out.png").exists()


def test_an_inpainting_checkpoint_is_refused(tmp_path, capsys):
    wd = tmp_path / "inpaint"
    cfg = toy_config(total=1)
    cfg.image_every = 0
    train(cfg, wd, progress=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    code = main(["upscale", "--checkpoint", str(wd), "--image", str(tmp_path / "x.png"), "--output", str(tmp_path / "o.png")])
    assert code == 2 and "not a super-resolution model" in capsys.readouterr().err


def test_repeated_python_api_calls_load_and_compile_once(workdir, tmp_path, monkeypatch):
    import shutil

    from jattn.export import upscale as module

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    image = np.random.default_rng(2).integers(0, 255, (21, 18, 3), dtype=np.uint8)
    latest = wd / "checkpoints" / str(max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()))
    with count_loads_and_compiles(module, monkeypatch) as (restores, compiles):
        first = module.upscale(wd, image)
        assert first.shape == (42, 36, 3) and len(restores) == 1 and compiles
        compiled = len(compiles)
        np.testing.assert_array_equal(module.upscale(wd, image), first)
        np.testing.assert_array_equal(module.upscale(latest, image), first)  # the same checkpoint
        assert len(restores) == 1 and len(compiles) == compiled  # neither restored nor compiled again
        np.testing.assert_array_equal(module.upscale(wd, image, tile=8, overlap=4), first)
        tiled = len(compiles)
        module.upscale(wd, image, tile=8, overlap=4)
        assert len(restores) == 1 and len(compiles) == tiled
        shutil.copytree(latest, wd / "checkpoints" / "9")  # a newer checkpoint
        np.testing.assert_array_equal(module.upscale(wd, image), first)
        assert len(restores) == 2


def test_out_of_memory_is_one_line_naming_tiles(workdir, tmp_path, capsys, monkeypatch):
    import jax

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9000000000 bytes.")

    real = Upscaler.__init__

    def patched(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self._predict = exhausted

    monkeypatch.setattr(Upscaler, "__init__", patched)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "x.png")
    code = main(["upscale", "--checkpoint", str(workdir), "--image", str(tmp_path / "x.png"), "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory upscaling 24x20 pixels at once (RESOURCE_EXHAUSTED" in err and "--tile" in err
    assert not (tmp_path / "o.png").exists()
