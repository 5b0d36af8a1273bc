"""A missing optional dependency (an extra) is one line naming `pip install 'jattn[EXTRA]'`."""

import json
import subprocess
import sys
import textwrap

import pytest

from jattn import MissingExtraError, _require_extra

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    BLOCKED = ("tensorflow", "tensorflow_datasets")

    class Block:  # as on a machine where they are not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import importlib.util
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (  # probes see them as absent
        None if name.split(".")[0] in BLOCKED else _find_spec(name, package))
    from jattn.cli import main

    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        results.append([code, err.getvalue()])
    print(json.dumps(results))
    """
)


def test_commands_name_the_extra_they_need(tmp_path):
    cases = {
        "tf": ["train", "--config", "demo", "--workdir", str(tmp_path / "w1"), "--total-steps", "1",
               "--set", "data.loader=tfdata"],
        "tfds": ["train", "--config", "deepfill_v1_places2", "--workdir", str(tmp_path / "w2"), "--total-steps", "1"],
        "tf ": ["export", "--workdir", str(tmp_path / "w3"), "--format", "saved_model", "--output", str(tmp_path / "o")],
        " tf": ["import-deepfill", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "w4")],
    }
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(list(cases.values()))], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for (extra, argv), (code, err) in zip(cases.items(), json.loads(out.stdout.splitlines()[-1])):
        assert code == 2, (argv, err)
        assert err.startswith(f"jattn {argv[0]}: error: ") and err.count("\n") == 1, err
        assert err.endswith(f"which is not installed: pip install 'jattn[{extra.strip()}]'\n"), err


def test_require_extra_tells_a_missing_module_from_a_broken_one(tmp_path, monkeypatch):
    with pytest.raises(MissingExtraError, match=r"^the thing needs jattn_no_such_module, which is not installed: "
                                                r"pip install 'jattn\[tf\]'$") as info:
        _require_extra("jattn_no_such_module", "tf", "the thing")
    assert isinstance(info.value, ModuleNotFoundError) and info.value.name == "jattn_no_such_module"
    (tmp_path / "jattn_broken_module.py").write_text("import jattn_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="jattn_missing_dependency") as info:
        _require_extra("jattn_broken_module", "tf", "the thing")
    assert not isinstance(info.value, MissingExtraError)  # installed but broken: its own error
    assert _require_extra("json", "tf", "the thing") is json
