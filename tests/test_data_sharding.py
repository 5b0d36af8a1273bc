"""Process batches -> global jax.Arrays sharded over the mesh's data axis (8 CPU devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jattn.data import sharding as sh


def _batch(b=16, h=4, w=6):
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32),
            "mask": (rng.uniform(size=(b, h, w, 1)) > 0.5).astype(np.float32)}


def test_global_array_is_sharded_over_8_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    local = _batch()
    out = sh.to_global_array(local, mesh)
    for k in local:
        x = out[k]
        assert isinstance(x, jax.Array) and x.shape == local[k].shape
        assert x.sharding == NamedSharding(mesh, P("data"))
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and len({s.device for s in shards}) == 8
        for i, s in enumerate(shards):
            assert s.data.shape == (2, *local[k].shape[1:])
            np.testing.assert_array_equal(np.asarray(s.data), local[k][2 * i:2 * i + 2])
        np.testing.assert_array_equal(np.asarray(x), local[k])


def test_global_array_on_a_2d_mesh_replicates_over_the_model_axis():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    local = _batch(8)
    x = sh.to_global_array(local, mesh)["image"]
    assert x.sharding.spec == P("data")
    for s in x.addressable_shards:
        assert s.data.shape == (2, 4, 6, 3) and s.replica_id in (0, 1)
    # Both axes as the data axis: batch split 8 ways.
    y = sh.to_global_array(local, mesh, data_axis=("data", "model"))["mask"]
    assert {s.data.shape for s in y.addressable_shards} == {(1, 4, 6, 1)}
    jitted = jax.jit(lambda b: (b["image"] * b["mask"]).sum())(sh.to_global_array(local, mesh))
    np.testing.assert_allclose(jitted, (local["image"] * local["mask"]).sum(), rtol=1e-5)


def test_sharding_errors_and_batch_size_helper():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="not in mesh axes"):
        sh.to_global_array(_batch(), mesh, data_axis="batch")
    with pytest.raises(ValueError):
        sh.to_global_array(_batch(12), mesh)  # 12 examples over 8 devices
    assert sh.per_process_batch_size(64, 4) == 16
    assert sh.per_process_batch_size(64) == 64  # one process here
    with pytest.raises(ValueError, match="not a positive multiple"):
        sh.per_process_batch_size(10, 4)
