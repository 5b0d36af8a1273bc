"""DeepFill v2: gated generator, SN-PatchGAN critic, losses and task, against the official golden files."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jattn import losses as L
from jattn.export import deepfill_import as di
from jattn.models.deepfill_v2 import DeepFillV2Generator, KernelSpectralNorm, SNPatchGANCritic, offsets_to_flow_v2

GEN_PARAMS = 4_052_478  # variables.txt
CRITIC_PARAMS = 5_946_816  # disc_variables.txt: 5,948,032 tensors' entries, 1,216 of them the u vectors
CRITIC_U = 1_216
LAYERS = [f"conv{i}" for i in range(1, 7)]


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _listed(path, scope):
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        out[name.removeprefix(scope + "/")] = tuple(int(s) for s in shape.strip("[]").split(","))
    return out


def _u_tree(arrays: dict, which: str):
    """batch_stats of the critic from losses.npz's u_before / u_after entries."""
    return {"sn_patch_gan": {
        n: {"kernel_sn": {"u": jnp.asarray(arrays[f"{which}/discriminator/sn_patch_gan/{n}/kernel_sn/u"])}}
        for n in LAYERS
    }}


# --------------------------------------------------------------------------- architecture


def test_parameter_counts_and_names():
    x, m = jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 256, 256, 1))
    gen = jax.eval_shape(DeepFillV2Generator().init, jax.random.key(0), x, m)["params"]
    assert _count(gen) == GEN_PARAMS
    assert len(jax.tree.leaves(gen)) == 84
    assert gen["conv1"]["kernel"].shape == (5, 5, 5, 48)  # stage 1: image, ones, mask
    assert gen["xconv1"]["kernel"].shape == gen["pmconv1"]["kernel"].shape == (5, 5, 3, 48)  # composite only
    assert gen["pmconv6"]["kernel"].shape == (3, 3, 96, 192)  # contextual attention on 96 channels
    assert gen["allconv11"]["kernel"].shape == (3, 3, 192, 192)  # concat of two 96-channel branches
    assert gen["conv17"]["kernel"].shape == (3, 3, 12, 3)
    assert set(gen["conv13_upsample"]) == {"conv13_upsample_conv"}
    crit = jax.eval_shape(SNPatchGANCritic().init, jax.random.key(0), jnp.zeros((1, 256, 256, 4)))
    assert _count(crit["params"]) == CRITIC_PARAMS and _count(crit["batch_stats"]) == CRITIC_U
    assert crit["batch_stats"]["sn_patch_gan"]["conv6"]["kernel_sn"]["u"].shape == (1, 256)
    out = jax.eval_shape(lambda v, x: SNPatchGANCritic().apply(v, x), crit, jnp.zeros((4, 256, 256, 4)))
    assert out.shape == (4, 4096) and out.dtype == jnp.float32
    small = jax.eval_shape(DeepFillV2Generator(cnum=8).init, jax.random.key(0), x[:, :32, :32], m[:, :32, :32])
    assert small["params"]["conv16"]["kernel"].shape == (3, 3, 4, 4)
    assert small["params"]["allconv11"]["kernel"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize("cnum", [12, 6, 10, 0])
def test_cnum_must_allow_gating(cnum):
    with pytest.raises(ValueError, match="multiple of 4"):
        DeepFillV2Generator(cnum=cnum)


def test_registry():
    """The task registry builds DeepFill v2 by name from a config, with the schema's defaults."""
    from jattn.train.task import build_task, task_names

    assert "deepfill_v2" in task_names()
    config = ml_collections.ConfigDict({"model": {"name": "deepfill_v2", "cnum": 16, "critic_cnum": 8},
                                        "data": {"image_size": 32}, "learning_rate": 1e-4})
    task = build_task(config)
    assert task.name == "deepfill_v2" and [u.name for u in task.updates] == ["d", "g"]  # the official n_critic
    batch = {"image": jnp.zeros((1, 32, 32, 3)), "mask": jnp.zeros((1, 32, 32, 1))}
    params, variables = jax.eval_shape(task.init, jax.random.key(0), batch)
    assert params["generator"]["conv1"]["kernel"].shape[-1] == 16
    critic_conv1 = params["critic"]["sn_patch_gan"]["conv1"]["kernel"]
    assert critic_conv1.shape[-2:] == (4, 8)  # gan_with_mask's default: [image, mask] in
    assert "u" in variables["critic"]["batch_stats"]["sn_patch_gan"]["conv1"]["kernel_sn"]
    config.model.name = "deepfill_v3"
    with pytest.raises(ValueError, match=r"unknown model 'deepfill_v3'; known models: .*deepfill_v1, deepfill_v2"):
        build_task(config)


def test_spectral_norm_power_iteration():
    """One neuralgym power iteration: v = l2(u W^T), u' = l2(v W), W / (v W u'^T); u stored only when asked."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    u0 = rng.normal(size=(1, 5)).astype(np.float32)
    sn = KernelSpectralNorm()
    variables = {"batch_stats": {"u": jnp.asarray(u0)}}
    w_norm, new = sn.apply(variables, kernel, True, mutable=["batch_stats"])
    w = kernel.reshape(-1, 5).astype(np.float64)
    v = u0 @ w.T
    v /= np.linalg.norm(v)
    u1 = v @ w
    u1 /= np.linalg.norm(u1)
    sigma_ref = (v @ w @ u1.T).item()
    np.testing.assert_allclose(np.asarray(w_norm), kernel / sigma_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["u"]), u1, rtol=1e-5, atol=1e-6)
    _, same = sn.apply(variables, kernel, False, mutable=["batch_stats"])
    np.testing.assert_array_equal(same["batch_stats"]["u"], u0)
    # init keeps the drawn vector (TF's truncated normal, |u_i| <= 2): the first forward pass updates it
    init_u = sn.init(jax.random.key(3), kernel, True)["batch_stats"]["u"]
    np.testing.assert_array_equal(init_u, sn.init(jax.random.key(3), kernel, False)["batch_stats"]["u"])
    assert init_u.shape == (1, 5) and np.abs(init_u).max() <= 2.0 and abs(np.linalg.norm(init_u) - 1) > 1e-3

    # The gradient goes through v, u' and sigma as in TF (flax's SpectralNorm stops it there).
    def sigma(k, stop):
        w = k.reshape(-1, 5)
        v = u0 @ w.T
        v = v / jnp.linalg.norm(v)
        u = v @ w
        u = u / jnp.linalg.norm(u)
        if stop:
            v, u = jax.lax.stop_gradient(v), jax.lax.stop_gradient(u)
        return (v @ w @ u.T)[0, 0]

    def grads(k):
        energy = lambda w: jnp.sum(w**2 * jnp.arange(w.size).reshape(w.shape))  # noqa: E731
        return (jax.grad(lambda k: energy(sn.apply(variables, k, False)))(k),
                jax.grad(lambda k: energy(k / sigma(k, False)))(k),
                jax.grad(lambda k: energy(k / sigma(k, True)))(k))

    g_module, g_full, g_stopped = jax.jit(grads)(jnp.asarray(kernel))
    np.testing.assert_allclose(g_module, g_full, rtol=1e-4, atol=1e-4 * np.abs(g_full).max())
    assert np.abs(np.asarray(g_full) - np.asarray(g_stopped)).max() > 1e-2 * np.abs(g_full).max()


# --------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def v2_dir(golden_dir):
    d = golden_dir / "deepfill_official" / "v2_seed1"
    if not d.is_dir():
        pytest.skip(f"official DeepFill v2 golden files not found at {d}")
    return d


def test_checkpoint_names_match_variables_txt(v2_dir):
    assert di.expected_generator_shapes("v2") == _listed(v2_dir / "variables.txt", "inpaint_net")
    assert di.expected_critic_v2_shapes() == _listed(v2_dir / "disc_variables.txt", "discriminator")


@pytest.fixture(scope="module")
def golden_run(v2_dir):
    params = di.load_official_generator(str(v2_dir / "ckpt" / "snap-0"), "v2")
    g = np.load(v2_dir / "golden.npz")
    model = DeepFillV2Generator()
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, mutable=["intermediates"]))
    (x1, x2, offsets), state = fwd(params, g["x_in"], g["mask"])
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return dict(params=params, golden=g, x1=np.asarray(x1), x2=np.asarray(x2), offsets=offsets, inter=inter)


def test_golden_generator(golden_run, v2_dir):
    g = golden_run["golden"]
    assert _count(golden_run["params"]) == GEN_PARAMS
    np.testing.assert_allclose(golden_run["x1"], g["x1"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(golden_run["x2"], g["x2"], atol=1e-4, rtol=0)
    flow = np.asarray(offsets_to_flow_v2(golden_run["offsets"]))
    assert flow.shape == g["offset_flow"].shape == (2, 64, 64, 3)
    np.testing.assert_allclose(flow, g["offset_flow"], atol=2 / 255 + 1e-6, rtol=0)  # one uint8 step
    complete = golden_run["x2"] * g["mask"] + g["x_in"] * (1 - g["mask"])
    out = np.clip((complete + 1) * 127.5, 0, 255).astype(np.uint8)[..., ::-1]
    assert np.abs(out.astype(int) - g["output_uint8"].astype(int)).max() <= 1
    ref = np.load(v2_dir / "intermediates.npz")
    np.testing.assert_array_equal(golden_run["inter"]["mask_s"], ref["mask_s"])
    for key in ("ca_f", "ca_y", "x_hallu", "pm"):
        assert golden_run["inter"][key].shape == ref[key].shape == (2, 64, 64, 96), key
        np.testing.assert_allclose(golden_run["inter"][key], ref[key], atol=1e-4, rtol=0, err_msg=key)


def test_golden_critic_and_losses(v2_dir):
    """The official graph's critic input is [batch_pos; batch_complete] with the tiled mask as
    a 4th channel, batch_complete = x2 * mask + batch_pos * (1 - mask) (the golden x1 / x2)."""
    g, ref = np.load(v2_dir / "golden.npz"), np.load(v2_dir / "losses.npz")
    loaded = di.load_official_critic_v2(str(v2_dir / "disc_ckpt" / "snap-0"))
    assert _count(loaded["params"]) == CRITIC_PARAMS
    u_before = _u_tree(ref, "u_before")
    for n in LAYERS:  # the checkpoint holds the vectors the official run started from
        np.testing.assert_array_equal(loaded["batch_stats"]["sn_patch_gan"][n]["kernel_sn"]["u"],
                                      u_before["sn_patch_gan"][n]["kernel_sn"]["u"])
    critic = SNPatchGANCritic()

    def score(x):
        return critic.apply({"params": loaded["params"], "batch_stats": u_before}, x, update_stats=True,
                            mutable=["batch_stats"])

    out = jax.jit(lambda *a: L.deepfill_v2_losses(score, *a, critic_has_aux=True))(
        g["batch_pos"], g["x1"], g["x2"], g["mask"])
    assert out["d_pos_neg"].shape == ref["d_pos_neg"].shape == (4, 4096)
    np.testing.assert_allclose(out["d_pos_neg"], ref["d_pos_neg"], atol=1e-5, rtol=1e-5)
    for key in ("ae_loss", "g_loss", "d_loss"):
        np.testing.assert_allclose(float(out[key]), float(ref[f"loss_{key}"]), rtol=1e-5, atol=0, err_msg=key)
    u_after = _u_tree(ref, "u_after")
    for n in LAYERS:
        got = out["critic_aux"]["batch_stats"]["sn_patch_gan"][n]["kernel_sn"]["u"]
        want = u_after["sn_patch_gan"][n]["kernel_sn"]["u"]
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=n)
        before = u_before["sn_patch_gan"][n]["kernel_sn"]["u"]
        assert abs(np.linalg.norm(want) - 1) < 1e-5 and abs(np.linalg.norm(before) - 1) > 0.1  # normalised by the run


def test_v2_loss_formulas():
    """Hand-checkable numbers: ae and hinge terms, the mask channel, one shared mask tiled."""
    gt = jnp.zeros((2, 4, 4, 3))
    x1 = jnp.full((2, 4, 4, 3), 0.5)
    x2 = jnp.full((2, 4, 4, 3), -0.25)
    mask = jnp.zeros((1, 4, 4, 1)).at[:, 1:3, 1:3].set(1.0)
    seen = {}

    def critic(x):  # rows: real and completed interleaved (L.pair)
        seen["x"] = x
        return L.pair(jnp.array([[2.0, 0.0], [0.5, 0.5]]), jnp.array([[-3.0, 1.0], [0.0, 0.0]]))

    out = L.deepfill_v2_losses(critic, gt, x1, x2, mask, l1_loss_alpha=2.0, gan_loss_alpha=0.5)
    assert seen["x"].shape == (4, 4, 4, 4)
    np.testing.assert_array_equal(seen["x"][..., 3], jnp.broadcast_to(mask[..., 0], (4, 4, 4)))
    np.testing.assert_allclose(seen["x"][1::2, ..., :3], out["batch_complete"])
    np.testing.assert_allclose(seen["x"][0::2, ..., :3], gt)
    np.testing.assert_allclose(out["batch_complete"][:, 1, 1], -0.25)
    np.testing.assert_allclose(out["batch_complete"][:, 0, 0], 0.0)
    np.testing.assert_allclose(out["ae_loss"], 2.0 * (0.5 + 0.25))
    hinge_pos = np.mean([0.0, 1.0, 0.5, 0.5])  # relu(1 - pos)
    hinge_neg = np.mean([0.0, 2.0, 1.0, 1.0])  # relu(1 + neg)
    np.testing.assert_allclose(out["d_loss"], 0.5 * hinge_pos + 0.5 * hinge_neg)
    np.testing.assert_allclose(out["g_loss_gan"], 0.5)
    np.testing.assert_allclose(out["g_loss"], 0.5 * 0.5 + 1.5)
    plain = L.deepfill_v2_losses(critic, gt, x1, x2, mask, gan_with_mask=False, ae_loss=False)
    assert seen["x"].shape == (4, 4, 4, 3)
    np.testing.assert_allclose(plain["g_loss"], 0.5)


# --------------------------------------------------------------------------- task


def _tiny_config(**overrides):
    from jattn.config import load_config

    config = load_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "demo_deepfill_v2.py")
    config.model.update({"cnum": 8, "critic_cnum": 8})
    config.data.image_size = 32
    config.learning_rate = 1e-3
    for key, value in overrides.items():
        config[key] = value
    return config


def _task_state(config):
    """State of the task with numpy-drawn params (avoids compiling the networks' init)."""
    from jattn.train.setup import init_batch
    from jattn.train.state import create_state
    from jattn.train.task import build_task

    task = build_task(config)
    params, variables = jax.eval_shape(task.init, jax.random.key(0), init_batch(config, task.fields))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            a = np.sqrt(6.0 / (np.prod(leaf.shape[:-1]) + leaf.shape[-1])) * 2.0
            return jnp.asarray(rng.uniform(-a, a, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0, 1 if path[-1].key == "u" else 0.05, leaf.shape), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, params)
    variables = jax.tree_util.tree_map_with_path(draw, variables)
    return task, create_state(params, task.optimizers, jax.random.key(1), variables)


def _batch(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, size, size, 1), np.float32)
    mask[0, 6:20, 8:22] = 1
    mask[-1, 14:28, 4:16] = 1
    return {"image": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 3)), jnp.float32), "mask": jnp.asarray(mask)}


def _u(state, layer="conv1"):
    return np.asarray(state.variables["critic"]["batch_stats"]["sn_patch_gan"][layer]["kernel_sn"]["u"])


def test_task_updates_keep_finite_and_move_u():
    from jattn.train.steps import apply_update

    config = _tiny_config()
    task, state = _task_state(config)
    assert [u.name for u in task.updates] == ["d", "g"] and [u.net for u in task.updates] == ["critic", "generator"]
    batch = _batch()
    u0 = _u(state)
    params0 = jax.tree.map(np.asarray, state.params)
    fns = [jax.jit(lambda s, b, upd=upd: apply_update(upd, s, b, 0)) for upd in task.updates]
    history = []
    for _ in range(2):
        for fn in fns:
            before = _u(state)
            state, metrics = fn(state, batch)
            history.append({k: float(v) for k, v in metrics.items()})
            after = _u(state)
            assert np.abs(after - before).max() > 0  # every critic forward pass moves u
            assert abs(np.linalg.norm(after) - 1) < 1e-5
    assert int(state.step) == 2
    assert np.abs(_u(state) - u0).max() > 1e-3
    for m in history:
        assert all(np.isfinite(v) for v in m.values()), m
    assert history[0]["d_finite"] == history[1]["g_finite"] == 1.0
    assert {"d_loss", "d_hinge_pos", "d_hinge_neg"} <= set(history[0])
    assert {"g_loss", "ae_loss", "g_loss_gan"} <= set(history[1])
    np.testing.assert_allclose(history[1]["g_loss"], history[1]["ae_loss"] + history[1]["g_loss_gan"], rtol=1e-5)
    for net in ("generator", "critic"):  # both networks were updated
        moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params[net], params0[net])
        assert max(jax.tree.leaves(moved)) > 1e-4, net
    out = jax.eval_shape(task.predict, state.params, state.variables, batch)
    assert {k: v.shape for k, v in out.items()} == {
        "input": (2, 32, 32, 3), "coarse": (2, 32, 32, 3), "refined": (2, 32, 32, 3),
        "output": (2, 32, 32, 3), "flow": (2, 8, 8, 3)}
    # a few more steps on the same small batch lower the reconstruction (AE) loss
    for _ in range(6):
        for fn in fns:
            state, metrics = fn(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["ae_loss"] < history[1]["ae_loss"], [h.get("ae_loss") for h in history]


def test_task_config_checks():
    from jattn.train.task import build_task

    task = build_task(_tiny_config(n_critic=2))
    assert [u.name for u in task.updates] == ["d", "d", "g"]
    config = _tiny_config()
    config.loss = ml_collections.ConfigDict({"l1_alpha": 1.0})
    with pytest.raises(ValueError, match="l1_alpha"):
        build_task(config)


@pytest.mark.slow
def test_task_bf16_updates():
    from jattn.train.steps import apply_update

    task, state = _task_state(_tiny_config(compute_dtype="bfloat16"))
    batch = _batch()
    for upd in task.updates:
        state, metrics = jax.jit(lambda s, b, upd=upd: apply_update(upd, s, b, 0))(state, batch)
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    out = jax.jit(task.predict)(state.params, state.variables, batch)
    assert out["output"].dtype == jnp.float32 and np.isfinite(np.asarray(out["output"])).all()
    assert np.abs(np.asarray(out["refined"])).max() <= 1.0
