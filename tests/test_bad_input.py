"""Bad input to the `jattn` commands, given the way a user would give it: each is one line on
stderr, exit status 2, no traceback, and nothing created (no workdir, no output file, no
folder on the way to one)."""

import errno
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import jattn._paths as paths
import jattn.train.logging as logs
from jattn.cli import main
from jattn.train.loop import train
from toy import toy_config, train_toy_sr

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"
TOY = """from toy import toy_config


def get_config():
    c = toy_config(total=2)
    c.image_every = 0
    return c
"""


def _one_line_error(capsys, args, *words):
    """Runs `jattn ARGS`: exit 2, one line naming the command and `words`, no traceback."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 2, out
    assert "Traceback" not in out.err + out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jattn {args[0]}: error: "), out.err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def toy(tmp_path):
    """A config file of the small toy GAN task."""
    path = tmp_path / "toy_config.py"
    path.write_text(TOY)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir of 2 toy steps, evaluated once (so it has its eval masks)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    config = toy_config(total=2)
    config.image_every = 0
    config.eval_images = 8
    config.eval_every = 2
    train(config, workdir, progress=False)
    return workdir


@pytest.fixture
def read_only(tmp_path):
    """An empty folder nothing can be written in: mode 555, or for root (who writes there
    anyway) a read-only tmpfs mounted on it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                       capture_output=True).returncode != 0:
        pytest.skip("root, and no read-only tmpfs can be mounted here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only_copy(tmp_path):
    """`copy(workdir)`: a copy of a workdir that nothing can be written in: mode 555, or for
    root a tmpfs made read-only once the copy is on it."""
    mounted = []

    def copy(workdir):
        folder = tmp_path / "ro_copy"
        folder.mkdir()
        if os.geteuid() != 0:
            shutil.copytree(workdir, folder / "run")
            (folder / "run").chmod(0o555)
            mounted.append(lambda: (folder / "run").chmod(0o755))
            return folder / "run"
        mount = shutil.which("mount")
        if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
            pytest.skip("root, and no tmpfs can be mounted here (to make read-only)")
        mounted.append(lambda: subprocess.run(["umount", str(folder)], check=False))
        shutil.copytree(workdir, folder / "run")
        if subprocess.run([mount, "-o", "remount,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root, and the tmpfs cannot be remounted read-only here")
        return folder / "run"

    yield copy
    for undo in reversed(mounted):
        undo()


class _FullDisk:
    """A file whose writes write half of their data, then fail as on a full disk."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _full_disk_for(monkeypatch, name):
    """Files written by jattn._paths whose name has `name` in it are on a full disk."""

    def full_disk_open(path, *args, **kwargs):
        file = open(path, *args, **kwargs)
        return _FullDisk(file) if name in pathlib.Path(path).name else file

    monkeypatch.setattr(paths, "open", full_disk_open, raising=False)


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder` (folders as None)."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _images(folder, names, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if data is None:
            Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(folder / name)
        else:
            (folder / name).write_bytes(data)
    return folder


# --------------------------------------------------------------------------- jattn train


def test_train_settings_that_cannot_make_a_run_create_no_workdir(tmp_path, toy, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = _images(tmp_path / "unreadable", [f"{i}.png" for i in range(9)], b"not an image")
    workdir = tmp_path / "runs" / "w"

    def folder(**source):
        return f"--config.data.source={ {'kind': 'folder', **source} }"

    cases = [
        (toy, ["--config.batch_size=0"], "batch_size=0", "8 devices"),
        (toy, ["--config.batch_size=4"], "batch_size=4", "8 devices"),  # the devices cannot split it
        (toy, ["--config.batch_size=12"], "batch_size=12"),
        (toy, ["--config.eval_every=1", "--config.eval_batch_size=4"], "eval_batch_size=4"),
        (toy, ["--config.eval_every=1", "--config.eval_images=4"], "eval_images=4"),
        (DEMO, ["--config.learning_rate=fast"], "learning_rate"),
        (toy, ["--config.optimizer.lr=fast"], "optimizer.lr"),
        (toy, ["--config.model.name=toy_gna"], "unknown model 'toy_gna'"),
        (DEMO, ["--config.data.image_size=60"], "divisible by 8"),
        (toy, [folder()], "'folder' source", "root"),
        (toy, [folder(root=str(tmp_path / "nowhere"))], "image folder not found", "nowhere"),
        (toy, [folder(root=str(empty))], "no image files", str(empty)),
        (toy, [folder(root=str(unreadable))], "no readable image", str(unreadable)),
        # the eval source too, where the run evaluates: before, not at the first evaluation
        (toy, ["--config.eval_every=2", f"--config.data.eval_source={ {'kind': 'folder', 'root': str(empty)} }"],
         "data.eval_source", "no image files", str(empty)),
        # and the eval metrics' weight files
        (toy, ["--config.eval_every=2", f"--config.eval_inception_weights={tmp_path / 'nowhere.npz'}"],
         "eval_inception_weights", "not found", "nowhere.npz"),
    ]
    for config, overrides, *words in cases:
        _one_line_error(capsys, ["train", "--config", config, "--workdir", workdir, "--no-progress", *overrides],
                        *words)
        assert not (tmp_path / "runs").exists(), overrides


def test_a_config_file_whose_get_config_raises(tmp_path, capsys):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    raise KeyError('data')\n")
    _one_line_error(capsys, ["train", "--config", config, "--workdir", tmp_path / "w"],
                    str(config), "get_config() failed: KeyError")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("line,words", [
    ("c.learning_rate = 'fast'", "learning_rate: expected a number, got 'fast'"),
    ("c.optimizer = ml_collections.ConfigDict({'lr': 'fast'})", "optimizer.lr: expected a number, got 'fast'"),
    ("c.prefetch_steps = '2'", "prefetch_steps: expected a whole number, got '2'"),
    ("c.step_unroll = 'no'", "step_unroll: expected True or False, got 'no'"),
])
def test_a_value_of_the_wrong_type_in_a_config_file_names_its_key(tmp_path, capsys, line, words):
    config = tmp_path / "typed.py"
    config.write_text(TOY.replace("from toy", "import ml_collections\nfrom toy").replace(
        "    return c", f"    {line}\n    return c"))
    _one_line_error(capsys, ["train", "--config", config, "--workdir", tmp_path / "w"], str(config), words)
    assert not (tmp_path / "w").exists()


def test_a_string_learning_rate_in_a_bundled_models_config_file_names_its_key(tmp_path, capsys):
    """DeepFill's per-network optimizer blocks (lr None: the config's learning_rate)."""
    config = tmp_path / "fast.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'configs')!r})\nimport demo\n\n\n"
                      "def get_config():\n    c = demo.get_config()\n    c.optimizer.generator.lr = 'fast'\n"
                      "    c.optimizer.critic.clip_norm = [1]\n    return c\n")
    _one_line_error(capsys, ["train", "--config", config, "--workdir", tmp_path / "w"], str(config),
                    "optimizer.generator.lr: expected a number, got 'fast'",
                    "optimizer.critic.clip_norm: expected a number, got [1]")
    assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_or_under_one(tmp_path, toy, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for workdir in (file, file / "w"):
        _one_line_error(capsys, ["train", "--config", toy, "--workdir", workdir], str(file), "not a folder")
    assert file.read_text() == "mine"


def test_a_read_only_workdir_or_parent(read_only, toy, capsys):
    for workdir in (read_only, read_only / "w"):
        _one_line_error(capsys, ["train", "--config", toy, "--workdir", workdir], f"{read_only} is not writable")
    assert not list(read_only.iterdir())


def test_a_config_json_that_is_a_folder_refuses_the_run_and_changes_nothing(trained, tmp_path, toy, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    (workdir / "config.json").unlink()
    (workdir / "config.json").mkdir()
    before = _snapshot(workdir)
    _one_line_error(capsys, ["train", "--config", toy, "--workdir", workdir, "--total-steps", "4", "--no-progress"],
                    f"{workdir / 'config.json'} is a folder, not a file")
    assert _snapshot(workdir) == before


def test_a_full_disk_while_writing_config_json_keeps_the_old_one(trained, tmp_path, toy, capsys, monkeypatch):
    """The resumed run stops at config.json, naming it: the old file whole, no temporary
    file, the logs as they were."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = _snapshot(workdir)
    _full_disk_for(monkeypatch, "config.json")
    line = _one_line_error(capsys, ["train", "--config", toy, "--workdir", workdir, "--total-steps", "4",
                                    "--no-progress"], f"cannot write {workdir / 'config.json'}", "No space left")
    assert "config.json.tmp" not in line
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_demo_refusals_are_one_line_like_train(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    _one_line_error(capsys, ["demo", "--workdir", file, "--output", tmp_path / "out"], "not a folder")
    _one_line_error(capsys, ["demo", "--workdir", tmp_path / "w", "--output", tmp_path / "out",
                             "--set", "batch_size=4"], "8 devices")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("failing", ["metrics.jsonl", "events.out.tfevents"])
def test_a_full_disk_while_logging_is_one_line_naming_the_file(tmp_path, toy, capsys, monkeypatch, failing):
    """The run stops at its first log step, naming the file, and a rerun resumes."""

    class Full:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._file, name)

    def full_disk_open(path, *args, **kwargs):
        file = open(path, *args, **kwargs)
        return Full(file) if failing in pathlib.Path(path).name else file

    monkeypatch.setattr(logs, "open", full_disk_open, raising=False)
    workdir = tmp_path / "w"
    line = _one_line_error(capsys, ["train", "--config", toy, "--workdir", workdir, "--no-progress"],
                           "No space left on device")
    assert line.startswith(f"jattn train: error: cannot write {workdir}/") and failing in line
    monkeypatch.undo()
    assert main(["train", "--config", str(toy), "--workdir", str(workdir), "--no-progress"]) == 0
    assert [r["step"] for r in logs.read_metrics(workdir)] == [1, 2]


# --------------------------------------------------------------------------- jattn eval


def test_eval_of_a_mistyped_workdir_or_a_file_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "mistyped"
    _one_line_error(capsys, ["eval", "--workdir", typo], "no such workdir")
    assert not (tmp_path / "runs").exists()
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    _one_line_error(capsys, ["eval", "--workdir", file], "a file, not a workdir")


def test_eval_of_eval_data_without_images_creates_nothing(trained, tmp_path, capsys):
    """An eval source that gives no eval batch, however the user gets there: one line naming
    it, before the checkpoint is read, and no eval_N.json nor eval masks written."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    empty = tmp_path / "empty"
    empty.mkdir()
    few = _images(tmp_path / "few", ["a.png", "b.png", "c.png"])
    unreadable = _images(tmp_path / "unreadable", [f"{i}.png" for i in range(9)], b"not an image")
    before = _snapshot(workdir)

    def source(**spec):
        return f"data.eval_source={ {'kind': 'folder', **spec} }"

    other_masks = "data.eval_mask={'kind': 'box', 'hole_size': [4, 4], 'margin': [0, 0], 'max_delta': [1, 1]}"
    cases = [
        ([source(root=str(empty))], "data.eval_source", "no image files", str(empty)),
        ([source(root=str(empty)), other_masks], "no image files", str(empty)),  # no new mask set either
        ([source(root=str(few))], "3 image(s), fewer than one eval batch (8)", str(few)),
        ([source(root=str(few), split="val", val_fraction=0.0)], "split 'val' is empty", str(few)),
        ([source(root=str(unreadable))], "no readable image", str(unreadable)),
        ([source(root=str(tmp_path / "nowhere"))], "image folder not found", "nowhere"),
        (["eval_images=4"], "eval_images=4 is less than one eval batch (8)"),
    ]
    for overrides, *words in cases:
        _one_line_error(capsys, ["eval", "--workdir", workdir, *[a for o in overrides for a in ("--set", o)]], *words)
        assert _snapshot(workdir) == before, overrides


def test_eval_result_that_cannot_be_written(trained, tmp_path, capsys, read_only_copy):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    (workdir / "eval_2.json").mkdir()
    _one_line_error(capsys, ["eval", "--workdir", workdir], f"cannot write {workdir / 'eval_2.json'}",
                    "a folder, not a file")
    assert not list((workdir / "eval_2.json").iterdir())
    read_only = read_only_copy(trained)
    _one_line_error(capsys, ["eval", "--workdir", read_only], f"cannot write {read_only / 'eval_2.json'}",
                    f"{read_only} is not writable")
    assert not (read_only / "eval_2.json").exists()


def test_a_full_disk_while_writing_the_eval_result_keeps_the_old_one(trained, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    (workdir / "eval_2.json").write_text('{"step": 2, "eval_psnr": 20.0}')
    _full_disk_for(monkeypatch, "eval_2.json")
    _one_line_error(capsys, ["eval", "--workdir", workdir], f"cannot write {workdir / 'eval_2.json'}",
                    "No space left on device")
    assert (workdir / "eval_2.json").read_text() == '{"step": 2, "eval_psnr": 20.0}'
    assert sorted(p.name for p in workdir.iterdir() if "eval_2" in p.name) == ["eval_2.json"]  # no temporary file


def test_eval_with_another_models_config(trained, capsys):
    _one_line_error(capsys, ["eval", "--workdir", trained, "--config", DEMO], "checkpoint 2", "could not be restored",
                    "does not fit this config's model")


def test_eval_with_a_corrupt_eval_mask_file(trained, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    (masks,) = (workdir / "eval_masks").glob("*.npy")
    data = bytearray(masks.read_bytes())
    data[-1] ^= 0xFF
    masks.write_bytes(bytes(data))
    _one_line_error(capsys, ["eval", "--workdir", workdir], str(masks), "corrupt", "to rebuild it")
    assert not list(workdir.glob("eval_*.json"))


# --------------------------------------------------------------------------- jattn inpaint


@pytest.fixture
def photos(tmp_path):
    """Folders img/ (a.png, b.png) and msk/ (their masks)."""
    _images(tmp_path / "img", ["a.png", "b.png"])
    hole = np.zeros((32, 32, 3), np.uint8)
    hole[8:20, 8:20] = 255
    (tmp_path / "msk").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(hole).save(tmp_path / "msk" / name)
    return tmp_path


def _inpaint(trained, photos, output, *more):
    return ["inpaint", "--checkpoint", trained, "--image", photos / "img", "--mask", photos / "msk",
            "--output", output, *more]


def test_inpaint_folder_mode_checks_every_output_before_writing_one(trained, photos, capsys):
    out = photos / "out"
    (out / "b.png").mkdir(parents=True)
    _one_line_error(capsys, _inpaint(trained, photos, out), f"cannot write {out / 'b.png'}", "a folder, not a file")
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]  # a.png was not written
    (out / "b.png").rmdir()
    _one_line_error(capsys, _inpaint(trained, photos, out, "--batch-size", "0"), "batch size", "at least 1")
    assert not list(out.iterdir())


def test_inpaint_outputs_that_cannot_be_written(trained, photos, read_only, capsys):
    file = photos / "notes.txt"
    file.write_text("mine")
    single = ["--image", photos / "img" / "a.png", "--mask", photos / "msk" / "a.png"]
    cases = [
        (file / "out.png", f"{file} is a file"),
        (read_only / "out.png", f"{read_only} is not writable"),
        (read_only / "new" / "out.png", f"{read_only} is not writable"),
        (photos / "new" / "out.xyz", "unknown image extension"),
    ]
    for output, words in cases:
        _one_line_error(capsys, ["inpaint", "--checkpoint", trained, *single, "--output", output], words)
    _one_line_error(capsys, _inpaint(trained, photos, file), f"{file} is a file")  # folder mode
    assert not (photos / "new").exists() and not list(read_only.iterdir()) and file.read_text() == "mine"
    # a new folder on the way to a good output is made
    assert main(["inpaint", "--checkpoint", str(trained), *map(str, single), "--output",
                 str(photos / "new" / "out.png")]) == 0
    assert (photos / "new" / "out.png").is_file()


def test_a_full_disk_while_writing_an_output_is_one_line_and_leaves_no_file(trained, photos, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        pathlib.Path(fp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = photos / "new" / "deeper" / "out.png"
    _one_line_error(capsys, ["inpaint", "--checkpoint", trained, "--image", photos / "img" / "a.png", "--mask",
                             photos / "msk" / "a.png", "--output", out], f"cannot write {out}", "No space left")
    assert not (photos / "new").exists()  # nor the folders made for it


# --------------------------------------------------------------------------- jattn upscale


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """A workdir of the toy super-resolution task."""
    workdir = tmp_path_factory.mktemp("sr")
    train_toy_sr(workdir, total=1)
    return workdir


def test_upscale_outputs_that_cannot_be_written(upscaler, photos, read_only, capsys):
    file = photos / "notes.txt"
    file.write_text("mine")
    (photos / "out" / "b.png").mkdir(parents=True)
    cases = [
        (photos / "img" / "a.png", file / "out.png", f"{file} is a file"),
        (photos / "img" / "a.png", read_only / "new" / "out.png", f"{read_only} is not writable"),
        (photos / "img" / "a.png", photos / "new" / "out.xyz", "unknown image extension"),
        (photos / "img", photos / "out", f"{photos / 'out' / 'b.png'} is a folder"),  # folder mode: a.png too
    ]
    for image, output, words in cases:
        _one_line_error(capsys, ["upscale", "--checkpoint", upscaler, "--image", image, "--output", output], words)
    assert not (photos / "new").exists() and not list(read_only.iterdir())
    assert sorted(p.name for p in (photos / "out").iterdir()) == ["b.png"]
    assert main(["upscale", "--checkpoint", str(upscaler), "--image", str(photos / "img" / "a.png"),
                 "--output", str(photos / "new" / "out.png")]) == 0
    assert Image.open(photos / "new" / "out.png").size == (64, 64)
