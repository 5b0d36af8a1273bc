"""SE-ResNet: parameter counts of the paper, SE gates, batch norm modes, the classify task."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.classifiers import SEResNet, SEResidualBlock, se_resnet18, se_resnet50, se_resnet_cifar
from jattn.train.task import build_task
from jattn.train.tasks.classify import classification_metrics
from task_helpers import fit, init, jit, task_config


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract_init(model, size):
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))), jax.random.key(0))


def test_parameter_counts_match_the_papers():
    v50 = _abstract_init(se_resnet50(1000), 224)
    assert _count(v50["params"]) == 28_088_024  # Hu et al.: 28.09 M (ResNet-50 25,557,032 + SE)
    assert round(_count(v50["params"]) / 1e6, 2) == 28.09
    v18 = _abstract_init(se_resnet18(1000), 224)
    assert _count(v18["params"]) == 11_689_512 + 89_080  # ResNet-18 + its SE gates
    # batch norm statistics are variables, not parameters: a mean and a var per BN channel,
    # as many as the BN scales and biases (53 BNs: stem, 3 per block, 4 projections)
    assert set(v50) == {"params", "batch_stats"}
    bn_params = [x for path, x in jax.tree_util.tree_leaves_with_path(v50["params"]) if "bn" in jax.tree_util.keystr(path)]
    assert len(bn_params) == 2 * 53 and _count(v50["batch_stats"]) == _count(bn_params)


@pytest.mark.parametrize("num_classes", [3, 10, 1000])
def test_shapes_for_presets_and_custom_layouts(num_classes):
    tiny = se_resnet_cifar(num_classes, depth=8, reduction=4)
    v = jax.eval_shape(tiny.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.eval_shape(tiny.apply, v, jnp.zeros((2, 32, 32, 3))).shape == (2, num_classes)
    assert len([k for k in v["params"] if k.startswith("stage")]) == 3  # depth 8: one block per stage
    # ImageNet stem (stride 2 + max pool) with bottleneck blocks: 4x wider outputs, /4 then /2 per stage
    custom = SEResNet((1, 1), num_classes, width=8, bottleneck=True, reduction=4)
    v = jax.eval_shape(custom.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    p = v["params"]
    assert p["stage1_block0"]["conv3"]["kernel"].shape == (1, 1, 16, 64)
    assert p["stage1_block0"]["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert p["head"]["kernel"].shape == (64, num_classes)
    with pytest.raises(ValueError, match="6n"):
        se_resnet_cifar(10, depth=21)


def test_every_block_has_a_squeeze_excitation_gate():
    p = _abstract_init(se_resnet50(1000), 224)["params"]
    blocks = [k for k in p if k.startswith("stage")]
    assert len(blocks) == 3 + 4 + 6 + 3
    for k in blocks:
        c = p[k]["conv3"]["kernel"].shape[-1]
        assert p[k]["se"]["reduce"]["kernel"].shape == (c, c // 16)
        assert p[k]["se"]["expand"]["kernel"].shape == (c // 16, c)


def test_se_gate_scales_the_residual_branch():
    # identity-shortcut block: with the SE gate shut (sigmoid -> 0) the block is relu(x)
    block = SEResidualBlock(8, reduction=2)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    v = flax.core.unfreeze(init(block, x, train=False))
    run = jit(lambda v: block.apply(v, x, train=False))
    y_open = run(v)
    v["params"]["se"]["expand"]["bias"] = jnp.full((8,), -1e4)
    y_shut = run(v)
    np.testing.assert_allclose(np.asarray(y_shut), np.asarray(jax.nn.relu(x)), atol=1e-6)
    assert float(jnp.max(jnp.abs(y_open - y_shut))) > 1e-2


def test_batch_norm_train_mode_updates_stats_eval_mode_uses_them():
    model = SEResNet((1,), 3, width=4, bottleneck=False, reduction=2, cifar_stem=True)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = init(model, x[:1])
    train = jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    evaluate = jit(lambda v, x: model.apply(v, x, train=False))
    _, upd = train(v, x)
    # running mean of the stem BN = 0.9 * 0 + 0.1 * batch mean of the stem conv output
    conv = jax.lax.conv_general_dilated(x, v["params"]["stem_conv"]["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["stem_bn"]["mean"]),
                               0.1 * np.asarray(jnp.mean(conv, axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)
    # eval mode: per-example (batch composition does not matter) and uses the stored stats
    v2 = {"params": v["params"], **upd}
    full = evaluate(v2, x)
    np.testing.assert_allclose(np.asarray(evaluate(v2, x[:1])), np.asarray(full[:1]), atol=1e-5)
    assert float(jnp.max(jnp.abs(evaluate(v, x) - full))) > 1e-4
    # train mode: batch statistics, so an example's logits depend on the rest of the batch
    t_full, _ = train(v2, x)
    t_two, _ = train(v2, x[:2])
    assert float(jnp.max(jnp.abs(t_full[:2] - t_two))) > 1e-4


def _pattern_batch(n=12, size=16, classes=3, seed=0):
    """Class k: a bright blob in one of three places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    img = rng.normal(0, 0.3, (n, size, size, 3)).astype(np.float32)
    for i, k in enumerate(labels):
        r0 = 2 + 4 * k
        img[i, r0 : r0 + 4, r0 : r0 + 4] += 1.0
    return {"image": jnp.asarray(np.clip(img, -1, 1)), "label": jnp.asarray(labels, jnp.int32)}


def test_task_fits_a_batch_and_updates_batch_stats():
    config = task_config({"name": "se_resnet", "stage_sizes": (1, 1), "num_classes": 3, "width": 8,
                          "bottleneck": False, "cifar_stem": True, "reduction": 4}, image_size=16, lr=3e-3)
    task = build_task(config)
    assert task.fields == ("label",)
    batch = _pattern_batch()
    state, history = fit(task, batch, 20)
    losses = [h["model_loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    stats = state.variables["model"]["batch_stats"]
    assert float(jnp.max(jnp.abs(stats["stem_bn"]["mean"]))) > 0  # initialised at 0, moved by training
    out = jit(task.predict)(state.params, state.variables, batch)
    assert out["output"].shape == (12, 3)
    m = jit(task.eval_metrics)(out, batch)
    assert set(m) == {"accuracy", "loss"}  # 3 classes: no top-5
    # eval-mode accuracy with the running statistics after 20 steps on this easy batch
    assert float(m["accuracy"]) >= 2 / 3


def test_classification_metrics_hand_computed():
    logits = jnp.asarray([
        [5.0, 4, 3, 2, 1, 0],   # label 0: top-1 right
        [5.0, 4, 3, 2, 1, 0],   # label 4: in the top 5 only
        [0.0, 1, 2, 3, 4, 5],   # label 0: in neither
        [0.0, 0, 9, 0, 0, 0],   # label 2: top-1 right
    ])
    labels = jnp.asarray([0, 4, 0, 2])
    metrics = jit(classification_metrics)
    m = metrics(logits, labels)
    assert float(m["accuracy"]) == 0.5
    assert float(m["top5_accuracy"]) == 0.75
    logp = np.asarray(jax.nn.log_softmax(logits))
    assert float(m["loss"]) == pytest.approx(-np.mean(logp[np.arange(4), np.asarray(labels)]), rel=1e-6)
    perfect = metrics(jnp.eye(3) * 10, jnp.arange(3))
    assert float(perfect["accuracy"]) == 1.0 and "top5_accuracy" not in perfect
