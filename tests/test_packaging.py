"""The wheel: what it holds, and that it runs without the source tree (and, slow, without extras)."""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import jattn

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
#: What a wheel is built from (pyproject.toml names no other file).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "jattn", "configs")


def _user_env(**changes) -> dict:
    """The environment of a user's shell: none of the test suite's JAX / XLA settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "PYTHONPATH")}
    return {**env, **changes}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built with pip from a copy of the source files (the checkout stays untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (root / "dist").glob("jattn-*.whl")
    return path


def _metadata(wheel: pathlib.Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def test_the_package_list_names_every_package():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "jattn").rglob("__init__.py")
                   if "__pycache__" not in p.parts)
    assert sorted(listed) == sorted([*found, "jattn.configs"]), "pyproject.toml [tool.setuptools] packages"


def test_the_wheel_holds_the_package_the_configs_and_the_licence(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    sources = {str(p.relative_to(REPO)) for p in (REPO / "jattn").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names
    assert {n for n in names if n.startswith("jattn/configs/")} == {f"jattn/configs/{c}.py" for c in CONFIG_NAMES}
    assert not [n for n in names if n.startswith(("configs/", "tests/", "benchmarks/", "docs/", "launch/"))]
    assert f"jattn-{jattn.__version__}.dist-info/licenses/LICENSE" in names
    assert re.search(r"^jattn = jattn\.cli:main$", entry_points, re.M)
    meta = _metadata(wheel)
    assert meta["Version"] == jattn.__version__ and meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"


def test_core_requirements_and_extras(wheel):
    meta = _metadata(wheel)
    requires = meta.get_all("Requires-Dist")
    core = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert core == {"jax", "flax", "optax", "orbax-checkpoint", "grain", "einops", "ml_collections", "numpy",
                    "pillow", "scikit-image", "safetensors", "tensorboard", "tqdm"}
    assert set(meta.get_all("Provides-Extra")) == {"tf", "tfds", "tpu", "onnx", "coco", "all", "dev"}

    def extra(name):
        return {r.split(";")[0].strip() for r in requires if re.search(rf"extra == ['\"]{name}['\"]", r)}

    assert {r.split(">=")[0] for r in extra("tf")} == {"tensorflow-cpu", "tensorflow"}
    def own(name):  # the extras of jattn's that extra `name` brings
        return {e.strip() for r in extra(name) if r.startswith("jattn[") for e in r[6:-1].split(",")}

    assert own("tfds") == {"tf"} and any(r.startswith("tensorflow-datasets") for r in extra("tfds"))
    assert own("all") == {"tf", "tfds", "tpu", "onnx", "coco"}
    assert own("dev") == {"tf", "tfds", "coco"} and {"pytest>=8", "pytest-xdist>=3.5"} <= extra("dev")
    assert {r.split(">=")[0] for r in extra("coco")} == {"pycocotools"}


def test_the_unpacked_wheel_runs_from_an_empty_folder(wheel, tmp_path):
    """The wheel's files alone (first on the path, no source tree): --version, the bundled
    configs by name (a config that imports its sibling included), import-deepfill's default."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _user_env(PYTHONPATH=str(site), JATTN_MALLOC="0", JATTN_XLA_DEFAULTS="0")

    def jattn_command(*args):
        return subprocess.run([sys.executable, "-m", "jattn", *args], capture_output=True, text=True, timeout=300,
                              cwd=empty, env=env)

    out = jattn_command("--version")
    assert out.returncode == 0 and out.stdout.startswith("jattn "), out.stderr
    out = jattn_command("configs")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == CONFIG_NAMES
    code = ("import argparse, jattn, jattn.cli as cli; "
            "load = lambda name: cli._load_config(argparse.Namespace(config=name, set=None, total_steps=None)); "
            "print(jattn.__file__, cli.config_path('demo'), load('demo').total_steps, "
            "load('deepfill_v1_places2').data.source.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=empty, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    package, demo, steps, source = out.stdout.split()
    assert pathlib.Path(package) == site / "jattn" / "__init__.py"
    assert pathlib.Path(demo) == site / "jattn" / "configs" / "demo.py"
    assert (steps, source) == ("40", "places365_small")
    out = jattn_command("import-deepfill", "--checkpoint", "nope", "--output", "imported")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("jattn import-deepfill: error: ")
    assert sorted(p.name for p in empty.iterdir()) == []


def test_the_ci_script_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2  # install and run the demo; run the tests
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == commands[1]


@pytest.mark.slow
def test_the_wheel_installs_without_extras_and_trains(wheel, tmp_path):
    """A fresh virtualenv with the wheel and its core requirements only (pip resolves them),
    then, from an empty folder, the commands a new user runs first."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=1800, env=_user_env())
    assert out.returncode == 0, out.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _user_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = str(venv / "bin" / "jattn")

    def run(*args):
        return subprocess.run([command, *args], capture_output=True, text=True, timeout=1800, cwd=empty, env=env)

    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util as u; print([m for m in ('tensorflow', 'tensorflow_datasets', "
                            "'jax2onnx', 'libtpu') if u.find_spec(m)])"], capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "[]", probe.stdout  # no extra came along
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"jattn {jattn.__version__} (jax "), out.stderr
    out = run("configs")
    assert out.returncode == 0 and [line.split()[0] for line in out.stdout.splitlines()] == CONFIG_NAMES
    out = run("train", "--config", "demo", "--workdir", "W", "--total-steps", "2", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"step": 2' in out.stdout.splitlines()[-1]
    assert (empty / "W" / "checkpoints" / "2").is_dir() and list((empty / "W" / "tensorboard").iterdir())
    out = run("demo", "--workdir", "W", "--output", "O", "--set", "total_steps=2")  # resumes, then inpaints
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (empty / "O").iterdir()) == ["flow.png", "inpainted.png", "input.png", "mask.png"]
    out = run("export", "--workdir", "W", "--format", "saved_model", "--output", "S")
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
        "jattn export: error: the saved_model export needs tensorflow, which is not installed: "
        "pip install 'jattn[tf]'")
