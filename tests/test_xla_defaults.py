"""jattn's XLA:CPU flags: added by the `jattn` command only, once, never over the user's own
flags, only when XLA accepts them, opt-out; importing jattn changes nothing."""

import json
import os
import subprocess
import sys
import textwrap

from jattn._xla import CPU_FLAGS, _jaxlib_key, accepted_flags, apply_cpu_defaults, xla_accepts

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _all(flags):
    return list(flags)


def test_added_once_after_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_cpu_defaults(env, _all) == list(CPU_FLAGS)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + " ".join(CPU_FLAGS)
    before = env["XLA_FLAGS"]
    assert apply_cpu_defaults(env, _all) == [] and env["XLA_FLAGS"] == before


def test_user_flags_rejected_flags_and_opt_out_are_left_alone():
    asked = []

    def accepts(flags):
        asked.append(flags)
        return list(flags)

    for own in (f"{FLAG}=individual_convolution", f"-{FLAG.lstrip('-')}=individual_dot"):
        env = {"XLA_FLAGS": own}
        assert apply_cpu_defaults(env, accepts) == [] and env["XLA_FLAGS"] == own
    assert asked == []  # nothing to add: XLA is not even asked
    env = {}
    assert apply_cpu_defaults(env, lambda flags: []) == [] and "XLA_FLAGS" not in env  # XLA aborts on unknown flags
    for off in ("0", "off", "false", "no"):
        env = {"JATTN_XLA_DEFAULTS": off}
        assert apply_cpu_defaults(env, accepts) == [] and "XLA_FLAGS" not in env
    assert asked == []


def test_xla_itself_says_which_flags_it_accepts():
    assert all(xla_accepts(flag) for flag in CPU_FLAGS)
    assert not xla_accepts("--xla_jattn_no_such_flag=1")
    assert not xla_accepts(f"{FLAG}=-no_such_fusion_type")


def test_the_answer_is_cached_per_jaxlib(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    asked = []

    def check(flag):
        asked.append(flag)
        return flag == "--a=1"

    assert accepted_flags(["--a=1", "--b=2"], env, check) == ["--a=1"]
    assert accepted_flags(["--a=1", "--b=2"], env, check) == ["--a=1"]
    assert asked == ["--a=1", "--b=2"]  # asked once each
    cache = json.loads((tmp_path / "cache" / "jattn" / "xla_flags.json").read_text())
    assert cache == {_jaxlib_key(): {"--a=1": True, "--b=2": False}}
    assert _jaxlib_key().split()[0] == __import__("importlib.metadata").metadata.version("jaxlib")
    # another jaxlib's answers are not this one's; an unwritable cache only means asking again
    (tmp_path / "cache" / "jattn" / "xla_flags.json").write_text(json.dumps({"0.0.1 /elsewhere": {"--c=3": True}}))
    assert accepted_flags(["--c=3"], env, check) == [] and asked[-1] == "--c=3"
    (tmp_path / "file").write_text("")
    assert accepted_flags(["--a=1"], {"XDG_CACHE_HOME": str(tmp_path / "file")}, check) == ["--a=1"]
    assert asked[-1] == "--a=1"


def test_importing_jattn_changes_no_environment_variable():
    code = textwrap.dedent("""
        import os
        before = dict(os.environ)
        import jattn, jattn.cli, jattn.config, jattn._xla, jattn._alloc
        from jattn.ops import contextual_attention
        from jattn.train.loop import train
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(changed)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JATTN_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _run_command(tmp_path, **env_changes):
    """`jattn devices` run as the program in a child Python; (its XLA_FLAGS after main, stderr)."""
    code = ("import json, os, sys; from jattn.cli import main; sys.argv = ['jattn', 'devices']; "
            "code = main(); print(json.dumps(os.environ.get('XLA_FLAGS'))); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JATTN_XLA_DEFAULTS")}
    env.update(JATTN_MALLOC="0", XDG_CACHE_HOME=str(tmp_path / "cache"), **env_changes)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_the_command_adds_them_and_says_so_once(tmp_path):
    flags, err = _run_command(tmp_path)
    assert flags == " ".join(CPU_FLAGS)
    assert err.count("jattn: XLA_FLAGS += ") == 1 and "JATTN_XLA_DEFAULTS=0" in err
    assert (tmp_path / "cache" / "jattn" / "xla_flags.json").is_file()
    flags, err = _run_command(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert flags == "--xla_force_host_platform_device_count=2 " + " ".join(CPU_FLAGS)
    own = f"{FLAG}=individual_dot"
    flags, err = _run_command(tmp_path, XLA_FLAGS=own)
    assert flags == own and "XLA_FLAGS +=" not in err
    flags, err = _run_command(tmp_path, JATTN_XLA_DEFAULTS="0")
    assert flags is None and "XLA_FLAGS +=" not in err
