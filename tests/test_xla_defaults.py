"""jattn's XLA:CPU defaults: added once, never over the user's own flags, opt-out."""

import os

from jattn._xla import CPU_FLAGS, apply_cpu_defaults

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_added_for_a_verified_jaxlib_and_kept_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_cpu_defaults(env, "0.10.2") == list(CPU_FLAGS["0.10.2"])
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ") and FLAG in env["XLA_FLAGS"]
    before = env["XLA_FLAGS"]
    assert apply_cpu_defaults(env, "0.10.2") == [] and env["XLA_FLAGS"] == before


def test_user_flags_unknown_versions_and_opt_out_are_left_alone():
    env = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    assert apply_cpu_defaults(env, "0.10.2") == [] and env["XLA_FLAGS"] == f"{FLAG}=individual_convolution"
    env = {}
    assert apply_cpu_defaults(env, "9.9.9") == [] and "XLA_FLAGS" not in env  # XLA aborts on unknown flags
    env = {"JATTN_XLA_DEFAULTS": "0"}
    assert apply_cpu_defaults(env, "0.10.2") == [] and "XLA_FLAGS" not in env


def test_importing_jattn_applied_them_to_this_process():
    # conftest imports jattn before JAX starts its backends
    from jattn._xla import _jaxlib_version

    expected = CPU_FLAGS.get(_jaxlib_version() or "", ())
    assert all(flag in os.environ.get("XLA_FLAGS", "") for flag in expected)
