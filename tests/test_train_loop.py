"""The training loop on a small GAN task: exact resume, extension, non-finite handling, logs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jattn.train.checkpoint import Checkpointer
from jattn.train.logging import read_metrics
from jattn.train.loop import ConfigMismatchError, NonFiniteLossError, train
from jattn.train.steps import Update
from jattn.train.task import Task, make_optimizer, register_task


class _G(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Conv(3, (3, 3))(nn.elu(nn.Conv(8, (3, 3))(x))))


class _D(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.leaky_relu(nn.Conv(8, (3, 3), strides=4)(x), 0.2).reshape(x.shape[0], -1))


@register_task("toy_gan")
def _toy_task(config):
    g, d = _G(), _D()
    poison = float(config.model.get("poison_after", -1))

    def init(key, batch):
        return {"generator": g.init(key, batch["image"])["params"], "critic": d.init(key, batch["image"])["params"]}, {}

    def fake(params, batch):
        return g.apply({"params": params["generator"]}, batch["image"] * (1 - batch["mask"]))

    def d_loss(params, variables, batch, key):
        f = jax.lax.stop_gradient(fake(params, batch)) + 0.01 * jax.random.normal(key, batch["image"].shape)
        loss = jnp.mean(d.apply({"params": params["critic"]}, f)) - jnp.mean(d.apply({"params": params["critic"]}, batch["image"]))
        return loss, ({}, {})

    def g_loss(params, variables, batch, key):
        f = fake(params, batch)
        loss = jnp.mean(jnp.abs(f - batch["image"])) - 0.01 * jnp.mean(d.apply({"params": params["critic"]}, f))
        if poison >= 0:  # NaN once the generator's bias has moved (a deterministic "blow-up")
            loss = loss * jnp.where(jnp.abs(params["generator"]["Conv_1"]["bias"][0]) > poison, jnp.nan, 1.0)
        return loss, ({"l1_loss": jnp.mean(jnp.abs(f - batch["image"]))}, {})

    def predict(params, variables, batch):
        out = fake(params, batch)
        return {"output": out * batch["mask"] + batch["image"] * (1 - batch["mask"]), "raw": out}

    opts = {"generator": make_optimizer(config.optimizer), "critic": make_optimizer(config.optimizer)}
    du = Update("d", "critic", d_loss, opts["critic"], advances_step=False)
    gu = Update("g", "generator", g_loss, opts["generator"])
    return Task("toy_gan", init, opts, (du, du, gu), predict)


def _config(total=6, **model):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.model = ml_collections.ConfigDict({"name": "toy_gan", **model})
    c.data = ml_collections.ConfigDict(
        {
            "source": {"kind": "sample_photos", "num_examples": 64, "crop_size": 16},
            "image_size": 16,
            "mask": {"kind": "box", "hole_size": [8, 8], "margin": [0, 0], "max_delta": [2, 2]},
            "shuffle_buffer": None,
            "worker_count": 0,
        }
    )
    c.batch_size = 8
    c.total_steps = total
    c.optimizer = ml_collections.ConfigDict({"lr": 1e-2, "b1": 0.5, "b2": 0.9, "schedule": "constant"})
    c.log_every = 1
    c.image_every = 3
    c.checkpoint_every = 2
    c.keep_checkpoints = 5
    c.skip_nonfinite = False
    return c


def _final_state(workdir, config):
    from jattn.train.loop import _state_init_fn

    from jattn.train.task import build_task

    shapes = jax.eval_shape(_state_init_fn(build_task(config), config), jax.random.key(0))
    return Checkpointer(workdir / "checkpoints").restore(shapes)


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    full = train(_config(total=6), tmp_path / "full", progress=False)
    train(_config(total=3), tmp_path / "split", progress=False)  # "interrupted" after step 3
    resumed = train(_config(total=6), tmp_path / "split", progress=False)
    assert full["step"] == resumed["step"] == 6
    a, b = _final_state(tmp_path / "full", _config()), _final_state(tmp_path / "split", _config())
    assert a.step == b.step == 6
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the logs agree step for step as well
    log_full = {r["step"]: r["g_loss"] for r in read_metrics(tmp_path / "full")}
    log_split = {r["step"]: r["g_loss"] for r in read_metrics(tmp_path / "split")}
    assert log_full == log_split


def test_logs_checkpoints_and_images(tmp_path):
    result = train(_config(total=4), tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"d_loss", "g_loss", "l1_loss", "d_grad_norm", "g_grad_norm", "images_per_second"} <= set(r)
        assert r["generator_learning_rate"] == pytest.approx(1e-2)
    assert result["metrics"]["g_loss"] == pytest.approx(records[-1]["g_loss"])
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000  # scalars and PNG images
    saved = Checkpointer(tmp_path / "checkpoints").restore_config()
    assert saved["model"] == {"name": "toy_gan"} and saved["total_steps"] == 4


def test_nonfinite_loss_stops_with_the_step_and_writes_no_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step \d+: .*g_loss=nan"):
        train(_config(total=20, poison_after=0.0), tmp_path, progress=False)
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert all(s < 20 for s in steps)
    restored = _final_state(tmp_path, _config(poison_after=0.0)) if steps else None
    if restored is not None:
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored.state.params))


def test_skip_nonfinite_goes_on(tmp_path):
    cfg = _config(total=4, poison_after=0.0)
    cfg.skip_nonfinite = True
    result = train(cfg, tmp_path, progress=False)
    assert result["step"] == 4 and result["skipped_updates"] >= 1
    assert read_metrics(tmp_path)[-1]["skipped_updates"] >= 1


def test_config_mismatch_is_refused(tmp_path):
    train(_config(total=2), tmp_path, progress=False)
    other = _config(total=4, width=3)
    with pytest.raises(ConfigMismatchError, match="model"):
        train(other, tmp_path, progress=False)


def test_eval_during_training_keeps_the_best_and_is_reproducible(tmp_path):
    from jattn.train.evaluate import evaluate
    from jattn.train.loop import restore_for_eval

    cfg = _config(total=6)
    cfg.eval_every = 2
    cfg.eval_images = 16
    cfg.eval_batch_size = 8
    cfg.keep_checkpoints = 1
    cfg.best_metric = "eval_psnr"
    cfg.best_mode = "max"
    result = train(cfg, tmp_path, progress=False)
    evals = [r for r in read_metrics(tmp_path) if "eval_psnr" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(np.isfinite(r["eval_psnr"]) and 0 < r["eval_ssim"] <= 1 for r in evals)
    best_step = max(evals, key=lambda r: r["eval_psnr"])["step"]
    ckpt = Checkpointer(tmp_path / "checkpoints", best_metric="eval_psnr", best_mode="max")
    assert ckpt.best_step() == best_step and 6 in ckpt.all_steps() and best_step in ckpt.all_steps()
    # the standalone evaluation of the final checkpoint reproduces the loop's numbers
    task, state, mesh, step = restore_for_eval(cfg, tmp_path)
    again = evaluate(task, state, cfg, mesh, tmp_path)
    assert step == 6
    for k in ("eval_psnr", "eval_ssim", "eval_l1", "eval_masks_sha256"):
        assert again[k] == result["eval"][k]
    assert len(result["eval"]["eval_masks_sha256"]) == 64
