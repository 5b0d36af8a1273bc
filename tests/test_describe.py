"""`jattn describe`: parameter counts of the paper configs against their papers, the forward's
FLOPs (small configs only: the compile is the slow part), the optimizers in words, learning
rates against optax's schedules directly, the JSON file and one-line errors."""

import functools
import json
import math
import pathlib

import optax
import pytest

from jattn.cli import main
from jattn.config import load_config
from jattn.describe import default_lr_steps, describe, forward_flops, largest_layers
from jattn.train.task import build_task

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if not p.name.startswith("demo"))


@functools.lru_cache(maxsize=None)
def _paper(name):
    """describe() of a bundled config without FLOPs, made once per test session (RCAN's
    400 convolutions take seconds to trace)."""
    return describe(load_config(REPO / "configs" / f"{name}.py"), flops=False, config_name=name)


def _describe(name, overrides=(), **kwargs):
    return describe(load_config(REPO / "configs" / f"{name}.py", list(overrides)), flops=False, **kwargs)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_config_is_described_without_compiling(path):
    r = _paper(path.stem)
    assert r["parameters"] and all(n > 0 for n in r["parameters"].values())
    assert r["parameters_total"] == sum(r["parameters"].values())
    assert r["flops_per_example"] == {} and "not measured" in r["flops_measured"]
    for net, layers in r["largest_layers"].items():
        assert 1 <= len(layers) <= 5
        counts = [layer["parameters"] for layer in layers]
        assert counts == sorted(counts, reverse=True) and counts[0] <= r["parameters"][net]
        for layer in layers:  # a layer's count is the sum of its leaves' shapes
            sizes = [math.prod(s) for s in layer["shapes"].values()]
            assert sum(sizes) == layer["parameters"]
    # every network's optimizer comes from its block, and has a rate at every default step
    assert set(r["optimizer"]) == set(r["parameters"]) == set(r["learning_rate"])
    assert all("optax: " in text for text in r["optimizer"].values())
    steps = {str(s) for s in (0, r["total_steps"])}
    assert all(steps <= set(rates) for rates in r["learning_rate"].values())


def _within(value, paper, rel):
    return abs(value - paper) <= rel * paper


def test_se_resnet50_parameters_match_the_paper():
    # Hu et al., SENet, Table 1: SE-ResNet-50 28.1 M (28.09 M in the text)
    se = _paper("se_resnet50_imagenet")["parameters"]
    assert _within(se["model"], 28.1e6, 0.01) and se["model"] == 28_088_024


def test_rcan_parameters_match_the_paper():
    # RCAN (Zhang et al. 2018) x4: 15.59 M (the official code's count, less its fixed MeanShift convs)
    x4 = _paper("rcan_div2k_x4")["parameters"]["model"]
    assert _within(x4, 15.59e6, 0.005) and x4 == 15_592_355
    # x2 has one x2 pixel-shuffle step (a 3x3 64 -> 256 conv) less than x4's two
    assert _paper("rcan_div2k_x2")["parameters"]["model"] == x4 - (9 * 64 * 256 + 256)


def test_deepfill_generators_match_the_released_checkpoints():
    # DeepFill v1 (Yu et al. 2018): the generator of the released checkpoint, 3.60 M
    v1 = _paper("deepfill_v1_places2")["parameters"]
    assert _within(v1["generator"], 3.60e6, 0.01) and v1["generator"] == 3_601_542
    # DeepFill v2 (Yu et al. 2019): the released generator, 4,052,478 (the paper: "4.1 M")
    assert _paper("deepfill_v2_places2")["parameters"]["generator"] == 4_052_478


def test_sagan_128_counts_generator_and_discriminator_together():
    """81.5 M is BigGAN's Table 1 row 1 (the SA-GAN baseline at 128 px, ch 64): its "Param (M)"
    column counts G and D together (BigGAN's own 158.3 M is G 70.4 M + D 87.9 M), so it is the
    total here, not the generator's count."""
    r = _paper("sagan_imagenet128")
    g, d = r["parameters"]["generator"], r["parameters"]["critic"]
    assert round((g + d) / 1e6, 1) == 81.5 and r["parameters_total"] == g + d == 81_542_470
    assert round(g / 1e6, 1) == 42.1 and round(d / 1e6, 1) == 39.5  # neither alone is 81.5 M


def test_largest_layers_of_se_resnet50():
    layers = _paper("se_resnet50_imagenet")["largest_layers"]["model"]
    top = layers[0]
    assert top["parameters"] == 3 * 3 * 512 * 512 and top["shapes"] == {"kernel": [3, 3, 512, 512]}
    head = next(layer for layer in layers if layer["layer"] == "head")
    assert head["shapes"] == {"kernel": [2048, 1000], "bias": [1000]} and head["parameters"] == 2_049_000


def test_largest_layers_groups_leaves_by_module():
    import jax
    import jax.numpy as jnp

    tree = {"a": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "b": {"c": {"scale": jnp.zeros(100)}},
            "d": {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)}}
    assert largest_layers(tree, top=2) == [
        {"layer": "b/c", "parameters": 100, "shapes": {"scale": [100]}},
        {"layer": "a", "parameters": 16, "shapes": {"bias": [4], "kernel": [3, 4]}},
    ]


# --------------------------------------------------------------------------- FLOPs


def test_forward_flops_per_example_is_positive_and_linear_in_the_batch():
    config = load_config(REPO / "configs" / "demo_rcan.py")
    task = build_task(config)
    one, two = forward_flops(task, config, batch_size=1), forward_flops(task, config, batch_size=2)
    assert one > 0 and two == pytest.approx(one, rel=0.01)  # per example: the total doubles
    # a convolution network: at least 2 FLOPs per parameter and low-res pixel (every conv but the
    # last runs at or above the low-res size)
    lowres_pixels = (config.data.image_size // config.data.scale) ** 2
    r = describe(config, flops=False)
    assert one >= 2 * r["parameters"]["model"] * lowres_pixels * 0.9


def test_describe_cli_writes_the_json_and_measures_the_generator(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.json"
    assert main(["describe", "--config", "demo", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["batch_size"] == 8 and r["model"] == "deepfill_v1"
    assert set(r["parameters"]) == {"generator", "critic"} and r["parameters"]["generator"] == 904_518
    # the task's only per-network forward is predict, the generator's: the critic is not measured
    assert list(r["flops_per_example"]) == ["generator"] and r["flops_per_example"]["generator"] > 1e8
    assert "task.predict" in r["flops_measured"] and "critic: not measured" in r["flops_measured"]
    assert r["optimizer"]["generator"].startswith("Adam (b1 0.5, b2 0.9")
    assert "5 calls per training step" in r["optimizer"]["critic"]
    assert r["learning_rate"] == {"generator": {"0": 1e-4, "40": 1e-4}, "critic": {"0": 1e-4, "40": 1e-4}}
    assert r["data"]["fields"] == ["image", "mask"] and r["data"]["images_per_step"] == 6 * 8
    assert r["data"]["image_size"] == [64, 64] and r["data"]["masks"].startswith("box")
    for words in ("generator", "critic", "GFLOP per example", "allconv11", "learning rate",
                  "source: sample_photos", "eval set"):
        assert words in text


# --------------------------------------------------------------------------- learning rates


def test_lr_at_matches_the_optax_step_schedule(tmp_path, capsys):
    out = tmp_path / "rcan.json"
    steps = [0, 1, 199_999, 200_000, 400_001, 999_999, 1_000_000]
    code = main(["describe", "--config", "rcan_div2k_x4", "--no-flops", "--json", str(out),
                 "--set", "model.n_resgroups=1", "--lr-at", *map(str, steps)])  # one group: fast to trace
    assert code == 0
    capsys.readouterr()
    rates = json.loads(out.read_text())["learning_rate"]["model"]
    paper = optax.piecewise_constant_schedule(1e-4, {200_000: 0.5, 400_000: 0.5, 600_000: 0.5, 800_000: 0.5})
    assert list(rates) == [str(s) for s in steps]
    for s in steps:
        assert rates[str(s)] == pytest.approx(float(paper(s)), rel=1e-6)
    assert rates["199999"] == pytest.approx(1e-4) and rates["200000"] == pytest.approx(5e-5)


def test_default_steps_and_boundaries_in_epochs():
    config = load_config(REPO / "configs" / "se_resnet50_imagenet.py")
    assert default_lr_steps(config, build_task(config)) == [0, 150_150, 300_300, 450_450, 500_500]
    r = describe(config, flops=False)
    sched = optax.piecewise_constant_schedule(0.15, {150_150: 0.1, 300_300: 0.1, 450_450: 0.1})
    for s, lr in r["learning_rate"]["model"].items():
        assert lr == pytest.approx(float(sched(int(s))), rel=1e-6)
    text = r["optimizer"]["model"]
    for words in ("SGD (momentum 0.9)", "lr 0.15", "x0.1 at updates 150150, 300300, 450450",
                  "epochs 30, 60, 90 of 5005 updates", "L2 weight decay 0.0001 on all parameters",
                  "add_decayed_weights(0.0001), inject_hyperparams(sgd)"):
        assert words in text


def test_warmup_and_accumulation_count_updates_not_micro_batches():
    """accumulate_steps 4: the schedule advances once every 4 training steps."""
    sets = ["optimizer.warmup_steps=100", "optimizer.accumulate_steps=4", "optimizer.clip_norm=1.0"]
    config = load_config(REPO / "configs" / "se_resnet_cifar10.py", sets)
    steps = [0, 8, 399, 400, 4 * 32_000 - 1, 4 * 32_000]
    r = describe(config, steps, flops=False)
    lr = config.learning_rate
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, 100),
                                  optax.piecewise_constant_schedule(lr, {32_000 - 100: 0.1, 48_000 - 100: 0.1})],
                                 [100])
    for s in steps:
        assert r["learning_rate"]["model"][str(s)] == pytest.approx(float(sched(s // 4)), rel=1e-6, abs=1e-12)
    assert r["learning_rate"]["model"]["400"] == pytest.approx(lr)
    text = r["optimizer"]["model"]
    assert "after 100 updates of linear warm-up" in text and "gradients of 4 calls averaged" in text
    assert "clipped to global norm 1" in text and text.endswith("every 4)")
    # the first step after the warm-up: update 100 is step 400
    assert 400 in default_lr_steps(config, build_task(config))


def test_a_critic_called_n_critic_times_per_step_counts_its_own_updates():
    sets = ["optimizer.critic.schedule=step", "optimizer.critic.boundaries=[100]", "optimizer.critic.factor=0.5"]
    r = _describe("demo", sets, lr_steps=[0, 19, 20, 21])
    critic, generator = r["learning_rate"]["critic"], r["learning_rate"]["generator"]
    # 5 critic updates per step: update 100 is the first of step 20
    assert critic == {"0": 1e-4, "19": 1e-4, "20": 5e-5, "21": 5e-5}
    assert set(generator.values()) == {1e-4}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,words", [
    (["--config", "no_such_config"], "config file not found"),
    (["--config", "demo", "--set", "bogus=1"], "unknown config key"),
    (["--config", "demo", "--set", "optimizer.generator.lrr=1"], "unknown config key"),
    (["--config", "demo", "--lr-at", "abc"], "--lr-at"),
    (["--config", "demo", "--lr-at", "-5"], "--lr-at"),
    (["--config", "demo", "--lr-at", "1.5"], "--lr-at"),
    (["--config", "demo", "--lr-at"], "--lr-at"),
])
def test_bad_input_is_one_line_exit_2(args, words, capsys):
    assert main(["describe", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jattn describe: error:") and words in err


def test_an_unwritable_json_path_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for path in (blocker / "out.json", tmp_path):  # under a file; a folder
        assert main(["describe", "--config", "demo", "--no-flops", "--json", str(path)]) == 2
        err = capsys.readouterr()
        assert err.out == "" and err.err.count("\n") == 1 and "cannot write" in err.err
