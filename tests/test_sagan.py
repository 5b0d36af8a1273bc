"""SAGAN: networks (shapes, attention placement, spectral norm, conditional BN, parameter
counts) and the training task (updates through the engine, EMA, predict).

Compiling a Flax init is slow on CPU (a threefry hash per parameter), so most tests take the
variables' shapes from `jax.eval_shape(init)` and fill them with numpy values (`_filled`);
the slow test runs the real init.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.config import load_config
from jattn.models.sagan import (D_WIDTHS, G_WIDTHS, ConditionalBatchNorm, SAGANDiscriminator, SAGANGenerator,
                                SNSelfAttention2D, attention_resolutions, count_params)
from jattn.train.state import create_state
from jattn.train.steps import apply_update
from jattn.train.task import build_task

# The test-size networks of the task config below: 32 px, ch 4, 8 classes, attention at 16.
G_NET = SAGANGenerator(32, 4, 128, 8, 16)
D_NET = SAGANDiscriminator(32, 4, 8, 16)


# XLA's CPU backend optimisations double the compile time of these small networks; the tests
# check values, not speed, so they compile without them.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _labels(n, k=0):
    return jnp.arange(n, dtype=jnp.int32) % k if k else None


def _filled(shapes, seed=0):
    """Values for a tree of ShapeDtypeStructs as the initialisers would give (gamma, biases,
    BN means 0; gains, BN variances, SN sigmas 1; kernels and SN vectors random)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1])).split("/")[-1]
        if name in ("gamma", "bias", "mean"):
            return jnp.zeros(s.shape, s.dtype)
        if name in ("gain", "var", "sigma", "scale"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _trace(module, *args, **kwargs):
    """(output shape, input shapes of every SNSelfAttention2D, param shapes), traced only."""

    def run(key):
        variables = module.init(key, *args, **kwargs)
        out, state = module.apply(variables, *args, **kwargs, mutable=["batch_stats", "intermediates"],
                                  capture_intermediates=lambda m, _: isinstance(m, SNSelfAttention2D))
        return out, state.get("intermediates", {}), variables["params"]

    out, inter, params = jax.eval_shape(run, jax.random.key(0))
    return out.shape, [x.shape for x in jax.tree_util.tree_leaves(inter)], params


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size,attn", [(32, 16), (64, 16), (128, 32)])
def test_shapes_and_attention_placement(size, attn):
    ch, k = 8, 5
    g = SAGANGenerator(size, ch, z_dim=16, num_classes=k, attention_resolution=attn)
    d = SAGANDiscriminator(size, ch, num_classes=k, attention_resolution=attn)
    out, attn_in, _ = _trace(g, jnp.zeros((2, 16)), _labels(2, k))
    assert out == (2, size, size, 3)
    # G: after the block whose output is attn x attn (its width: ch * that block's multiplier)
    g_block = attention_resolutions(size)["generator"].index(attn)
    assert attn_in == [(2, attn, attn, ch * G_WIDTHS[size][g_block + 1])]
    out, attn_in, _ = _trace(d, jnp.zeros((2, size, size, 3)), _labels(2, k))
    assert out == (2,)
    # D: after the first block whose output is attn x attn
    res, r = [], size
    for _, down in D_WIDTHS[size]:
        r = r // 2 if down else r
        res.append(r)
    assert attn_in == [(2, attn, attn, ch * D_WIDTHS[size][res.index(attn)][0])]


def test_attention_resolution_checked_and_optional():
    with pytest.raises(ValueError, match=r"attention_resolution=4 .*generator.*\[8, 16, 32\]"):
        _trace(SAGANGenerator(32, 4, 16, attention_resolution=4), jnp.zeros((1, 16)))
    with pytest.raises(ValueError, match=r"attention_resolution=32 .*discriminator.*\[8, 16\]"):
        _trace(SAGANDiscriminator(32, 4, attention_resolution=32), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="image_size must be one of"):
        _trace(SAGANGenerator(48, 4, 16), jnp.zeros((1, 16)))
    _, attn_in, params = _trace(SAGANGenerator(32, 4, 16, attention_resolution=None), jnp.zeros((1, 16)))
    assert attn_in == [] and "attention" not in params and "block2" in params


def test_self_attention_block():
    block = SNSelfAttention2D()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    variables = _jit(lambda k: block.init(k, x, update_stats=False))(jax.random.key(2))
    p = variables["params"]
    assert float(p["gamma"]) == 0.0
    assert p["theta"]["conv"]["kernel"].shape == (1, 1, 16, 2) and p["g"]["conv"]["kernel"].shape == (1, 1, 16, 8)
    assert p["out"]["conv"]["kernel"].shape == (1, 1, 8, 16) and "bias" not in p["out"]["conv"]
    run = _jit(lambda params: block.apply({**variables, "params": params}, x, update_stats=False))
    np.testing.assert_array_equal(run(p), x)  # gamma = 0: the identity at init
    on = {**p, "gamma": jnp.float32(1.0)}
    y = run(on)
    assert float(np.max(np.abs(y - x))) > 1e-3
    # the 1x1 convs are spectrally normalised: scaling kernels leaves the output unchanged
    scaled = {**on, "out": {"conv": {"kernel": 10.0 * p["out"]["conv"]["kernel"]}},
              "theta": {"conv": {"kernel": 3.0 * p["theta"]["conv"]["kernel"]}}}
    np.testing.assert_allclose(run(scaled), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even H, W"):
        block.apply(variables, x[:, :7], update_stats=False)


def test_spectral_norm_vectors_update():
    x, y = jax.random.normal(jax.random.key(3), (2, 32, 32, 3)), jnp.array([1, 5], jnp.int32)
    dv = _filled(jax.eval_shape(D_NET.init, jax.random.key(0), x, y))
    apply = _jit(lambda v: D_NET.apply(v, x, y, update_stats=True, mutable=["batch_stats"]))
    frozen = _jit(lambda v: D_NET.apply(v, x, y, update_stats=False))
    logits, new = apply(dv)
    np.testing.assert_allclose(frozen(dv), logits, rtol=1e-5, atol=1e-5)  # same forward, stats kept
    for net, layer, kind in [("block1", "conv1", "conv"), ("attention", "out", "conv"), ("embed", None, "dense")]:
        path = (net,) if layer is None else (net, layer)
        params, stats, new_stats = (_at(tree, path) for tree in (dv["params"], dv["batch_stats"], new["batch_stats"]))
        w = np.asarray(params[kind]["kernel"], np.float64)
        w = w.reshape(-1, w.shape[-1])
        u0 = np.asarray(stats["sn"][f"{kind}/kernel/u"], np.float64)
        # one power iteration: v = normalise(u W^T), u = normalise(v W), sigma = v W u^T
        v = u0 @ w.T
        v /= np.linalg.norm(v)
        u = v @ w
        u /= np.linalg.norm(u)
        np.testing.assert_allclose(new_stats["sn"][f"{kind}/kernel/u"], u, rtol=1e-4, atol=1e-5)
        assert float(new_stats["sn"][f"{kind}/kernel/sigma"]) == pytest.approx((v @ w @ u.T).item(), rel=1e-4)
        assert float(np.max(np.abs(new_stats["sn"][f"{kind}/kernel/u"] - u0))) > 1e-3
    # repeated updates: sigma grows towards the largest singular value (never past it)
    w = np.asarray(dv["params"]["block1"]["conv1"]["conv"]["kernel"]).reshape(-1, 16)
    top = np.linalg.svd(w, compute_uv=False)[0]
    sigmas = []
    for _ in range(10):
        dv = {**dv, "batch_stats": apply(dv)[1]["batch_stats"]}
        sigmas.append(float(dv["batch_stats"]["block1"]["conv1"]["sn"]["conv/kernel/sigma"]))
    assert all(b >= a - 1e-6 for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] <= top * (1 + 1e-5)
    assert sigmas[-1] > 0.8 * top


def test_conditional_batch_norm_init_and_labels():
    bn = ConditionalBatchNorm(num_classes=3)
    x = jax.random.normal(jax.random.key(4), (4, 2, 2, 5))
    variables = _jit(lambda k: bn.init(k, x, jnp.zeros(4, jnp.int32), train=False))(jax.random.key(0))
    np.testing.assert_array_equal(variables["params"]["gain"], np.ones((3, 5)))  # the official init
    np.testing.assert_array_equal(variables["params"]["bias"], np.zeros((3, 5)))
    assert set(variables["batch_stats"]["bn"]) == {"mean", "var"} and "bn" not in variables["params"]
    # G: same z with different labels differs once the class tables differ; same label, same image
    z = jnp.tile(jax.random.normal(jax.random.key(5), (1, 128)), (4, 1))
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    gv = _filled(jax.eval_shape(G_NET.init, jax.random.key(0), z, y))
    run = _jit(lambda p: G_NET.apply({**gv, "params": p}, z, y, train=False))
    out = run(gv["params"])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # tables at their init: labels do not matter
    assert gv["params"]["block0"]["bn0"]["gain"].shape == (8, 16)
    rng = np.random.default_rng(0)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 * rng.normal(size=p.shape).astype(np.float32)
        if path[-1].key in ("gain", "bias") and p.ndim == 2 else p, gv["params"])
    out = run(moved)
    assert float(np.mean(np.abs(out[0] - out[1]))) > 1e-3
    np.testing.assert_array_equal(out[1], out[3])
    # projection discriminator: same image, different labels -> different logits
    x = jnp.tile(jax.random.normal(jax.random.key(7), (1, 32, 32, 3)), (4, 1, 1, 1))
    dv = _filled(jax.eval_shape(D_NET.init, jax.random.key(0), x, y), seed=1)
    logits = _jit(lambda v: D_NET.apply(v, x, y, update_stats=False))(dv)
    assert abs(float(logits[0] - logits[1])) > 1e-4 and float(logits[1]) == pytest.approx(float(logits[3]), abs=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        jax.eval_shape(lambda: G_NET.apply(gv, z, None, train=False))


def _biggan_count(size, ch, z_dim, k, attn):
    """G and D parameter counts by the BigGAN formulas (SNGAN-style ResNet, 3x3 convs with bias,
    bias-free attention convs C->C/8, C/8, C/2 and C/2->C plus gamma, class-conditional BN tables
    of 2 * K * C per BN, a projection embedding K * C)."""

    def attention(c):
        return 2 * c * (c // 8) + 2 * c * (c // 2) + 1

    gw = [ch * m for m in G_WIDTHS[size]]  # 4x4, 8x8, ...: attention after the output of size attn
    g = z_dim * 16 * gw[0] + 16 * gw[0] + attention(gw[int(np.log2(attn // 4))])
    for a, b in zip(gw[:-1], gw[1:]):
        g += (9 * a * b + b) + (9 * b * b + b) + (a * b + b) + 2 * (k or 1) * (a + b)
    g += 2 * gw[-1] + 9 * gw[-1] * 3 + 3
    d, a, r, placed = 0, 3, size, False
    for i, (m, down) in enumerate(D_WIDTHS[size]):
        b, r = ch * m, r // 2 if down else r
        d += (9 * a * b + b) + (9 * b * b + b) + ((a * b + b) if (i == 0 or down or a != b) else 0)
        if r == attn and not placed:
            d, placed = d + attention(b), True
        a = b
    return g, d + a + 1 + k * a


@pytest.mark.parametrize("size,k,attn", [(32, 10, 16), (64, 1000, 32), (128, 1000, 32), (128, 0, 64)])
def test_parameter_counts(size, k, attn):
    g = SAGANGenerator(size, 64, 128, k, attn)
    d = SAGANDiscriminator(size, 64, k, attn)
    y = _labels(1, k)
    gp = jax.eval_shape(lambda key: g.init(key, jnp.zeros((1, 128)), y), jax.random.key(0))["params"]
    dp = jax.eval_shape(lambda key: d.init(key, jnp.zeros((1, size, size, 3)), y), jax.random.key(0))["params"]
    assert (count_params(gp), count_params(dp)) == _biggan_count(size, 64, 128, k, attn)
    if (size, k) == (128, 1000):
        # BigGAN (Brock et al. 2019) Table 1, row 1: the SA-GAN baseline at 128 px, ch 64: 81.5M
        assert count_params(gp) + count_params(dp) == 81_542_470
        assert round((count_params(gp) + count_params(dp)) / 1e6, 1) == 81.5


# --------------------------------------------------------------------------- task


def _task_config(**model):
    c = load_config("configs/demo_sagan.py")
    c.model.update({"ch": 4, "ema_decay": 0.5, **model})
    return c


def _batch(rng, n=8, k=8):
    return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, k, n), jnp.int32)}


INIT_BATCH = {"image": jnp.zeros((1, 32, 32, 3)), "label": jnp.zeros((1,), jnp.int32)}


def _task_init(task, key=0):
    """task.init's structure with `_filled` values, the EMA entries copies as init makes them."""
    params, variables = _filled(jax.eval_shape(task.init, jax.random.key(key), INIT_BATCH))
    variables = {**variables, "generator_ema": params["generator"]}
    if "generator_ema_stats" in variables:
        variables["generator_ema_stats"] = variables["generator"]
    return params, variables


def test_task_init_structure():
    task = build_task(_task_config())
    params, variables = jax.eval_shape(task.init, jax.random.key(0), INIT_BATCH)
    assert set(params) == {"generator", "critic"}
    assert set(variables) == {"generator", "critic", "generator_ema", "generator_ema_stats"}
    struct = jax.tree_util.tree_structure
    assert struct(variables["generator_ema"]) == struct(params["generator"])
    shapes = functools.partial(jax.tree_util.tree_map, lambda s: (s.shape, s.dtype))
    assert shapes(variables["generator_ema"]) == shapes(params["generator"])
    assert struct(variables["generator_ema_stats"]) == struct(variables["generator"])
    assert set(variables["generator"]["batch_stats"]) >= {"block0", "attention", "bn_out", "dense", "conv_out"}
    assert params["generator"]["attention"]["theta"]["conv"]["kernel"].shape == (1, 1, 16, 2)
    assert params["critic"]["embed"]["dense"]["kernel"].shape == (8, 16)  # the projection's class embedding


@pytest.mark.slow
def test_task_init_values():
    task = build_task(_task_config())
    params, variables = _jit(task.init)(jax.random.key(0), INIT_BATCH)
    for a, b in zip(jax.tree_util.tree_leaves(params["generator"]), jax.tree_util.tree_leaves(variables["generator_ema"])):
        np.testing.assert_array_equal(a, b)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(variables["generator"]), leaves(variables["generator_ema_stats"])):
        np.testing.assert_array_equal(a, b)
    assert float(params["generator"]["attention"]["gamma"]) == 0.0 and float(params["critic"]["attention"]["gamma"]) == 0.0
    np.testing.assert_array_equal(params["generator"]["block1"]["bn1"]["gain"], np.ones((8, 16)))
    state = create_state(params, task.optimizers, jax.random.key(1), variables)
    for i, update in enumerate(task.updates):
        state, m = _jit(lambda s, b, i, u=update: apply_update(u, s, b, i))(state, _batch(np.random.default_rng(i)), i)
        assert all(np.isfinite(float(v)) for v in m.values())


@pytest.fixture(scope="module")
def trained():
    """The demo task (ch 4, EMA decay 0.5): D, G, D, G updates on random batches."""
    config = _task_config()
    task = build_task(config)
    assert task.fields == ("label",) and [u.net for u in task.updates] == ["critic", "generator"]
    params, variables = _task_init(task)
    state0 = create_state(params, task.optimizers, jax.random.key(1), variables)
    fns = [_jit(lambda s, b, i, u=u: apply_update(u, s, b, i)) for u in task.updates]
    rng = np.random.default_rng(0)
    states, metrics = [state0], []
    for _ in range(2):
        for i, fn in enumerate(fns):
            s, m = fn(states[-1], _batch(rng), i)
            states.append(s)
            metrics.append({k: float(v) for k, v in m.items()})
    return task, config, fns, states, metrics
def test_task_updates_run_finite(trained):
    task, config, _, states, metrics = trained
    assert [int(s.step) for s in states] == [0, 0, 1, 1, 2]
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values()), m
        assert all(m[k] == 1.0 for k in m if k.endswith("_finite"))
    assert {"d_loss", "d_real", "d_fake"} <= set(metrics[0]) and {"g_loss", "g_attention_gamma"} <= set(metrics[1])
    assert metrics[0]["d_loss"] == pytest.approx(2.0, abs=0.5)  # hinge loss at init: logits near 0
    opt = config.optimizer
    assert (opt.generator.lr, opt.critic.lr, opt.generator.b1, opt.generator.b2) == (1e-4, 4e-4, 0.0, 0.9)


def test_task_variables_and_ema(trained):
    _, _, _, states, _ = trained
    s0, s1, s2 = jax.device_get(states[:3])  # compared in numpy (eager jnp ops compile one by one)

    def diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    # D update: D's params and SN vectors move, G untouched
    assert diff(s1.params["critic"], s0.params["critic"]) > 0 and diff(s1.variables["critic"], s0.variables["critic"]) > 0
    assert diff(s1.params["generator"], s0.params["generator"]) == 0
    assert diff(s1.variables["generator"], s0.variables["generator"]) == 0
    # G update: G's params, BN running averages and SN vectors move; so does the EMA, by the engine's rule
    assert diff(s2.params["generator"], s1.params["generator"]) > 0
    bn = ("block0", "bn0", "bn", "mean")
    get = lambda v: v["batch_stats"][bn[0]][bn[1]][bn[2]][bn[3]]  # noqa: E731
    assert float(np.max(np.abs(get(s2.variables["generator"]) - get(s1.variables["generator"])))) > 0
    ema = jax.tree_util.tree_map(lambda e, p: 0.5 * e + 0.5 * p, s1.variables["generator_ema"], s2.params["generator"])
    assert diff(s2.variables["generator_ema"], ema) < 1e-6
    assert diff(s2.variables["generator_ema"], s1.variables["generator_ema"]) > 0
    # "track": the EMA generator keeps its own batch-norm statistics, updated by the G update
    assert diff(s2.variables["generator_ema_stats"], s1.variables["generator_ema_stats"]) > 0
    assert diff(s2.variables["generator_ema_stats"], s2.variables["generator"]) > 0


def test_critic_updates_lower_hinge_loss(trained):
    _, _, fns, states, _ = trained
    batch = _batch(np.random.default_rng(1))
    state, losses = states[-1], []
    for _ in range(6):  # D updates do not advance the step: same key, same fakes
        state, m = fns[0](state, batch, 0)
        losses.append(float(m["d_loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_predict_samples_from_ema_with_fixed_latents(trained):
    task, _, _, states, _ = trained
    s = states[-1]
    predict = _jit(task.predict)
    batch = _batch(np.random.default_rng(2))
    out = jax.device_get(predict(s.params, s.variables, batch))
    assert out["output"].shape == (8, 32, 32, 3) and float(np.max(np.abs(out["output"]))) <= 1.0
    np.testing.assert_array_equal(out["real"], batch["image"])
    np.testing.assert_array_equal(predict(s.params, s.variables, batch)["output"], out["output"])  # fixed latents
    other = {**batch, "index": np.arange(8, 16, dtype=np.int32)}
    assert float(np.mean(np.abs(predict(s.params, s.variables, other)["output"] - out["output"]))) > 1e-4
    # the EMA generator draws them: the live generator's params do not matter, the EMA's do
    zeroed = jax.tree_util.tree_map(np.zeros_like, s.params["generator"])
    np.testing.assert_array_equal(predict({**s.params, "generator": zeroed}, s.variables, batch)["output"], out["output"])
    moved = {**s.variables, "generator_ema": s.params["generator"]}
    assert float(np.mean(np.abs(predict(s.params, moved, batch)["output"] - out["output"]))) > 1e-5


def test_unconditional_batch_stats_mode_and_config_errors():
    config = _task_config(num_classes=0, ema_stats="batch", attention_resolution=8)
    task = build_task(config)
    assert task.fields == ()
    shapes = jax.eval_shape(task.init, jax.random.key(0), {"image": jnp.zeros((1, 32, 32, 3))})
    assert set(shapes[1]) == {"generator", "critic", "generator_ema"}  # no EMA statistics in "batch" mode
    assert "embed" not in shapes[0]["critic"] and set(shapes[0]["generator"]["block0"]["bn0"]) == {"bn"}
    assert shapes[0]["generator"]["attention"]["theta"]["conv"]["kernel"].shape == (1, 1, 16, 2)  # at 8x8: 4 * 4 ch
    params, variables = _filled(shapes)
    batch = {"image": jnp.zeros((4, 32, 32, 3))}
    out = _jit(task.predict)(params, variables, batch)["output"]
    assert out.shape == (4, 32, 32, 3) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="ema_stats"):
        build_task(_task_config(ema_stats="running"))
    bad_loss = _task_config()
    bad_loss.loss.kind = "wgan"
    with pytest.raises(ValueError, match=r"loss.kind must be one of \['hinge', 'nonsaturating'\], got 'wgan'"):
        build_task(bad_loss)


@pytest.mark.parametrize("name,size,k,attn", [("sagan_imagenet128", 128, 1000, 32), ("sagan_cifar10", 32, 10, 16),
                                               ("demo_sagan", 32, 8, 16)])
def test_configs(name, size, k, attn):
    c = load_config(f"configs/{name}.py")
    assert (c.model.name, c.data.image_size, c.model.num_classes, c.model.attention_resolution) == ("sagan", size, k, attn)
    assert (c.optimizer.generator.lr, c.optimizer.critic.lr, c.n_critic) == (1e-4, 4e-4, 1)
    task = build_task(c)
    assert task.fields == ("label",) and len(task.updates) == 2
    if name == "sagan_imagenet128":
        assert c.batch_size == 256 and c.model.ch == 64
