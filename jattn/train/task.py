"""A task: how one model trains on the shared engine.

A task bundles the networks' initialisation, their optimizers, the updates of one training
step (e.g. DeepFill v1: `n_critic` critic updates, then the generator) and a `predict`
function for evaluation and image summaries. Tasks are registered by model name; the loop
(`jattn.train.loop`) is the same for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from jattn.train.steps import Update

__all__ = ["Task", "register_task", "build_task", "task_names", "make_optimizer"]


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


_TASKS: dict[str, Callable[[Any], Task]] = {}


def register_task(name: str):
    """Decorator: `@register_task("deepfill_v1") def build(config) -> Task`."""

    def wrap(builder):
        _TASKS[name] = builder
        return builder

    return wrap


def task_names() -> list[str]:
    _import_builtin_tasks()
    return sorted(_TASKS)


def build_task(config) -> Task:
    """The task of `config.model.name`, built from the config."""
    _import_builtin_tasks()
    name = config.model.name
    if name not in _TASKS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_TASKS)) or '(none)'}")
    return _TASKS[name](config)


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
    """Adam from a config block: lr (None: `default_lr`, the config's `learning_rate`), b1,
    b2, optional clip_norm, schedule ("constant" | "cosine" | "linear") with warmup_steps
    and decay_steps."""
    lr = cfg.get("lr")
    if lr is None:
        if default_lr is None:
            raise ValueError("optimizer: no lr in the optimizer block and no learning_rate in the config")
        lr = default_lr
    lr = float(lr)
    warmup = int(cfg.get("warmup_steps", 0))
    schedule = cfg.get("schedule", "constant")
    decay = int(cfg.get("decay_steps", 0))
    if schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(decay, 1))
    elif schedule == "linear":
        sched = optax.linear_schedule(lr, 0.0, max(decay, 1))
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant, cosine or linear")
    if warmup:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    parts = []
    if cfg.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.inject_hyperparams(optax.adam)(learning_rate=sched, b1=float(cfg.b1), b2=float(cfg.b2)))
    return optax.chain(*parts)
