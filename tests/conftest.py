"""Test set-up: every test sees 8 simulated CPU devices.

The device count must be fixed before JAX initialises its backends, so it is set
here, at import time of the conftest, before any test module imports jax.
"""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
# The tests check values, not speed, and compiling dominates their time on CPU: programs are
# compiled without the backend's (LLVM's) optimisation, which takes a third to a half of each
# compile; the values are XLA's either way. JATTN_TEST_XLA_OPT=1 keeps the default level.
_flags = ["--xla_force_host_platform_device_count=8"]
if os.environ.get("JATTN_TEST_XLA_OPT") != "1":
    _flags.append("--xla_backend_optimization_level=0")
for _flag in _flags:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# TensorFlow (input pipelines only) must stay quiet and off any GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pathlib
import tempfile

import jax
import pytest

from jattn._xla import apply_cpu_defaults

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags, before JAX starts its backends below

# One persistent compilation cache per test session, shared by the pytest-xdist workers
# (they inherit the variable from the controller) and new each session: many tests train or
# load the same small programs, and compiling dominates their time on CPU. A test that
# counts compilations turns it off around its count (task_helpers.count_compiles).
_OWN_CACHE = "JATTN_TEST_COMPILATION_CACHE" not in os.environ  # made here: removed at the end
os.environ.setdefault("JATTN_TEST_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jattn-test-xla-cache-"))
jax.config.update("jax_compilation_cache_dir", os.environ["JATTN_TEST_COMPILATION_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

GOLDEN = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, after every worker
        import shutil

        shutil.rmtree(os.environ["JATTN_TEST_COMPILATION_CACHE"], ignore_errors=True)


def pytest_configure(config):
    del config
    n = jax.device_count()
    if n != 8:
        raise RuntimeError(f"tests expect 8 simulated CPU devices, JAX sees {n}")


@pytest.fixture(scope="session")
def golden_dir():
    """Path of ../shared/golden; skips (with the reason) when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden outputs of the official DeepFill code not found at {GOLDEN}")
    return GOLDEN
