"""The official DeepFill checkpoints through jattn import-deepfill then jattn inpaint."""

import numpy as np
import pytest
from PIL import Image

from jattn.cli import main


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_import_then_inpaint_reproduces_the_official_output(golden_dir, tmp_path, version):
    root = golden_dir / "deepfill_official" / f"{version}_seed1"
    golden = np.load(root / "golden.npz")
    workdir = tmp_path / "imported"
    assert main(["import-deepfill", "--checkpoint", str(root / "ckpt" / "snap-0"), "--version", version,
                 "--output", str(workdir)]) == 0
    mask = Image.fromarray((golden["mask"][0, ..., 0] * 255).astype(np.uint8))
    n = golden["images_raw_bgr"].shape[0]
    for folder in ("in", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(n):
        Image.fromarray(golden["images_raw_bgr"][i][..., ::-1]).save(tmp_path / "in" / f"in{i}.png")  # RGB file
        mask.save(tmp_path / "masks" / f"in{i}.png")
    # folder mode: the images go through one model call (one compile)
    assert main(["inpaint", "--checkpoint", str(workdir), "--image", str(tmp_path / "in"),
                 "--mask", str(tmp_path / "masks"), "--output", str(tmp_path / "out")]) == 0
    for i in range(n):
        out = np.asarray(Image.open(tmp_path / "out" / f"in{i}.png")).astype(int)
        diff = np.abs(out - golden["output_uint8"][i].astype(int))
        assert diff.max() <= 2, f"image {i}: max difference {diff.max()} levels"


def test_import_refuses_an_existing_workdir_and_the_wrong_version(golden_dir, tmp_path, capsys):
    ckpt = str(golden_dir / "deepfill_official" / "v1_seed1" / "ckpt" / "snap-0")
    assert main(["import-deepfill", "--checkpoint", ckpt, "--output", str(tmp_path / "w")]) == 0
    assert main(["import-deepfill", "--checkpoint", ckpt, "--output", str(tmp_path / "w")]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    # a v1 checkpoint read as v2: the shapes do not fit the v2 generator, said in one line
    assert main(["import-deepfill", "--checkpoint", ckpt, "--version", "v2", "--output", str(tmp_path / "v2")]) == 2
    err = capsys.readouterr().err
    assert "DeepFill v2 generator" in err and len(err.strip().splitlines()) == 1, err
    assert "does not match the model (scope 'inpaint_net/'): 82 of the wrong shape" in err
    assert err.strip().endswith("it is a DeepFill v1 generator: import it as v1 (--version v1)"), err
    assert not (tmp_path / "v2" / "checkpoints").exists()
    assert main(["import-deepfill", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2


def test_imported_model_exports_with_contextual_attention(golden_dir, tmp_path):
    import jax

    root = golden_dir / "deepfill_official" / "v1_seed1"
    golden = np.load(root / "golden.npz")
    workdir = tmp_path / "imported"
    assert main(["import-deepfill", "--checkpoint", str(root / "ckpt"), "--output", str(workdir)]) == 0
    assert main(["export", "--workdir", str(workdir), "--format", "jax-export", "--output", str(tmp_path / "m.jax")]) == 0
    exported = jax.export.deserialize(bytearray((tmp_path / "m.jax").read_bytes()))
    mask = np.repeat(golden["mask"], 2, axis=0)
    got = np.asarray(exported.call(golden["batch_pos"][..., ::-1].copy(), mask))  # RGB in, RGB out
    np.testing.assert_allclose(got, golden["batch_complete"][..., ::-1], atol=1e-4)
    # jattn inpaint runs the export itself (symbolic H, W): the official output within 2 levels
    Image.fromarray((golden["mask"][0, ..., 0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(golden["images_raw_bgr"][0][..., ::-1]).save(tmp_path / "in.png")
    assert main(["inpaint", "--checkpoint", str(tmp_path / "m.jax"), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")]) == 0
    diff = np.abs(np.asarray(Image.open(tmp_path / "out.png")).astype(int) - golden["output_uint8"][0].astype(int))
    assert diff.max() <= 2, f"max difference {diff.max()} levels"
