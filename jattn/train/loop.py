"""The training loop: config -> data -> sharded updates -> checkpoints and logs.

`train(config, workdir)` runs `config.total_steps` steps of the task named by
`config.model.name`. On a workdir that already has checkpoints it resumes from the
latest one that restores (train state, data-iterator position and all), so an
interrupted run continues exactly; a larger `total_steps` extends a finished run.

Sections: set-up (mesh, task, data), state (restore or init), the step loop, and the end
(final checkpoint, summary). Each step is one compiled program (`make_train_step`) fed by
batches prefetched to the devices (`StepBatches`); its metrics stay on the devices and
are fetched only at log steps, and its non-finite flag is read once the next step is
under way, so the host never waits for the devices between steps.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np

from jattn.config import ConfigError, with_defaults
from jattn.train.checkpoint import Checkpointer
from jattn.train.evaluate import make_evaluator
from jattn.train.input import StepBatches
from jattn.train.logging import MetricWriter
from jattn.train.setup import abstract_train_state, provenance, state_init_fn
from jattn.train.sharding import make_mesh, replicated, to_global_array
from jattn.train.state import TrainState
from jattn.train.steps import make_train_step
from jattn.train.task import build_task

__all__ = ["NonFiniteLossError", "ConfigMismatchError", "train", "make_train_data", "learning_rates"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN / Inf (and `config.skip_nonfinite` is off)."""


class ConfigMismatchError(ValueError):
    """The workdir's checkpoints were written by a different model configuration."""


# --------------------------------------------------------------------------- set-up


def make_train_data(config, *, fields=None, process_index: int | None = None, process_count: int | None = None):
    """The training batch iterator of this process: grain (default; its position is saved in
    checkpoints, so a resumed run reads exactly the batches an uninterrupted one would) or
    tf.data (`data.loader = "tf"`, e.g. for TFDS tfrecord data; a resumed run restarts its
    shuffled order). `fields`: what the batches hold beside "image" (default: the task's)."""
    from jattn.data import make_dataset
    from jattn.data.sharding import per_process_batch_size

    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    config = with_defaults(config)
    fields = build_task(config).fields if fields is None else tuple(fields)
    d = config.data
    mask = d.mask
    return make_dataset(
        d.source.to_dict() if hasattr(d.source, "to_dict") else dict(d.source),
        loader=d.loader,
        image_size=d.image_size,
        batch_size=per_process_batch_size(config.batch_size, process_count),
        mask_spec=mask.to_dict() if hasattr(mask, "to_dict") else mask,
        fields=fields,
        scale=d.scale,
        seed=config.seed,
        train=True,
        shuffle_buffer=d.shuffle_buffer,
        process_index=process_index,
        process_count=process_count,
        **({"worker_count": d.worker_count} if d.loader == "grain" else {}),
    )


def learning_rates(state: TrainState) -> dict[str, float]:
    """Current learning rate of each network (optax.inject_hyperparams states)."""
    out = {}
    for net, opt in state.opt_state.items():
        for leaf in jax.tree_util.tree_leaves(opt, is_leaf=lambda x: hasattr(x, "hyperparams")):
            if hasattr(leaf, "hyperparams") and "learning_rate" in leaf.hyperparams:
                out[f"{net}_learning_rate"] = float(leaf.hyperparams["learning_rate"])
    return out


def _model_block(config) -> dict:
    model = config.model
    return json.loads(json.dumps(model.to_dict() if hasattr(model, "to_dict") else dict(model)))


def _saved_model_block(model: dict | None) -> dict | None:
    """A checkpoint's saved model block completed with the schema's defaults (a run saved
    before a key was declared has none for it); as saved where the schema rejects it."""
    if model is None:
        return None
    try:
        return _model_block(with_defaults({"model": model}))
    except ConfigError:
        return model


def _image_grid(images: dict[str, jax.Array], count: int) -> dict[str, np.ndarray]:
    """{"samples": [count * H, len(images) * W, 3]}: a row per example, a column per output
    (in the task's order, e.g. input, coarse, refined, output, flow); smaller outputs (the
    flow picture, a low-res input) are repeated up to the image size, one channel is shown
    as gray; outputs that are not [B, h, w, 1 or 3] images (class logits) are left out."""
    columns = []
    height = width = None
    for arr in images.values():
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            continue
        arr = np.asarray(jax.device_get(arr))[:count].astype(np.float32)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if height is None:
            height, width = arr.shape[1:3]
        if arr.shape[1:3] != (height, width):
            arr = np.repeat(np.repeat(arr, height // arr.shape[1], axis=1), width // arr.shape[2], axis=2)
        columns.append(np.concatenate(list(arr), axis=0))
    return {"samples": np.concatenate(columns, axis=1)} if columns else {}


# --------------------------------------------------------------------------- train


def train(config, workdir: str | pathlib.Path, *, data_iter=None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns the last step's metrics and step."""
    config = with_defaults(config)  # every key of the task's schema, its defaults where unset
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    task = build_task(config)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
                        best_mode=config.best_mode)
    data = make_train_data(config, fields=task.fields) if data_iter is None else data_iter
    # Only grain iterators have a state to checkpoint (get_state / set_state).
    saved_iter = data if hasattr(data, "get_state") else None

    # ----------------------------------------------------------------------- state
    init = state_init_fn(task, config)
    key = jax.random.key(config.seed)

    def check_model(saved: dict | None) -> None:
        saved_model = _saved_model_block((saved or {}).get("model"))
        if saved_model is not None and saved_model != _model_block(config):
            raise ConfigMismatchError(
                f"{workdir}: the checkpoints were written with model {saved_model}, "
                f"but the config asks for {_model_block(config)}"
            )

    try:  # before any array is read: a different model would fail to restore with a vaguer error
        check_model(ckpt.restore_config())
    except ConfigMismatchError:
        raise
    except Exception as err:  # noqa: BLE001 - an unreadable latest config: restore() reports and falls back
        log.warning("could not read the latest checkpoint's config (%s)", err)
    restored = ckpt.restore(abstract_train_state(task, config, mesh), data_iter=saved_iter)
    if restored is not None:
        check_model(restored.config)
        state = restored.state
        log.info("resumed from step %d", restored.step)
    else:
        state = jax.jit(init, out_shardings=replicated(mesh))(key)
    start = int(state.step)
    total = int(config.total_steps)

    # One program per step (all its updates), the state donated; see jattn.train.steps.
    step_fn = make_train_step(task.updates, mesh, unroll=bool(config.step_unroll))
    batches = StepBatches(data, len(task.updates), mesh, size=int(config.prefetch_steps))
    writer = MetricWriter(workdir, process_index=jax.process_index())
    predict = jax.jit(task.predict)
    eval_every = int(config.eval_every)
    evaluator = make_evaluator(task, config, mesh, workdir) if eval_every else None  # compiled once
    config_dict = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    config_dict["jattn"] = provenance()
    if jax.process_index() == 0:
        _write_json(workdir / "config.json", config_dict)

    # ----------------------------------------------------------------------- loop
    log_every = int(config.log_every)
    ckpt_every = int(config.checkpoint_every)
    image_every = int(config.image_every)
    eval_metrics: dict[str, float] | None = None
    guard = _FiniteGuard(skip=bool(config.skip_nonfinite))
    metrics: dict[str, float] = {}
    t_last, step_last = time.perf_counter(), start
    bar = _progress(start, total) if progress and jax.process_index() == 0 else None
    try:
        with jax.set_mesh(mesh):
            for step in range(start, total):
                done = step + 1
                state, dev_metrics = step_fn(state, next(batches))
                guard.push(done, dev_metrics)  # reads the previous step's flag: finished by now
                if bar is not None:
                    bar.update(1)
                is_log = done % log_every == 0 or done == total
                is_image = image_every and (done % image_every == 0 or done == total)
                is_eval = eval_every and (done % eval_every == 0 or done == total)
                is_ckpt = ckpt_every and done % ckpt_every == 0 and done != total
                if is_log or is_image or is_eval or is_ckpt:
                    guard.check_all()  # this step too: nothing is logged or saved after a bad update
                if is_log:
                    metrics = {k: float(v) for k, v in _fetch(dev_metrics).items() if k != "finite"}
                    now = time.perf_counter()
                    rate = (done - step_last) * len(task.updates) * int(config.batch_size) / max(now - t_last, 1e-9)
                    t_last, step_last = now, done
                    writer.scalars(done, {**metrics, **learning_rates(state), **_bad_data_counts(batches),
                                          "images_per_second": rate, "skipped_updates": guard.skipped})
                    if bar is not None:
                        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("d_loss", "g_loss", "l1_loss")}
                        bar.set_postfix({**shown, "img/s": f"{rate:.1f}"})
                if is_image:
                    sample = to_global_array(batches.first_host_batch, mesh)
                    writer.images(done, _image_grid(predict(state.params, state.variables, sample), count=4))
                if is_eval:
                    eval_metrics = evaluator(state)
                    writer.scalars(done, {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))})
                if is_ckpt:
                    ckpt.save(done, state, config=config_dict, data_iter=batches if saved_iter is not None else None,
                              metrics=_numeric(eval_metrics))
            guard.check_all()
        # ------------------------------------------------------------------- end
        if total > start or ckpt.latest_step() != total:
            ckpt.save(total, state, config=config_dict, data_iter=batches if saved_iter is not None else None,
                      metrics=_numeric(eval_metrics))
    finally:
        ckpt.close()
        writer.close()
        if bar is not None:
            bar.close()
    return {"step": int(state.step), "metrics": metrics, "eval": eval_metrics, "skipped_updates": guard.skipped}


def _fetch(tree: Any) -> Any:
    """The loop's one device-to-host copy of metrics (log steps only)."""
    return jax.device_get(tree)


def _read_flag(flag: jax.Array) -> float:
    """A step's "all updates applied" flag, read on the host."""
    return float(flag)


class _FiniteGuard:
    """Non-finite updates, seen without stalling each step: a step's flag is read after the
    next step has been dispatched, when it has finished (`push`), or at once before
    anything is logged or saved (`check_all`). A dropped update stops the run
    (`NonFiniteLossError`, naming the step and its losses) or, with `skip`, is counted."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0
        self._pending: list[tuple[int, dict]] = []

    def push(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        while len(self._pending) > 1:
            self._check(*self._pending.pop(0))

    def check_all(self) -> None:
        while self._pending:
            self._check(*self._pending.pop(0))

    def _check(self, step: int, metrics: dict) -> None:
        if _read_flag(metrics["finite"]) >= 1.0:
            return
        losses = {k: float(v) for k, v in _fetch(metrics).items() if k.endswith("_loss")}
        msg = f"non-finite loss or gradient at step {step}: " + ", ".join(f"{k}={v}" for k, v in losses.items())
        if not self.skip:
            raise NonFiniteLossError(msg + " (set config.skip_nonfinite=True to skip such updates)")
        self.skipped += 1
        log.warning("%s; update skipped", msg)


def _bad_data_counts(data) -> dict[str, float]:
    """Input files skipped / converted / upscaled so far, summed over all processes."""
    stats = getattr(data, "bad_data", None)
    if stats is None:
        return {}
    counts = np.asarray([stats.skipped, stats.converted, stats.upscaled], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
    return {"data_skipped": float(counts[0]), "data_converted": float(counts[1]), "data_upscaled": float(counts[2])}


def _write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _numeric(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _progress(start: int, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
