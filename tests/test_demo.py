"""The main job end to end at tiny sizes: DeepFill v1 trains on bundled photos, then inpaints."""

import json

import numpy as np
from PIL import Image

from jattn.cli import main
from jattn.train.logging import read_metrics

TINY = [
    "total_steps=8",
    "learning_rate=1e-3",
    "log_every=1",
    "n_critic=2",
    "batch_size=8",
    "model.cnum=4",
    "model.critic_cnum=4",
    "model.local_size=16",
    "data.image_size=32",
    "data.source={'kind': 'sample_photos', 'num_examples': 32, 'crop_size': 32}",
    "data.mask={'kind': 'box', 'hole_size': [16, 16], 'margin': [2, 2], 'max_delta': [4, 4]}",
    "eval_every=8",
    "eval_images=8",
    "image_every=8",
    "checkpoint_every=4",
]


def test_demo_trains_deepfill_then_inpaints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as the README's `jattn demo` (workdirs/demo, demo_out)
    args = ["demo", "--workdir", "run", "--output", "out"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 8
    records = read_metrics(tmp_path / "run")
    train_logs = [r for r in records if "g_loss" in r]
    assert [r["step"] for r in train_logs] == list(range(1, 9))
    # a short run lowers the reconstruction losses
    assert train_logs[-1]["l1_loss"] < train_logs[0]["l1_loss"]
    assert train_logs[-1]["ae_loss"] < train_logs[0]["ae_loss"]
    last = [r for r in records if "d_loss" in r][-1]
    for key in ("d_loss", "g_loss", "l1_loss", "ae_loss", "gp_loss", "d_loss_local", "d_loss_global"):
        assert np.isfinite(last[key]), key
    assert any("eval_psnr" in r for r in records)
    inp = np.asarray(Image.open(tmp_path / "out" / "input.png"))
    out = np.asarray(Image.open(tmp_path / "out" / "inpainted.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png"))[..., 0] > 127
    assert out.shape == inp.shape == (128, 128, 3)
    np.testing.assert_array_equal(out[~mask], inp[~mask])  # known pixels kept exactly
    assert (tmp_path / "out" / "flow.png").is_file()
