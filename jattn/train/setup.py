"""What a run is made of, without running it: the state's initialiser, abstract states and
batches (shapes, dtypes and shardings; nothing allocated), and a checkpoint restored for
evaluation or inference.

The training loop (`jattn.train.loop`), `jattn compile`, evaluation and the exports all
build their state and batches here, so they agree on every shape.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jattn.config import with_defaults
from jattn.data.examples import image_size_pair
from jattn.train.checkpoint import Checkpointer, abstract_state
from jattn.train.sharding import data_sharding, make_mesh, replicated, stacked_data_sharding
from jattn.train.state import TrainState, create_state
from jattn.train.task import Task, build_task

__all__ = ["batch_shapes", "init_batch", "state_init_fn", "initial_state", "abstract_train_state", "abstract_step_batches",
           "abstract_eval_batch", "provenance",
           "restore_for_eval"]


def batch_shapes(config, fields=("mask",), batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of `batch_size` examples: "image" [B, H, W, 3] and the
    `fields` (see `jattn.data.FIELDS`): "mask" [B, H, W, 1], "label" [B], "lowres"
    [B, H/s, W/s, 3] (s = data.scale), "segmentation" [B, H, W], and "boxes" [B, M, 4] with
    what it brings (M = data.max_boxes): "classes" [B, M], "image_id" [B], "scale" [B]."""
    h, w = image_size_pair(config.data.image_size)
    s = int(config.data.get("scale") or 1)
    m = int(config.data.get("max_boxes") or 1)
    b = int(batch_size)
    shapes = {"image": ((b, h, w, 3), jnp.float32), "mask": ((b, h, w, 1), jnp.float32), "label": ((b,), jnp.int32),
              "lowres": ((b, h // s, w // s, 3), jnp.float32), "segmentation": ((b, h, w), jnp.int32),
              "boxes": ((b, m, 4), jnp.float32), "classes": ((b, m), jnp.int32), "image_id": ((b,), jnp.int32),
              "scale": ((b,), jnp.float32)}
    unknown = [f for f in fields if f not in shapes]
    if unknown:
        raise ValueError(f"unknown batch field(s) {unknown}; known: {sorted(shapes)}")
    with_boxes = ("classes", "image_id", "scale") if "boxes" in fields else ()
    keys = dict.fromkeys(("image", *fields, *with_boxes))
    return {k: jax.ShapeDtypeStruct(*shapes[k]) for k in keys}


def init_batch(config, fields=("mask",)) -> dict:
    """A batch of one example of zeros with `fields` (for initialising parameters)."""
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_shapes(config, fields).items()}


def state_init_fn(task: Task, config):
    """`init(key) -> TrainState` of a step-0 run (parameters from `task.init` on a zero batch)."""

    def init(key):
        params, variables = task.init(jax.random.fold_in(key, 0), init_batch(config, task.fields))
        return create_state(params, task.optimizers, jax.random.fold_in(key, 1), variables)

    return init


#: XLA options for the initialiser's program. It runs once per run and is mostly the random
#: number generator unrolled for every parameter, over which the backend's optimiser (LLVM on
#: the CPU) spends most of the compile for no gain that matters; the values are the same.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def initial_state(task: Task, config, mesh: Mesh | None = None) -> TrainState:
    """The step-0 state from `config.seed` (`state_init_fn`), replicated on `mesh` (None:
    JAX's default device)."""
    shardings = None if mesh is None else replicated(mesh)
    init = jax.jit(state_init_fn(task, config), out_shardings=shardings)
    key = jax.random.key(int(config.seed))
    return init.lower(key).compile(compiler_options=INIT_COMPILER_OPTIONS)(key)


def abstract_train_state(task: Task, config, mesh: Mesh) -> TrainState:
    """The run's state as `jax.ShapeDtypeStruct` leaves, replicated on `mesh` (nothing is
    allocated: `jax.eval_shape`)."""
    shapes = jax.eval_shape(state_init_fn(task, config), jax.random.key(int(config.seed)))
    return abstract_state(shapes, replicated(mesh))


def abstract_step_batches(task: Task, config, mesh: Mesh, global_batch: int | None = None) -> dict:
    """One step's stacked global batches, abstract: `[len(task.updates), B, ...]` per field,
    B (default `config.batch_size`) split over the mesh's data axis."""
    b = int(config.batch_size if global_batch is None else global_batch)
    n = len(task.updates)
    sharding = stacked_data_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((n, *s.shape), s.dtype, sharding=sharding)
            for k, s in batch_shapes(config, task.fields, b).items()}


def abstract_eval_batch(task: Task, config, mesh: Mesh, global_batch: int | None = None) -> dict:
    """One evaluation / inference batch, abstract: `[B, ...]` per field, B split."""
    b = int((config.eval_batch_size or config.batch_size) if global_batch is None else global_batch)
    sharding = data_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for k, s in batch_shapes(config, task.fields, b).items()}


def restore_for_eval(config, workdir: str | pathlib.Path, step: int | None = None) -> tuple[Task, Any, Mesh, int]:
    """(task, state, mesh, step) of a workdir's checkpoint, for evaluation and inference."""
    config = with_defaults(config)
    workdir = pathlib.Path(workdir)
    mesh = make_mesh()
    task = build_task(config)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        restored = ckpt.restore(abstract_train_state(task, config, mesh), step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    return task, restored.state, mesh, restored.step


def provenance() -> dict:
    """jattn's version and, when installed from a git checkout, its commit."""
    import subprocess

    import jattn

    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=pathlib.Path(jattn.__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": jattn.__version__, "git_commit": commit, "jax": jax.__version__}
