"""Checkpointer: exact round trips, latest + best kept, no NaN written, checksums and
corruption fallback, save failures, re-sharding."""

import errno
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jattn.train.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointRestoreError,
    CheckpointSaveError,
    CorruptCheckpointError,
    NonFiniteStateError,
    abstract_state,
    verify,
)


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)},
        "step": jnp.asarray(seed, jnp.int32),
        "key": jax.random.key_data(jax.random.key(seed)),
    }


def _assert_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_with_config(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    state = _state(3)
    ckpt.save(10, state, config={"lr": 1e-4, "model": "deepfill_v1"})
    ckpt.wait()
    restored = ckpt.restore(jax.tree_util.tree_map(jnp.zeros_like, state))
    assert restored.step == 10
    _assert_equal(restored.state, state)
    assert restored.config == {"lr": 1e-4, "model": "deepfill_v1"}
    assert ckpt.restore_config() == {"lr": 1e-4, "model": "deepfill_v1"}


def test_a_relative_directory_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # orbax itself wants absolute paths
    ckpt = Checkpointer("workdirs/run/checkpoints")
    ckpt.save(1, _state(1))
    ckpt.wait()
    _assert_equal(ckpt.restore(jax.tree_util.tree_map(jnp.zeros_like, _state(1))).state, _state(1))
    assert (tmp_path / "workdirs" / "run" / "checkpoints" / "1").is_dir()


def test_empty_directory_restores_none(tmp_path):
    assert Checkpointer(tmp_path / "none").restore(_state()) is None


def test_keeps_latest_and_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, best_metric="psnr", keep_best=1, best_mode="max", async_save=False)
    for step, psnr in zip([1, 2, 3, 4, 5], [5.0, 9.0, 3.0, 4.0, 2.0]):
        ckpt.save(step, _state(step), metrics={"psnr": psnr})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    assert ckpt.latest_step() == 5


def test_keeps_best_in_min_mode(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1, best_metric="l1", best_mode="min", async_save=False)
    for step, l1 in zip([1, 2, 3], [0.5, 0.1, 0.3]):
        ckpt.save(step, _state(step), metrics={"l1": l1})
    assert ckpt.all_steps() == [2, 3]


def test_refuses_non_finite_state(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    bad = _state(2)
    bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteStateError, match=r"step 2.*params.*w"):
        ckpt.save(2, bad)
    assert ckpt.all_steps() == [1]


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_every_checkpoint_carries_a_manifest_of_its_files(tmp_path):
    for async_save in (True, False):
        ckpt = Checkpointer(tmp_path / f"ckpt{async_save}", async_save=async_save)
        ckpt.save(1, _state(1), config={"lr": 1.0})
        ckpt.close()
        folder = tmp_path / f"ckpt{async_save}" / "1"
        files = json.loads((folder / MANIFEST).read_text())["files"]
        assert "config/metadata" in files and any(name.startswith("state/") for name in files)
        assert str(_largest_file(folder / "state").relative_to(folder)) in files
        assert verify(folder) is True


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    # truncate every data file of the latest checkpoint's state
    for path in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(tmp_path / "ckpt").restore(_state(0))
    assert restored.step == 1
    _assert_equal(restored.state, _state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "checkpoint 2" in warnings[0] and "corrupt" in warnings[0]
    assert "\n" not in warnings[0] and not any(r.exc_info for r in caplog.records)
    assert (tmp_path / "ckpt" / "2").is_dir()  # a reader only skips it
    with pytest.raises(CorruptCheckpointError, match="checkpoint 2"):
        Checkpointer(tmp_path / "ckpt").restore(_state(0), step=2)  # explicit step: the error itself


def test_a_flipped_byte_is_caught_and_the_step_moved_aside(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    path = _largest_file(tmp_path / "ckpt" / "2" / "state")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    restored = ckpt.restore(_state(0), move_corrupt=True)
    assert restored.step == 1
    assert ckpt.all_steps() == [1] and ckpt.corrupt_folders() == ["2.corrupt"]
    assert (tmp_path / "ckpt" / "2.corrupt" / "state").is_dir()  # kept, out of orbax's way
    ckpt.save(2, _state(5))  # the step can be written again
    _assert_equal(ckpt.restore(_state(0)).state, _state(5))


def test_a_read_error_stops_instead_of_rolling_back(tmp_path, monkeypatch):
    import jattn.train.checkpoint as checkpoint

    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    digest = checkpoint._digest

    def flaky(path):
        if "/2/" in str(path):
            raise OSError(errno.EIO, "Input/output error")
        return digest(path)

    monkeypatch.setattr(checkpoint, "_digest", flaky)
    with pytest.raises(CheckpointRestoreError, match=r"checkpoint 2 .*could not be read.*Input/output error"):
        Checkpointer(tmp_path / "ckpt").restore(_state(0), move_corrupt=True)
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [1, 2]  # nothing moved


def test_an_intact_checkpoint_that_does_not_restore_is_not_skipped(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    other = {"params": {"w": jnp.zeros((3, 3))}}  # a different model
    with pytest.raises(CheckpointRestoreError, match="checkpoint 2 .*could not be restored.*not corrupt"):
        ckpt.restore(other, move_corrupt=True)
    assert ckpt.all_steps() == [1, 2]


@pytest.mark.parametrize("change, named", [
    (lambda s: {**s, "params": {**s["params"], "w": jnp.zeros((8, 5))}},
     r"params/w is \[8, 4\] in the checkpoint and \[8, 5\] in this model"),
    (lambda s: {**s, "params": {**s["params"], "v": jnp.zeros(3)}}, "this model has params/v, the checkpoint does not"),
    (lambda s: {k: v for k, v in s.items() if k != "key"}, "the checkpoint has key, this model does not"),
    (lambda s: {**s, "params": {"w": jnp.zeros((2, 2)), "b": jnp.zeros(5)}}, r"params/\w is .*; 1 more differ\)"),
])
def test_a_state_that_does_not_fit_is_named_before_any_array_is_read(tmp_path, monkeypatch, change, named):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    read = []
    monkeypatch.setattr(ckpt._manager, "restore", lambda *a, **k: read.append(1))
    with pytest.raises(CheckpointRestoreError, match=f"checkpoint 1 .*could not be restored \\({named}.*not corrupt"):
        ckpt.restore(change(_state(0)))
    assert read == []  # orbax never started reading arrays
    monkeypatch.undo()
    assert ckpt.restore(_state(0)).state["step"] == 1  # the checkpoint itself is fine


def test_a_checkpoint_without_manifest_restores_unverified(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    for step in (1, 2):
        (tmp_path / "ckpt" / str(step) / MANIFEST).unlink()  # as written before manifests
    assert ckpt.restore(_state(0)).step == 2
    _largest_file(tmp_path / "ckpt" / "2" / "state").write_bytes(b"")
    with pytest.raises(CheckpointRestoreError, match=f"checkpoint 2 .*no {MANIFEST}.*2.corrupt"):
        Checkpointer(tmp_path / "ckpt").restore(_state(0), move_corrupt=True)
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [1, 2]


def test_all_checkpoints_corrupt_is_one_clear_error_every_time(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    for step in (1, 2):
        _largest_file(tmp_path / "ckpt" / str(step) / "state").write_bytes(b"x")
    for _ in range(2):  # the first run moves them aside, a rerun finds only those
        with caplog.at_level(logging.WARNING):
            with pytest.raises(CheckpointRestoreError, match=r"no checkpoint .* could be restored") as err:
                Checkpointer(tmp_path / "ckpt").restore(_state(0), move_corrupt=True)
        assert "\n" not in str(err.value) and "1.corrupt" in str(err.value) and "2.corrupt" in str(err.value)
    assert not any(r.exc_info for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1.corrupt", "2.corrupt"]


def test_a_failed_save_is_one_line_with_the_free_space(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, _state(1))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint 2 could not be saved to .*ckpt/2: .*No space left.*GiB free"):
        ckpt.save(2, _state(2))
    monkeypatch.undo()
    ckpt.close()
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [1]


def test_a_failed_background_save_is_reported_by_the_next_check(tmp_path, monkeypatch):
    import jattn.train.checkpoint as checkpoint

    write = checkpoint._write_manifest

    def full(folder, step):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(folder, step)

    monkeypatch.setattr(checkpoint, "_write_manifest", full)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, _state(1))
    ckpt.wait()
    ckpt.save(2, _state(2))
    deadline = time.monotonic() + 60
    with pytest.raises(CheckpointSaveError, match=r"checkpoint 2 could not be saved.*No space left.*GiB free"):
        while time.monotonic() < deadline:  # no save call in between: check() alone reports it
            ckpt.check()
            time.sleep(0.01)
    ckpt.close()  # reported once
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("2")]
    assert leftovers and all("tmp" in name for name in leftovers)  # nothing that looks like step 2
    monkeypatch.undo()
    again = Checkpointer(tmp_path / "ckpt", cleanup_tmp=True)
    assert again.all_steps() == [1]
    again.save(2, _state(2))
    again.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
    _assert_equal(Checkpointer(tmp_path / "ckpt").restore(_state(0)).state, _state(2))


def test_restore_onto_a_different_mesh(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    state = {
        "w": jax.device_put(jnp.asarray(rng.standard_normal((16, 3)), jnp.float32), NamedSharding(mesh8, P("data"))),
        "b": jax.device_put(jnp.ones((3,)), NamedSharding(mesh8, P())),
    }
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(7, state)
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",), axis_types=(AxisType.Auto,))
    shapes = jax.eval_shape(lambda: state)
    target = abstract_state(shapes, {"w": NamedSharding(mesh4, P("data")), "b": NamedSharding(mesh4, P())})
    restored = ckpt.restore(target)
    assert restored.step == 7
    _assert_equal(restored.state, state)
    assert restored.state["w"].sharding.mesh.devices.size == 4
    assert restored.state["w"].sharding.spec == P("data")


def test_grain_iterator_position_is_restored(tmp_path):
    grain = pytest.importorskip("grain")
    ds = grain.MapDataset.range(100).shuffle(seed=1).batch(4)
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(3, _state(), data_iter=it)
    expected = [np.asarray(next(it)) for _ in range(2)]
    fresh = iter(ds.to_iter_dataset())
    ckpt.restore(_state(), data_iter=fresh)
    got = [np.asarray(next(fresh)) for _ in range(2)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def _replicated_state(mesh, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"a{i}": jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32), NamedSharding(mesh, P()))
            for i, s in enumerate(shapes)}


def test_first_save_of_small_replicated_arrays_compiles_one_program(tmp_path):
    """A first save compiles one program: the finiteness check of the whole tree. Orbax's
    replica-parallel save would slice each replicated array per device, with one eager
    compile per shape and device; small arrays are written whole by one replica. An array
    above REPLICA_SLICE_MIN_BYTES per replica is still sliced, and everything restores."""
    from task_helpers import count_compiles

    from jattn.train.checkpoint import REPLICA_SLICE_MIN_BYTES

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    small = [(3, 3, c, k) for c in (3, 5, 7) for k in (11, 13)] + [(n,) for n in range(17, 29)]
    state = _replicated_state(mesh, small)
    big_rows = REPLICA_SLICE_MIN_BYTES * 8 // (4 * 64) + 8  # 8 slices of a bit more than the minimum each
    state["big"] = jax.device_put(jnp.arange(big_rows * 64, dtype=jnp.float32).reshape(big_rows, 64),
                                  NamedSharding(mesh, P()))
    jax.block_until_ready(state)
    with count_compiles() as compiles:
        ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
        ckpt.save(1, {k: v for k, v in state.items() if k != "big"})
        assert len(compiles) == 1  # the finiteness check; was 8 x 18 slice compiles, 36 checks
        ckpt.save(2, state)
        assert 2 < len(compiles) <= 1 + 1 + 8  # the check of the new tree; the big array sliced per device
    target = abstract_state(jax.eval_shape(lambda: state), NamedSharding(mesh, P()))
    _assert_equal(ckpt.restore(target).state, state)


def test_checkpoints_of_orbax_standard_save_still_restore(tmp_path):
    """Checkpoints written with `ocp.args.StandardSave` (jattn's format before the state got
    its own handler) restore, onto the same or another sharding."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    state = {**_replicated_state(mesh, [(3, 3, 4, 8), (8,)], seed=2), "step": jnp.asarray(5, jnp.int32)}
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave({"lr": 0.5})))
    manager.wait_until_finished()
    manager.close()
    ckpt = Checkpointer(tmp_path / "ckpt")
    restored = ckpt.restore(jax.tree_util.tree_map(jnp.zeros_like, state))
    assert restored.step == 5 and restored.config == {"lr": 0.5}
    _assert_equal(restored.state, state)
    mesh2 = Mesh(np.array(jax.devices()[:2]), ("data",), axis_types=(AxisType.Auto,))
    restored = ckpt.restore(abstract_state(jax.eval_shape(lambda: state), NamedSharding(mesh2, P())))
    _assert_equal(restored.state, state)
    assert restored.state["a0"].sharding.mesh.devices.size == 2
