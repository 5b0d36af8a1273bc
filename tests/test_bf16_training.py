"""A DeepFill v1 training run with bfloat16 compute: fp32 params, finite losses that fall,
and a first step that agrees with the float32 run to bf16 precision."""

import numpy as np
import pytest

from jattn.cli import main
from jattn.train.logging import read_metrics
from test_demo import TINY


def _train(workdir, steps, dtype):
    args = ["train", "--config", "configs/demo.py", "--workdir", str(workdir), "--no-progress"]
    for item in TINY + [f"total_steps={steps}", f"compute_dtype={dtype}", "eval_every=0", "image_every=0",
                        "checkpoint_every=0"]:
        args += ["--set", item]
    assert main(args) == 0
    return [r for r in read_metrics(workdir) if "g_loss" in r]


@pytest.mark.slow  # two DeepFill compilations (about 2 minutes on 2 cores)
def test_bf16_training_run(tmp_path, monkeypatch):
    import pathlib

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    bf16 = _train(tmp_path / "bf16", 8, "bfloat16")
    fp32 = _train(tmp_path / "fp32", 1, "float32")
    for r in bf16:
        assert all(np.isfinite(r[k]) for k in ("g_loss", "d_loss", "l1_loss", "ae_loss", "gp_loss"))
    assert bf16[-1]["l1_loss"] < bf16[0]["l1_loss"] and bf16[-1]["ae_loss"] < bf16[0]["ae_loss"]
    for k in ("l1_loss", "ae_loss"):  # same data, same init: equal to bf16 rounding
        np.testing.assert_allclose(bf16[0][k], fp32[0][k], rtol=3e-2)
    # parameters (and so checkpoints) stay float32
    from jattn.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "bf16" / "checkpoints")
    try:
        meta = ckpt.restore_config(None)
    finally:
        ckpt.close()
    assert meta["compute_dtype"] == "bfloat16"
    from jattn.export.formats import export_safetensors
    from safetensors.numpy import load_file

    export_safetensors(tmp_path / "bf16", tmp_path / "g.safetensors")
    assert {v.dtype for v in load_file(tmp_path / "g.safetensors").values()} == {np.dtype(np.float32)}
