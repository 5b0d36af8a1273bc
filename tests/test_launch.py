"""Launchers (dry runs), a 2-process local launch == 1 process x 8 devices, and the collectives of a step."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.config import load_config
from jattn.train.checkpoint import Checkpointer, abstract_state
from jattn.train.loop import train
from jattn.train.setup import state_init_fn
from jattn.train.sharding import make_mesh, replicate_tree, replicated, to_global_array
from jattn.train.steps import jit_update
from jattn.train.task import build_task

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
LAUNCH = ROOT / "launch"
sys.path.insert(0, str(LAUNCH))
import local_multiprocess  # noqa: E402


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory):
    """gcloud / srun stubs that fail: a dry run that tried to run one would be caught."""
    d = tmp_path_factory.mktemp("stub_bin")
    for name in ("gcloud", "srun", "sbatch"):
        (d / name).write_text("#!/bin/sh\necho \"stub $0 called\" >&2\nexit 99\n")
        (d / name).chmod(0o755)
    return d


def _dry(script, *args, stub, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e["PATH"] = f"{stub}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("DRY_RUN", "0")  # dry only when the test says so (DRY_RUN=1 or --dry-run)
    e.update(env)
    out = subprocess.run(["bash", str(LAUNCH / script), *args], env=e, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


# --- shell launchers: dry runs -------------------------------------------------------------

def test_tpu_pod_dry_run_creates_installs_and_trains_on_all_workers(stub_bin):
    cmds = _dry("tpu_pod.sh", stub=stub_bin, DRY_RUN="1", WORKDIR="gs://bucket/run", TPU_NAME="pod1", ZONE="us-west4-a",
                ACCELERATOR="v5litepod-256", EXTRA_ARGS="--set batch_size=4096")
    assert cmds[0].startswith("gcloud compute tpus tpu-vm describe pod1 --zone=us-west4-a")
    assert cmds[1].startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-west4-a")
    assert "--accelerator-type=v5litepod-256" in cmds[1]
    ssh = [c for c in cmds if c.startswith("gcloud compute tpus tpu-vm ssh pod1")]
    assert ssh and all("--worker=all" in c for c in ssh)
    assert any("tpu-vm scp" in c and "--worker=all" in c for c in cmds)
    assert any("pip install" in c and "jax[tpu]" in c for c in ssh)
    train_cmd = ssh[-1]
    assert "python -m jattn train --distributed auto" in train_cmd
    assert "--workdir gs://bucket/run" in train_cmd and "--set batch_size=4096" in train_cmd
    assert cmds == _dry("tpu_pod.sh", "--dry-run", stub=stub_bin, WORKDIR="gs://bucket/run", TPU_NAME="pod1",
                        ZONE="us-west4-a", ACCELERATOR="v5litepod-256", EXTRA_ARGS="--set batch_size=4096")


def test_tpu_pod_needs_a_gs_workdir(stub_bin):
    env = {**os.environ, "DRY_RUN": "1", "WORKDIR": "/tmp/x", "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "gs://" in out.stderr


def test_gpus_dry_run_is_one_process_over_all_gpus(stub_bin):
    cmds = _dry("gpus.sh", "--dry-run", "--set", "batch_size=128", stub=stub_bin, WORKDIR="workdirs/g8", PYTHON="python3")
    assert len(cmds) == 1
    assert re.search(r"python3 -m jattn train --distributed off --config configs/deepfill_v1_base.py "
                     r"--workdir workdirs/g8 --set batch_size=128$", cmds[0])
    assert "CUDA_VISIBLE_DEVICES" not in cmds[0]
    assert "CUDA_VISIBLE_DEVICES=0,1" in _dry("gpus.sh", stub=stub_bin, DRY_RUN="1", GPUS="0,1", PYTHON="python3")[0]


def test_slurm_dry_run_is_srun_with_distributed_auto(stub_bin):
    cmds = _dry("slurm.sbatch", stub=stub_bin, DRY_RUN="1", WORKDIR="/shared/run", PYTHON="python3",
                EXTRA_ARGS="--set batch_size=512")
    assert len(cmds) == 1
    assert cmds[0].startswith("srun ")
    assert "python3 -m jattn train --distributed auto" in cmds[0]
    assert "--workdir /shared/run" in cmds[0] and cmds[0].endswith("--set batch_size=512")
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "#SBATCH --ntasks-per-node=1" in text


def test_local_multiprocess_dry_run(capsys):
    res = local_multiprocess.launch(["train", "--config", "c.py", "--workdir", "w"], num_processes=2,
                                    devices_per_process=4, port=12345, dry_run=True,
                                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert res.ok
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line.startswith(f"[{i}] ")
        assert "JAX_NUM_CPU_DEVICES=4" in line and "JATTN_COORDINATOR=127.0.0.1:12345" in line
        assert f"JATTN_PROCESS_ID={i}" in line and "JATTN_NUM_PROCESSES=2" in line
        assert "device_count" not in line and "XLA_FLAGS=--xla_foo=1" in line
        assert line.endswith("-m jattn train --config c.py --workdir w")


def test_local_multiprocess_failure_is_nonzero(tmp_path):
    # a bad config in every process: each fails; the launcher reports a non-zero status
    res = local_multiprocess.launch(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")],
                                    num_processes=2, devices_per_process=1, echo=False, timeout=120)
    assert not res.ok and res.returncode != 0


# --- 2 processes x 4 devices through the launcher == 1 process x 8 devices ----------------------

CONFIG = """
import toy  # registers the "toy_gan" task (tests/ is on PYTHONPATH)


def get_config():
    c = toy.toy_config(total=3)
    c.image_every = 0
    return c
"""


def test_local_multiprocess_two_by_four_matches_one_by_eight(tmp_path):
    cfg_file = tmp_path / "toy_cfg.py"
    cfg_file.write_text(CONFIG)
    workdir = tmp_path / "multi"
    pythonpath = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    res = local_multiprocess.launch(
        ["train", "--config", str(cfg_file), "--workdir", str(workdir), "--no-progress"],
        num_processes=2, devices_per_process=4, extra_env={"PYTHONPATH": pythonpath},
        cwd=ROOT, echo=False, timeout=420,
    )
    assert res.ok, "\n".join(res.outputs[0][-40:] + res.outputs[1][-40:])
    results = [json.loads(next(line for line in reversed(out) if line.startswith("{"))) for out in res.outputs]

    cfg = load_config(cfg_file)
    single = train(cfg, tmp_path / "single", progress=False)
    for r in results:  # every process reports the same global losses as the single process
        for k in ("d_loss", "g_loss"):
            np.testing.assert_allclose(r["metrics"][k], single["metrics"][k], rtol=1e-5, atol=1e-6)

    shapes = jax.eval_shape(state_init_fn(build_task(cfg), cfg), jax.random.key(0))
    shapes = abstract_state(shapes, replicated(make_mesh()))  # restore the 2-process run onto 1 x 8
    multi = Checkpointer(workdir / "checkpoints").restore(shapes)
    one = Checkpointer(tmp_path / "single" / "checkpoints").restore(shapes)
    assert multi.step == one.step == 3
    for a, b in zip(jax.tree_util.tree_leaves(multi.state.params), jax.tree_util.tree_leaves(one.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- collectives of a sharded update, read from the compiled HLO --------------------------------

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def _collectives(hlo: str) -> dict:
    found = {}
    for line in hlo.splitlines():
        for op in _COLLECTIVES:
            if re.search(rf"\b{op}(-start)?\(", line):
                found.setdefault(op, []).append(line)
    return found


def _operands(line: str) -> tuple[int, int]:
    """(number of rank-0 operands, total elements of the other operands) of a tuple all-reduce."""
    result_type = line.split(" all-reduce")[0].split("=", 1)[1]
    dims = re.findall(r"f32\[([\d,]*)\]", result_type)
    return sum(1 for d in dims if not d), sum(math.prod(int(x) for x in d.split(",")) for d in dims if d)


def test_sharded_update_runs_one_all_reduce_per_network_update():
    """One fused all-reduce per update: the gradient leaves plus the scalar loss/metric sums.

    XLA's all-reduce combiner merges every gradient all-reduce and the scalar reductions of
    the loss and metrics into a single tuple all-reduce; nothing else crosses devices (the
    state is replicated, the batch stays where it is). See docs/scaling.md.
    """
    from test_train_steps import _batches, _setup

    state, updates = _setup()
    mesh = make_mesh()
    assert mesh.size == 8
    state = replicate_tree(state, mesh)
    batch = to_global_array(_batches(1)[0], mesh)
    found = {}
    for u in (updates[0], updates[-1]):  # a critic update and the generator update
        hlo = jit_update(u, mesh, donate=False).lower(state, batch, jnp.asarray(0, jnp.int32)).compile().as_text()
        colls = _collectives(hlo)
        assert set(colls) == {"all-reduce"}, {k: len(v) for k, v in colls.items()}
        assert len(colls["all-reduce"]) == 1, colls["all-reduce"]
        scalars, elements = _operands(colls["all-reduce"][0])
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params[u.net]))
        found[u.net] = (scalars, elements, n_params)
    # generator: exactly its gradient (443 floats) + 2 scalars (the loss and the l1 metric)
    assert found["generator"] == (2, found["generator"][2], found["generator"][2])
    # critic: its gradient is reduced as TWO partial sums -- d_loss calls the critic twice
    # (real images, fake images); XLA all-reduces each branch's contribution and adds them
    # after the reduction, so every critic gradient leaf travels twice -- except the Dense
    # bias (1 float), whose gradient mean(fake)-mean(real) makes identically 0, folded away.
    # + 3 scalars (the two score means that make up the loss, and the d_real metric).
    scalars, elements, n_params = found["critic"]
    assert (scalars, elements) == (3, 2 * (n_params - 1))
