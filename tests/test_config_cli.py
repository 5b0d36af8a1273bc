"""Config files, overrides and the CLI's error handling."""

import argparse
import pathlib
import re
import subprocess
import sys

import pytest

from jattn.cli import main
from jattn.config import ConfigError, load_config, schema_for, with_defaults

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.model.name and config.total_steps > 0


def test_overrides_apply_with_types():
    config = load_config(DEMO, ["total_steps=7", "optimizer.generator.lr=3e-4", "data.image_size=32", "model.cnum=8"])
    assert config.total_steps == 7 and config.optimizer.generator.lr == 3e-4
    assert config.data.image_size == 32 and config.model.cnum == 8


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["total_stepz=3"], "unknown config key"),
        (["optimizer.generator.lrr=1"], "unknown config key"),
        (["total_steps"], "key=value"),
        (["total_steps='many'"], "total_steps"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "nofn.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(tmp_path / "nofn.py")
    (tmp_path / "typo.py").write_text(
        "import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
        "    c.total_steps = 5\n    c.n_critc = 5\n    return c\n"
    )
    with pytest.raises(ConfigError, match="n_critc"):
        load_config(tmp_path / "typo.py")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load"):
        load_config(tmp_path / "broken.py")


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "config file not found" in err
    code = main(["train", "--config", str(DEMO), "--workdir", str(tmp_path / "w"), "--set", "bogus=1"])
    assert code == 2 and "unknown config key" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written for a bad config


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "jattn", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "demo" in out.stdout


def test_config_dot_flags_and_valid_keys_listed(tmp_path, capsys):
    code = main(["train", "--config", str(DEMO), "--workdir", str(tmp_path / "w"), "--config.total_stepz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "total_stepz" in err and "total_steps" in err  # the valid keys are listed
    from jattn.cli import _config_flags

    assert _config_flags(["--config.a.b=1", "--config.c", "2", "--x"]) == (["a.b=1", "c=2"], ["--x"])
    config = load_config(DEMO, ["learning_rate=3e-4"])
    assert config.learning_rate == 3e-4 and config.optimizer.generator.lr is None


# --------------------------------------------------------------------------- schema and defaults

CONFIGS = sorted((REPO / "configs").glob("*.py"))

#: A few effective values of every shipped config: what they loaded to before the schema
#: held the defaults (the files restated them), so the schema must give the same.
EXPECTED = {
    "attention_rcnn_coco.py": {"model.preset": "resnet50_fpn", "model.num_classes": 80, "model.fpn_channels": None,
                               "loss.box_loss": "smooth_l1", "optimizer.name": "sgd", "optimizer.momentum": 0.9,
                               "optimizer.weight_decay": 1e-4, "optimizer.boundaries": [60_000, 80_000],
                               "learning_rate": 0.02, "batch_size": 16, "total_steps": 90_000, "data.max_boxes": 100},
    "demo_attention_rcnn.py": {"model.preset": "tiny", "model.num_classes": 5, "loss.box_loss": "smooth_l1",
                               "optimizer.name": "adam", "learning_rate": 2e-3, "total_steps": 1000,
                               "data.image_size": 96, "eval_images": 256},
    "attention_unet_base.py": {"model.features": None, "model.attention": True, "loss.dice_weight": 1.0,
                               "optimizer.b1": 0.9, "optimizer.b2": 0.999, "data.mask": None, "eval_batch_size": 8},
    "deepfill_v1_base.py": {"model.cnum": 32, "model.local_size": 128, "model.ca_block_size": None, "n_critic": 5,
                            "optimizer.generator.b1": 0.5, "optimizer.critic.b2": 0.9, "optimizer.critic.lr": None,
                            "loss.gan_loss_alpha": 0.001, "loss.gamma": 0.9, "learning_rate": 1e-4},
    "deepfill_v1_celebahq.py": {"data.source.name": "celeb_a_hq/256", "data.eval_source": None, "eval_images": 256,
                                "n_critic": 5, "model.cnum": 32},
    "deepfill_v1_places2.py": {"data.eval_source.split": "validation", "model.local_size": 128, "n_critic": 5},
    "deepfill_v2_base.py": {"model.cnum": 48, "model.critic_cnum": 64, "n_critic": 1, "optimizer.generator.b2": 0.999,
                            "loss.gan_with_mask": True, "loss.l1_loss_alpha": 1.0},
    "deepfill_v2_celebahq.py": {"data.source.name": "celeb_a_hq/256", "model.cnum": 48, "eval_images": 256},
    "deepfill_v2_places2.py": {"data.source.name": "places365_small", "model.cnum": 48, "n_critic": 1},
    "demo.py": {"model.cnum": 16, "model.local_size": 32, "n_critic": 5, "batch_size": 8, "total_steps": 40,
                "log_every": 5, "eval_batch_size": 8, "optimizer.generator.b1": 0.5, "data.image_size": 64},
    "demo_attention_unet.py": {"model.base": 16, "model.depth": 4, "learning_rate": 1e-3, "total_steps": 600},
    "demo_deepfill_v2.py": {"model.cnum": 16, "model.critic_cnum": 16, "n_critic": 1, "data.image_size": 64},
    "demo_rcan.py": {"model.n_resgroups": 2, "model.reduction": 8, "data.scale": 2, "learning_rate": 5e-4,
                     "data.eval_source": None},
    "demo_sa_inpaint.py": {"model.widths": (32, 64, 128), "model.spectral_norm": True, "loss.adv": 0.01,
                           "learning_rate": 2e-4, "n_critic": 1},
    "demo_sagan.py": {"model.ch": 16, "model.ema_decay": 0.99, "model.attention_resolution": 16,
                      "optimizer.critic.lr": 4e-4, "data.image_size": 32},
    "demo_se_resnet.py": {"model.depth": 8, "model.num_classes": 3, "optimizer.schedule": "constant",
                          "optimizer.decay_steps": 0, "learning_rate": 2e-3, "image_every": 0},
    "rcan_div2k_x2.py": {"model.n_resgroups": 10, "model.n_resblocks": 20, "data.scale": 2, "data.image_size": 96,
                         "optimizer.b1": 0.9, "optimizer.lr": None, "best_metric": "eval_psnr_y"},
    "rcan_div2k_x4.py": {"data.scale": 4, "data.image_size": 192, "model.n_feats": 64},
    "sa_inpaint_places2.py": {"model.widths": (64, 128, 256), "model.critic_widths": (64, 128, 256, 512),
                              "loss.gan": "hinge", "optimizer.critic.b1": 0.5, "total_steps": 500_000},
    "sagan_cifar10.py": {"model.num_classes": 10, "model.attention_resolution": 16, "model.bn_momentum": 0.9,
                         "batch_size": 64, "best_metric": None, "best_mode": "min"},
    "sagan_imagenet128.py": {"model.ch": 64, "model.ema_stats": "track", "model.inception_weights": None,
                             "model.is_splits": 10, "learning_rate": None, "optimizer.generator.lr": 1e-4,
                             "optimizer.critic.lr": 4e-4, "optimizer.generator.b1": 0.0, "loss.kind": "hinge"},
    "se_resnet50_imagenet.py": {"model.preset": "se_resnet50", "model.zero_init_last_bn": False,
                                "loss.label_smoothing": 0.0, "optimizer.warmup_steps": 0, "optimizer.name": "sgd",
                                "optimizer.clip_norm": None, "compute_dtype": "bfloat16", "data.worker_count": 8},
    "se_resnet_cifar10.py": {"model.preset": "se_resnet_cifar", "model.depth": 20, "optimizer.schedule": "step",
                             "optimizer.boundaries": [32_000, 48_000], "loss.label_smoothing": 0.0},
}
#: Defaults every shipped config leaves to the trainer schema.
TRAINER_DEFAULTS = {"seed": 0, "keep_checkpoints": 3, "skip_nonfinite": False, "data.loader": "grain",
                    "data.eval_mask": None, "data.shuffle_buffer": None, "step_unroll": True, "prefetch_steps": 2}


def _at(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def _keys(block, prefix=""):
    """The dotted keys of a (nested) dict, blocks included."""
    out = []
    for key, value in block.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def test_every_shipped_config_is_checked_here():
    assert sorted(EXPECTED) == [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_to_their_values_with_every_schema_key(path):
    config = load_config(path)
    for key, value in {**TRAINER_DEFAULTS, **EXPECTED[path.name]}.items():
        assert _at(config, key) == value, key
    schema = schema_for(config.model.name).to_dict()
    assert set(_keys(schema)) <= set(_keys(config.to_dict()))  # every key has a value, its default at least
    assert config.eval_batch_size is not None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("block", ["model", "loss"])
def test_unknown_keys_in_model_and_loss_blocks_are_errors(tmp_path, path, block):
    """A typo in a task's block is an error naming it and the block's valid keys, in a file
    or in an override."""
    valid = schema_for(load_config(path).model.name)[block]
    (tmp_path / "typo.py").write_text(
        f"import sys\nsys.path.insert(0, {str(path.parent)!r})\nimport {path.stem} as base\n\n\n"
        f"def get_config():\n    c = base.get_config()\n"
        f"    c.{block} = {{**c.get({block!r}, {{}}), 'bogus_key': 1}}\n    return c\n"
    )
    listed = ", ".join(f"{block}.{k}" for k in valid) or "(none)"
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\): {block}\.bogus_key; valid keys here: "
                                          + re.escape(listed) + "$"):
        load_config(tmp_path / "typo.py")
    with pytest.raises(ConfigError, match=rf"{block}\.bogus_key.*unknown config key"):
        load_config(path, [f"{block}.bogus_key=1"])


MINIMAL = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": "deepfill_v1", "cnum": 8})
    c.data = ml_collections.ConfigDict({"source": {"kind": "sample_photos"}, "image_size": 32})
    c.batch_size = 4
    c.total_steps = 2
    c.learning_rate = 1e-4
    return c
"""


def test_a_minimal_config_gets_every_default(tmp_path):
    (tmp_path / "minimal.py").write_text(MINIMAL)
    config = load_config(tmp_path / "minimal.py", ["batch_size=6", "step_unroll=False", "prefetch_steps=3"])
    assert (config.model.cnum, config.model.critic_cnum, config.model.local_size) == (8, 64, None)
    assert config.n_critic == 5 and config.loss.l1_alpha == 1.2 and config.optimizer.generator.b1 == 0.9
    assert (config.log_every, config.image_every, config.eval_every, config.eval_images) == (10, 0, 0, 64)
    assert config.eval_batch_size == 6  # batch_size, after the overrides
    assert config.step_unroll is False and config.prefetch_steps == 3
    assert (config.compute_dtype, config.best_metric, config.best_mode, config.data.worker_count) == (
        "float32", None, "max", 0)


def test_required_keys_and_unknown_models_are_errors(tmp_path):
    (tmp_path / "nosteps.py").write_text(MINIMAL.replace("    c.total_steps = 2\n", ""))
    with pytest.raises(ConfigError, match="required config key.*total_steps"):
        load_config(tmp_path / "nosteps.py")
    (tmp_path / "nomodel.py").write_text(MINIMAL.replace('"deepfill_v1"', '"deepfill_v9"'))
    with pytest.raises(ConfigError, match=r"unknown model 'deepfill_v9'; known models: .*deepfill_v1, deepfill_v2"):
        load_config(tmp_path / "nomodel.py")
    (tmp_path / "block.py").write_text(MINIMAL.replace("    return c\n", "    c.loss = 0.5\n    return c\n"))
    with pytest.raises(ConfigError, match="config key loss must be a block of keys"):
        load_config(tmp_path / "block.py")


#: configs/demo.py as `jattn train` saved it before the schema (WORKDIR/config.json and the
#: checkpoints' config): fewer keys than a config has now.
SAVED_BEFORE_SCHEMA = {
    "seed": 0, "model": {"name": "deepfill_v1", "cnum": 16, "critic_cnum": 16, "local_size": 32, "ca_block_size": None},
    "data": {"source": {"kind": "sample_photos", "num_examples": 512, "crop_size": 64}, "eval_source": None,
             "loader": "grain", "image_size": 64,
             "mask": {"kind": "box", "hole_size": [32, 32], "margin": [4, 4], "max_delta": [8, 8]},
             "eval_mask": None, "shuffle_buffer": None, "worker_count": 0},
    "batch_size": 8, "total_steps": 40, "n_critic": 5, "compute_dtype": "float32", "learning_rate": 0.0001,
    "optimizer": {net: {"lr": None, "b1": 0.5, "b2": 0.9, "clip_norm": None, "schedule": "constant",
                        "warmup_steps": 0} for net in ("generator", "critic")},
    "loss": {"l1_alpha": 1.2, "l1_loss_alpha": 1.2, "ae_loss_alpha": 1.2, "gan_loss_alpha": 0.001,
             "wgan_gp_lambda": 10.0, "global_wgan_loss_alpha": 1.0, "gamma": 0.9},
    "log_every": 5, "image_every": 20, "checkpoint_every": 20, "eval_every": 20, "eval_images": 16,
    "eval_batch_size": 8, "keep_checkpoints": 3, "best_metric": "eval_psnr", "best_mode": "max",
    "skip_nonfinite": False, "jattn": {"version": "0.1.0", "git_commit": None, "jax": "0.7.0"},
}


def test_a_config_saved_before_the_schema_still_builds_its_task_and_state():
    """What `restore_for_eval` does with a checkpoint's saved config: the task and the abstract
    state, the keys the saved config lacks taking their defaults."""
    import jax
    import ml_collections

    from jattn.train.setup import abstract_train_state
    from jattn.train.sharding import make_mesh
    from jattn.train.task import build_task

    saved = ml_collections.ConfigDict(SAVED_BEFORE_SCHEMA)
    completed = with_defaults(saved)
    assert completed.step_unroll is True and completed.prefetch_steps == 2
    assert completed.optimizer.generator.decay_steps == 0 and completed.jattn.version == "0.1.0"
    task = build_task(saved)
    assert [u.name for u in task.updates] == ["d"] * 5 + ["g"]
    state = abstract_train_state(task, saved, make_mesh(jax.devices()[:1]))
    assert state.params["generator"]["conv1"]["kernel"].shape == (5, 5, 5, 16)
    assert saved.to_dict() == ml_collections.ConfigDict(SAVED_BEFORE_SCHEMA).to_dict()  # left as it was


# --------------------------------------------------------------------------- the command line


def _parsers(parser, name="jattn"):
    """(name, parser) of `parser` and of every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_and_subcommand_has_help_text():
    from jattn.cli import build_parser

    parser = build_parser()
    missing, seen = [], 0
    for name, p in _parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{name} {sub}" for sub in action.choices if not (helped.get(sub) or "").strip()]
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 50 and not missing, missing


def test_version_names_jattn_and_jax():
    import importlib.metadata

    from jattn.cli import version_string

    out = subprocess.run([sys.executable, "-m", "jattn", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == version_string() + "\n"
    assert out.stdout.startswith(f"jattn {importlib.metadata.version('jattn')} (jax {importlib.metadata.version('jax')}")


def test_eval_reads_the_config_saved_with_the_checkpoint(tmp_path, capsys):
    import json

    from jattn.train.loop import train
    from toy import toy_config

    config = toy_config(total=2)
    config.eval_images = 8
    train(config, tmp_path / "run", progress=False)
    capsys.readouterr()
    assert main(["eval", "--workdir", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and result["eval_images"] == 8 and "eval_psnr" in result
    assert json.loads((tmp_path / "run" / "eval_2.json").read_text()) == result
    # overrides apply to the saved config; a bad one, or a step that is not there, is one line
    assert main(["eval", "--workdir", str(tmp_path / "run"), "--step", "1", "--set", "eval_images=16"]) == 2
    err = capsys.readouterr().err
    assert err == f"jattn eval: error: {tmp_path / 'run'}: no checkpoint for step 1 (have 2)\n"
    assert main(["eval", "--workdir", str(tmp_path / "run"), "--set", "eval_imagez=16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_imagez" in err


def test_eval_of_a_workdir_without_checkpoints_is_one_line_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "mistyped"
    for config in ([], ["--config", str(DEMO)]):
        assert main(["eval", "--workdir", str(typo), *config]) == 2
        assert capsys.readouterr().err == f"jattn eval: error: {typo}: no such workdir\n"
        assert not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--workdir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints in this workdir" in err
    assert list((tmp_path / "empty").iterdir()) == []


# --------------------------------------------------------------------------- bundled configs


def test_bundled_configs_are_the_configs_folder_by_name():
    from jattn.cli import bundled_configs, config_path

    assert {name: path.resolve() for name, path in bundled_configs().items()} == {p.stem: p.resolve() for p in CONFIGS}
    assert config_path("demo").resolve() == DEMO and config_path("demo.py").resolve() == DEMO
    assert config_path("deepfill_v1_places2").name == "deepfill_v1_places2.py"


def test_config_takes_a_path_or_a_bundled_name(tmp_path, monkeypatch, capsys):
    from jattn.cli import _load_config

    def load(arg, *overrides):
        return _load_config(argparse.Namespace(config=arg, set=list(overrides), total_steps=None))

    monkeypatch.chdir(tmp_path)
    assert load("demo").total_steps == 40
    places = load("deepfill_v1_places2")  # imports its sibling deepfill_v1_base
    assert places.model.name == "deepfill_v1" and places.data.source.name == "places365_small"
    (tmp_path / "demo.py").write_text(MINIMAL)
    assert load("demo.py").total_steps == 2  # a file in the current folder comes first
    monkeypatch.chdir(REPO)
    assert load("configs/demo.py", "total_steps=3").total_steps == 3
    # a name that is neither: one line, nothing written
    code = main(["train", "--config", "dmo", "--workdir", str(tmp_path / "w")])
    assert code == 2 and not (tmp_path / "w").exists()
    assert capsys.readouterr().err == ("jattn train: error: config file not found: dmo and no bundled config has "
                                       "that name (`jattn configs` lists them)\n")
    assert main(["train", "--config", "sub/dmo.py", "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == "jattn train: error: config file not found: sub/dmo.py\n"


def test_configs_lists_every_bundled_config_with_its_summary(capsys):
    import ast

    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [p.stem for p in CONFIGS]
    for line, path in zip(lines, CONFIGS):
        first = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0].strip()
        assert line.split(None, 1)[1].startswith(first), line
    assert any(line.startswith("demo ") and "DeepFill v1, small and fast" in line for line in lines)


def test_import_deepfill_without_config_uses_the_bundled_base_config(tmp_path, capsys):
    code = main(["import-deepfill", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("jattn import-deepfill: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "config" not in err


def test_train_refusals_are_one_line_and_allow_config_change(tmp_path, capsys):
    """`jattn train` on a workdir: a resume whose config trains differently is refused
    (exit 2, one line naming the key) unless --allow-config-change; total steps below the
    latest checkpoint and a workdir held by another run are refused the same way."""
    import fcntl

    config = tmp_path / "toy_config.py"
    config.write_text("from toy import toy_config\n\n\ndef get_config():\n    return toy_config(total=2)\n")
    workdir = tmp_path / "w"
    base = ["train", "--config", str(config), "--workdir", str(workdir), "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()

    def refused(args, *words):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        for word in words:
            assert word in err, err

    refused([*base, "--set", "batch_size=16", "--total-steps", "4"], "batch_size")
    assert main([*base, "--set", "batch_size=16", "--total-steps", "4", "--allow-config-change"]) == 0
    capsys.readouterr()
    refused([*base, "--set", "batch_size=16", "--total-steps", "1"], "total_steps")
    with open(workdir / ".lock", "a+") as held:  # another run holds the workdir
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused([*base, "--set", "batch_size=16", "--total-steps", "6"])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
