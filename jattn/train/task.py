"""A task: how one model trains on the shared engine.

A task bundles the networks' initialisation, their optimizers, the updates of one training
step (e.g. DeepFill v1: `n_critic` critic updates, then the generator) and a `predict`
function for evaluation and image summaries. Tasks are the model registry: each is
registered by model name with its config schema (its `model`, `loss` and `optimizer`
blocks and any task-specific defaults, see `jattn.config`), and `build_task` builds the
task of `config.model.name` from the config completed with those defaults. The loop
(`jattn.train.loop`) is the same for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jattn.config import ConfigError, with_defaults
from jattn.train.optim import make_optimizer
from jattn.train.steps import Update

__all__ = ["Task", "register_task", "build_task", "task_names", "task_schema", "make_optimizer", "compute_dtype"]


@dataclasses.dataclass(frozen=True)
class Task:
    """init(key, batch) -> (params by network, variables by network);
    updates: the updates of one step, in order, one batch each;
    predict(params, variables, batch) -> dict of arrays, "output" being the final result
    (e.g. the composited inpainting, the upscaled image, class logits); the [B, H, W, C]
    ones are shown in the sample grids.
    fields: the batch entries the task needs beside "image" (see `jattn.data.FIELDS`):
      "mask" [B, H, W, 1] float32 (1 = hole), "label" [B] int32, "lowres" [B, H/s, W/s, 3]
      (bicubic downscale by `data.scale`), "segmentation" [B, H, W] int32 (0 = background).
    eval_metrics(outputs, batch) -> dict of per-batch mean scalars (jittable); None: the
      inpainting metrics (PSNR, SSIM, L1, L2, TV, hole L1 of "output" against "image").
    export_network: the network `jattn export` writes (None: "generator", else the only one).
    evaluate(state, config, mesh, host_batches, save_outputs=None) -> dict: a whole-eval-set
      evaluation (e.g. IS / FID, COCO mAP: not means of per-batch values) replacing the
      per-batch metrics; `save_outputs`, a checked empty folder (or None), gets the
      evaluation's outputs (e.g. COCO results), or a `SaveOutputsError` if it has none."""

    name: str
    init: Callable[[jax.Array, dict], tuple[dict, dict]]
    optimizers: Mapping[str, optax.GradientTransformation]
    updates: tuple[Update, ...]
    predict: Callable[[dict, dict, dict], dict[str, jax.Array]]
    fields: tuple[str, ...] = ("mask",)
    eval_metrics: Callable[[dict, dict], dict[str, jax.Array]] | None = None
    export_network: str | None = None
    evaluate: Callable[..., dict] | None = None


@dataclasses.dataclass(frozen=True)
class _Entry:
    build: Callable[[Any], Task]
    schema: Callable[[], ml_collections.ConfigDict] | None


_TASKS: dict[str, _Entry] = {}


def register_task(name: str, schema: Callable[[], ml_collections.ConfigDict] | None = None):
    """Decorator: `@register_task("deepfill_v1", schema=fn) def build(config) -> Task`.

    `schema()` returns the task's keys with their defaults, laid over `jattn.config.trainer_schema`:
    its `model` block (without "name", added here), `loss` and `optimizer` blocks, and any
    top-level default of its own (e.g. `n_critic`). Without a schema, the task's blocks are
    free-form. The builder always gets a config completed with the defaults.
    """

    def wrap(builder):
        _TASKS[name] = _Entry(builder, schema)
        return builder

    return wrap


def task_names() -> list[str]:
    """Sorted names of the registered tasks (built-in ones imported first)."""
    _import_builtin_tasks()
    return sorted(_TASKS)


def _entry(name) -> _Entry:
    _import_builtin_tasks()
    if name not in _TASKS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(_TASKS)) or '(none)'}")
    return _TASKS[name]


def task_schema(name: str) -> ml_collections.ConfigDict:
    """The task's own schema (empty for a task registered without one), with `model.name`."""
    entry = _entry(name)
    schema = ml_collections.ConfigDict() if entry.schema is None else entry.schema()
    if "model" in schema:
        schema.model = {"name": name, **schema.model.to_dict()}
    return schema


def build_task(config) -> Task:
    """The task of `config.model.name`, built from `config` completed with the defaults of its
    schema (`jattn.config.with_defaults`; `config` itself is not changed). An unknown name or
    key is a `jattn.config.ConfigError` (a ValueError) naming the valid ones."""
    return _entry(config.model.name).build(with_defaults(config))


def _import_builtin_tasks() -> None:
    """Import the modules that register the built-in tasks (kept lazy: no model import cost)."""
    import importlib

    for module in ("jattn.train.tasks",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def compute_dtype(config) -> jnp.dtype:
    """`config.compute_dtype` (None: float32) as a dtype."""
    return jnp.dtype(config.compute_dtype or "float32")
