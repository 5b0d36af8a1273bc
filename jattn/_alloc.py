"""The memory allocator the `jattn` command runs under (Linux).

XLA:CPU allocates each execution's temporaries as one large block and frees it at the end.
glibc's malloc serves blocks over its mmap threshold (at most 32 MiB) with a fresh `mmap`
and returns them with `munmap`, so every execution faults in all of its temporary memory
again, 4 KiB at a time. A one-program DeepFill step has tens of MB of temporaries: without
a fix it spends a large part of each step in page faults (`docs/benchmarks.md`).

Two fixes, in this order of preference:

- **tcmalloc** keeps freed memory for reuse (with `TCMALLOC_RELEASE_RATE=0` it never hands
  it back). Used when one of `LIBRARY_NAMES` is in `SEARCH_DIRS` (Debian / Ubuntu:
  `apt install libtcmalloc-minimal4`).
- **glibc's malloc, tuned** (`GLIBC_SETTINGS`), where there is no tcmalloc: one arena, so
  that every thread's large blocks come from the main heap, which grows with `brk`; no
  `mmap` for large blocks; and a trim threshold of 64 GiB, so that freed memory stays in
  the heap for the next execution. The cost is a higher peak resident memory: freed blocks
  are kept, not returned. Small blocks are still served per thread by glibc's tcache.

A library cannot change the allocator of a process that is already running, so the
`jattn` command (`jattn.cli.main`) re-executes itself once, with the new environment,
before anything is computed, and says so in one line on stderr. Importing jattn does
nothing of the kind. `JATTN_MALLOC` decides:

- unset or `auto`: tcmalloc where found, else tuned glibc malloc (on glibc systems);
- `glibc`: tuned glibc malloc even where tcmalloc is installed (to compare);
- `0` / `off` / `false` / `no`: the allocator as it is;
- a path: preload that library (an error if it is not a file).

Settings the user has already made win: an `LD_PRELOAD` naming tcmalloc means nothing is
done, and each of `GLIBC_SETTINGS` already in the environment is kept as it is (when all of
them are, there is nothing to re-execute for). Nothing happens off Linux, on a C library
other than glibc without tcmalloc, or in the re-executed process itself
(`JATTN_MALLOC_ACTIVE` is set there, naming the allocator). This matters only for the CPU
backend's host memory; it is harmless on GPU and TPU hosts (Cloud TPU VM images preload
tcmalloc themselves).
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

__all__ = ["GLIBC_SETTINGS", "LIBRARY_NAMES", "SEARCH_DIRS", "active_allocator", "allocator_environment",
           "find_tcmalloc", "reexec_with_allocator"]

LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
#: glibc malloc's environment settings (mallopt(3)) where there is no tcmalloc.
GLIBC_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",                       # every thread allocates from the main, brk-grown heap
    "MALLOC_MMAP_MAX_": "0",                       # never mmap a block, however large
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024 ** 3),  # keep freed memory in the heap for reuse
}
ACTIVE = "JATTN_MALLOC_ACTIVE"
_OFF = ("0", "off", "false", "no")


def find_tcmalloc(dirs: Sequence[str] = SEARCH_DIRS) -> str | None:
    """The first `LIBRARY_NAMES` file found in `dirs`, or None."""
    for name in LIBRARY_NAMES:
        for d in dirs:
            path = pathlib.Path(d) / name
            if path.is_file():
                return str(path)
    return None


def active_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """What this process was re-executed under (for reports), or the C library's malloc."""
    return environ.get(ACTIVE) or "the C library's malloc"


def _glibc() -> bool:
    """Whether this process runs on glibc."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def _tcmalloc_environment(environ: Mapping[str, str], library: str) -> dict[str, str]:
    env = dict(environ)
    preload = environ.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    env[ACTIVE] = f"tcmalloc ({library})"
    return env


def _glibc_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    if all(key in environ for key in GLIBC_SETTINGS):
        return None
    env = {**GLIBC_SETTINGS, **environ}
    env[ACTIVE] = "glibc malloc (" + " ".join(f"{k}={env[k]}" for k in GLIBC_SETTINGS) + ")"
    return env


def allocator_environment(environ: Mapping[str, str], *, platform: str = sys.platform,
                          dirs: Sequence[str] = SEARCH_DIRS, glibc: bool | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should run as is.
    `glibc` says whether the C library is glibc (None: ask this process's).

    Raises FileNotFoundError when `JATTN_MALLOC` is a path that is not a file.
    """
    setting = environ.get("JATTN_MALLOC", "auto").strip()
    if setting.lower() in _OFF or environ.get(ACTIVE) or not platform.startswith("linux"):
        return None
    if "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    glibc = _glibc() if glibc is None else glibc
    if setting.lower() in ("", "auto", "glibc"):
        library = find_tcmalloc(dirs) if setting.lower() != "glibc" else None
        if library is not None:
            return _tcmalloc_environment(environ, library)
        return _glibc_environment(environ) if glibc else None
    if not pathlib.Path(setting).is_file():
        raise FileNotFoundError(f"JATTN_MALLOC={setting!r} is not a file; set it to the path of a tcmalloc "
                                f"library, to 'auto', 'glibc' or '0'")
    return _tcmalloc_environment(environ, setting)


def reexec_with_allocator(argv: Sequence[str] | None = None, *, announce: bool = False) -> None:
    """Replace this process by itself under the allocator `allocator_environment` gives;
    returns only when it gives none. Call it first thing in a program's entry point, never
    from library code (tests, notebooks). `argv` defaults to `sys.orig_argv`; `announce`
    prints one line on stderr naming the allocator before the re-execution."""
    env = allocator_environment(os.environ)
    if env is None:
        return
    args = list(sys.orig_argv if argv is None else argv)
    if announce:
        print(f"jattn: running under {env[ACTIVE]}; JATTN_MALLOC=0 turns this off", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)
