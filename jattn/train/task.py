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

from jattn.config import ConfigError, optimizer_schema, overlay, with_defaults
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
    evaluate(state, config, mesh, host_batches) -> dict: a whole-eval-set evaluation (e.g.
      IS / FID, which are not means of per-batch values) replacing the per-batch metrics."""

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


def make_optimizer(cfg, default_lr: float | None = None) -> optax.GradientTransformation:
    """Adam from an optimizer block (`jattn.config.optimizer_schema`, whose defaults fill in
    the keys `cfg` lacks): lr (None: `default_lr`, the config's `learning_rate`), b1, b2,
    clip_norm, schedule ("constant" | "cosine" | "linear") with warmup_steps and decay_steps."""
    cfg = overlay(optimizer_schema(), cfg)
    lr = default_lr if cfg.lr is None else cfg.lr
    if lr is None:
        raise ValueError("optimizer: no lr in the optimizer block and no learning_rate in the config")
    lr = float(lr)
    sched = _schedule(cfg.schedule, lr, int(cfg.decay_steps))
    warmup = int(cfg.warmup_steps)
    if warmup:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.inject_hyperparams(optax.adam)(learning_rate=sched, b1=float(cfg.b1), b2=float(cfg.b2)))
    return optax.chain(*parts)


def _schedule(name: str, lr: float, decay: int) -> optax.Schedule:
    """The learning-rate schedule `name` from `lr` (decaying to 0 over `decay` steps)."""
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, max(decay, 1))
    if name == "linear":
        return optax.linear_schedule(lr, 0.0, max(decay, 1))
    raise ValueError(f"unknown learning-rate schedule {name!r}; use constant, cosine or linear")


def compute_dtype(config) -> jnp.dtype:
    """`config.compute_dtype` (None: float32) as a dtype."""
    return jnp.dtype(config.compute_dtype or "float32")
