"""Run the `jattn` command under tcmalloc when the machine has it (Linux).

XLA:CPU allocates each execution's temporaries as one large block and frees it at the end.
glibc's malloc serves blocks that large with a fresh `mmap` and returns them with
`munmap`, so every execution faults in all of its temporary memory again, 4 KiB at a
time. tcmalloc keeps freed memory for reuse (with `TCMALLOC_RELEASE_RATE=0` it never hands
it back), which spares those page faults (`docs/benchmarks.md`).

A library cannot change the allocator of a process that is already running, so the
`jattn` command (`jattn.cli.main`) re-executes itself once, with `LD_PRELOAD` naming the
library, before anything is computed, and says so in one line on stderr. Importing jattn
does nothing of the kind. `JATTN_TCMALLOC` decides:

- unset or `auto`: use tcmalloc if one of `LIBRARY_NAMES` is in `SEARCH_DIRS`
  (Debian / Ubuntu: `apt install libtcmalloc-minimal4`), else run as is;
- `0` / `off` / `false` / `no`: never;
- a path: preload that library (an error if it is not a file).

Nothing happens when `LD_PRELOAD` already names a tcmalloc, off Linux, or in the
re-executed process itself (`JATTN_TCMALLOC_ACTIVE` is set there). This matters only for
the CPU backend's host memory; it is harmless on GPU and TPU hosts (Cloud TPU VM images
preload tcmalloc themselves).
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

__all__ = ["LIBRARY_NAMES", "SEARCH_DIRS", "find_tcmalloc", "preload_environment", "reexec_with_tcmalloc"]

LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_OFF = ("0", "off", "false", "no")
_ACTIVE = "JATTN_TCMALLOC_ACTIVE"


def find_tcmalloc(dirs: Sequence[str] = SEARCH_DIRS) -> str | None:
    """The first `LIBRARY_NAMES` file found in `dirs`, or None."""
    for name in LIBRARY_NAMES:
        for d in dirs:
            path = pathlib.Path(d) / name
            if path.is_file():
                return str(path)
    return None


def preload_environment(environ: Mapping[str, str], *, platform: str = sys.platform,
                        dirs: Sequence[str] = SEARCH_DIRS) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should run as is.

    Raises FileNotFoundError when `JATTN_TCMALLOC` is a path that is not a file.
    """
    setting = environ.get("JATTN_TCMALLOC", "auto").strip()
    if setting.lower() in _OFF or environ.get(_ACTIVE) or not platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return None
    if setting.lower() in ("", "auto"):
        library = find_tcmalloc(dirs)
        if library is None:
            return None
    else:
        if not pathlib.Path(setting).is_file():
            raise FileNotFoundError(f"JATTN_TCMALLOC={setting!r} is not a file; set it to the path of "
                                    f"a tcmalloc library, to 'auto' or to '0'")
        library = setting
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    env[_ACTIVE] = library
    return env


def reexec_with_tcmalloc(argv: Sequence[str] | None = None, *, announce: bool = False) -> None:
    """Replace this process by itself under tcmalloc when `preload_environment` says so;
    returns only when it does not. Call it first thing in a program's entry point, never
    from library code (tests, notebooks). `argv` defaults to `sys.orig_argv`; `announce`
    prints one line on stderr naming the library before the re-execution."""
    env = preload_environment(os.environ)
    if env is None:
        return
    args = list(sys.orig_argv if argv is None else argv)
    if announce:
        print(f"jattn: running under tcmalloc ({env[_ACTIVE]}); JATTN_TCMALLOC=0 turns this off", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)
