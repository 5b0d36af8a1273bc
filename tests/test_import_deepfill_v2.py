"""The official DeepFill v2 checkpoint through import_official_checkpoint, then jattn's Inpainter."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.config import load_config
from jattn.export import deepfill_import as di

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def v2_dir(golden_dir):
    d = golden_dir / "deepfill_official" / "v2_seed1"
    if not d.is_dir():
        pytest.skip(f"official DeepFill v2 golden files not found at {d}")
    return d


def test_import_sets_the_width_from_the_checkpoint(v2_dir, tmp_path):
    """(The CLI round trip to the official output is in test_import_deepfill.py.)"""
    from jattn.train.checkpoint import Checkpointer

    config = load_config(CONFIGS / "deepfill_v2_base.py")
    config.model.cnum = 8  # set from the checkpoint by the importer
    result = di.import_official_checkpoint(str(v2_dir / "ckpt" / "snap-0"), tmp_path / "w", config, version="v2")
    assert result == {"workdir": str(tmp_path / "w"), "cnum": 48, "critics": False}
    ckpt = Checkpointer(tmp_path / "w" / "checkpoints")
    try:
        saved = ckpt.restore_config(None)
    finally:
        ckpt.close()
    assert saved["model"]["name"] == "deepfill_v2" and saved["model"]["cnum"] == 48
    with pytest.raises(ValueError, match="already has checkpoints"):
        di.import_official_checkpoint(str(v2_dir / "ckpt"), tmp_path / "w", config, version="v2")


def test_import_errors_name_the_version(v2_dir, golden_dir, tmp_path):
    v1_config = load_config(CONFIGS / "deepfill_v1_base.py")
    with pytest.raises(ValueError, match="model.name 'deepfill_v2'"):
        di.import_official_checkpoint(str(v2_dir / "ckpt"), tmp_path / "a", v1_config, version="v2")
    v2_config = load_config(CONFIGS / "deepfill_v2_base.py")
    v1_ckpt = golden_dir / "deepfill_official" / "v1_seed1" / "ckpt"
    with pytest.raises(ValueError, match="^DeepFill v2 generator: checkpoint .* does not match") as err:
        di.import_official_checkpoint(str(v1_ckpt), tmp_path / "b", v2_config, version="v2")
    message = str(err.value)
    assert "\n" not in message and ": 82 of the wrong shape (inpaint_net/allconv11/bias is [128], expected [192]; " in message
    assert message.endswith("... and 80 more); it is a DeepFill v1 generator: import it as v1 (--version v1)")
    with pytest.raises(ValueError, match="v3"):
        di.import_official_checkpoint(str(v2_dir / "ckpt"), tmp_path / "c", v2_config, version="v3")
    with pytest.raises(ValueError, match="DeepFill v2 critic"):
        di.load_official_critic_v2(str(v1_ckpt))
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


def test_critic_rgb_import_scores_rgb_like_bgr(v2_dir):
    from jattn.models.deepfill_v2 import SNPatchGANCritic

    bgr = di.load_official_critic_v2(str(v2_dir / "disc_ckpt"))
    rgb = di.load_official_critic_v2(str(v2_dir / "disc_ckpt"), channel_order="rgb")
    k_bgr = bgr["params"]["sn_patch_gan"]["conv1"]["kernel"]
    k_rgb = rgb["params"]["sn_patch_gan"]["conv1"]["kernel"]
    np.testing.assert_array_equal(k_rgb[:, :, :3], k_bgr[:, :, 2::-1])
    np.testing.assert_array_equal(k_rgb[:, :, 3], k_bgr[:, :, 3])  # the mask channel stays
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    mask = np.zeros((2, 64, 64, 1), np.float32)
    mask[:, 16:40, 20:50] = 1
    critic = SNPatchGANCritic()
    run = jax.jit(lambda v, x: critic.apply(v, x, update_stats=True, mutable=["batch_stats"]))
    a, a_stats = run(bgr, np.concatenate([image, mask], -1))
    b, b_stats = run(rgb, np.concatenate([image[..., ::-1], mask], -1))
    np.testing.assert_allclose(a, b, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a_stats), jax.tree.leaves(b_stats)):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.slow
def test_import_with_critic_keeps_weights_and_u_vectors(v2_dir, tmp_path):
    """A file holding generator and critic (as training snapshots do): both are imported, the
    critic's conv1 in RGB order and its spectral-norm vectors into variables["critic"]."""
    tf = pytest.importorskip("tensorflow")
    from jattn.train.setup import restore_for_eval

    tensors = {}
    for sub in ("ckpt", "disc_ckpt"):
        reader = tf.train.load_checkpoint(str(v2_dir / sub / "snap-0"))
        for name in reader.get_variable_to_shape_map():
            tensors[name] = reader.get_tensor(name)
    tensors["global_step"] = np.int64(5)
    names = sorted(tensors)
    prefix = str(tmp_path / "merged" / "snap-5")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    config = load_config(CONFIGS / "deepfill_v2_base.py")
    assert di.import_official_checkpoint(prefix, tmp_path / "w", config, version="v2")["critics"]
    _, state, _, step = restore_for_eval(config, tmp_path / "w")
    assert step == 0
    want = di.load_official_critic_v2(prefix, channel_order="rgb")
    for got, ref in ((state.params["critic"], want["params"]),
                     (state.variables["critic"]["batch_stats"], want["batch_stats"])):
        jax.tree.map(lambda g, r: np.testing.assert_array_equal(np.asarray(g), np.asarray(r)), got, ref)
    np.testing.assert_array_equal(
        state.params["generator"]["conv17"]["bias"], jnp.asarray(tensors["inpaint_net/conv17/bias"][::-1]))
