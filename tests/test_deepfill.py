"""DeepFill v1 generator / critics / official checkpoint import, against the official golden files."""
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jattn.config import ConfigError
from jattn.export import deepfill_import as di
from jattn.train import task as task_module
from jattn.train.task import build_task, register_task, task_names
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, offsets_to_flow

GEN_PARAMS = 3_601_542
CRITIC_PARAMS = 7_072_770


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_params(model, *args, seed=0):
    """Glorot-uniform kernels, U(-0.1, 0.1) biases, drawn with numpy.

    (Eager `jax.random` here compiles one program per shape, which is slow on a shared CPU.)
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            fan_in, fan_out = int(np.prod(leaf.shape[:-1])), leaf.shape[-1]
            a = np.sqrt(6.0 / (fan_in + fan_out))
            return jnp.asarray(rng.uniform(-a, a, leaf.shape), jnp.float32)
        return jnp.asarray(rng.uniform(-0.1, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _small_inputs(batch=2, size=64, seed=1):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    masks = np.zeros((batch, size, size, 1), np.float32)
    masks[0, 16:40, 20:44] = 1
    masks[-1, 30:58, 8:30] = 1
    return image, masks


# --------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def v1_dir(golden_dir):
    d = golden_dir / "deepfill_official" / "v1_seed1"
    if not d.is_dir():
        pytest.skip(f"official DeepFill v1 golden files not found at {d}")
    return d


@pytest.fixture(scope="module")
def golden_run(v1_dir):
    params = di.load_official_generator(str(v1_dir / "ckpt" / "snap-0"))
    g = np.load(v1_dir / "golden.npz")
    model = DeepFillV1Generator()
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, mutable=["intermediates"]))
    (x1, x2, offsets), state = fwd(params, g["x_in"], g["mask"])
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return dict(params=params, golden=g, x1=np.asarray(x1), x2=np.asarray(x2), offsets=offsets, inter=inter)


def test_golden_outputs(golden_run):
    g = golden_run["golden"]
    np.testing.assert_allclose(golden_run["x1"], g["x1"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(golden_run["x2"], g["x2"], atol=1e-4, rtol=0)
    flow = np.asarray(offsets_to_flow(golden_run["offsets"]))
    assert flow.shape == g["offset_flow"].shape == (2, 64, 64, 3)
    np.testing.assert_allclose(flow, g["offset_flow"], atol=2 / 255 + 1e-6, rtol=0)
    assert golden_run["offsets"].dtype == jnp.int32
    # The official test output (composite, BGR -> RGB, truncated to uint8).
    complete = golden_run["x2"] * g["mask"] + g["x_in"] * (1 - g["mask"])
    out = np.clip((complete + 1) * 127.5, 0, 255).astype(np.uint8)[..., ::-1]
    assert np.abs(out.astype(int) - g["output_uint8"].astype(int)).max() <= 1


def test_golden_intermediates(golden_run, v1_dir):
    ref = np.load(v1_dir / "intermediates.npz")
    inter = golden_run["inter"]
    np.testing.assert_array_equal(inter["mask_s"], ref["mask_s"])
    for key in ("ca_f", "ca_y", "x_hallu", "pm"):
        assert inter[key].shape == ref[key].shape, key
        np.testing.assert_allclose(inter[key], ref[key], atol=1e-4, rtol=0, err_msg=key)


def test_checkpoint_matches_variables_txt(v1_dir):
    listed = {}
    for line in (v1_dir / "variables.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        listed[name.removeprefix("inpaint_net/")] = tuple(int(s) for s in shape.strip("[]").split(","))
    assert di.expected_generator_shapes() == listed
    listed = {}
    for line in (v1_dir / "disc_variables.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        listed[name.removeprefix("discriminator/")] = tuple(int(s) for s in shape.strip("[]").split(","))
    assert di.expected_critics_shapes() == listed


def test_load_official_critics(v1_dir):
    params = di.load_official_critics(str(v1_dir / "disc_ckpt"))  # a directory works too
    assert _count(params) == CRITIC_PARAMS
    assert params["discriminator_local"]["conv4"]["kernel"].shape == (5, 5, 256, 512)
    assert params["dout_global_fc"]["kernel"].shape == (65536, 1)


# --------------------------------------------------------------------------- architecture


def test_parameter_counts():
    x, m = jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 256, 256, 1))
    gen = jax.eval_shape(DeepFillV1Generator().init, jax.random.key(0), x, m)["params"]
    assert _count(gen) == GEN_PARAMS
    assert len(jax.tree.leaves(gen)) == 84
    assert set(gen["conv13_upsample"]) == {"conv13_upsample_conv"}
    assert gen["allconv15_upsample"]["allconv15_upsample_conv"]["kernel"].shape == (3, 3, 64, 32)
    crit = jax.eval_shape(
        DeepFillV1Critics().init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)), jnp.zeros((1, 256, 256, 3))
    )["params"]
    assert _count(crit) == CRITIC_PARAMS
    assert set(crit) == {"discriminator_local", "discriminator_global", "dout_local_fc", "dout_global_fc"}
    # Widths scale with cnum.
    small = jax.eval_shape(DeepFillV1Generator(cnum=8).init, jax.random.key(0), x[:, :64, :64], m[:, :64, :64])
    assert small["params"]["conv1"]["kernel"].shape == (5, 5, 5, 8)
    assert small["params"]["allconv11"]["kernel"].shape == (3, 3, 64, 32)


def test_input_checks():
    model = DeepFillV1Generator(cnum=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 60, 64, 3)), jnp.zeros((1, 60, 64, 1)))
    with pytest.raises(ValueError, match="mask batch"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 64, 64, 3)), jnp.zeros((3, 64, 64, 1)))


@pytest.fixture(scope="module")
def small_model():
    model = DeepFillV1Generator(cnum=8)
    image, masks = _small_inputs()
    params = _random_params(model, image, masks)
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    return model, params, fwd, image, masks


def test_per_image_masks_equal_single_runs(small_model):
    _, params, fwd, image, masks = small_model
    x1, x2, off = fwd(params, image * (1 - masks), masks)
    assert off.shape == (2, 8, 8, 2)
    for i in range(2):
        s1, s2, soff = fwd(params, image[i : i + 1] * (1 - masks[i : i + 1]), masks[i : i + 1])
        np.testing.assert_allclose(x1[i : i + 1], s1, atol=1e-5)
        np.testing.assert_allclose(x2[i : i + 1], s2, atol=1e-5)
        np.testing.assert_array_equal(off[i : i + 1], soff)
    # ... and differs from sharing the first mask (the masks do matter).
    _, x2_shared, _ = fwd(params, image * (1 - masks[:1]), masks[:1])
    assert np.abs(np.asarray(x2_shared[1]) - np.asarray(x2[1])).max() > 1e-3


def test_bf16_compute(small_model):
    _, params, _, image, masks = small_model
    model = DeepFillV1Generator(cnum=8, dtype=jnp.bfloat16)
    x1, x2, off = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(params, image * (1 - masks), masks)
    assert x1.shape == x2.shape == image.shape and off.dtype == jnp.int32
    assert np.isfinite(np.asarray(x1)).all() and np.isfinite(np.asarray(x2)).all()
    assert np.abs(np.asarray(x2)).max() <= 1.0


def _abstract_params(task, size):
    """The task's params as shapes, initialised (abstractly) on an image of `size` x `size`."""
    batch = {"image": jnp.zeros((1, size, size, 3)), "mask": jnp.zeros((1, size, size, 1))}
    params, _ = jax.eval_shape(task.init, jax.random.key(0), batch)
    return params


def test_registry():
    """The task registry builds DeepFill v1 by name from a config, with the schema's defaults."""
    assert "deepfill_v1" in task_names()
    config = ml_collections.ConfigDict({"model": {"name": "deepfill_v1", "cnum": 16}, "data": {"image_size": 32},
                                        "learning_rate": 1e-4})
    task = build_task(config)
    assert task.name == "deepfill_v1" and task.fields == ("mask",) and set(task.optimizers) == {"generator", "critic"}
    assert [u.name for u in task.updates] == ["d"] * 5 + ["g"]  # the official n_critic
    params = _abstract_params(task, 32)
    assert params["generator"]["conv1"]["kernel"].shape[-1] == 16
    assert params["critic"]["discriminator_local"]["conv1"]["kernel"].shape[-1] == 64  # critic_cnum's default
    assert params["critic"]["dout_local_fc"]["kernel"].shape == (512, 1)  # local_size: image_size // 2 -> 16 px
    assert config.to_dict() == {"model": {"name": "deepfill_v1", "cnum": 16}, "data": {"image_size": 32},
                                "learning_rate": 1e-4}  # the caller's config is left as it was
    config.model.name = "no_such_model"
    with pytest.raises(ValueError, match=r"unknown model 'no_such_model'; known models: .*deepfill_v1.*deepfill_v2"):
        build_task(config)


def test_registry_takes_new_tasks_with_their_schema():
    """A registered task gets its config completed with its schema's defaults; an unknown key
    in a block its schema declares is an error naming the valid keys."""
    seen = {}

    def schema():
        return ml_collections.ConfigDict({"model": {"width": 3}, "loss": {"weight": 0.5}, "n_critic": 2})

    @register_task("_test_dummy", schema=schema)
    def _dummy(config):
        seen["config"] = config
        return "a task"

    try:
        assert "_test_dummy" in task_names()
        config = ml_collections.ConfigDict({"model": {"name": "_test_dummy", "width": 5}, "data": {"image_size": 8}})
        assert build_task(config) == "a task"
        got = seen["config"]
        assert (got.model.name, got.model.width, got.loss.weight, got.n_critic) == ("_test_dummy", 5, 0.5, 2)
        assert got.log_every == 10 and got.optimizer is None  # trainer defaults; no optimizer schema: free-form
        config.model.depth = 4
        with pytest.raises(ConfigError, match=r"unknown config key\(s\): model.depth; valid keys here: "
                                              r"model.name, model.width"):
            build_task(config)
    finally:
        task_module._TASKS.pop("_test_dummy")


# --------------------------------------------------------------------------- importer


def _save_tf1_checkpoint(prefix: pathlib.Path, tensors: dict) -> str:
    """Writes a TF (V2-format) checkpoint holding exactly `tensors` {name: array}."""
    tf = pytest.importorskip("tensorflow")
    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[n]) for n in names],
    )
    return str(prefix)


@pytest.fixture(scope="module")
def fake_generator_tensors():
    rng = np.random.default_rng(3)
    out = {}
    for name, shape in di.expected_generator_shapes(cnum=4).items():
        scale = np.sqrt(6.0 / (np.prod(shape[:-1]) + shape[-1])) if len(shape) > 1 else 0.1
        out[f"inpaint_net/{name}"] = rng.uniform(-scale, scale, shape).astype(np.float32)
    return out


def test_loader_roundtrip_ignores_slots(tmp_path, fake_generator_tensors):
    tensors = dict(fake_generator_tensors)
    tensors["inpaint_net/conv1/kernel/Adam"] = np.zeros((5, 5, 5, 4), np.float32)
    tensors["inpaint_net/conv1/kernel/Adam_1"] = np.zeros((5, 5, 5, 4), np.float32)
    tensors["global_step"] = np.int64(7)
    tensors["discriminator/dout_local_fc/bias"] = np.zeros((1,), np.float32)
    params = di.load_official_generator(_save_tf1_checkpoint(tmp_path / "snap-1", tensors), cnum=4)
    np.testing.assert_array_equal(params["conv1"]["kernel"], tensors["inpaint_net/conv1/kernel"])
    np.testing.assert_array_equal(
        params["conv13_upsample"]["conv13_upsample_conv"]["bias"],
        tensors["inpaint_net/conv13_upsample/conv13_upsample_conv/bias"],
    )
    assert len(jax.tree.leaves(params)) == 84


def test_loader_errors_name_the_tensors(tmp_path, fake_generator_tensors):
    tensors = dict(fake_generator_tensors)
    del tensors["inpaint_net/pmconv9/bias"]
    tensors["inpaint_net/conv5/kernel"] = np.zeros((3, 3, 16, 7), np.float32)
    tensors["inpaint_net/extra_layer/kernel"] = np.zeros((2,), np.float32)
    prefix = _save_tf1_checkpoint(tmp_path / "bad", tensors)
    with pytest.raises(ValueError) as err:
        di.load_official_generator(prefix, cnum=4)
    msg = str(err.value)
    assert "1 missing (inpaint_net/pmconv9/bias)" in msg
    assert "1 of the wrong shape (inpaint_net/conv5/kernel is [3, 3, 16, 7], expected [3, 3, 16, 16])" in msg
    assert "1 unexpected (inpaint_net/extra_layer/kernel)" in msg
    assert len(msg.splitlines()) == 1
    with pytest.raises(ValueError, match="cannot read a TensorFlow checkpoint"):
        di.load_official_generator(str(tmp_path / "nothing_here"), cnum=4)
    with pytest.raises(ValueError, match="channel_order"):
        di.load_official_generator(prefix, channel_order="rbg", cnum=4)
    with pytest.raises(ValueError, match="version"):
        di.load_official_generator(prefix, version="v3", cnum=4)


def test_loader_rgb_channel_order(tmp_path, fake_generator_tensors):
    prefix = _save_tf1_checkpoint(tmp_path / "snap-2", fake_generator_tensors)
    bgr = di.load_official_generator(prefix, cnum=4)
    rgb = di.load_official_generator(prefix, cnum=4, channel_order="rgb")
    model = DeepFillV1Generator(cnum=4)
    image, masks = _small_inputs(batch=1, size=32)
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    x_bgr = image * (1 - masks)
    a1, a2, aoff = fwd(bgr, x_bgr, masks)
    b1, b2, boff = fwd(rgb, x_bgr[..., ::-1], masks)
    np.testing.assert_allclose(b1, np.asarray(a1)[..., ::-1], atol=1e-5)
    np.testing.assert_allclose(b2, np.asarray(a2)[..., ::-1], atol=1e-4)
    np.testing.assert_array_equal(aoff, boff)
