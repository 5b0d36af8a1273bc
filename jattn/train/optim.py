"""Optimizers from a config's optimizer block: optax chains, nothing home-made.

The block (`jattn.config.optimizer_schema`, whose defaults fill in the keys a config leaves
out) names the optimizer, its weight decay, gradient clipping, learning-rate schedule and
gradient accumulation; docs/models.md has examples and what each paper config uses.

- ``name``: ``"adam"`` (the default; `optax.adam` with b1, b2, eps), ``"adamw"``
  (`optax.adamw`: decoupled weight decay, Loshchilov & Hutter) or ``"sgd"`` (`optax.sgd` with
  ``momentum``, 0 for none, and ``nesterov``; the heavy-ball form of PyTorch's SGD).
- ``weight_decay``: for ``adam`` and ``sgd`` it is the classic L2 penalty, added to the
  gradient before the optimizer sees it (`optax.add_decayed_weights` first in the chain, as
  PyTorch's ``Adam(weight_decay=)`` and ``SGD(weight_decay=)`` do): Adam then scales it by
  its second-moment estimate, SGD feeds it through the momentum. For ``adamw`` it is
  decoupled: ``params -= lr * weight_decay * params`` beside the Adam step (optax's and
  PyTorch's AdamW, the decay scaled by the scheduled learning rate). ``decay_mask``:
  ``"all"`` parameters, or ``"kernels"``: only those of 2 or more dimensions, leaving biases
  and normalisation scales / offsets (1-D) undecayed (optax's ``mask=``, a function of the
  parameter pytree).
- ``clip_norm``: the gradients clipped to this global norm first (`optax.clip_by_global_norm`).
- ``schedule``: ``"constant"``; ``"cosine"`` and ``"linear"`` decay to 0 over
  ``decay_steps`` updates after the warm-up; ``"step"`` (or ``"multistep"``) multiplies the
  rate by ``factor`` at each of ``boundaries`` (updates counted from the start of training,
  warm-up included) or ``boundaries_epochs`` (epochs of ``steps_per_epoch`` updates);
  `optax.piecewise_constant_schedule`. ``warmup_steps``: a linear ramp from 0 before any of
  them (`optax.join_schedules`).
- ``accumulate_steps`` k > 1: `optax.MultiSteps`, for a global batch larger than memory
  allows. The loop still calls the update once per training step with one batch of
  ``batch_size``; the optimizer averages the gradients of k such calls and changes the
  parameters on every k-th call only (the other calls leave them as they are). So one
  training step is one micro-batch: ``total_steps``, ``log_every``, ``checkpoint_every`` ...
  count micro-batches, the effective batch is ``k * batch_size`` and the run makes
  ``total_steps / k`` parameter updates. The learning-rate schedule sees only those updates
  (the optimizer state inside MultiSteps advances on real updates only), so
  ``warmup_steps``, ``decay_steps``, ``boundaries`` and ``steps_per_epoch`` count updates,
  not micro-batches. (In a GAN task each network's optimizer counts its own calls: with
  ``n_critic`` 5 the critic's accumulates over 5 calls per training step.) Batch-norm
  statistics and EMAs still move on every micro-batch.

With every key at its default the optimizer is ``chain(inject_hyperparams(adam))``, the
same state pytree as before these options existed, so older checkpoints restore.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jattn.config import DECAY_MASKS, OPTIMIZERS, SCHEDULES, ConfigError, optimizer_schema, overlay

__all__ = ["make_optimizer", "learning_rate_schedule", "decay_mask", "schedule_boundaries"]


def _names(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def make_optimizer(cfg, default_lr: float | None = None, *, where: str = "optimizer") -> optax.GradientTransformation:
    """The optimizer of the block `cfg` (a ConfigDict or dict; missing keys take the defaults of
    `jattn.config.optimizer_schema`), its learning rate `cfg.lr` or else `default_lr` (the
    config's `learning_rate`). `where` names the block in error messages (e.g.
    "optimizer.generator"). A bad value is a `jattn.config.ConfigError` naming its key."""
    cfg = overlay(optimizer_schema(), cfg)
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"{where}.name: unknown optimizer {cfg.name!r}; use {_names(OPTIMIZERS)}")
    lr = default_lr if cfg.lr is None else cfg.lr
    if lr is None:
        raise ConfigError(f"{where}: no lr in the optimizer block and no learning_rate in the config")
    sched = learning_rate_schedule(cfg, float(lr), where=where)
    wd = float(cfg.weight_decay or 0.0)
    if wd < 0:
        raise ConfigError(f"{where}.weight_decay: must be >= 0, got {wd}")
    mask = decay_mask(cfg.decay_mask, where=where)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    if cfg.name == "adam":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask))  # L2: into the gradient, before Adam
        parts.append(optax.inject_hyperparams(optax.adam)(
            learning_rate=sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)))
    elif cfg.name == "adamw":
        parts.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps), weight_decay=wd,
            mask=mask))
    else:  # sgd
        momentum = float(cfg.momentum or 0.0)
        if cfg.nesterov and not momentum:
            raise ConfigError(f"{where}.nesterov: Nesterov momentum needs {where}.momentum > 0")
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask))  # L2 before the momentum, as PyTorch's SGD
        parts.append(optax.inject_hyperparams(optax.sgd)(
            learning_rate=sched, momentum=momentum or None, nesterov=bool(cfg.nesterov)))
    tx = optax.chain(*parts)
    k = cfg.accumulate_steps
    if k is None or int(k) != k or int(k) < 1:
        raise ConfigError(f"{where}.accumulate_steps: expected a whole number >= 1, got {k!r}")
    if int(k) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(k)).gradient_transformation()
    return tx


def decay_mask(name: str, *, where: str = "optimizer"):
    """optax's `mask=` for the weight decay `name`: None ("all": every parameter) or a function
    of the parameter pytree, True where a parameter has 2 or more dimensions ("kernels")."""
    if name == "all":
        return None
    if name == "kernels":
        return lambda params: jax.tree.map(lambda p: np.ndim(p) > 1, params)
    raise ConfigError(f"{where}.decay_mask: unknown weight-decay mask {name!r}; use {_names(DECAY_MASKS)}")


def schedule_boundaries(cfg, *, where: str = "optimizer") -> list[int]:
    """The updates at which a step schedule multiplies the rate by `cfg.factor`: `cfg.boundaries`,
    or `cfg.boundaries_epochs` times `cfg.steps_per_epoch` (rounded); increasing, positive."""
    steps, epochs = cfg.get("boundaries"), cfg.get("boundaries_epochs")
    if (steps is None) == (epochs is None):
        raise ConfigError(f"{where}.boundaries: the step schedule needs {where}.boundaries (in updates) or "
                          f"{where}.boundaries_epochs with {where}.steps_per_epoch, not both nor neither")
    if epochs is not None:
        per_epoch = cfg.get("steps_per_epoch")
        if not per_epoch or per_epoch <= 0:
            raise ConfigError(f"{where}.steps_per_epoch: {where}.boundaries_epochs needs steps_per_epoch > 0 "
                              f"(updates per epoch), got {per_epoch!r}")
        key, values = "boundaries_epochs", [int(round(float(e) * per_epoch)) for e in epochs]
    else:
        key, values = "boundaries", list(steps)
    if not all(isinstance(b, (int, np.integer)) or (isinstance(b, float) and b.is_integer()) for b in values):
        raise ConfigError(f"{where}.{key}: expected whole numbers of updates, got {values!r}")
    values = [int(b) for b in values]
    if not values or values[0] <= 0 or any(a >= b for a, b in zip(values, values[1:])):
        raise ConfigError(f"{where}.{key}: expected increasing positive boundaries, got {values!r} (in updates)")
    return values


def learning_rate_schedule(cfg, lr: float, *, where: str = "optimizer") -> optax.Schedule:
    """The learning rate by optimizer update of the block `cfg` (completed with the schema's
    defaults) starting from `lr`: `cfg.schedule` after `cfg.warmup_steps` of linear warm-up."""
    cfg = overlay(optimizer_schema(), cfg)
    warmup = int(cfg.warmup_steps or 0)
    decay = int(cfg.decay_steps or 0)
    name = cfg.schedule
    if name == "constant":
        sched = optax.constant_schedule(lr)
    elif name == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(decay, 1))
    elif name == "linear":
        sched = optax.linear_schedule(lr, 0.0, max(decay, 1))
    elif name in ("step", "multistep"):
        bounds = schedule_boundaries(cfg, where=where)
        if bounds[0] <= warmup:
            raise ConfigError(f"{where}.boundaries: the first boundary ({bounds[0]} updates) must come after the "
                              f"{warmup} warm-up steps (boundaries count from the start of training)")
        # join_schedules runs the second schedule from 0 at the end of the warm-up: shift them back
        sched = optax.piecewise_constant_schedule(lr, {b - warmup: float(cfg.factor) for b in bounds})
    else:
        raise ConfigError(f"{where}.schedule: unknown learning-rate schedule {name!r}; use {_names(SCHEDULES)}")
    if warmup:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    return sched
