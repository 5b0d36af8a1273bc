"""Orbax checkpoints of a training run: state, config and data-iterator state together.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager` with what a long run needs:
- keep the latest `keep` checkpoints *and* the best `keep_best` by an eval metric (orbax's
  best-N policy alone would delete the latest: both policies are combined);
- asynchronous saves (the step loop goes on while the files are written), written to a
  temporary folder and renamed when complete, so an interrupted save leaves nothing that
  looks like a checkpoint;
- never write non-finite values: `save` raises `NonFiniteStateError` instead;
- restore the latest checkpoint that restores: one that fails (truncated, corrupt) is
  reported and the previous one is used;
- restore onto any mesh: pass an abstract state whose leaves are `jax.ShapeDtypeStruct`s
  carrying the new shardings (see `abstract_state`).

The data iterator (grain) is saved only when given; grain is imported only then.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

__all__ = ["Checkpointer", "NonFiniteStateError", "Restored", "abstract_state", "nonfinite_leaves"]

log = logging.getLogger(__name__)


class NonFiniteStateError(ValueError):
    """A state with NaN or Inf values was about to be checkpointed."""


class Restored(NamedTuple):
    step: int
    state: Any
    config: dict | None


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` that hold a NaN or an Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                bad.append(jax.tree_util.keystr(path))
    return bad


def abstract_state(state_shapes: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves with `shardings` (a matching tree, or one sharding for all).

    `state_shapes` is e.g. `jax.eval_shape(init_fn, ...)`; with shardings built on a new
    mesh, restoring with the result re-shards the checkpoint onto that mesh.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings), state_shapes)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )


class Checkpointer:
    """Saves and restores `(state, config, data iterator)` under `directory/<step>/`.

    Args:
      directory: the checkpoint folder (local path or `gs://...`).
      keep: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to `save(metrics=...)`; with it, the best
        `keep_best` checkpoints are kept as well (never at the expense of the latest).
      best_mode: "max" or "min" (e.g. "max" for PSNR).
      async_save: write in a background thread (call `wait()` before reading the files).
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        keep_best: int = 1,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer: best_mode must be 'max' or 'min', got {best_mode!r}")
        # orbax refuses relative paths (e.g. the default `jattn demo` workdir): make local ones absolute
        self.directory = pathlib.Path(directory).absolute() if "://" not in str(directory) else directory
        self.best_metric = best_metric
        policies = [checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(str(self.directory), options=options)

    # ----------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step() if self.best_metric else None

    # ----------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Mapping | None = None,
        data_iter: Any = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = True,
    ) -> bool:
        """Save `state` (a pytree of arrays) as checkpoint `step`; returns whether it saved.

        Raises `NonFiniteStateError` (naming the leaves) instead of writing NaN / Inf.
        """
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: non-finite values in {shown}")
        items = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        if data_iter is not None:
            import grain

            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
        return self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ----------------------------------------------------------------------- restore

    def _restore_step(self, step: int, target: Any, data_iter: Any, with_config: bool) -> Restored:
        items = {"state": ocp.args.StandardRestore(target)}
        if with_config:
            items["config"] = ocp.args.JsonRestore()
        if data_iter is not None:
            import grain

            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        config = restored.get("config") if with_config else None
        return Restored(step, restored["state"], config)

    def restore(self, target: Any, *, step: int | None = None, data_iter: Any = None) -> Restored | None:
        """Restore `step` (default: the latest that restores) into the structure of `target`.

        `target`: a pytree like the saved state — concrete arrays, or `jax.ShapeDtypeStruct`s
        with shardings (`abstract_state`) to restore onto another mesh. `data_iter`: a grain
        iterator whose position is restored in place. Returns None when there is no
        checkpoint. With `step=None`, a checkpoint that fails to restore is logged and the
        previous one is tried; with an explicit `step`, the error is raised.
        """
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            return None
        candidates = [step] if step is not None else list(reversed(steps))
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        errors = []
        for s in candidates:
            has_config = (self._item_dir(s) / "config").exists() if isinstance(self.directory, pathlib.Path) else True
            try:
                return self._restore_step(s, target, data_iter, has_config)
            except Exception as err:  # noqa: BLE001 - any failure means "try the previous one"
                if step is not None:
                    raise
                msg = f"checkpoint step {s} in {self.directory} failed to restore ({type(err).__name__}: {err})"
                log.warning("%s; trying the previous one", msg)
                errors.append(msg)
        raise RuntimeError("no checkpoint could be restored:\n" + "\n".join(errors))

    def _item_dir(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.directory) / str(step)

    def restore_config(self, step: int | None = None) -> dict | None:
        """Only the config saved with a checkpoint (latest by default), or None."""
        self._manager.reload()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])


def host_copy(tree: Any) -> Any:
    """The pytree as NumPy arrays on the host (for comparisons and exports)."""
    return jax.tree_util.tree_map(np.asarray, tree)
