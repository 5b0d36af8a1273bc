"""Whether a path can be written, asked before anything is created."""

from __future__ import annotations

import os
import pathlib

__all__ = ["write_problem"]


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
