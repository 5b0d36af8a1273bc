"""jattn._alloc: when the `jattn` command re-executes itself under tcmalloc."""

import os
import subprocess
import sys

import pytest

from jattn import _alloc


def _fake_lib(tmp_path, name="libtcmalloc_minimal.so.4"):
    lib = tmp_path / name
    lib.write_bytes(b"")
    return lib


def test_auto_finds_the_library_and_sets_the_environment(tmp_path):
    lib = _fake_lib(tmp_path)
    env = _alloc.preload_environment({"PATH": "/bin"}, platform="linux", dirs=[str(tmp_path / "none"), str(tmp_path)])
    assert env["LD_PRELOAD"] == str(lib)
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert env["JATTN_TCMALLOC_ACTIVE"] == str(lib)
    assert env["PATH"] == "/bin"


def test_keeps_an_existing_preload_and_release_rate(tmp_path):
    lib = _fake_lib(tmp_path)
    env = _alloc.preload_environment({"LD_PRELOAD": "/x/libfoo.so", "TCMALLOC_RELEASE_RATE": "5"},
                                     platform="linux", dirs=[str(tmp_path)])
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "5"


@pytest.mark.parametrize("environ,platform", [
    ({"JATTN_TCMALLOC": "0"}, "linux"),
    ({"JATTN_TCMALLOC": "off"}, "linux"),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux"),   # already under tcmalloc
    ({"JATTN_TCMALLOC_ACTIVE": "/some/lib"}, "linux"),          # the re-executed process
    ({}, "darwin"),
])
def test_nothing_to_do(tmp_path, environ, platform):
    _fake_lib(tmp_path)
    assert _alloc.preload_environment(environ, platform=platform, dirs=[str(tmp_path)]) is None


def test_auto_without_the_library_runs_as_is(tmp_path):
    assert _alloc.find_tcmalloc([str(tmp_path)]) is None
    assert _alloc.preload_environment({}, platform="linux", dirs=[str(tmp_path)]) is None


def test_explicit_path(tmp_path):
    lib = _fake_lib(tmp_path, "libmytcmalloc.so")
    env = _alloc.preload_environment({"JATTN_TCMALLOC": str(lib)}, platform="linux", dirs=[])
    assert env["LD_PRELOAD"] == str(lib)
    with pytest.raises(FileNotFoundError, match="JATTN_TCMALLOC='/no/such/lib.so' is not a file"):
        _alloc.preload_environment({"JATTN_TCMALLOC": "/no/such/lib.so"}, platform="linux")


def _real_library():
    for name in ("libm.so.6",):  # any loadable library stands in for tcmalloc
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                  "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux-only")
@pytest.mark.parametrize("announce", [False, True])
def test_reexec_replaces_the_process_once(announce):
    lib = _real_library()
    if lib is None:
        pytest.skip("no libm.so.6 in the usual library folders to stand in for tcmalloc")
    code = ("import os, sys; from jattn._alloc import reexec_with_tcmalloc; "
            f"print('start', os.getpid(), flush=True); reexec_with_tcmalloc(announce={announce}); "
            "print('after', os.getpid(), os.environ['LD_PRELOAD'], os.environ['TCMALLOC_RELEASE_RATE'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_TCMALLOC_ACTIVE")}
    env["JATTN_TCMALLOC"] = lib
    proc = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    out = proc.stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    assert len(starts) == 2, out                       # ran again once, not in a loop
    assert starts[0].split()[1] == starts[1].split()[1]  # the same process (exec, not a child)
    after = [line for line in out if line.startswith("after")]
    assert after == [f"after {starts[0].split()[1]} {lib} 0 ['a', 'b']"]
    said = f"jattn: running under tcmalloc ({lib}); JATTN_TCMALLOC=0 turns this off\n"
    assert proc.stderr == (said if announce else "")  # once, before the re-execution


def _command(*args, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_TCMALLOC_ACTIVE")}
    env.update(JATTN_XLA_DEFAULTS="0", **env_changes)
    return subprocess.run([sys.executable, "-m", "jattn", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_command_names_a_bad_library_path():
    out = _command("devices", JATTN_TCMALLOC="/no/such/libtcmalloc.so")
    assert out.returncode == 2
    assert out.stderr == "jattn: error: JATTN_TCMALLOC='/no/such/libtcmalloc.so' is not a file; set it to the path " \
                         "of a tcmalloc library, to 'auto' or to '0'\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux-only")
def test_the_command_reexecutes_but_help_version_and_importing_jattn_do_not():
    lib = _real_library()
    if lib is None:
        pytest.skip("no libm.so.6 in the usual library folders to stand in for tcmalloc")
    out = _command("devices", JATTN_TCMALLOC=lib)
    assert out.returncode == 0 and out.stderr.count("jattn: running under tcmalloc") == 1, out.stderr
    for args in (["--help"], ["--version"], ["configs"]):  # nothing computed: no process settings
        out = _command(*args, JATTN_TCMALLOC="/no/such/libtcmalloc.so")
        assert out.returncode == 0 and "tcmalloc" not in out.stderr, (args, out.stderr)
    code = "import os; import jattn, jattn.cli; print(os.environ.get('LD_PRELOAD'))"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_TCMALLOC_ACTIVE")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JATTN_TCMALLOC": lib}, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "None" and out.stderr == ""
