"""The training loop on a small GAN task: exact resume, extension, non-finite handling, logs."""

import json
import re

import jax
import numpy as np
import pytest

from jattn.train.checkpoint import Checkpointer
from jattn.train.logging import read_metrics
from jattn.train.loop import ConfigMismatchError, NonFiniteLossError, train
from toy import toy_config as _config


def _final_state(workdir, config):
    from jattn.train.setup import state_init_fn

    from jattn.train.task import build_task

    shapes = jax.eval_shape(state_init_fn(build_task(config), config), jax.random.key(0))
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
    # the logs agree step for step as well, each step logged once
    log_full = [(r["step"], r["g_loss"]) for r in read_metrics(tmp_path / "full")]
    log_split = [(r["step"], r["g_loss"]) for r in read_metrics(tmp_path / "split")]
    assert log_full == log_split and [s for s, _ in log_full] == [1, 2, 3, 4, 5, 6]


def test_tfdata_resumed_run_is_bitwise_identical_and_other_loaders_are_refused(tmp_path):
    def tfdata_config(total):
        cfg = _config(total=total)
        cfg.data.loader = "tfdata"
        return cfg

    train(tfdata_config(8), tmp_path / "full", progress=False)
    train(tfdata_config(4), tmp_path / "split", progress=False)  # "interrupted" after step 4
    saved = json.loads((tmp_path / "split" / "checkpoints" / "4" / "data_iter" / "process_0-of-1.json").read_text())
    assert saved["format"] == "jattn.tfdata" and saved["batches"] == 4 * 3  # 3 updates a step
    assert saved["position"] == 4 * 3 * 8  # 96 of 64 examples: inside the second epoch
    train(tfdata_config(8), tmp_path / "split", progress=False)
    a, b = _final_state(tmp_path / "full", _config()), _final_state(tmp_path / "split", _config())
    assert a.step == b.step == 8
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # every logged metric agrees step for step, each step logged once
    def logged(workdir):
        return [{k: v for k, v in r.items() if k != "images_per_second"} for r in read_metrics(workdir)]

    assert logged(tmp_path / "full") == logged(tmp_path / "split")
    assert [r["step"] for r in logged(tmp_path / "full")] == list(range(1, 9))
    # a position written by one loader is not restored by the other, even with changes allowed
    with pytest.raises(ConfigMismatchError, match=r"data\.loader='tfdata', whose iterator position "
                       r"data\.loader='grain' cannot restore"):
        train(_config(total=10), tmp_path / "split", progress=False, allow_config_change=True)
    assert Checkpointer(tmp_path / "split" / "checkpoints").all_steps()[-1] == 8  # nothing written
    from jattn.config import with_defaults
    from jattn.train.loop import _check_loader

    with pytest.raises(ConfigMismatchError, match=r"data\.loader='grain', whose iterator position "
                       r"data\.loader='tfdata' cannot restore"):
        _check_loader({"data": {"loader": "grain"}}, with_defaults(tfdata_config(4)), tmp_path)
    _check_loader({"data": {"loader": "tf"}}, with_defaults(tfdata_config(4)), tmp_path)  # an alias


def test_logs_checkpoints_and_images(tmp_path):
    result = train(_config(total=4), tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"d_loss", "g_loss", "l1_loss", "d_grad_norm", "g_grad_norm", "images_per_second", "data_skipped"} <= set(r)
        assert r["generator_learning_rate"] == pytest.approx(1e-2)
    assert result["metrics"]["g_loss"] == pytest.approx(records[-1]["g_loss"])
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000  # scalars and PNG images
    saved = Checkpointer(tmp_path / "checkpoints").restore_config()
    assert saved["model"] == {"name": "toy_gan"} and saved["total_steps"] == 4
    assert saved["jattn"]["version"] and len(saved["jattn"]["git_commit"] or "0" * 40) == 40
    assert json.loads((tmp_path / "config.json").read_text()) == saved


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
    with pytest.raises(ConfigMismatchError, match=r"model\.width \(unset -> 3\)"):
        train(other, tmp_path, progress=False)


def test_eval_during_training_keeps_the_best_and_is_reproducible(tmp_path):
    from jattn.train.evaluate import evaluate
    from jattn.train.setup import restore_for_eval

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


def test_image_grid_rows_are_examples_and_columns_outputs():
    from jattn.train.loop import _image_grid

    images = {
        "input": np.zeros((6, 8, 8, 3), np.float32),
        "output": np.ones((6, 8, 8, 3), np.float32),
        "flow": np.full((6, 2, 2, 3), 0.5, np.float32),  # smaller: repeated up to 8x8
        "mask": np.ones((6, 8, 8, 1), np.float32),
    }
    grid = _image_grid(images, count=4)["samples"]
    assert grid.shape == (4 * 8, 4 * 8, 3)
    np.testing.assert_array_equal(grid[:, 8:16], 1.0)
    np.testing.assert_array_equal(grid[:, 16:24], 0.5)


def test_supervised_task_with_labels_trains_and_evaluates(tmp_path):
    """A single-network task with its own fields and metrics runs on the same loop: labelled
    shapes in, a lower loss and an accuracy out; no masks are built or hashed."""
    cfg = _config(total=30)
    cfg.model.name = "toy_classifier"
    cfg.data.source = {"kind": "shapes", "num_examples": 64, "size": 16}
    cfg.data.mask = None
    cfg.optimizer.lr = 3e-2
    cfg.eval_every = 30
    cfg.eval_images = 32
    cfg.eval_batch_size = 16
    cfg.checkpoint_every = 0
    result = train(cfg, tmp_path, progress=False)
    losses = [r["train_loss"] for r in read_metrics(tmp_path) if "train_loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert set(result["eval"]) == {"eval_accuracy", "eval_images"}
    assert result["eval"]["eval_images"] == 32 and 0.0 <= result["eval"]["eval_accuracy"] <= 1.0
    assert not (tmp_path / "eval_masks").exists()


def test_one_program_per_step_and_no_metric_fetch_between_log_steps(tmp_path, monkeypatch):
    """The loop dispatches one compiled program per step; it copies metrics to the host only
    at log steps, and reads a step's non-finite flag once the next step is dispatched."""
    import jattn.train.loop as loop

    events = []
    build = loop.make_train_step

    def counted_build(*args, **kwargs):
        fn = build(*args, **kwargs)

        def step(*a):
            events.append(("step",))
            return fn(*a)

        return step

    fetch, read_flag = loop._fetch, loop._read_flag
    monkeypatch.setattr(loop, "make_train_step", counted_build)
    monkeypatch.setattr(loop, "_fetch", lambda tree: events.append(("fetch",)) or fetch(tree))
    monkeypatch.setattr(loop, "_read_flag", lambda flag: events.append(("flag",)) or read_flag(flag))
    cfg = _config(total=8)
    cfg.log_every = 4
    cfg.image_every = 0
    cfg.checkpoint_every = 0
    train(cfg, tmp_path, progress=False)
    steps = [i for i, e in enumerate(events) if e == ("step",)]
    assert len(steps) == 8  # one program per step
    fetches = [i for i, e in enumerate(events) if e == ("fetch",)]
    # log steps 4 and 8: exactly one metrics fetch each, after those steps' dispatch
    assert len(fetches) == 2 and steps[3] < fetches[0] < steps[4] and fetches[1] > steps[7]
    # between steps 1..3 (no log): the only host reads are the previous step's flags
    for a, b in zip(steps[:3], steps[1:4]):
        assert [e for e in events[a + 1:b]] in ([], [("flag",)])
    assert events[steps[1] + 1] == ("flag",)  # step 1's flag, read after step 2 is dispatched
    assert sum(e == ("flag",) for e in events) == 8  # each step's flag exactly once


def test_nonfinite_stops_within_one_step_of_the_bad_update(tmp_path, monkeypatch):
    import jattn.train.loop as loop

    dispatched = []
    build = loop.make_train_step

    def counted_build(*args, **kwargs):
        fn = build(*args, **kwargs)

        def step(*a):
            dispatched.append(1)
            return fn(*a)

        return step

    monkeypatch.setattr(loop, "make_train_step", counted_build)
    cfg = _config(total=20, poison_after=0.0)
    cfg.log_every = 100
    cfg.image_every = 0
    with pytest.raises(NonFiniteLossError, match=r"step (\d+)") as err:
        train(cfg, tmp_path, progress=False)
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert len(dispatched) <= bad_step + 1
    assert all(s < bad_step for s in Checkpointer(tmp_path / "checkpoints").all_steps())
