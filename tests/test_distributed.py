"""Multi-host: 2 processes x 4 CPU devices via jax.distributed on localhost == 1 process x 8."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jattn.train.checkpoint import Checkpointer, abstract_state
from jattn.train.loop import _state_init_fn, train
from jattn.train.sharding import make_mesh, replicated
from jattn.train.task import build_task
from toy import toy_config

TESTS = pathlib.Path(__file__).resolve().parent

WORKER = """
import json, sys
from jattn.train.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from toy import toy_config
from jattn.train.loop import train
cfg = toy_config(total=3)
cfg.image_every = 0
result = train(cfg, sys.argv[3], progress=False)
print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(), "local": jax.local_device_count(),
                              "metrics": result["metrics"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["JAX_NUM_CPU_DEVICES"] = "4"
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    workdir = tmp_path / "multi"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), str(workdir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process training timed out")
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))))
    assert sorted(o["process"] for o in outputs) == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 8 and o["local"] == 4 for o in outputs)

    single = train(toy_config(total=3), tmp_path / "single", progress=False)
    for o in outputs:  # every process saw the same global losses
        for k in ("d_loss", "g_loss"):
            np.testing.assert_allclose(o["metrics"][k], single["metrics"][k], rtol=1e-5, atol=1e-6)

    cfg = toy_config(total=3)
    shapes = jax.eval_shape(_state_init_fn(build_task(cfg), cfg), jax.random.key(0))
    shapes = abstract_state(shapes, replicated(make_mesh()))  # restore the 2-process run onto this one
    multi_state = Checkpointer(workdir / "checkpoints").restore(shapes)
    single_state = Checkpointer(tmp_path / "single" / "checkpoints").restore(shapes)
    assert multi_state.step == single_state.step == 3
    for a, b in zip(jax.tree_util.tree_leaves(multi_state.state.params), jax.tree_util.tree_leaves(single_state.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
