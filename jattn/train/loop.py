"""The training loop: config -> data -> sharded updates -> checkpoints and logs.

`train(config, workdir)` runs `config.total_steps` steps of the task named by
`config.model.name`. On a workdir that already has checkpoints it resumes from the
latest one that restores (train state, data-iterator position and all), so an
interrupted run continues exactly; a larger `total_steps` extends a finished run.

Sections: set-up (mesh, task, data), state (restore or init), the step loop (updates,
non-finite check, logs, images, checkpoints), and the end (final checkpoint, summary).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.train.checkpoint import Checkpointer, abstract_state
from jattn.train.evaluate import evaluate
from jattn.train.logging import MetricWriter
from jattn.train.sharding import make_mesh, replicated, to_global_array
from jattn.train.state import TrainState, create_state
from jattn.train.steps import jit_update, run_updates
from jattn.train.task import Task, build_task

__all__ = ["NonFiniteLossError", "ConfigMismatchError", "train", "make_train_data", "init_batch", "learning_rates",
           "restore_for_eval"]

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
    fields = build_task(config).fields if fields is None else tuple(fields)
    d = config.data
    mask = d.get("mask")
    return make_dataset(
        d.source.to_dict() if hasattr(d.source, "to_dict") else dict(d.source),
        loader=d.get("loader", "grain"),
        image_size=d.image_size,
        batch_size=per_process_batch_size(config.batch_size, process_count),
        mask_spec=mask.to_dict() if hasattr(mask, "to_dict") else mask,
        fields=fields,
        scale=d.get("scale"),
        seed=config.seed,
        train=True,
        shuffle_buffer=d.get("shuffle_buffer"),
        process_index=process_index,
        process_count=process_count,
        **({"worker_count": d.get("worker_count", 0)} if d.get("loader", "grain") == "grain" else {}),
    )


def init_batch(config, fields=("mask",)) -> dict:
    """A batch of one example of zeros with `fields` (see `jattn.data.FIELDS`)."""
    size = config.data.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    s = int(config.data.get("scale") or 1)
    shapes = {"mask": ((1, h, w, 1), jnp.float32), "label": ((1,), jnp.int32),
              "lowres": ((1, h // s, w // s, 3), jnp.float32), "segmentation": ((1, h, w), jnp.int32)}
    batch = {"image": jnp.zeros((1, h, w, 3), jnp.float32)}
    for f in fields:
        batch[f] = jnp.zeros(*shapes[f])
    return batch


def _state_init_fn(task: Task, config):
    batch = init_batch(config, task.fields)

    def init(key):
        params, variables = task.init(jax.random.fold_in(key, 0), batch)
        return create_state(params, task.optimizers, jax.random.fold_in(key, 1), variables)

    return init


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
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    task = build_task(config)
    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep=config.get("keep_checkpoints", 3),
        best_metric=config.get("best_metric"),
        best_mode=config.get("best_mode", "max"),
    )
    data = make_train_data(config, fields=task.fields) if data_iter is None else data_iter
    # Only grain iterators have a state to checkpoint (get_state / set_state).
    saved_iter = data if hasattr(data, "get_state") else None

    # ----------------------------------------------------------------------- state
    init = _state_init_fn(task, config)
    key = jax.random.key(config.seed)
    shapes = jax.eval_shape(init, key)
    def check_model(saved: dict | None) -> None:
        saved_model = (saved or {}).get("model")
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
    restored = ckpt.restore(abstract_state(shapes, replicated(mesh)), data_iter=saved_iter)
    if restored is not None:
        check_model(restored.config)
        state = restored.state
        log.info("resumed from step %d", restored.step)
    else:
        state = jax.jit(init, out_shardings=replicated(mesh))(key)
    start = int(state.step)
    total = int(config.total_steps)

    jitted = {}  # one compiled function per distinct update (the critic's repeats n_critic times)
    fns = [jitted.setdefault(id(u), jit_update(u, mesh)) if id(u) not in jitted else jitted[id(u)] for u in task.updates]
    writer = MetricWriter(workdir, process_index=jax.process_index())
    predict = jax.jit(task.predict)
    sample_batch = None
    config_dict = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    config_dict["jattn"] = provenance()
    if jax.process_index() == 0:
        _write_json(workdir / "config.json", config_dict)

    # ----------------------------------------------------------------------- loop
    log_every = int(config.get("log_every", 10))
    ckpt_every = int(config.get("checkpoint_every", 0))
    image_every = int(config.get("image_every", 0))
    eval_every = int(config.get("eval_every", 0))
    eval_metrics: dict[str, float] | None = None
    skip_nonfinite = bool(config.get("skip_nonfinite", False))
    skipped = 0
    metrics: dict[str, float] = {}
    t_last, step_last = time.perf_counter(), start
    bar = _progress(start, total) if progress and jax.process_index() == 0 else None
    try:
        for step in range(start, total):
            host_batches = [next(data) for _ in fns]
            if sample_batch is None:
                sample_batch = host_batches[-1]
            batches = [to_global_array(b, mesh) for b in host_batches]
            state, dev_metrics = run_updates(fns, state, batches)
            metrics = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
            done = step + 1
            bad = {k: v for k, v in metrics.items() if k.endswith("_finite") and v < 1.0}
            if bad:
                losses = {k: v for k, v in metrics.items() if k.endswith("_loss")}
                msg = f"non-finite loss or gradient at step {done}: " + ", ".join(f"{k}={v}" for k, v in losses.items())
                if not skip_nonfinite:
                    raise NonFiniteLossError(msg + " (set config.skip_nonfinite=True to skip such updates)")
                skipped += 1
                log.warning("%s; update skipped", msg)
            if bar is not None:
                bar.update(1)
            if done % log_every == 0 or done == total:
                now = time.perf_counter()
                rate = (done - step_last) * len(fns) * int(config.batch_size) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                writer.scalars(done, {**metrics, **learning_rates(state), **_bad_data_counts(data),
                                      "images_per_second": rate, "skipped_updates": skipped})
                if bar is not None:
                    shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("d_loss", "g_loss", "l1_loss")}
                    bar.set_postfix({**shown, "img/s": f"{rate:.1f}"})
            if image_every and (done % image_every == 0 or done == total):
                sample = to_global_array(sample_batch, mesh)
                writer.images(done, _image_grid(predict(state.params, state.variables, sample), count=4))
            if eval_every and (done % eval_every == 0 or done == total):
                eval_metrics = evaluate(task, state, config, mesh, workdir)
                writer.scalars(done, {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))})
            if ckpt_every and done % ckpt_every == 0 and done != total:
                ckpt.save(done, state, config=config_dict, data_iter=saved_iter, metrics=_numeric(eval_metrics))
        # ------------------------------------------------------------------- end
        if total > start or ckpt.latest_step() != total:
            ckpt.save(total, state, config=config_dict, data_iter=saved_iter, metrics=_numeric(eval_metrics))
    finally:
        ckpt.close()
        writer.close()
        if bar is not None:
            bar.close()
    return {"step": int(state.step), "metrics": metrics, "eval": eval_metrics, "skipped_updates": skipped}


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


def restore_for_eval(config, workdir: str | pathlib.Path, step: int | None = None):
    """(task, state, mesh, step) of a workdir's checkpoint, for evaluation and inference."""
    workdir = pathlib.Path(workdir)
    mesh = make_mesh()
    task = build_task(config)
    shapes = jax.eval_shape(_state_init_fn(task, config), jax.random.key(config.seed))
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        restored = ckpt.restore(abstract_state(shapes, replicated(mesh)), step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    return task, restored.state, mesh, restored.step


def _progress(start: int, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
