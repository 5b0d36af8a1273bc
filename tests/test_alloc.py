"""jattn._alloc: the allocator the `jattn` command re-executes itself under."""

import os
import subprocess
import sys

import pytest

from jattn import _alloc

GLIBC = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def _fake_lib(tmp_path, name="libtcmalloc_minimal.so.4"):
    lib = tmp_path / name
    lib.write_bytes(b"")
    return lib


def test_auto_finds_tcmalloc_and_sets_the_environment(tmp_path):
    lib = _fake_lib(tmp_path)
    env = _alloc.allocator_environment({"PATH": "/bin"}, platform="linux", dirs=[str(tmp_path / "none"), str(tmp_path)],
                                       glibc=True)
    assert env["LD_PRELOAD"] == str(lib)
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert env["JATTN_MALLOC_ACTIVE"] == f"tcmalloc ({lib})"
    assert env["PATH"] == "/bin"
    assert not any(key in env for key in GLIBC)  # tcmalloc is preferred to tuning glibc


def test_keeps_an_existing_preload_and_release_rate(tmp_path):
    lib = _fake_lib(tmp_path)
    env = _alloc.allocator_environment({"LD_PRELOAD": "/x/libfoo.so", "TCMALLOC_RELEASE_RATE": "5"},
                                       platform="linux", dirs=[str(tmp_path)])
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "5"


def test_auto_without_tcmalloc_tunes_glibc(tmp_path):
    assert _alloc.find_tcmalloc([str(tmp_path)]) is None
    env = _alloc.allocator_environment({"PATH": "/bin"}, platform="linux", dirs=[str(tmp_path)], glibc=True)
    assert {key: env[key] for key in GLIBC} == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                                "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
    assert env["JATTN_MALLOC_ACTIVE"] == ("glibc malloc (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
                                          f"MALLOC_TRIM_THRESHOLD_={64 << 30})")
    assert "LD_PRELOAD" not in env and env["PATH"] == "/bin"


def test_glibc_settings_the_user_made_win(tmp_path):
    env = _alloc.allocator_environment({"MALLOC_ARENA_MAX": "4"}, platform="linux", dirs=[str(tmp_path)], glibc=True)
    assert env["MALLOC_ARENA_MAX"] == "4" and env["MALLOC_MMAP_MAX_"] == "0"
    all_set = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_MAX_": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
    assert _alloc.allocator_environment(all_set, platform="linux", dirs=[str(tmp_path)], glibc=True) is None


def test_glibc_setting_skips_an_installed_tcmalloc(tmp_path):
    _fake_lib(tmp_path)
    env = _alloc.allocator_environment({"JATTN_MALLOC": "glibc"}, platform="linux", dirs=[str(tmp_path)], glibc=True)
    assert "LD_PRELOAD" not in env and env["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.parametrize("environ,platform,glibc,tcmalloc", [
    ({"JATTN_MALLOC": "0"}, "linux", True, True),
    ({"JATTN_MALLOC": "off"}, "linux", True, False),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux", True, True),  # already under tcmalloc
    ({"JATTN_MALLOC_ACTIVE": "glibc malloc"}, "linux", True, False),      # the re-executed process
    ({}, "darwin", False, True),
    ({}, "linux", False, False),                                           # musl, say, and no tcmalloc
])
def test_nothing_to_do(tmp_path, environ, platform, glibc, tcmalloc):
    if tcmalloc:
        _fake_lib(tmp_path)
    assert _alloc.allocator_environment(environ, platform=platform, dirs=[str(tmp_path)], glibc=glibc) is None


def test_active_allocator_names_what_the_process_runs_under():
    assert _alloc.active_allocator({}) == "the C library's malloc"
    assert _alloc.active_allocator({"JATTN_MALLOC_ACTIVE": "tcmalloc (/x.so)"}) == "tcmalloc (/x.so)"


def test_this_process_c_library_is_detected():
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert _alloc._glibc()


def test_explicit_path(tmp_path):
    lib = _fake_lib(tmp_path, "libmytcmalloc.so")
    env = _alloc.allocator_environment({"JATTN_MALLOC": str(lib)}, platform="linux", dirs=[])
    assert env["LD_PRELOAD"] == str(lib)
    with pytest.raises(FileNotFoundError, match="JATTN_MALLOC='/no/such/lib.so' is not a file"):
        _alloc.allocator_environment({"JATTN_MALLOC": "/no/such/lib.so"}, platform="linux")


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
    code = ("import os, sys; from jattn._alloc import reexec_with_allocator; "
            f"print('start', os.getpid(), flush=True); reexec_with_allocator(announce={announce}); "
            "print('after', os.getpid(), os.environ['LD_PRELOAD'], os.environ['TCMALLOC_RELEASE_RATE'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_MALLOC_ACTIVE")}
    env["JATTN_MALLOC"] = lib
    proc = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    out = proc.stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    assert len(starts) == 2, out                       # ran again once, not in a loop
    assert starts[0].split()[1] == starts[1].split()[1]  # the same process (exec, not a child)
    after = [line for line in out if line.startswith("after")]
    assert after == [f"after {starts[0].split()[1]} {lib} 0 ['a', 'b']"]
    said = f"jattn: running under tcmalloc ({lib}); JATTN_MALLOC=0 turns this off\n"
    assert proc.stderr == (said if announce else "")  # once, before the re-execution


def _command(*args, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_MALLOC_ACTIVE")}
    env.update(JATTN_XLA_DEFAULTS="0", **env_changes)
    return subprocess.run([sys.executable, "-m", "jattn", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_command_names_a_bad_library_path():
    out = _command("devices", JATTN_MALLOC="/no/such/libtcmalloc.so")
    assert out.returncode == 2
    assert out.stderr == "jattn: error: JATTN_MALLOC='/no/such/libtcmalloc.so' is not a file; set it to the path " \
                         "of a tcmalloc library, to 'auto', 'glibc' or '0'\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux-only")
def test_the_command_reexecutes_but_help_version_and_importing_jattn_do_not():
    lib = _real_library()
    if lib is None:
        pytest.skip("no libm.so.6 in the usual library folders to stand in for tcmalloc")
    out = _command("devices", JATTN_MALLOC=lib)
    assert out.returncode == 0 and out.stderr.count("jattn: running under tcmalloc") == 1, out.stderr
    for args in (["--help"], ["--version"], ["configs"]):  # nothing computed: no process settings
        out = _command(*args, JATTN_MALLOC="/no/such/libtcmalloc.so")
        assert out.returncode == 0 and "tcmalloc" not in out.stderr, (args, out.stderr)
    code = "import os; import jattn, jattn.cli; print(os.environ.get('LD_PRELOAD'))"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JATTN_MALLOC_ACTIVE")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JATTN_MALLOC": lib}, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "None" and out.stderr == ""


_glibc_only = pytest.mark.skipif(not (sys.platform.startswith("linux") and _alloc._glibc()),
                                 reason="the malloc settings are glibc's")


@_glibc_only
def test_the_command_reexecutes_under_tuned_glibc():
    out = _command("devices", JATTN_MALLOC="glibc")
    said = [line for line in out.stderr.splitlines() if "running under" in line]
    assert out.returncode == 0 and said == [f"jattn: running under glibc malloc (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
                                            f"MALLOC_TRIM_THRESHOLD_={64 << 30}); JATTN_MALLOC=0 turns this off"], out.stderr
    # `jattn compile` executes nothing: XLA flags, but the allocator left as it is
    out = _command("compile", "--config", "/no/such/config.py", "--topology", "local", JATTN_MALLOC="glibc")
    assert out.returncode == 2 and "running under" not in out.stderr, out.stderr


# What XLA:CPU does each execution: a worker thread allocates one block larger than glibc's
# largest mmap threshold (32 MiB), writes it and frees it. The minor page faults of the
# later rounds show whether the memory was kept for reuse or faulted in again.
_FAULTS = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
def in_thread():
    t = threading.Thread(target=round_trip); t.start(); t.join()
in_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    in_thread()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@_glibc_only
def test_tuned_glibc_keeps_a_large_block_for_the_next_execution():
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    tuned = _alloc.allocator_environment({"JATTN_MALLOC": "glibc", **base})
    faults = {name: int(subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                                       check=True, timeout=60).stdout)
              for name, env in (("plain", base), ("tuned", tuned))}
    pages = (64 << 20) // 4096
    assert faults["plain"] > pages // 2, faults   # mmapped and faulted in again every round
    assert faults["tuned"] < pages // 20, faults  # kept in the heap
