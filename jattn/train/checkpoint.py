"""Orbax checkpoints of a training run: state, config and data-iterator state together.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager` with what a long run needs:
- keep the latest `keep` checkpoints *and* the best `keep_best` by an eval metric (orbax's
  best-N policy alone would delete the latest: both policies are combined);
- asynchronous saves (the step loop goes on while the files are written), written to a
  temporary folder and renamed when complete, so an interrupted save leaves nothing that
  looks like a checkpoint; a save that fails in the background is reported by the next
  `check()` (one call per step is cheap), as `CheckpointSaveError` naming the step, the
  folder and the free space there;
- a checksum manifest in every step folder (`jattn_checksums.json`: size and sha256 of each
  file), written by the background save before orbax renames the folder into place, so
  every checkpoint that looks complete carries one;
- never write non-finite values: `save` raises `NonFiniteStateError` instead;
- restore the latest *intact* checkpoint: its files are checked against its manifest
  first; one that does not match (truncated, overwritten, files missing) is reported in one
  line, and, with `move_corrupt=True`, renamed to `<step>.corrupt` (a name orbax does not
  take for a step, so later runs never see it again); the previous one is used. Any other
  failure (an I/O error, a checkpoint that verifies but does not fit the target) is not
  taken for corruption: it raises `CheckpointRestoreError` instead of rolling the run back.
  A state that does not fit the target is found from the checkpoint's metadata before any
  array is read, and the error names the first array that differs.
  With several processes, process 0 chooses the step and broadcasts it, so all agree;
- restore onto any mesh: pass an abstract state whose leaves are `jax.ShapeDtypeStruct`s
  carrying the new shardings (see `abstract_state`).

Checkpoints written before manifests existed have none: they are restored unverified, and
if one fails to restore the run stops (naming it) rather than guessing that it is corrupt.

The data iterator (grain) is saved only when given; grain is imported only then.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

__all__ = [
    "Checkpointer", "CheckpointError", "CheckpointRestoreError", "CheckpointSaveError", "CorruptCheckpointError",
    "NonFiniteStateError", "Restored", "abstract_state", "nonfinite_leaves", "MANIFEST", "CORRUPT_SUFFIX",
]

log = logging.getLogger(__name__)

#: The checksum manifest in each step folder.
MANIFEST = "jattn_checksums.json"
#: Suffix of a step folder moved aside as corrupt (`12.corrupt`); orbax's step names are digits only.
CORRUPT_SUFFIX = ".corrupt"
# Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete
# (orbax.checkpoint._src.path.atomicity_types.TMP_DIR_SUFFIX); on object stores it writes
# `<step>` directly and marks it complete with commit_success.txt.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Top-level files orbax writes or rewrites after the manifest (while committing the step):
# not covered by it. Orbax reads _CHECKPOINT_METADATA leniently (a damaged one is logged).
_UNSEALED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST})
#: The smallest part of a replicated array that one replica writes. Orbax's replica-parallel
#: save cuts every replicated array into one slice per replica with an eager `lax.slice`, which
#: compiles once per array shape and device: a few hundred small compiles (tens of seconds) at a
#: run's first save, to split writes of kilobytes. Arrays whose slices would be smaller than
#: this are written whole by one replica; larger ones are still shared out across the hosts.
REPLICA_SLICE_MIN_BYTES = 4 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the state item: orbax's standard type handlers, with jax.Array's
    `min_slice_bytes_for_replica_parallel` set (in its own registry: the global one is the
    process's). The files are those of `StandardSave`, so either restores the other's."""
    array = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_SLICE_MIN_BYTES,
        array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array), "_array_metadata_store", None))
    others = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()
              if ty is not jax.Array]
    registry = ocp.type_handlers.create_type_handler_registry(*others, (jax.Array, array))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class NonFiniteStateError(ValueError):
    """A state with NaN or Inf values was about to be checkpointed."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message is one line naming it."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its checksum manifest."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (e.g. a full disk); names the step, the folder and its free space."""


class CheckpointRestoreError(CheckpointError):
    """No checkpoint could be restored, or one failed for a reason other than corruption."""


class Restored(NamedTuple):
    step: int
    state: Any
    config: dict | None


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` that hold a NaN or an Inf (one program
    for the whole tree, compiled once per tree structure, and one transfer)."""
    floats = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not floats:
        return []
    finite = np.asarray(_all_finite([leaf for _, leaf in floats]))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(floats, finite) if not ok]


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """[len(leaves)] bool: whether each array holds only finite values."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


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


# --------------------------------------------------------------------------- manifests


def _files(folder: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    """(relative posix path, path) of every file under `folder`, sorted (epath has no rglob)."""
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{path.name}"
        if path.is_dir():
            yield from _files(path, rel + "/")
        else:
            yield rel, path


def _digest(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _write_manifest(folder: epath.Path, step: int) -> None:
    """Write `folder/MANIFEST`: size and sha256 of every file of the step (but `_UNSEALED`)."""
    files = {}
    for rel, path in _files(folder):
        if rel in _UNSEALED or rel.startswith(f".{MANIFEST}"):
            continue
        size, sha = _digest(path)
        files[rel] = {"size": size, "sha256": sha}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": 1, "step": int(step), "files": files}, indent=1))
    tmp.rename(folder / MANIFEST)


def verify(folder: str | pathlib.Path | epath.Path, step: int | None = None) -> bool:
    """Check a step folder against its manifest: True when every file matches, False when it
    has no manifest (written before manifests); raises `CorruptCheckpointError` (naming the
    first file that differs) or, for a read error, the `OSError` itself."""
    folder = epath.Path(folder)
    name = f"checkpoint {step if step is not None else folder.name} ({folder}) is corrupt"
    try:
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        if not folder.exists():
            raise CorruptCheckpointError(f"{name}: the folder is missing") from None
        return False
    try:
        files = json.loads(text)["files"]
        entries = [(str(rel), int(want["size"]), str(want["sha256"])) for rel, want in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"{name}: its checksum manifest {MANIFEST} is unreadable") from None
    for rel, size, sha in entries:
        try:
            got_size, got_sha = _digest(folder / rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{name}: {rel} is missing") from None
        except IsADirectoryError:
            raise CorruptCheckpointError(f"{name}: {rel} is a folder, a file was written") from None
        if got_size != size:
            raise CorruptCheckpointError(f"{name}: {rel} has {got_size} bytes, {size} were written")
        if got_sha != sha:
            raise CorruptCheckpointError(f"{name}: {rel} does not match its checksum")
    return True


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _free_space(path: Any) -> str:
    """"N.N GiB free" on the filesystem of `path` (its nearest existing parent), or ""."""
    try:
        p = pathlib.Path(str(path))
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p).free
    except (OSError, ValueError):
        return ""
    return f"{free / 2**30:.1f} GiB free there"


def _agree(*values: int) -> tuple[int, ...]:
    """Process 0's `values` on every process (themselves with one process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return tuple(int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32)))


class _ReportedByCaller(logging.Filter):
    """Drops orbax's error records that carry a traceback: orbax logs a failed background
    save twice that way before raising it in the caller's thread, where it becomes one
    `CheckpointError` line (the original error chained to it, and logged at debug level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET_ORBAX = _ReportedByCaller()


# Codes broadcast by `Checkpointer.choose_step` besides a step number.
_NONE, _FAILED = -1, -2


class Checkpointer:
    """Saves and restores `(state, config, data iterator)` under `directory/<step>/`.

    Args:
      directory: the checkpoint folder (local path or `gs://...`).
      keep: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to `save(metrics=...)`; with it, the best
        `keep_best` checkpoints are kept as well (never at the expense of the latest).
      best_mode: "max" or "min" (e.g. "max" for PSNR).
      async_save: write in a background thread (call `wait()` before reading the files);
        False: `save` returns once the checkpoint is complete.
      cleanup_tmp: delete the temporary folders of saves that never completed (only a
        process that owns the directory may: a reader would delete a running save's folder).
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
        cleanup_tmp: bool = False,
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer: best_mode must be 'max' or 'min', got {best_mode!r}")
        # orbax refuses relative paths (e.g. the default `jattn demo` workdir): make local ones absolute
        self.directory = pathlib.Path(directory).absolute() if "://" not in str(directory) else directory
        self._root = epath.Path(self.directory)
        self.best_metric = best_metric
        self._async = async_save
        self._saving: int | None = None  # the step of a save that may still be running or have failed
        self._sealing: int | None = None  # the step the post-finalization hook seals
        self._verified: set[int] = set()
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
            # Always orbax's asynchronous checkpointer: its post-finalization hook is where the
            # manifest goes in, after every file is written and before the folder is renamed
            # into place. async_save=False waits for each save instead.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            cleanup_tmp_directories=cleanup_tmp,
            create=True,
        )
        handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = _state_handler()
        handlers.add("state", ocp.args.PyTreeSave, state_handler)
        handlers.add("state", ocp.args.PyTreeRestore, state_handler)
        self._manager = ocp.CheckpointManager(str(self.directory), options=options, handler_registry=handlers)
        logging.getLogger("absl").addFilter(_QUIET_ORBAX)  # orbax logs through absl's logger; added once

    # ----------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step() if self.best_metric else None

    def corrupt_folders(self) -> list[str]:
        """Names of the step folders moved aside as corrupt (`<step>.corrupt...`)."""
        if not self._root.exists():
            return []
        return sorted(p.name for p in self._root.iterdir() if CORRUPT_SUFFIX in p.name and p.name.split(".")[0].isdigit())

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

        Raises `NonFiniteStateError` (naming the leaves) instead of writing NaN / Inf, and
        `CheckpointSaveError` when this save, or the previous one still in the background,
        fails.
        """
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: non-finite values in {shown}")
        self._finish()  # a failed previous save is reported as itself, not as this one
        items = {"state": ocp.args.PyTreeSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        if data_iter is not None:
            import grain

            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
        self._saving = self._sealing = int(step)
        try:
            saved = self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force)
        except Exception as err:  # noqa: BLE001 - whatever failed, the run cannot go on: one line
            self._saving = None
            log.debug("checkpoint %d: save failed", step, exc_info=True)
            raise self._save_error(int(step), err) from err
        if not saved:
            self._saving = None
        elif not self._async:
            self._finish()
        return saved

    def check(self) -> None:
        """Raise `CheckpointSaveError` if a background save has failed; returns at once while
        one is still running (cheap: call it every step)."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self._finish()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (`CheckpointSaveError` if one failed)."""
        self._finish()

    def close(self) -> None:
        try:
            self._finish()
        finally:
            self._manager.close()

    def _finish(self) -> None:
        step = self._saving
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            log.debug("checkpoint %s: background save failed", step, exc_info=True)
            raise self._save_error(step, err) from err
        finally:
            self._saving = None

    def _save_error(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        folder = self._root / str(step) if step is not None else self._root
        free = _free_space(self.directory)
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err):
            hint = "; free some space, then rerun: training resumes from the last complete checkpoint"
        else:
            hint = ""
        return CheckpointSaveError(f"{what} could not be saved to {folder}: {_one_line(err)}"
                                   + (f" ({free})" if free else "") + hint)

    def _seal(self) -> None:
        """Orbax's post-finalization hook (background thread, primary process): every file of
        the step is written; the manifest goes in before the folder is committed. An error
        here fails the save, which then never looks complete."""
        step = self._sealing
        if step is None:
            return
        folder = self._root / f"{step}{_TMP_SUFFIX}"
        if not folder.exists():
            folder = self._root / str(step)
        _write_manifest(folder, step)

    # ----------------------------------------------------------------------- restore

    def _folder(self, step: int) -> epath.Path:
        return self._root / str(step)

    def _move_aside(self, step: int) -> str:
        target = self._root / f"{step}{CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
            target = self._root / f"{step}{CORRUPT_SUFFIX}.{n}"
            n += 1
        self._folder(step).rename(target)
        return target.name

    def choose_step(self, *, move_corrupt: bool = False) -> int | None:
        """The latest checkpoint whose files match its manifest (or that has none), None when
        there is no checkpoint at all.

        A corrupt one is reported (one warning line) and skipped, and with `move_corrupt`
        renamed to `<step>.corrupt`. Raises `CheckpointRestoreError` when reading one fails
        for another reason (nothing is skipped then), or when checkpoints exist (or were moved
        aside) but none is intact. Process 0 decides; every process gets its answer.
        """
        chosen, verified, error = _FAILED, False, None
        if jax.process_index() == 0:
            try:
                chosen, verified = self._choose(move_corrupt)
            except CheckpointError as err:
                error = err
        chosen, verified = _agree(chosen, int(verified))
        self._manager.reload()
        if error is not None:
            raise error
        if chosen == _FAILED:
            raise CheckpointRestoreError(f"process 0 could not choose a checkpoint in {self.directory} (see its log)")
        if chosen == _NONE:
            return None
        if verified:
            self._verified.add(chosen)
        return chosen

    def _choose(self, move_corrupt: bool) -> tuple[int, bool]:
        """(step, whether it has a manifest) of the latest intact checkpoint, or (_NONE, False)."""
        self._manager.reload()
        earlier = self.corrupt_folders()
        corrupt = []
        for step in reversed(self.all_steps()):
            try:
                verified = verify(self._folder(step), step)
            except CorruptCheckpointError as err:
                if move_corrupt:
                    moved = self._move_aside(step)
                    log.warning("%s; moved aside to %s, using the previous checkpoint", err, moved)
                    corrupt.append(moved)
                else:
                    log.warning("%s; using the previous checkpoint", err)
                    corrupt.append(str(step))
                continue
            except OSError as err:
                raise CheckpointRestoreError(
                    f"checkpoint {step} in {self.directory} could not be read ({_one_line(err)}); not taken for "
                    "corruption, so the run stops instead of going back to an older checkpoint: rerun once "
                    "the storage is readable") from err
            return step, verified
        if corrupt or earlier:
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} could be restored: every one is corrupt "
                f"({', '.join(corrupt + earlier)}); delete the .corrupt folders to start the run over")
        return _NONE, False

    def _mismatch(self, step: int, target: Any) -> str | None:
        """The first difference between the saved state's arrays and `target`'s (names and
        shapes, from the checkpoint's metadata), or None. Read before any array, so a model
        that does not fit is named without starting the restore."""
        try:
            saved = ocp.tree.to_flat_dict(self._manager.item_metadata(step)["state"].tree)
        except Exception:  # noqa: BLE001 - no readable metadata: the restore itself reports
            return None
        wanted = ocp.tree.to_flat_dict(target)
        missing = [k for k in wanted if k not in saved]
        extra = [k for k in saved if k not in wanted]
        shapes = [k for k in wanted if k in saved and getattr(saved[k], "shape", None) is not None
                  and tuple(saved[k].shape) != tuple(np.shape(wanted[k]))]
        differ = len(missing) + len(extra) + len(shapes)
        if not differ:
            return None
        more = f"; {differ - 1} more differ" if differ > 1 else ""
        name = lambda key: "/".join(key)  # noqa: E731
        if shapes:
            k = shapes[0]
            first = (f"{name(k)} is {list(saved[k].shape)} in the checkpoint and "
                     f"{list(np.shape(wanted[k]))} in this model")
        elif missing:
            first = f"this model has {name(missing[0])}, the checkpoint does not"
        else:
            first = f"the checkpoint has {name(extra[0])}, this model does not"
        return first + more

    def _restore_step(self, step: int, target: Any, data_iter: Any, with_config: bool) -> Restored:
        folder = self._folder(step)
        items = {"state": ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
        if with_config and (folder / "config").exists():
            items["config"] = ocp.args.JsonRestore()
        if data_iter is not None and (folder / "data_iter").exists():
            import grain

            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        config = restored.get("config") if "config" in items else None
        return Restored(step, restored["state"], config)

    def _checked(self, step: int) -> bool:
        """Verify `step` (once per Checkpointer): True with a manifest, False without one."""
        if step in self._verified:
            return True
        try:
            ok = verify(self._folder(step), step)
        except OSError as err:
            raise CheckpointRestoreError(f"checkpoint {step} in {self.directory} could not be read "
                                         f"({_one_line(err)})") from err
        if ok:
            self._verified.add(step)
        return ok

    def restore(self, target: Any, *, step: int | None = None, data_iter: Any = None,
                move_corrupt: bool = False) -> Restored | None:
        """Restore `step` (default: the latest intact one, see `choose_step`) into the structure
        of `target`.

        `target`: a pytree like the saved state — concrete arrays, or `jax.ShapeDtypeStruct`s
        with shardings (`abstract_state`) to restore onto another mesh. `data_iter`: a grain
        iterator whose position is restored in place. Returns None when there is no
        checkpoint. An explicit `step` that is corrupt raises `CorruptCheckpointError`; any
        failure of the restore itself raises `CheckpointRestoreError`.
        """
        self._manager.reload()
        if step is None:
            step = self.choose_step(move_corrupt=move_corrupt)
            if step is None:
                return None
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        verified = self._checked(step)
        mismatch = self._mismatch(step, target)
        if mismatch:
            raise CheckpointRestoreError(f"checkpoint {step} in {self.directory} could not be restored ({mismatch}): "
                                         "its state does not fit this config's model, so it is not corrupt")
        try:
            return self._restore_step(step, target, data_iter, with_config=True)
        except Exception as err:  # noqa: BLE001 - reported as one line naming the checkpoint
            if verified:
                why = ("its files match their checksums, so it is not corrupt: a read error or a state that "
                       "does not fit this config's model")
            else:
                why = (f"it has no {MANIFEST} (written before checksums), so corruption cannot be told from "
                       f"a read error; if it is damaged, rename it to {step}{CORRUPT_SUFFIX} and rerun")
            raise CheckpointRestoreError(
                f"checkpoint {step} in {self.directory} could not be restored ({_one_line(err)}); {why}") from err

    def restore_config(self, step: int | None = None) -> dict | None:
        """Only the config saved with a checkpoint (default: the latest intact one), or None."""
        self._manager.reload()
        step = self.choose_step() if step is None else step
        if step is None or not (self._folder(step) / "config").exists():
            return None
        self._checked(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - one line naming the checkpoint
            raise CheckpointRestoreError(f"the config of checkpoint {step} in {self.directory} could not be read "
                                         f"({_one_line(err)})") from err
        return dict(restored["config"])


def host_copy(tree: Any) -> Any:
    """The pytree as NumPy arrays on the host (for comparisons and exports)."""
    return jax.tree_util.tree_map(np.asarray, tree)
