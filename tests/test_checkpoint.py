"""Checkpointer: exact round trips, latest + best kept, no NaN written, fallback, re-sharding."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jattn.train.checkpoint import Checkpointer, NonFiniteStateError, abstract_state


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
    assert "step 2" in caplog.text and "failed to restore" in caplog.text
    with pytest.raises(Exception):
        Checkpointer(tmp_path / "ckpt").restore(_state(0), step=2)  # explicit step: the error itself


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
