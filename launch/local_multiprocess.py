#!/usr/bin/env python3
"""Run a multi-process jattn job on this machine: N processes x D simulated CPU devices.

This is how a multi-host run (a TPU pod slice, several GPU nodes) is rehearsed on one
machine: every process joins the same `jax.distributed` run through a coordinator on
127.0.0.1, sees its D local CPU devices, and the mesh spans N*D devices.

    python launch/local_multiprocess.py --num-processes 2 --devices-per-process 4 -- \
        train --config configs/demo.py --workdir workdirs/mp --total-steps 3 --no-progress

Each process gets:
    JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES=D (and any --xla_force_host_platform_device_count
    removed from XLA_FLAGS, since it would override D),
    JATTN_COORDINATOR=127.0.0.1:PORT, JATTN_NUM_PROCESSES=N, JATTN_PROCESS_ID=i
and runs `python -m jattn <args...>`. Output lines are streamed with a `[i] ` prefix.
When a process fails the others are killed and the launcher exits with that status
(non-zero). `--dry-run` prints the commands and environments and runs nothing.

From Python: `launch(["train", ...], num_processes=2, devices_per_process=4)` returns a
`LaunchResult` (return codes and each process's output lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

__all__ = ["LaunchResult", "free_port", "process_env", "launch", "main"]

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass
class LaunchResult:
    returncodes: list[int]
    outputs: list[list[str]]  # stdout+stderr lines of each process, without the prefix

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    @property
    def returncode(self) -> int:
        """0 when every process succeeded, else the first non-zero status (1 if killed by a signal)."""
        for rc in self.returncodes:
            if rc != 0:
                return rc if rc > 0 else 1
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    port: int,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process `process_id`."""
    env = dict(os.environ if base is None else base)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", ""))
    flags = " ".join(flags.split())
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["JATTN_COORDINATOR"] = f"127.0.0.1:{port}"
    env["JATTN_NUM_PROCESSES"] = str(num_processes)
    env["JATTN_PROCESS_ID"] = str(process_id)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra or {})
    return env


def _command(args: Sequence[str], python: str) -> list[str]:
    return [python, "-m", "jattn", *args]


def _pump(i: int, stream, sink: list[str], echo: bool, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        sink.append(line)
        if echo:
            try:
                with lock:
                    print(f"[{i}] {line}", flush=True)
            except (BrokenPipeError, OSError):  # our stdout went away (e.g. `| head`): keep draining
                echo = False
    stream.close()


def launch(
    args: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
    timeout: float | None = None,
    dry_run: bool = False,
) -> LaunchResult:
    """Start the processes, stream their output, wait; kill the rest when one fails."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("--num-processes and --devices-per-process must be >= 1")
    port = port or free_port()
    cmd = _command(args, python)
    envs = [process_env(i, num_processes, devices_per_process, port, env, extra_env) for i in range(num_processes)]
    if dry_run:
        shown = ("JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "JATTN_COORDINATOR",
                 "JATTN_NUM_PROCESSES", "JATTN_PROCESS_ID", *(extra_env or {}))
        for i, e in enumerate(envs):
            assigns = " ".join(f"{k}={shlex.quote(e[k])}" for k in dict.fromkeys(shown) if k in e)
            print(f"[{i}] {assigns} {shlex.join(cmd)}", flush=True)
        return LaunchResult([0] * num_processes, [[] for _ in range(num_processes)])

    lock = threading.Lock()
    procs, threads, outputs = [], [], [[] for _ in range(num_processes)]
    try:
        for i in range(num_processes):
            p = subprocess.Popen(cmd, env=envs[i], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, outputs[i], echo, lock), daemon=True)
            t.start()
            threads.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = False
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                failed = True
                break
            if deadline is not None and time.monotonic() > deadline:
                failed = True
                print(f"local_multiprocess: timed out after {timeout:.0f} s", file=sys.stderr, flush=True)
                break
            time.sleep(0.1)
        if failed or any(p.returncode != 0 for p in procs):
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                print(f"local_multiprocess: process {bad[0]} exited with {procs[bad[0]].returncode}; "
                      "stopping the others", file=sys.stderr, flush=True)
    finally:
        for p in procs:  # kill the survivors (only those this launcher started)
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
    return LaunchResult([p.returncode for p in procs], outputs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        k = argv.index("--")
        ours, theirs = argv[:k], argv[k + 1:]
    else:
        ours, theirs = argv, []
    parser = argparse.ArgumentParser(
        prog="local_multiprocess.py",
        description="Run `python -m jattn ARGS` in N local processes joined by jax.distributed.",
        usage="%(prog)s --num-processes N --devices-per-process D [--port P] [--dry-run] -- JATTN_ARGS...",
    )
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are killed")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and environments only")
    a = parser.parse_args(ours)
    if not theirs:
        parser.error("give the jattn arguments after `--`, e.g. -- train --config ... --workdir ...")
    result = launch(theirs, num_processes=a.num_processes, devices_per_process=a.devices_per_process,
                    port=a.port, timeout=a.timeout, dry_run=a.dry_run)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
