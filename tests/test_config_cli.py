"""Config files, overrides and the CLI's error handling."""

import pathlib
import subprocess
import sys

import pytest

from jattn.cli import main
from jattn.config import ConfigError, load_config

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
