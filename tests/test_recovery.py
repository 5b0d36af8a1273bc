"""A run's workdir survives what happens to long runs: a corrupt or truncated checkpoint, a
second run started on it, a full disk during a save, a total_steps below the run's, an
update that blows the weights up, a changed config on resume. Each test does what a user
would (train, damage or change something, train again) on the small toy GAN task."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jattn.train.checkpoint import MANIFEST, Checkpointer, CheckpointRestoreError, CheckpointSaveError
from jattn.train.logging import read_events, read_metrics, truncate_metrics
from jattn.train.loop import (
    ConfigMismatchError,
    NonFiniteLossError,
    TotalStepsError,
    WorkdirLockedError,
    config_changes,
    train,
)
from toy import toy_config

TOTAL = 6


def _config(total=TOTAL, **model):
    c = toy_config(total=total, **model)
    c.image_every = 0  # no prediction program to compile
    return c


def _final_state(workdir):
    from jattn.train.setup import state_init_fn
    from jattn.train.task import build_task

    config = _config()
    shapes = jax.eval_shape(state_init_fn(build_task(config), config), jax.random.key(0))
    return Checkpointer(workdir / "checkpoints").restore(shapes)


def _assert_same_run(workdir, reference):
    """The workdir's final checkpoint and logs are those of the uninterrupted reference run."""
    restored = _final_state(workdir)
    assert restored.step == TOTAL
    for x, y in zip(jax.tree_util.tree_leaves(restored.state), reference["leaves"]):
        np.testing.assert_array_equal(np.asarray(x), y)
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))  # every step logged once
    assert [r["g_loss"] for r in records] == reference["g_loss"]
    g_loss = [(e.step, v.simple_value) for e in read_events(workdir) for v in e.summary.value if v.tag == "g_loss"]
    assert [step for step, _ in g_loss] == list(range(1, TOTAL + 1))  # in TensorBoard too
    np.testing.assert_array_equal([v for _, v in g_loss], np.float32(reference["g_loss"]))


def _snapshot(workdir):
    """Every file under the workdir (but the lock) with its bytes: to show a refused run changed nothing."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of TOTAL steps (checkpoints at 2, 4, 6)."""
    workdir = tmp_path_factory.mktemp("reference")
    train(_config(), workdir, progress=False)
    restored = _final_state(workdir)
    return {
        "workdir": workdir,
        "leaves": [np.asarray(x) for x in jax.tree_util.tree_leaves(restored.state)],
        "g_loss": [r["g_loss"] for r in read_metrics(workdir)],
    }


@pytest.fixture
def finished(reference, tmp_path):
    """A copy of the reference run's workdir: a finished run to damage."""
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    return workdir


def _rerun_twice(workdir, reference, caplog):
    with caplog.at_level(logging.WARNING, logger="jattn"):
        result = train(_config(), workdir, progress=False)
    assert result["step"] == TOTAL
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("jattn")]
    assert len(warnings) == 1 and "checkpoint 6" in warnings[0] and "6.corrupt" in warnings[0]
    assert "\n" not in warnings[0]
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [2, 4, 6] and ckpt.corrupt_folders() == ["6.corrupt"]
    _assert_same_run(workdir, reference)
    caplog.clear()
    assert train(_config(), workdir, progress=False)["step"] == TOTAL  # converged: nothing left to do
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("jattn")]
    assert Checkpointer(workdir / "checkpoints").corrupt_folders() == ["6.corrupt"]
    _assert_same_run(workdir, reference)


def test_truncated_latest_checkpoint_is_moved_aside_and_the_rerun_converges(finished, reference, caplog):
    path = _largest_file(finished / "checkpoints" / "6" / "state")
    os.truncate(path, 1000)
    _rerun_twice(finished, reference, caplog)


def test_a_flipped_byte_is_caught_and_the_rerun_converges(finished, reference, caplog):
    path = _largest_file(finished / "checkpoints" / "6" / "state")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    _rerun_twice(finished, reference, caplog)


def test_every_checkpoint_corrupt_is_one_clear_error(finished):
    for step in (2, 4, 6):
        (finished / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{}")
    metrics = (finished / "metrics.jsonl").read_bytes()
    for _ in range(2):  # the rerun says the same, and neither starts the run over
        with pytest.raises(CheckpointRestoreError, match=r"no checkpoint .* could be restored") as err:
            train(_config(), finished, progress=False)
        assert "\n" not in str(err.value)
        assert all(f"{s}.corrupt" in str(err.value) for s in (2, 4, 6))
    assert (finished / "metrics.jsonl").read_bytes() == metrics
    assert not Checkpointer(finished / "checkpoints").all_steps()


_HOLD_LOCK = """
import sys, time
from jattn.train.loop import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_the_workdir_is_refused_until_the_first_one_ends(finished):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(finished)
        with pytest.raises(WorkdirLockedError, match=rf"in use by another training run \(pid {holder.pid} on "):
            train(_config(total=8), finished, progress=False)
        assert _snapshot(finished) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock, as a crashed run would
        holder.wait()
    assert str(holder.pid) in (finished / ".lock").read_text()  # its record stays behind
    assert train(_config(), finished, progress=False)["step"] == TOTAL  # and is taken over


def test_total_steps_below_the_run_or_below_one_is_refused(finished, tmp_path):
    before = _snapshot(finished)
    with pytest.raises(TotalStepsError, match=r"total_steps=3 is below the latest checkpoint .*\(step 6\)"):
        train(_config(total=3), finished, progress=False)
    assert _snapshot(finished) == before  # nothing relabelled, nothing deleted
    for total in (0, -3):
        with pytest.raises(TotalStepsError, match="at least 1"):
            train(_config(total=total), tmp_path / "fresh", progress=False)
        with pytest.raises(TotalStepsError, match="at least 1"):
            train(_config(total=total), finished, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert _snapshot(finished) == before


def test_an_infinite_learning_rate_stops_cleanly_and_saves_nothing(tmp_path):
    cfg = _config()
    cfg.optimizer.lr = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"non-finite update at step 1: .*learning rate"):
        train(cfg, tmp_path / "stop", progress=False)
    assert not Checkpointer(tmp_path / "stop" / "checkpoints").all_steps()
    # skipping the updates cannot save the infinite rate either: a clean stop at the first save
    cfg.skip_nonfinite = True
    with pytest.raises(NonFiniteLossError, match=r"refusing to checkpoint step 2: non-finite values in .*learning_rate"):
        train(cfg, tmp_path / "skip", progress=False)
    assert not Checkpointer(tmp_path / "skip" / "checkpoints").all_steps()


def test_a_failed_background_save_stops_the_next_step_and_the_rerun_resumes(tmp_path, monkeypatch, reference):
    import jattn.train.checkpoint as checkpoint
    import jattn.train.loop as loop

    failed = threading.Event()
    write = checkpoint._write_manifest

    def disk_full_at_4(folder, step):
        if step == 4:
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        write(folder, step)

    dispatched = []
    build = loop.make_train_step

    def slow_step_5(*args, **kwargs):
        fn = build(*args, **kwargs)

        def step(*a):
            dispatched.append(1)
            if len(dispatched) == 5:  # the save of 4 fails in the background meanwhile
                assert failed.wait(60)
                time.sleep(2)
            return fn(*a)

        return step

    monkeypatch.setattr(checkpoint, "_write_manifest", disk_full_at_4)
    monkeypatch.setattr(loop, "make_train_step", slow_step_5)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointSaveError, match=r"checkpoint 4 could not be saved to .*: .*No space left on device "
                                                  r"\(\d+\.\d GiB free there\)") as err:
        train(_config(), workdir, progress=False)
    assert "\n" not in str(err.value)
    assert len(dispatched) == 5  # reported at the next step, not at the next save
    assert Checkpointer(workdir / "checkpoints").all_steps() == [2]
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
    monkeypatch.undo()
    # space freed: the rerun resumes from 2, replays 3 and 4 (logged once), leaves no half-written step
    assert train(_config(), workdir, progress=False)["step"] == TOTAL
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert all((workdir / "checkpoints" / s / MANIFEST).is_file() for s in ("2", "4", "6"))
    _assert_same_run(workdir, reference)


def test_a_changed_batch_size_on_resume_is_refused_unless_allowed(finished, caplog):
    before = _snapshot(finished)
    for key, value in (("batch_size", 16), ("seed", 4)):
        cfg = _config(total=8)
        cfg[key] = value
        with pytest.raises(ConfigMismatchError, match=rf"different config: {key} \(\d+ -> {value}\)"):
            train(cfg, finished, progress=False)
    assert _snapshot(finished) == before
    cfg = _config(total=8)
    cfg.batch_size = 16
    cfg.log_every = 2  # how often to log may change freely
    with caplog.at_level(logging.WARNING, logger="jattn"):
        result = train(cfg, finished, progress=False, allow_config_change=True)
    assert result["step"] == 8
    assert "batch_size (8 -> 16)" in caplog.text
    assert [r["step"] for r in read_metrics(finished)] == [1, 2, 3, 4, 5, 6, 8]
    assert Checkpointer(finished / "checkpoints").restore_config()["batch_size"] == 16


def test_config_changes_name_what_trains_differently():
    saved = json.loads(json.dumps(_config().to_dict()))
    assert config_changes(saved, _config(total=100)) == []  # how long to run is free
    cfg = _config()
    cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.skip_nonfinite = 5, 10, 1, True
    assert config_changes(saved, cfg) == []
    cfg = _config(width=4)
    cfg.optimizer.lr = 1e-3
    cfg.data.image_size = 32
    assert config_changes(saved, cfg) == ["data.image_size (16 -> 32)", "model.width (unset -> 4)",
                                          "optimizer.lr (0.01 -> 0.001)"]
    assert config_changes(saved, cfg, model_only=True) == ["model.width (unset -> 4)"]


def test_a_config_saved_before_a_key_was_declared_still_matches():
    """A checkpoint's config lacks the keys declared after it was written: compared with the
    schema's defaults filled in, it matches the config that leaves them at their defaults;
    a real difference does not."""
    import pathlib

    from jattn.config import load_config, schema_for, trainer_schema

    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_rcan.py")
    full = json.loads(json.dumps(config.to_dict()))
    defaults = schema_for("rcan").model
    at_default = [k for k, v in defaults.items() if k != "name" and full["model"].get(k) == v]
    assert at_default, "demo_rcan leaves some model keys at their defaults"
    saved = dict(full, model={k: v for k, v in full["model"].items() if k not in at_default})
    for key in ("n_critic", "compute_dtype"):
        assert full[key] == trainer_schema()[key]
        del saved[key]
    assert config_changes(saved, config) == []
    saved["model"]["n_resgroups"] = full["model"]["n_resgroups"] + 1
    assert config_changes(saved, config) == [f"model.n_resgroups ({full['model']['n_resgroups'] + 1} -> "
                                             f"{full['model']['n_resgroups']})"]


def test_truncate_metrics_keeps_the_restored_steps_only(tmp_path):
    records = [{"step": s, "g_loss": 0.5} for s in (1, 2, 3, 3, 4, 5)]  # step 3: its eval record too
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "g_lo'  # killed mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert truncate_metrics(tmp_path, 3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert truncate_metrics(tmp_path, 3) == 0
    assert truncate_metrics(tmp_path / "none", 0) == 0
