"""The optimizer block (jattn.train.optim): each optimizer, decay mask, schedule and gradient
accumulation against optax used directly, the errors, the unchanged default Adam state, and
every shipped config's optimizers."""

import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn.config import ConfigError, load_config
from jattn.train.optim import decay_mask, learning_rate_schedule, make_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _params():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 4)), "bias": jax.random.normal(keys[1], (4,))},
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(keys[2], (4,)), "offset": jnp.full((4,), 0.3)},
        "dense": {"kernel": jax.random.normal(keys[3], (4, 3))},
    }


def _grads(step, params):
    """A fixed pseudo-random gradient per step (different sizes, some large, to exercise clipping)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(100 + step), len(leaves))
    return jax.tree.unflatten(tree, [3.0 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, steps=5, params=None):
    """Params after `steps` updates of `tx` with the fixed gradients, and every step's updates."""
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for step in range(steps):
        updates, state = update(_grads(step, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return params, history


def _kernels(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


LR = 3e-2
#: (block, the same optimizer written with optax directly)
CASES = {
    "adam": ({"lr": LR}, optax.adam(LR)),
    "adam_betas_eps_clip": ({"lr": LR, "b1": 0.5, "b2": 0.9, "eps": 1e-6, "clip_norm": 1.0},
                            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR, b1=0.5, b2=0.9, eps=1e-6))),
    "adam_l2_all": ({"lr": LR, "weight_decay": 0.05},
                    optax.chain(optax.add_decayed_weights(0.05), optax.adam(LR))),
    "adam_l2_kernels": ({"lr": LR, "weight_decay": 0.05, "decay_mask": "kernels"},
                        optax.chain(optax.add_decayed_weights(0.05, _kernels), optax.adam(LR))),
    "adamw_all": ({"name": "adamw", "lr": LR, "weight_decay": 0.1}, optax.adamw(LR, weight_decay=0.1)),
    "adamw_kernels_clip": ({"name": "adamw", "lr": LR, "b1": 0.0, "b2": 0.99, "weight_decay": 0.1,
                            "decay_mask": "kernels", "clip_norm": 2.0},
                           optax.chain(optax.clip_by_global_norm(2.0),
                                       optax.adamw(LR, b1=0.0, b2=0.99, weight_decay=0.1, mask=_kernels))),
    "sgd": ({"name": "sgd", "lr": LR}, optax.sgd(LR)),
    "sgd_momentum_l2": ({"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 1e-2},
                        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(LR, momentum=0.9))),
    "sgd_nesterov_l2_kernels": ({"name": "sgd", "lr": LR, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2,
                                 "decay_mask": "kernels"},
                                optax.chain(optax.add_decayed_weights(1e-2, _kernels),
                                            optax.sgd(LR, momentum=0.9, nesterov=True))),
    "adam_warmup_cosine": ({"lr": LR, "schedule": "cosine", "warmup_steps": 2, "decay_steps": 4},
                           optax.adam(optax.join_schedules(
                               [optax.linear_schedule(0.0, LR, 2), optax.cosine_decay_schedule(LR, 4)], [2]))),
    "adam_linear": ({"lr": LR, "schedule": "linear", "decay_steps": 4},
                    optax.adam(optax.linear_schedule(LR, 0.0, 4))),
    "sgd_step": ({"name": "sgd", "lr": LR, "momentum": 0.9, "schedule": "step", "boundaries": [2, 4], "factor": 0.1},
                 optax.sgd(optax.piecewise_constant_schedule(LR, {2: 0.1, 4: 0.1}), momentum=0.9)),
    "adamw_multistep_epochs_warmup": ({"name": "adamw", "lr": LR, "weight_decay": 0.1, "schedule": "multistep",
                                       "boundaries_epochs": [1.5], "steps_per_epoch": 2, "factor": 0.5,
                                       "warmup_steps": 1},
                                      optax.adamw(optax.join_schedules(
                                          [optax.linear_schedule(0.0, LR, 1),
                                           optax.piecewise_constant_schedule(LR, {2: 0.5})], [1]),
                                          weight_decay=0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_optimizer_and_schedule_equals_optax_used_directly(case):
    block, reference = CASES[case]
    ours, our_updates = _run(make_optimizer(block), steps=6)
    theirs, their_updates = _run(reference, steps=6)
    # Float rounding only: our hyperparameters are float32 arrays (optax.inject_hyperparams, for
    # the logged learning rate), optax's here Python floats, and Adam's bias correction
    # 1 - 0.999^t loses up to ~1e-4 relative to cancellation in float32 either way: updates
    # agree to 1e-4 of the learning rate (a wrong hyperparameter moves them by percents).
    for a, b in zip(our_updates, their_updates):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * LR), a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), ours, theirs)
    assert not jax.tree.all(jax.tree.map(lambda x, y: jnp.array_equal(x, y), ours, _params()))  # it moved


def test_the_config_learning_rate_is_the_default_and_the_block_lr_wins():
    a, _ = _run(make_optimizer({"name": "sgd"}, 0.1), steps=1)
    b, _ = _run(optax.sgd(0.1), steps=1)
    c, _ = _run(make_optimizer({"name": "sgd", "lr": 0.1}, 5.0), steps=1)
    jax.tree.map(lambda x, y, z: (np.testing.assert_allclose(x, y, rtol=1e-7), np.testing.assert_allclose(z, y)),
                 a, b, c)
    with pytest.raises(ConfigError, match="no lr"):
        make_optimizer({})


# --------------------------------------------------------------------------- weight decay mask


def test_the_kernels_mask_is_true_for_kernels_only():
    mask = decay_mask("kernels")(_params())
    assert mask == {"conv": {"kernel": True, "bias": False}, "norm": {"scale": False, "offset": False},
                    "dense": {"kernel": True}}
    assert decay_mask("all") is None  # optax: every parameter


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_kernels_mask_leaves_1d_parameters_undecayed(name):
    """With zero gradients the only update is the weight decay: 1-D parameters (biases,
    normalisation scales / offsets) do not move, kernels shrink; with "all" everything does."""
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for mask in ("kernels", "all"):
        tx = make_optimizer({"name": name, "lr": 0.1, "weight_decay": 0.5, "decay_mask": mask, "momentum": 0.9})
        updates, _ = tx.update(zeros, tx.init(params), params)
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            p = params[path[0].key][path[1].key]
            if p.ndim == 1 and mask == "kernels":
                assert jnp.all(u == 0), (mask, path)
            else:
                assert jnp.all(u != 0) and jnp.all(jnp.sign(u) == -jnp.sign(p)), (mask, path)  # towards 0
        if name == "adamw":  # decoupled: exactly -lr * wd * p
            np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * params["dense"]["kernel"], rtol=1e-6)
        if name == "sgd":  # L2 through SGD: -lr * wd * p on the first step
            np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * params["conv"]["kernel"], rtol=1e-6)


# --------------------------------------------------------------------------- schedules


def _rates(block, steps, lr=1.0):
    sched = learning_rate_schedule(block, lr)
    return [float(sched(i)) for i in range(steps)]


def test_step_schedule_boundaries_in_steps_and_in_epochs():
    expected = [1.0] * 3 + [0.5] * 3 + [0.25] * 2
    assert _rates({"schedule": "step", "boundaries": [3, 6], "factor": 0.5}, 8) == expected
    assert _rates({"schedule": "multistep", "boundaries_epochs": [1, 2], "steps_per_epoch": 3, "factor": 0.5},
                  8) == expected
    # fractional epochs round to whole updates: 1.5 x 4 = 6
    assert _rates({"schedule": "step", "boundaries_epochs": [1.5], "steps_per_epoch": 4}, 8) == pytest.approx(
        [1.0] * 6 + [0.1] * 2)


def test_warmup_is_linear_from_zero_and_step_boundaries_count_from_the_start():
    rates = _rates({"schedule": "step", "boundaries": [4, 6], "factor": 0.1, "warmup_steps": 2}, 8)
    assert rates == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    rates = _rates({"schedule": "constant", "warmup_steps": 4}, 6, lr=2.0)
    assert rates == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
    # cosine / linear decay over decay_steps after the warm-up (as before the step schedule existed)
    rates = _rates({"schedule": "cosine", "warmup_steps": 2, "decay_steps": 4}, 8)
    assert rates == pytest.approx([0.0, 0.5] + [0.5 * (1 + np.cos(np.pi * i / 4)) for i in range(5)] + [0.0])
    assert _rates({"schedule": "linear", "decay_steps": 4}, 6) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


@pytest.mark.parametrize(
    "block,match",
    [
        ({"schedule": "step"}, r"optimizer\.boundaries: the step schedule needs"),
        ({"schedule": "step", "boundaries": [2], "boundaries_epochs": [1], "steps_per_epoch": 2},
         r"optimizer\.boundaries: .*not both"),
        ({"schedule": "step", "boundaries_epochs": [1]}, r"optimizer\.steps_per_epoch"),
        ({"schedule": "step", "boundaries": [5, 3]}, r"optimizer\.boundaries: expected increasing"),
        ({"schedule": "step", "boundaries": [0]}, r"optimizer\.boundaries: expected increasing"),
        ({"schedule": "step", "boundaries": [2.5]}, r"optimizer\.boundaries: expected whole numbers"),
        ({"schedule": "step", "boundaries": [3], "warmup_steps": 3}, r"optimizer\.boundaries: .*after the 3 warm-up"),
        ({"schedule": "exponential"}, r"optimizer\.schedule: unknown learning-rate schedule 'exponential'; "
                                      r"use constant, cosine, linear, step or multistep"),
        ({"name": "lamb"}, r"optimizer\.name: unknown optimizer 'lamb'; use adam, adamw or sgd"),
        ({"decay_mask": "biases"}, r"optimizer\.decay_mask: unknown weight-decay mask 'biases'"),
        ({"name": "sgd", "nesterov": True}, r"optimizer\.nesterov: .*momentum"),
        ({"accumulate_steps": 0}, r"optimizer\.accumulate_steps"),
        ({"bogus": 1}, r"unknown config key\(s\): bogus"),
    ],
)
def test_bad_blocks_are_one_line_errors_naming_the_key(block, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_optimizer(block, 1e-3)
    assert "\n" not in str(err.value)


def test_bad_names_in_a_config_are_load_errors_naming_the_key():
    demo = REPO / "configs" / "demo.py"  # a GAN: one block per network
    for override, key in [("optimizer.generator.name='lamb'", "optimizer.generator.name"),
                          ("optimizer.critic.schedule='poly'", "optimizer.critic.schedule"),
                          ("optimizer.critic.decay_mask='bias'", "optimizer.critic.decay_mask"),
                          ("optimizer.generator.boundaries=3", "optimizer.generator.boundaries")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_config(demo, [override])
        assert "\n" not in str(err.value)
    unet = REPO / "configs" / "demo_attention_unet.py"  # one block
    with pytest.raises(ConfigError, match=r"optimizer\.name: expected one of adam, adamw, sgd, got 'lamb'"):
        load_config(unet, ["optimizer.name='lamb'"])
    config = load_config(unet, ["optimizer.name='sgd'", "optimizer.schedule='step'", "optimizer.boundaries=[10, 20]"])
    assert config.optimizer.boundaries == [10, 20]
    make_optimizer(config.optimizer, config.learning_rate)


# --------------------------------------------------------------------------- gradient accumulation


def _linear_loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _linear_data(n=16):
    kx, ky = jax.random.split(jax.random.PRNGKey(3))
    return jax.random.normal(kx, (n, 5)), jax.random.normal(ky, (n, 2))


def _find(state, kind):
    return [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, kind)) if isinstance(s, kind)]


@pytest.mark.parametrize("block", [
    {"name": "adam", "lr": 0.05, "schedule": "step", "boundaries": [1], "factor": 0.1, "clip_norm": 0.5},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "warmup_steps": 2},
])
def test_accumulated_micro_batches_equal_one_big_batch_and_the_schedule_counts_updates(block):
    """k = 4 micro-batches of 4 under accumulate_steps 4 give the parameters of one step on
    the batch of 16 (mean losses: the mean of the micro-batch gradients is the big batch's),
    the parameters change only on every 4th call, and the schedule (a warm-up, a step at
    update 1) advances per update: with micro-steps counted it would differ."""
    k = 4
    x, y = _linear_data(16)
    params0 = {"w": jnp.ones((5, 2)) * 0.1, "b": jnp.zeros((2,))}
    grad = jax.jit(jax.grad(_linear_loss))

    big = make_optimizer(block)
    p_big, s_big = params0, big.init(params0)
    acc = make_optimizer({**block, "accumulate_steps": k})
    p_acc, s_acc = params0, acc.init(params0)
    assert type(s_acc).__name__ == "MultiStepsState"
    for update in range(3):
        u, s_big = big.update(grad(p_big, x, y), s_big, p_big)
        p_big = optax.apply_updates(p_big, u)
        for micro in range(k):
            before = p_acc
            sl = slice(4 * micro, 4 * micro + 4)
            u, s_acc = acc.update(grad(p_acc, x[sl], y[sl]), s_acc, p_acc)
            p_acc = optax.apply_updates(p_acc, u)
            if micro < k - 1:
                jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p_acc, before)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_acc, p_big)
        # the learning rate the loop logs (jattn.train.loop.learning_rates) is the one of the real update
        (inner,) = _find(s_acc, optax.InjectStatefulHyperparamsState)
        (ref,) = _find(s_big, optax.InjectStatefulHyperparamsState)
        assert int(inner.count) == int(ref.count) == update + 1
        assert float(inner.hyperparams["learning_rate"]) == float(ref.hyperparams["learning_rate"])
    from jattn.train.loop import learning_rates

    lrs = learning_rates(types.SimpleNamespace(opt_state={"net": s_acc}))
    assert lrs["net_learning_rate"] == pytest.approx(float(ref.hyperparams["learning_rate"]))


# --------------------------------------------------------------------------- the default Adam state


def _old_make_optimizer(lr, b1=0.9, b2=0.999, clip_norm=None, schedule="constant", warmup=0, decay=0):
    """make_optimizer as it was with Adam only (jattn/train/task.py before the optimizer block
    grew), for the state structure checkpoints were saved with."""
    if schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(decay, 1))
    else:
        sched = optax.linear_schedule(lr, 0.0, max(decay, 1))
    if warmup:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.inject_hyperparams(optax.adam)(learning_rate=sched, b1=b1, b2=b2))
    return optax.chain(*parts)


def _layout(state):
    leaves, tree = jax.tree.flatten(state)
    return tree, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


@pytest.mark.parametrize("block,old", [
    ({}, {}),
    ({"b1": 0.5, "b2": 0.9}, {"b1": 0.5, "b2": 0.9}),
    ({"clip_norm": 1.0, "schedule": "cosine", "warmup_steps": 10, "decay_steps": 100},
     {"clip_norm": 1.0, "schedule": "cosine", "warmup": 10, "decay": 100}),
])
def test_a_default_adam_block_keeps_the_optimizer_state_checkpoints_have(block, old):
    params = _params()
    new_state = make_optimizer(block, 1e-4).init(params)
    old_state = _old_make_optimizer(1e-4, **old).init(params)
    assert _layout(new_state) == _layout(old_state)
    jax.tree.map(np.testing.assert_array_equal, new_state, old_state)
    # and the same updates
    a, _ = _run(make_optimizer(block, 1e-4), steps=3)
    b, _ = _run(_old_make_optimizer(1e-4, **old), steps=3)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------- shipped configs


def _blocks(config):
    """(where, block) of each optimizer block of a loaded config (one, or one per network)."""
    opt = config.optimizer
    if "name" in opt:
        return [("optimizer", opt)]
    return [(f"optimizer.{net}", block) for net, block in opt.items()]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_its_optimizers(path):
    config = load_config(path)
    params = {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones((2,))}
    for where, block in _blocks(config):
        tx = make_optimizer(block, config.learning_rate, where=where)
        state = tx.init(params)
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)), where


def test_the_paper_recipes_of_the_shipped_configs():
    rcan = load_config(REPO / "configs" / "rcan_div2k_x4.py")
    assert (rcan.optimizer.name, rcan.optimizer.b1, rcan.optimizer.b2, rcan.optimizer.eps) == ("adam", 0.9, 0.999, 1e-8)
    sched = learning_rate_schedule(rcan.optimizer, rcan.learning_rate)
    assert [float(sched(s)) for s in (0, 199_999, 200_000, 400_000, 800_000, 999_999)] == pytest.approx(
        [1e-4, 1e-4, 5e-5, 2.5e-5, 6.25e-6, 6.25e-6])

    se = load_config(REPO / "configs" / "se_resnet50_imagenet.py")
    assert (se.optimizer.name, se.optimizer.momentum, se.optimizer.weight_decay) == ("sgd", 0.9, 1e-4)
    assert se.learning_rate == pytest.approx(0.6 * se.batch_size / 1024)  # linear scaling from batch 1024
    sched = learning_rate_schedule(se.optimizer, se.learning_rate)
    epoch = se.optimizer.steps_per_epoch
    assert epoch * 100 == se.total_steps and abs(epoch * se.batch_size - 1_281_167) < se.batch_size
    rates = [float(sched(e * epoch)) for e in (0, 29, 30, 59, 60, 90, 99)]
    assert rates == pytest.approx([0.15, 0.15, 0.015, 0.015, 0.0015, 0.00015, 0.00015])

    cifar = load_config(REPO / "configs" / "se_resnet_cifar10.py")
    sched = learning_rate_schedule(cifar.optimizer, cifar.learning_rate)
    assert [float(sched(s)) for s in (0, 31_999, 32_000, 48_000)] == pytest.approx([0.1, 0.1, 0.01, 0.001])

    sagan = load_config(REPO / "configs" / "sagan_imagenet128.py")
    assert (sagan.optimizer.generator.lr, sagan.optimizer.critic.lr) == (1e-4, 4e-4)
    assert (sagan.optimizer.critic.b1, sagan.optimizer.critic.b2) == (0.0, 0.9)
    v1 = load_config(REPO / "configs" / "deepfill_v1_base.py")
    assert (v1.learning_rate, v1.optimizer.generator.b1, v1.optimizer.generator.b2) == (1e-4, 0.5, 0.9)
    v2 = load_config(REPO / "configs" / "deepfill_v2_base.py")
    assert (v2.learning_rate, v2.optimizer.critic.b1, v2.optimizer.critic.b2) == (1e-4, 0.5, 0.999)
