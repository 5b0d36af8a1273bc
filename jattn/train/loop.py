"""The training loop: config -> data -> sharded updates -> checkpoints and logs.

`train(config, workdir)` runs `config.total_steps` steps of the task named by
`config.model.name`. On a workdir that already has checkpoints it resumes from the
latest intact one (train state, data-iterator position and all), so an interrupted run
continues exactly; a larger `total_steps` extends a finished run. A resume is refused
(`TrainError`, one line) when:
- another run holds the workdir (`WORKDIR/.lock`, see `WorkdirLock`);
- `total_steps` is below the latest checkpoint (a run never goes back or relabels one);
- the config differs from the checkpoint's in a key that changes what is trained (batch
  size, seed, data, model, optimizer, ...; `allow_config_change=True` accepts it);
  how long to run and how often to log, evaluate or save may change freely.
A corrupt latest checkpoint is moved aside and the previous one used (see
`jattn.train.checkpoint`); `metrics.jsonl` and the TensorBoard events are cut back to the
restored step, so replayed steps are logged once. A config, data source or workdir that
cannot make a run is a `SetupError` before the workdir is created.

Sections: set-up (mesh, task, data), state (restore or init), the step loop, and the end
(final checkpoint, summary). Each step is one compiled program (`make_train_step`) fed by
batches prefetched to the devices (`StepBatches`); its metrics stay on the devices and
are fetched only at log steps, and its non-finite flag is read once the next step is
under way, so the host never waits for the devices between steps.
"""

from __future__ import annotations

import fcntl
import json
import logging
import numbers
import os
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from jattn._paths import write_atomic, write_problem
from jattn.config import with_defaults
from jattn.train.checkpoint import Checkpointer, NonFiniteStateError
from jattn.train.evaluate import check_eval_data, check_eval_metrics, make_evaluator
from jattn.train.input import StepBatches
from jattn.train.logging import MetricWriter, truncate_events, truncate_metrics
from jattn.train.setup import abstract_train_state, initial_state, provenance
from jattn.train.sharding import make_mesh, to_global_array
from jattn.train.state import TrainState
from jattn.train.steps import make_train_step
from jattn.train.task import build_task

__all__ = ["NonFiniteLossError", "TrainError", "SetupError", "ConfigMismatchError", "TotalStepsError",
           "WorkdirLockedError", "WorkdirLock", "config_changes", "train", "make_train_data", "learning_rates"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss, gradient or update became NaN / Inf (and `config.skip_nonfinite` is off)."""


class TrainError(Exception):
    """A run refused before it trains or writes anything; the message is one line."""


class SetupError(TrainError, ValueError):
    """The config, its data or the workdir cannot make a run: a batch size the devices cannot
    split, a data source that gives no image, an image size the model cannot take, a workdir
    that cannot be written. Found before the workdir is created."""


class ConfigMismatchError(TrainError, ValueError):
    """The workdir's checkpoints were written with a config that trains differently."""


class TotalStepsError(TrainError, ValueError):
    """`total_steps` below 1, or below the workdir's latest checkpoint."""


class WorkdirLockedError(TrainError):
    """Another run holds the workdir."""


class WorkdirLock:
    """`WORKDIR/.lock`, held with `fcntl.flock` by the one process that trains in the workdir
    (process 0 of a multi-process run); it holds that process's pid and host for the message
    a second run gets. The kernel drops the lock when its holder exits, however it exits, so
    a lock file left by a dead run is simply taken over; the file itself is never removed
    (removing it would let a third run lock a new file while the second holds the old one).

    On a shared filesystem the lock is only as good as the filesystem's `flock`: NFSv4 and
    Lustre pass it between machines (a crashed machine's lock expires with its lease), some
    network and FUSE filesystems (e.g. gcsfuse) keep it local to one machine. Where `flock`
    is not supported at all, the run goes on unlocked with a warning.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info['pid']} on {info['host']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise WorkdirLockedError(f"{self.path.parent} is in use by another training run ({who}); "
                                     "wait for it to end, or train in another workdir") from None
        except OSError as err:  # ENOLCK / EOPNOTSUPP: a filesystem without flock
            os.close(fd)
            log.warning("cannot lock %s (%s): a second run in this workdir would not be detected", self.path, err)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- set-up


def make_train_data(config, *, fields=None, process_index: int | None = None, process_count: int | None = None):
    """The training batch iterator of this process: grain (default) or tf.data
    (`data.loader = "tfdata"`, also for TFDS tfrecord data). Either's position is saved in
    checkpoints, so a resumed run reads exactly the batches an uninterrupted one would.
    `fields`: what the batches hold beside "image" (default: the task's)."""
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
        max_boxes=d.max_boxes,
        augment=d.augment.to_dict() if hasattr(d.augment, "to_dict") else d.augment,
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


# Keys that may differ between a checkpoint's config and the run resuming it: how long to run,
# how often to log / evaluate / save, what to keep, how the step is compiled (step_unroll:
# the same updates, possibly rounded differently), and what to do on a non-finite update.
# Every other key changes what is trained.
FREE_ON_RESUME = ("total_steps", "log_every", "image_every", "checkpoint_every", "keep_checkpoints", "eval_every",
                  "eval_images", "eval_batch_size", "best_metric", "best_mode", "skip_nonfinite", "step_unroll",
                  "prefetch_steps", "jattn", "data.eval_source", "data.eval_mask", "data.eval_resize_shorter")
_UNSET = object()


def _plain(config) -> dict:
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(v) -> str:
    text = "unset" if v is _UNSET else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: Mapping, config, *, model_only: bool = False) -> list[str]:
    """`"key (saved -> now)"` for each key whose value in `config` differs from a checkpoint's
    `saved` config, but the keys of `FREE_ON_RESUME`; model_only: the model block only.

    Both are compared completed with the schema's defaults (a config saved before a key was
    declared matches one that leaves it at its default); a saved config that the schema no
    longer accepts is compared as saved, over its own keys."""
    try:
        old, complete = _plain(with_defaults(dict(saved))), True
    except Exception:  # noqa: BLE001 - e.g. a task or key the schema no longer has
        old, complete = _plain(saved), False
    old, new = _flat(old), _flat(_plain(with_defaults(config)))
    keys = sorted(set(old) | set(new)) if complete else sorted(old)
    changes = []
    for key in keys:
        if any(key == f or key.startswith(f + ".") for f in FREE_ON_RESUME):
            continue
        if model_only and not key.startswith("model."):
            continue
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a != b:
            changes.append(f"{key} ({_shown(a)} -> {_shown(b)})")
    return changes


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


def train(config, workdir: str | pathlib.Path, *, data_iter=None, progress: bool = True,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns the last step's metrics and step.

    allow_config_change: resume even where the config differs from the checkpoint's in keys
    that change what is trained (otherwise `ConfigMismatchError` names them).
    Raises `TrainError` (refused: nothing written, though a corrupt checkpoint met on the way
    is still moved aside; `SetupError` before the workdir is even created),
    `NonFiniteLossError`, `jattn.train.checkpoint.CheckpointError` (a save failed, or no
    checkpoint restores), `jattn.train.logging.LogWriteError` and `jattn._paths.WriteError`
    (`WORKDIR/config.json` could not be written, e.g. a full disk; the old one is kept).
    """
    config = with_defaults(config)  # every key of the task's schema, its defaults where unset
    total = _total_steps(config)
    workdir = pathlib.Path(workdir)
    problem = write_problem(workdir, folder=True)
    if problem is None and workdir.is_dir():
        problem = write_problem(workdir / "config.json", folder=False)
    if problem is not None:
        raise SetupError(f"cannot train in workdir {workdir}: {problem}")
    run = _set_up(config, data_iter)
    lock = WorkdirLock(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # the other processes of a run share process 0's workdir
            lock.acquire()
    except OSError as err:
        raise SetupError(f"cannot train in workdir {workdir}: {err.strerror or err}") from None
    try:
        return _train_locked(config, workdir, total, run, progress, allow_config_change)
    finally:
        lock.release()


_LOADER_KINDS = {"tf": "tfdata"}  # aliases of the same loader (jattn.data.make_dataset)


def _check_loader(saved: Mapping, config, workdir: pathlib.Path) -> None:
    """A checkpoint's data-iterator position is restored only by the loader that wrote it:
    `ConfigMismatchError` (even where config changes are allowed) for another one."""
    data = saved.get("data") if isinstance(saved, Mapping) else None
    old = (data.get("loader") if isinstance(data, Mapping) else None) or "grain"
    new = config.data.loader or "grain"
    if _LOADER_KINDS.get(old, old) != _LOADER_KINDS.get(new, new):
        raise ConfigMismatchError(
            f"{workdir}: the checkpoints were written with data.loader={old!r}, whose iterator position "
            f"data.loader={new!r} cannot restore; resume with data.loader={old!r}, or train in another workdir")


def _total_steps(config) -> int:
    total = config.total_steps
    if isinstance(total, float) and total.is_integer():
        total = int(total)
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
        raise TotalStepsError(f"total_steps must be a whole number of at least 1, not {total!r}")
    return int(total)


class _Run(NamedTuple):
    """What a run is made of before its workdir exists."""

    mesh: Any
    task: Any
    data: Any
    abstract_state: TrainState


def _set_up(config, data_iter) -> _Run:
    """The mesh, task, training data and abstract state of a run; `SetupError` (one line)
    for batch sizes the devices cannot split, a data source (or eval source, where the run
    evaluates) that gives no image, or a model that cannot take the config's images (its
    initialisation is traced, nothing computed)."""
    mesh = make_mesh()
    _check_batch_sizes(config, mesh.size)
    try:
        task = build_task(config)
        data = make_train_data(config, fields=task.fields) if data_iter is None else data_iter
        if config.eval_every:
            check_eval_data(config)
            check_eval_metrics(config)
        return _Run(mesh, task, data, abstract_train_state(task, config, mesh))
    except (ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SetupError(f"cannot train this config: {first}") from None


def _check_batch_sizes(config, devices: int) -> None:
    """batch_size (and eval_batch_size where the run evaluates) positive multiples of the
    device count, which each batch is split over; eval_images at least one eval batch."""
    sizes = {"batch_size": config.batch_size}
    if config.eval_every:
        sizes["eval_batch_size"] = config.eval_batch_size or config.batch_size
    for key, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 or size % devices:
            raise SetupError(f"{key}={size!r}: a batch must be a positive multiple of the {devices} devices "
                             "it is split over")
    if config.eval_every and config.eval_images < sizes["eval_batch_size"]:
        raise SetupError(f"eval_images={config.eval_images} is less than one eval batch "
                         f"({sizes['eval_batch_size']})")


def _train_locked(config, workdir: pathlib.Path, total: int, run: _Run, progress: bool,
                  allow_config_change: bool) -> dict[str, Any]:
    mesh, task, data = run.mesh, run.task, run.data
    # The run owns the workdir (the lock): it may delete saves that never completed (orbax
    # does so on process 0).
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
                        best_mode=config.best_mode, cleanup_tmp=True)
    writer = None
    bar = None
    finished = False
    try:
        # grain's and tf.data's iterators have a state to checkpoint (get_state / set_state);
        # an iterator passed in without one is not saved.
        saved_iter = data if hasattr(data, "get_state") else None

        # ------------------------------------------------------------------- state
        # Choose the checkpoint (a corrupt one is moved aside), then compare its config and
        # step with this run's before any array is read: a different model would fail to
        # restore with a vaguer error, and a refused run must leave everything as it was.
        latest = ckpt.choose_step(move_corrupt=True)
        if latest is not None:
            saved = ckpt.restore_config(latest)
            if latest > 0 and saved is not None and saved_iter is not None:
                _check_loader(saved, config, workdir)
            # A step-0 checkpoint (an imported one) has seen no batch: only its model must match.
            changes = config_changes(saved, config, model_only=latest == 0) if saved is not None else []
            if changes and not allow_config_change:
                raise ConfigMismatchError(
                    f"{workdir}: the checkpoints were written with a different config: {', '.join(changes)}; "
                    "resume with the saved values, or allow the change (allow_config_change=True, "
                    "jattn train --allow-config-change)")
            if changes:
                log.warning("resuming step %d with a changed config: %s", latest, ", ".join(changes))
            if total < latest:
                raise TotalStepsError(
                    f"total_steps={total} is below the latest checkpoint of {workdir} (step {latest}); "
                    f"a run never goes back: pass total_steps >= {latest}, or train in another workdir")
            restored = ckpt.restore(run.abstract_state, step=latest, data_iter=saved_iter)
            if latest > 0 and saved_iter is not None and not ckpt._folder(latest).joinpath("data_iter").exists():
                log.warning("checkpoint %d has no data-iterator position (written without one): the data "
                            "restarts from its first batch, not where the saved run was", latest)
            state = restored.state
            log.info("resumed from step %d", restored.step)
        else:
            state = initial_state(task, config, mesh)
        start = int(state.step)
        if start == total:
            log.info("%s is already at step %d: nothing to train", workdir, total)

        # One program per step (all its updates), the state donated; see jattn.train.steps.
        step_fn = make_train_step(task.updates, mesh, unroll=bool(config.step_unroll))
        batches = StepBatches(data, len(task.updates), mesh, size=int(config.prefetch_steps))
        config_dict = _plain(config)
        config_dict["jattn"] = provenance()
        if jax.process_index() == 0:
            # before the logs are cut back: a config.json that cannot be written loses nothing
            _write_json(workdir / "config.json", config_dict)
            truncate_metrics(workdir, start)  # replayed steps are logged again below
            truncate_events(workdir, start)
        writer = MetricWriter(workdir, process_index=jax.process_index())
        predict = jax.jit(task.predict)
        eval_every = int(config.eval_every)
        evaluator = make_evaluator(task, config, mesh, workdir) if eval_every else None  # compiled once

        def save(step: int) -> None:
            try:
                ckpt.save(step, state, config=config_dict, data_iter=batches if saved_iter is not None else None,
                          metrics=_numeric(eval_metrics))
            except NonFiniteStateError as err:  # e.g. an infinite learning rate in the optimizer state
                raise NonFiniteLossError(str(err)) from None

        # ------------------------------------------------------------------- loop
        log_every = int(config.log_every)
        ckpt_every = int(config.checkpoint_every)
        image_every = int(config.image_every)
        eval_metrics: dict[str, float] | None = None
        guard = _FiniteGuard(skip=bool(config.skip_nonfinite))
        metrics: dict[str, float] = {}
        t_last, step_last = time.perf_counter(), start
        bar = _progress(start, total) if progress and jax.process_index() == 0 else None
        with jax.set_mesh(mesh):
            for step in range(start, total):
                done = step + 1
                state, dev_metrics = step_fn(state, next(batches))
                guard.push(done, dev_metrics)  # reads the previous step's flag: finished by now
                ckpt.check()  # a background save that failed stops the run now, not at the next save
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
                    save(done)
            guard.check_all()
        # ------------------------------------------------------------------- end
        if total > start:
            save(total)
        ckpt.wait()  # the last save's errors are this run's
        finished = True
    finally:
        try:
            ckpt.close()
        except Exception as err:  # noqa: BLE001 - reported here only when another error is on its way
            if finished:
                raise
            log.error("%s", err)
        finally:
            if writer is not None:
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
    """Non-finite updates (a NaN / Inf loss, gradient, new parameters or optimizer state),
    seen without stalling each step: a step's flag is read after the
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
        values = _fetch(metrics)
        losses = {k: float(v) for k, v in values.items() if k.endswith("_loss")}
        shown = ", ".join(f"{k}={v}" for k, v in losses.items())
        if all(np.isfinite(v) for k, v in values.items() if k.endswith(("_loss", "_grad_norm"))):
            msg = (f"non-finite update at step {step}: {shown}, but the new parameters or optimizer state "
                   "are not finite (too high a learning rate?)")
        else:
            msg = f"non-finite loss or gradient at step {step}: {shown}"
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
    """`data` as JSON in `path`, replaced at once (`jattn._paths.write_atomic`); a
    `WriteError` naming `path` when it cannot be written."""
    write_atomic(path, json.dumps(data, indent=2))


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
