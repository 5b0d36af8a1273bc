"""XLA:CPU flags that the `jattn` command sets before JAX starts its backends.

XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10), and YNNPACK's
backward-filter convolution (the kernel gradient of every conv layer) is slow on the CPUs
this project was measured on. `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`
takes convolutions out of YNNPACK's fusion types (YNNPACK keeps the others), so XLA's own
convolutions run them; `docs/benchmarks.md` has the measurements. The flag changes nothing
on GPU or TPU.

`apply_cpu_defaults()` adds these flags to `XLA_FLAGS`. Importing jattn does not call it:
`jattn.cli.main` does, when run as the `jattn` command; other programs may call it
themselves before their first JAX computation (XLA reads `XLA_FLAGS` once, when JAX starts
its first backend). It adds only flags the user has not set in `XLA_FLAGS`, only flags the
running XLA accepts, and nothing when `JATTN_XLA_DEFAULTS=0`.

Whether XLA accepts a flag: XLA aborts the whole process on an `XLA_FLAGS` entry it does
not know (or a value it cannot parse), so a flag that a later jaxlib renames or drops must
not be passed. jattn asks XLA itself: a child Python starts JAX's CPU backend with only the
flag in `XLA_FLAGS`, and exit status 0 means XLA parsed it. The other ways considered are
weaker: a table of checked jaxlib versions turns the flag off at every jaxlib release until
someone edits it, and searching jaxlib's shared library for the flag's name is a guess (a
name in the binary says nothing of the value syntax). The child costs an import of JAX, so
its answer is kept per jaxlib (version and install folder) in
`$XDG_CACHE_HOME/jattn/xla_flags.json` (default `~/.cache/jattn/`); where that cannot be
written, the check runs each time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, MutableMapping

__all__ = ["CPU_FLAGS", "apply_cpu_defaults", "xla_accepts", "accepted_flags"]

CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)

_OFF = ("0", "false", "no", "off")
# Starts JAX's CPU backend, which parses XLA_FLAGS (and aborts on one it does not accept).
_CHECK = "import jax; jax.devices('cpu'); print('ok')"


def xla_accepts(flag: str, *, timeout: float = 300) -> bool:
    """Whether the running jaxlib's XLA starts with `flag` in `XLA_FLAGS` (a child process)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:  # -P: the current folder is not on sys.path
        out = subprocess.run([sys.executable, "-P", "-c", _CHECK], env=env, capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("ok")


def _jaxlib_key() -> str | None:
    """The installed jaxlib's version and folder, or None without jaxlib (nothing is imported)."""
    try:
        version = importlib.metadata.version("jaxlib")
        spec = importlib.util.find_spec("jaxlib")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return f"{version} {list(spec.submodule_search_locations)[0]}"


def _cache_file(environ) -> pathlib.Path:
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "jattn" / "xla_flags.json"


def accepted_flags(flags, environ=None, check: Callable[[str], bool] = xla_accepts) -> list[str]:
    """The `flags` the running XLA accepts: asked once per jaxlib (`check`), then cached."""
    environ = os.environ if environ is None else environ
    key = _jaxlib_key()
    if key is None:
        return []
    path = _cache_file(environ)
    try:
        cache = json.loads(path.read_text())
        known = cache.get(key, {}) if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache, known = {}, {}
    known = known if isinstance(known, dict) else {}
    answers = {flag: known[flag] if isinstance(known.get(flag), bool) else check(flag) for flag in flags}
    if any(known.get(flag) is not answer for flag, answer in answers.items()):
        cache = {**(cache if isinstance(cache, dict) else {}), key: {**known, **answers}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass  # no cache: the check runs again next time
    return [flag for flag in flags if answers[flag]]


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None,
                       accepts: Callable[[list[str]], list[str]] | None = None) -> list[str]:
    """Append the `CPU_FLAGS` that `XLA_FLAGS` does not set and XLA accepts to
    `environ["XLA_FLAGS"]` (default `os.environ`); returns the flags added. `accepts` maps
    flags to the accepted ones (default: `accepted_flags`, asked only when a flag is missing)."""
    environ = os.environ if environ is None else environ
    if environ.get("JATTN_XLA_DEFAULTS", "1").strip().lower() in _OFF:
        return []
    current = environ.get("XLA_FLAGS", "")
    given = {item.split("=", 1)[0].lstrip("-") for item in current.split()}
    missing = [flag for flag in CPU_FLAGS if flag.split("=", 1)[0].lstrip("-") not in given]
    if not missing:
        return []
    added = (accepts or (lambda flags: accepted_flags(flags, environ)))(missing)
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
