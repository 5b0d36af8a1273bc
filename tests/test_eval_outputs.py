"""`jattn eval --save-outputs DIR`: every evaluated example as PNG files, scored by a standard
tool to the reported metrics (up to 8-bit rounding); bad folders are one-line errors that
leave nothing behind."""

import json

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from jattn.cli import main
from jattn.train.loop import train
from toy import toy_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy inpainting workdir of 2 steps with 16 eval images (16 x 16)."""
    workdir = tmp_path_factory.mktemp("inpaint") / "run"
    config = toy_config(total=2)
    config.image_every = 0
    config.eval_images = 16
    train(config, workdir, progress=False)
    return workdir


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.float64) / 255.0


def test_saved_outputs_score_to_the_reported_metrics(trained, tmp_path, capsys):
    out_dir = tmp_path / "outputs"
    code, out, err = _eval(capsys, "--workdir", trained, "--save-outputs", out_dir)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(f"{i:04d}_{k}.png" for i in range(16) for k in ("output", "target", "mask"))
    assert not list(tmp_path.glob(".outputs*"))  # no temporary folder left
    psnrs, ssims, hole_l1 = [], [], []
    for i in range(16):
        output, target = _read(out_dir / f"{i:04d}_output.png"), _read(out_dir / f"{i:04d}_target.png")
        mask = _read(out_dir / f"{i:04d}_mask.png")
        assert output.shape == target.shape == (16, 16, 3) and mask.shape == (16, 16)
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.mean() > 0
        known = mask == 0  # the composited output keeps the known pixels (up to the 8-bit rounding)
        np.testing.assert_allclose(output[known], target[known], atol=1 / 255 + 1e-9)
        psnrs.append(sk_psnr(target, output, data_range=1.0))
        ssims.append(sk_ssim(target, output, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                             data_range=1.0, channel_axis=-1))
        hole_l1.append(np.abs(output - target)[~known].sum() / (16 * 16 * 3))
    assert abs(np.mean(psnrs) - result["eval_psnr"]) < 0.1
    assert abs(np.mean(ssims) - result["eval_ssim"]) < 5e-3
    # the metrics' L1 is on [-1, 1]: twice the [0, 1] difference
    assert abs(2 * np.mean([np.abs(_read(out_dir / f"{i:04d}_output.png") - _read(out_dir / f"{i:04d}_target.png")).mean()
                            for i in range(16)]) - result["eval_l1"]) < 5e-3


def test_bad_output_folders_are_one_line_errors(trained, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.png").write_bytes(b"keep")
    file = tmp_path / "file"
    file.write_text("mine")
    for target, words in [(full, "the folder is not empty"), (file, "a file, not a folder"),
                          (file / "sub", "a file, not a folder")]:
        code, out, err = _eval(capsys, "--workdir", trained, "--save-outputs", target)
        assert code == 2 and "Traceback" not in out + err
        assert len(err.strip().splitlines()) == 1 and f"cannot save outputs to {target}" in err and words in err
    assert (full / "mine.png").read_bytes() == b"keep" and file.read_text() == "mine"


def test_a_failed_evaluation_leaves_no_partial_folder(trained, tmp_path, capsys, monkeypatch):
    import jattn.train.evaluate as ev

    calls = []
    real = ev._ImageWriter.write

    def failing(self, images):
        calls.append(1)
        if len(calls) == 2:
            raise ev.SaveOutputsError(f"cannot save outputs to {self.directory}: No space left on device")
        return real(self, images)

    monkeypatch.setattr(ev._ImageWriter, "write", failing)
    target = tmp_path / "outputs"
    code, out, err = _eval(capsys, "--workdir", trained, "--save-outputs", target)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not target.exists() and not list(tmp_path.glob(".outputs*"))


def test_a_task_without_image_outputs_is_refused(tmp_path):
    import jax.numpy as jnp

    from jattn.train.evaluate import SaveOutputsError, saved_images

    batch = {"image": jnp.zeros((2, 8, 8, 3))}
    with pytest.raises(SaveOutputsError, match="not an image"):
        saved_images({"output": jnp.zeros((2, 10))}, batch)  # a classifier's logits
    images = saved_images({"output": jnp.full((2, 8, 8, 3), 1.5)}, {**batch, "mask": jnp.ones((2, 8, 8, 1))})
    assert images["output"].dtype == jnp.uint8 and int(images["output"].max()) == 255  # clipped
    assert int(images["target"][0, 0, 0, 0]) == 128 and int(images["mask"].min()) == 255
    # super-resolution gives its own target; segmentation a coloured label map beside its logits
    sr = saved_images({"output": jnp.zeros((2, 16, 16, 3)), "target": jnp.ones((2, 16, 16, 3))}, batch)
    assert sr["output"].shape == (2, 16, 16, 3) and int(sr["target"].min()) == 255 and "mask" not in sr
    seg = saved_images({"output": jnp.zeros((2, 8, 8, 4)), "labels": -jnp.ones((2, 8, 8, 3))}, batch)
    assert int(seg["output"].max()) == 0


# --------------------------------------------------------------------------- FID, KID, LPIPS


def test_fid_kid_and_lpips_of_the_outputs_against_the_targets(trained, tmp_path, capsys, monkeypatch):
    """With weight files named in the config, eval reports FID and KID of the outputs' Inception
    features against the targets' and the mean LPIPS; stand-in networks record what they see."""
    import jax.numpy as jnp

    import jattn.gan_metrics as gm
    import jattn.lpips as lp

    seen = []

    def inception(images):  # (pool features, logits) like the FID Inception's
        seen.append(np.asarray(images))
        feats = jnp.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=-1)
        return feats, feats

    monkeypatch.setattr(gm, "inception_network", lambda path: inception)
    monkeypatch.setattr(lp, "lpips_network", lambda path, net: lambda a, b: jnp.abs(a - b).mean(axis=(1, 2, 3)))
    monkeypatch.setattr(lp, "lpips_min_size", lambda net: 16)
    for name in ("inception.npz", "lpips.npz"):
        (tmp_path / name).write_bytes(b"stand-in")
    code, out, err = _eval(capsys, "--workdir", trained, "--set", f"eval_inception_weights={tmp_path / 'inception.npz'}",
                           "--set", f"eval_lpips_weights={tmp_path / 'lpips.npz'}")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    # the stand-in LPIPS is the per-image mean |output - target|: the whole image's L1
    np.testing.assert_allclose(result["eval_lpips"], result["eval_l1"], rtol=1e-5)
    fake, real = np.concatenate(seen[0::2]), np.concatenate(seen[1::2])
    assert fake.shape == real.shape == (16, 16, 16, 3) and not np.array_equal(fake, real)
    feats = [np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1).astype(np.float64) for x in (fake, real)]
    fid = gm.frechet_distance(feats[0].mean(0), np.cov(feats[0], rowvar=False), feats[1].mean(0),
                              np.cov(feats[1], rowvar=False))
    kid, _ = gm.kernel_inception_distance(feats[0], feats[1], subset_size=16)
    np.testing.assert_allclose(result["eval_fid"], fid, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result["eval_kid"], kid, rtol=1e-4, atol=1e-7)


def test_unusable_metric_weights_are_one_line_errors(trained, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in trained.glob("eval_*.json")}
    missing = tmp_path / "nowhere.npz"
    code, out, err = _eval(capsys, "--workdir", trained, "--set", f"eval_inception_weights={missing}")
    assert code == 2 and "Traceback" not in out + err and len(err.strip().splitlines()) == 1
    assert "eval_inception_weights" in err and "not found" in err and str(missing) in err
    lpips_file = tmp_path / "lpips.npz"
    np.savez(lpips_file, x=np.zeros(1))
    code, out, err = _eval(capsys, "--workdir", trained, "--set", f"eval_lpips_weights={lpips_file}")
    assert code == 2 and "eval_lpips_weights" in err and "smaller than LPIPS alex's 31 px" in err
    assert {p.name: p.read_bytes() for p in trained.glob("eval_*.json")} == before  # nothing written
