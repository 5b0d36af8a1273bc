"""Joining a multi-process (multi-host) run with `jax.distributed`.

Call `initialize(...)` before any other JAX call. The coordinator comes from, in order:
the arguments (the CLI's `--coordinator`, `--num-processes`, `--process-id`); the
environment (`JATTN_COORDINATOR`, `JATTN_NUM_PROCESSES`, `JATTN_PROCESS_ID`); or, with
`auto=True` (`--distributed auto`), JAX's own cluster detection (Cloud TPU pods, SLURM,
...). With none of these it does nothing: a single process.
"""

from __future__ import annotations

import logging
import os

import jax

__all__ = ["initialize"]

log = logging.getLogger(__name__)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Join the run; returns True when this process is part of a multi-process run."""
    coordinator = coordinator or os.environ.get("JATTN_COORDINATOR")
    if num_processes is None and "JATTN_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JATTN_NUM_PROCESSES"])
    if process_id is None and "JATTN_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JATTN_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the number of processes and this process's id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()  # cluster auto-detection (TPU pod, SLURM, ...)
    else:
        return False
    log.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return jax.process_count() > 1
