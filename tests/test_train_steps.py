"""The update engine: sharded == single-device, non-finite updates (loss, gradient or new
weights) dropped, keys per update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn.train.sharding import make_mesh, replicate_tree, to_global_array
from jattn.train.state import create_state, update_key
from jattn.train.steps import Update, jit_update, run_updates


class TinyG(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Conv(3, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x))))


class TinyD(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.leaky_relu(nn.Conv(8, (3, 3), strides=2)(x), 0.2)
        return nn.Dense(1)(x.reshape(x.shape[0], -1))


G, D = TinyG(), TinyD()


def d_loss(params, variables, batch, key):
    del variables
    fake = jax.lax.stop_gradient(G.apply({"params": params["generator"]}, batch["image"] * (1 - batch["mask"])))
    noise = 0.01 * jax.random.normal(key, fake.shape)
    real_s = D.apply({"params": params["critic"]}, batch["image"])
    fake_s = D.apply({"params": params["critic"]}, fake + noise)
    loss = jnp.mean(fake_s) - jnp.mean(real_s)
    return loss, ({"d_real": jnp.mean(real_s)}, {})


def g_loss(params, variables, batch, key):
    del variables, key
    fake = G.apply({"params": params["generator"]}, batch["image"] * (1 - batch["mask"]))
    adv = -jnp.mean(D.apply({"params": params["critic"]}, fake))
    l1 = jnp.mean(jnp.abs(fake - batch["image"]))
    return l1 + 0.01 * adv, ({"l1": l1}, {})


def _setup():
    key = jax.random.key(0)
    x = jnp.zeros((1, 16, 16, 3))
    params = {"generator": G.init(key, x)["params"], "critic": D.init(jax.random.fold_in(key, 1), x)["params"]}
    txs = {"generator": optax.adam(1e-3, 0.5, 0.9), "critic": optax.adam(1e-3, 0.5, 0.9)}
    updates = [
        Update("d", "critic", d_loss, txs["critic"], advances_step=False),
        Update("d", "critic", d_loss, txs["critic"], advances_step=False),
        Update("g", "generator", g_loss, txs["generator"]),
    ]
    return create_state(params, txs, jax.random.key(42)), updates


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.zeros((8, 16, 16, 1), np.float32)
        mask[:, 4:10, 5:12] = 1
        out.append({"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32), "mask": mask})
    return out


def _train(mesh, steps=3):
    state, updates = _setup()
    state = replicate_tree(state, mesh)
    fns = [jit_update(u, mesh) for u in updates]
    batches = _batches(steps * len(fns))
    history = []
    for s in range(steps):
        chunk = [to_global_array(b, mesh) for b in batches[s * len(fns) : (s + 1) * len(fns)]]
        state, metrics = run_updates(fns, state, chunk)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_eight_devices_equal_one_device():
    state8, hist8 = _train(make_mesh())
    state1, hist1 = _train(make_mesh(jax.devices()[:1]))
    assert int(state8.step) == int(state1.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(state8.params), jax.tree_util.tree_leaves(state1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    for m8, m1 in zip(hist8, hist1):
        for k in m8:
            np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-4)
    # the parameters really moved and the metrics are named as documented
    assert set(hist8[0]) >= {"d_loss", "d_grad_norm", "d_finite", "g_loss", "g_grad_norm", "g_finite", "l1", "d_real"}
    init, _ = _setup()
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree_util.tree_leaves(state8.params), jax.tree_util.tree_leaves(init.params))]
    assert max(moved) > 1e-4


def test_state_is_replicated_and_batch_sharded():
    mesh = make_mesh()
    state, updates = _setup()
    state = replicate_tree(state, mesh)
    fn = jit_update(updates[-1], mesh)
    batch = to_global_array(_batches(1)[0], mesh)
    assert len(batch["image"].sharding.device_set) == 8
    new_state, _ = fn(state, batch, 0)
    leaf = jax.tree_util.tree_leaves(new_state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_non_finite_update_is_dropped_and_flagged():
    mesh = make_mesh()
    state, updates = _setup()
    state = replicate_tree(state, mesh)
    before = jax.tree_util.tree_map(np.asarray, state)
    fn = jit_update(updates[-1], mesh, donate=False)
    bad = _batches(1)[0]
    bad["image"][0, 0, 0, 0] = np.nan
    new_state, metrics = fn(state, to_global_array(bad, mesh), 0)
    assert float(metrics["g_finite"]) == 0.0 and not np.isfinite(float(metrics["g_loss"]))
    assert int(new_state.step) == 1  # the step is used up, its update dropped
    for a, b in zip(jax.tree_util.tree_leaves(new_state.replace(step=state.step)), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_an_update_that_makes_the_weights_infinite_is_dropped():
    """A finite loss and gradient, but an infinite learning rate: the new parameters and
    optimizer state are not finite, so the update is dropped and flagged like a NaN loss."""
    mesh = make_mesh()
    state, updates = _setup()
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=float("inf"), b1=0.5, b2=0.9)
    state = create_state(state.params, {"generator": tx, "critic": tx}, jax.random.key(42))
    update = Update("g", "generator", g_loss, tx)
    state = replicate_tree(state, mesh)
    before = jax.tree_util.tree_map(np.asarray, state)
    new_state, metrics = jit_update(update, mesh, donate=False)(state, to_global_array(_batches(1)[0], mesh), 0)
    assert np.isfinite(float(metrics["g_loss"])) and np.isfinite(float(metrics["g_grad_norm"]))
    assert float(metrics["g_finite"]) == 0.0
    assert int(new_state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(before.params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree_util.tree_leaves(new_state.opt_state), jax.tree_util.tree_leaves(before.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_keys_differ_per_update_and_step():
    state, _ = _setup()
    k = [jax.random.key_data(update_key(state, i)) for i in range(3)]
    k.append(jax.random.key_data(update_key(state.replace(step=state.step + 1), 0)))
    assert len({tuple(np.asarray(x).tolist()) for x in k}) == 4
    again = jax.random.key_data(update_key(state, 1))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(k[1]))


def test_create_state_needs_an_optimizer_per_network():
    with pytest.raises(ValueError, match="no optimizer"):
        create_state({"generator": {}, "critic": {}}, {"generator": optax.sgd(1.0)}, jax.random.key(0))


# --------------------------------------------------------------------------- one program per step


def _stacked(chunk):
    from jattn.train.input import stack_batches

    return stack_batches(chunk)


def _train_one_program(mesh, steps=3, unroll=False):
    from jattn.train.steps import make_train_step

    state, updates = _setup()
    state = replicate_tree(state, mesh)
    step_fn = make_train_step(updates, mesh, unroll=unroll)
    batches = _batches(steps * len(updates))
    history = []
    with jax.set_mesh(mesh):
        for s in range(steps):
            chunk = _stacked(batches[s * len(updates):(s + 1) * len(updates)])
            state, metrics = step_fn(state, to_global_array(chunk, mesh, stacked=True))
            history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_one_program_step_equals_the_updates_run_one_by_one():
    """The whole step as one program (critic repeats scanned) gives the numbers of the
    updates dispatched one by one, and the same on 8 devices as on 1."""
    mesh = make_mesh()
    ref_state, ref_hist = _train(mesh)
    for unroll in (False, True):
        state, hist = _train_one_program(mesh, unroll=unroll)
        assert int(state.step) == 3
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
        for m, r in zip(hist, ref_hist):
            assert set(m) == set(r) | {"finite"} and m["finite"] == 1.0
            for k in r:
                np.testing.assert_allclose(m[k], r[k], atol=1e-6, rtol=1e-5)
    state1, _ = _train_one_program(make_mesh(jax.devices()[:1]))
    for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_one_program_step_flags_a_dropped_update():
    from jattn.train.steps import make_train_step

    mesh = make_mesh()
    state, updates = _setup()
    state = replicate_tree(state, mesh)
    chunk = _stacked(_batches(len(updates)))
    chunk["image"][-1, 0, 0, 0, 0] = np.nan  # the generator's batch only
    with jax.set_mesh(mesh):
        new_state, metrics = make_train_step(updates, mesh, donate=False)(state, to_global_array(chunk, mesh, stacked=True))
    assert float(metrics["finite"]) == 0.0 and float(metrics["d_finite"]) == 1.0 and float(metrics["g_finite"]) == 0.0
    assert int(new_state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params["generator"]), jax.tree_util.tree_leaves(state.params["generator"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stacked_batches_are_split_along_the_batch_axis():
    mesh = make_mesh()
    chunk = to_global_array(_stacked(_batches(3)), mesh, stacked=True)
    assert chunk["image"].shape == (3, 8, 16, 16, 3)
    shard = chunk["image"].addressable_shards[0]
    assert shard.data.shape == (3, 1, 16, 16, 3)


def test_each_value_is_checked_for_finiteness_once_in_a_step_program():
    """The finite flag of an update is computed once: its loss, gradient norm and every new
    float array each pass one is-finite in the compiled step. A cheap flag would be copied,
    with the loss's arithmetic, into every fusion that selects a state array (3x as many
    is-finite ops here) and so into the next updates' programs."""
    from jattn.train.steps import make_train_step

    state, updates = _setup()
    mesh = make_mesh()
    batches = {"image": jnp.zeros((len(updates), 8, 16, 16, 3)), "mask": jnp.zeros((len(updates), 8, 16, 16, 1))}
    with jax.set_mesh(mesh):
        hlo = make_train_step(updates, mesh).lower(state, batches).compile().as_text()

    def floats(tree):
        return sum(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree_util.tree_leaves(tree))

    checked = sum(floats(state.params[u.net]) + floats(state.opt_state[u.net]) + 2 for u in updates)
    assert hlo.count(" is-finite(") <= checked
