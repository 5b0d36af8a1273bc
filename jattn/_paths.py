"""Whether a path can be written, asked before anything is created; files replaced at once."""

from __future__ import annotations

import os
import pathlib

__all__ = ["WriteError", "write_problem", "check_writable", "write_atomic"]


class WriteError(Exception):
    """A file that cannot be written; the message is one line naming it (`cannot write PATH:
    REASON`)."""


def write_problem(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why `path` cannot be written as a folder (`folder=True`) or as a file, its missing
    parent folders made on the way, or None when it can. The reasons: `path` is a file (or a
    folder) already, a parent is a file, or the folder to write in is not writable. A full
    disk shows only when something is written."""
    path = pathlib.Path(path)
    if path.exists() and path.is_dir() != folder:
        return f"{path} is {'a file, not a folder' if folder else 'a folder, not a file'}"
    existing = path if folder and path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_writable(path: str | os.PathLike) -> None:
    """A `WriteError` naming `path` when it cannot be written as a file (`write_problem`)."""
    problem = write_problem(path, folder=False)
    if problem is not None:
        raise WriteError(f"cannot write {path}: {problem}")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` (a file in an existing folder) with `data` at once: written to a
    temporary file beside it, flushed to disk, then renamed over it, so a crash or a full
    disk leaves the old file or the new one, never half of one, and no temporary file.
    A `WriteError` (one line naming `path`) when it cannot be written: `write_problem`'s
    reasons, checked first, or the error of the write itself (e.g. a full disk)."""
    path = pathlib.Path(path)
    check_writable(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
