"""XLA:CPU settings jattn applies before JAX starts its backends.

XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10). Its backward-filter
convolution (the kernel gradient of every conv layer) runs at about a quarter of the
rate of XLA's own (Eigen) convolution on this project's CPUs, which made the kernel
gradients over half of a DeepFill v1 generator update. Removing convolutions from the
YNNPACK fusion list makes a whole DeepFill v1 training iteration about 1.4x faster
(`docs/benchmarks.md`); YNNPACK keeps the other fusion types.

`apply_cpu_defaults()` runs when `jattn` is imported. It only adds flags the user has not
set in `XLA_FLAGS`, only for jaxlib versions where the flags were checked to exist (XLA
aborts on unknown flags), and nothing when `JATTN_XLA_DEFAULTS=0`. Flags take effect only
if JAX has not initialised its backends yet: import jattn before the first computation.
The flags change nothing on GPU or TPU.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

__all__ = ["CPU_FLAGS", "apply_cpu_defaults"]

# jaxlib version -> flags verified to exist (and to help) there.
CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "0.10.2": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",),
}


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None) -> list[str]:
    """Append jattn's XLA:CPU flags to `environ["XLA_FLAGS"]` (default `os.environ`);
    returns the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get("JATTN_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    version = jaxlib_version if jaxlib_version is not None else _jaxlib_version()
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in CPU_FLAGS.get(version or "", ()) if flag.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
