"""Self-attention inpainting: generator / critic layout, the full-width scaled attention with
gamma = 0 at init, spectral-norm state, and the GAN task."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.sa_inpaint import PatchCritic, SAInpaintGenerator
from jattn.train.task import build_task
from jattn.train.tasks.sa_inpaint import masked_l1
from task_helpers import fit, init_state, jit, task_config

WIDTHS, CRITIC = (8, 8, 16), (8, 8, 8, 8)


def test_default_layout_and_shapes():
    gen = SAInpaintGenerator()
    image, mask = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 32, 32, 1))
    p = jax.eval_shape(gen.init, jax.random.key(0), image, mask)["params"]
    assert p["enc0"]["kernel"].shape == (5, 5, 4, 64)  # image * (1 - mask) and the mask: 4 channels
    assert p["enc1"]["kernel"].shape == (3, 3, 64, 128) and p["enc2"]["kernel"].shape == (3, 3, 128, 256)
    att = p["attention"]
    for name in ("query", "key", "value"):  # queries, keys and values at full width
        assert att[name]["kernel"].shape == (1, 1, 256, 256)
    assert att["gamma"].shape == ()
    assert p["out"]["kernel"].shape == (3, 3, 64, 3)
    out = jax.eval_shape(gen.apply, {"params": p}, image, mask)
    assert out.shape == (2, 32, 32, 3)
    critic = PatchCritic(spectral_norm=True)
    v = jax.eval_shape(lambda k: critic.init(k, image, mask), jax.random.key(0))
    assert jax.eval_shape(lambda v: critic.apply(v, image, mask), v).shape == (2, 4, 4, 1)
    assert v["params"]["conv0"]["conv"]["kernel"].shape == (4, 4, 4, 64)  # image + mask
    assert v["batch_stats"]["conv0"]["sn"]["conv/kernel/u"].shape == (1, 64)  # power iteration
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros((1, 30, 30, 3)), jnp.zeros((1, 30, 30, 1)))


def _photos(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.uniform(0.5, 2) * xx) + rng.uniform(0, 6))
                    for _ in range(3 * n)]).reshape(n, 3, size, size).transpose(0, 2, 3, 1)
    mask = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        r, c = rng.integers(0, size // 2, 2)
        mask[i, r : r + size // 2, c : c + size // 2] = 1
    return {"image": jnp.asarray(0.8 * img, jnp.float32), "mask": jnp.asarray(mask)}


def _config(**loss):
    return task_config({"name": "sa_inpaint", "widths": WIDTHS, "critic_widths": CRITIC, "spectral_norm": True},
                       image_size=16, lr=3e-3, loss={"l1_hole": 1.0, "l1_valid": 1.0, "adv": 0.01, **loss}, n_critic=1,
                       optimizer={"generator": {"lr": None, "b1": 0.5, "b2": 0.999},
                                  "critic": {"lr": None, "b1": 0.5, "b2": 0.999}})


@pytest.fixture(scope="module")
def setup():
    task = build_task(_config())
    batch = _photos()
    return task, batch, init_state(task, batch)


def test_gamma_zero_at_init_and_attention_is_then_the_identity(setup):
    task, batch, state = setup
    g = state.params["generator"]
    assert float(g["attention"]["gamma"]) == 0.0
    assert g["attention"]["query"]["kernel"].shape == (1, 1, 16, 16)  # full width of the small net too
    gen = SAInpaintGenerator(WIDTHS)
    run = jit(lambda p, module: module.apply({"params": p}, batch["image"], batch["mask"]), static_argnums=1)
    with_att = run(g, gen)
    without = run({k: v for k, v in g.items() if k != "attention"}, SAInpaintGenerator(WIDTHS, attention=False))
    np.testing.assert_allclose(np.asarray(with_att), np.asarray(without), atol=1e-6)
    moved = {**g, "attention": {**g["attention"], "gamma": jnp.asarray(1.0)}}
    assert float(jnp.max(jnp.abs(run(moved, gen) - with_att))) > 1e-4


def test_attention_weights_are_scaled_by_one_over_sqrt_width(setup):
    _, batch, state = setup
    g = state.params["generator"]
    gen = SAInpaintGenerator(WIDTHS)

    @jit
    def run(p):
        return gen.apply({"params": p}, batch["image"], batch["mask"], return_attention=True,
                         capture_intermediates=lambda mdl, _: mdl.name == "enc2")

    (_, weights), inter = run(g)
    feats = jax.nn.relu(inter["intermediates"]["enc2"]["__call__"][0]).reshape(4, -1, 16)  # [B, HW, C]
    q = feats @ g["attention"]["query"]["kernel"][0, 0] + g["attention"]["query"]["bias"]
    k = feats @ g["attention"]["key"]["kernel"][0, 0] + g["attention"]["key"]["bias"]
    expected = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(16), axis=-1)
    assert weights.shape == (4, 16, 16)  # 4x4 positions at 1/4 of 16x16
    np.testing.assert_allclose(np.asarray(weights), np.asarray(expected), atol=1e-5)


def test_task_trains_critic_then_generator(setup):
    task, batch, state0 = setup
    assert [u.net for u in task.updates] == ["critic", "generator"] and task.fields == ("mask",)
    state, history = fit(task, batch, 20, state=state0)
    assert all(h["d_finite"] == 1.0 and h["g_finite"] == 1.0 for h in history)
    l1 = [h["l1_loss"] for h in history]
    assert l1[-1] < 0.7 * l1[0], l1
    # spectral-norm vectors: moved by the critic updates (the generator update does not write them)
    u0 = state0.variables["critic"]["batch_stats"]["conv0"]["sn"]["conv/kernel/u"]
    u1 = state.variables["critic"]["batch_stats"]["conv0"]["sn"]["conv/kernel/u"]
    assert float(jnp.max(jnp.abs(u1 - u0))) > 1e-3
    state_g, _ = fit(dataclasses.replace(task, updates=task.updates[1:]), batch, 1, state=state)
    np.testing.assert_array_equal(np.asarray(state_g.variables["critic"]["batch_stats"]["conv0"]["sn"]["conv/kernel/u"]),
                                  np.asarray(u1))
    out = jit(task.predict)(state.params, state.variables, batch)
    img, mask = batch["image"], batch["mask"]
    np.testing.assert_allclose(np.asarray(out["output"] * (1 - mask)), np.asarray(img * (1 - mask)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["output"] * mask), np.asarray(out["raw"] * mask), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["input"] * mask), np.asarray(jnp.broadcast_to(mask, img.shape)))
    assert float(jnp.max(jnp.abs(out["raw"]))) < 1.0
    assert task.eval_metrics is None and task.export_network == "generator"


def test_losses_hand_computed_and_config_errors():
    a = jnp.zeros((1, 2, 2, 3))
    b = jnp.asarray([[[[1.0] * 3, [2.0] * 3], [[3.0] * 3, [4.0] * 3]]])
    mask = jnp.asarray([[[[1.0], [0.0]], [[0.0], [1.0]]]])
    assert float(masked_l1(a, b, mask)) == pytest.approx((1 + 4) / 2)
    assert float(masked_l1(a, b, 1 - mask)) == pytest.approx((2 + 3) / 2)
    assert float(masked_l1(a, b, jnp.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError, match="loss.gan"):
        build_task(_config(gan="wasserstein-ish"))
    assert build_task(_config(gan="nonsaturating")).name == "sa_inpaint"
