"""Metrics of a run: `WORKDIR/metrics.jsonl` and TensorBoard event files.

Every logged step appends one JSON object (with `step`) to `metrics.jsonl`, and one event to
this run's event file under `WORKDIR/tensorboard/`, each flushed at once, so a crash loses
nothing logged. A resumed run first cuts both back to the step it resumes from
(`truncate_metrics`, `truncate_events`), so the steps it replays are logged once. Events
(scalars and images) are written with the `tensorboard` package's protos and record
format, without importing TensorFlow. A file that cannot be written (a full disk) is a
`LogWriteError` naming it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["LogWriteError", "MetricWriter", "read_metrics", "read_events", "truncate_metrics", "truncate_events"]

log = logging.getLogger(__name__)

EVENTS = "tensorboard"  # the event files' folder under the workdir
_FILE_IDS = itertools.count()  # event files this process started (their names' last part)


class LogWriteError(RuntimeError):
    """metrics.jsonl or an event file could not be written (e.g. a full disk); the message
    is one line naming the file."""


@contextlib.contextmanager
def _writing(path: pathlib.Path):
    try:
        yield
    except OSError as err:
        raise LogWriteError(f"cannot write {path}: {err.strerror or err}") from None


def _replace(path: pathlib.Path, data: bytes) -> None:
    """`path`'s bytes replaced at once (written beside it, then renamed), so a crash leaves
    the old or the new file, never half of one."""
    tmp = path.with_name(".rewrite.tmp")  # no "tfevents" in the name: TensorBoard skips it
    try:
        with _writing(path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
    """[H, W, C] float in [-1, 1] or uint8 -> (png bytes, H, W, C)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round((arr.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    h, w = arr.shape[:2]
    return buf.getvalue(), h, w, 1 if arr.ndim == 2 else arr.shape[-1]


class _EventFile:
    """One run's TensorBoard event file (TFRecord framing), each event flushed when written."""

    def __init__(self, folder: pathlib.Path):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_IDS)}"
        self.path = folder / name
        with _writing(self.path):
            folder.mkdir(parents=True, exist_ok=True)
            self._records = RecordWriter(open(self.path, "xb"))
        self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event) -> None:
        with _writing(self.path):
            self._records.write(event.SerializeToString())
            self._records.flush()

    def close(self) -> None:
        with _writing(self.path):
            self._records.close()


class MetricWriter:
    """Writes scalars (jsonl + TensorBoard) and images (TensorBoard) under `workdir`."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, process_index: int = 0):
        self.workdir = pathlib.Path(workdir)
        self.enabled = process_index == 0  # one writer per run, on the first process
        self._events = None
        self._jsonl = None
        if not self.enabled:
            return
        self._jsonl_path = self.workdir / "metrics.jsonl"
        with _writing(self._jsonl_path):
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            self._events = _EventFile(self.workdir / EVENTS)

    def _add(self, step: int, values) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values(summary_pb2))
        self._events.write(event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else repr(v)) for k, v in clean.items()}}
        with _writing(self._jsonl_path):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._events is not None:
            self._add(step, lambda pb: [pb.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()])

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: name -> [H, W, C] in [-1, 1] (or uint8)."""
        if not self.enabled or self._events is None:
            return

        def values(pb):
            out = []
            for name, img in images.items():
                data, h, w, c = _png(img)
                out.append(pb.Summary.Value(tag=name, image=pb.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)))
            return out

        self._add(step, values)

    def flush(self) -> None:
        """Nothing to do: every record is flushed when written."""

    def close(self) -> None:
        if self._jsonl is not None:
            with _writing(self._jsonl_path):
                self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl` (empty when absent)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir: str | pathlib.Path, step: int) -> int:
    """Remove the records of `WORKDIR/metrics.jsonl` logged after `step` (a run resuming from
    `step` logs them again); returns how many were removed. A line that does not parse (the
    last one of a run killed while writing it) goes too. The file is replaced at once (written
    beside it, then renamed: `_replace`)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            removed += 1
    if removed:
        _replace(path, "".join(line + "\n" for line in kept).encode("utf-8"))
        log.info("metrics.jsonl: %d records after step %d removed (this run logs those steps again)", removed, step)
    return removed


def _records(path: pathlib.Path) -> Iterator[tuple[bytes, bytes]]:
    """(framed record, event bytes) of each whole record of an event file; a record cut off
    at the end (a run killed while writing it) is left out."""
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (size,) = struct.unpack_from("<Q", data, pos)  # length, its CRC, the event, its CRC
        end = pos + 12 + size + 4
        if end > len(data):
            break
        yield data[pos:end], data[pos + 12 : pos + 12 + size]
        pos = end


def read_events(workdir: str | pathlib.Path) -> list:
    """Every event (`tensorboard.compat.proto.event_pb2.Event`) of the run's event files,
    file by file in name order."""
    from tensorboard.compat.proto import event_pb2

    files = sorted((pathlib.Path(workdir) / EVENTS).glob("events.out.tfevents.*"))
    return [event_pb2.Event.FromString(event) for path in files for _, event in _records(path)]


def truncate_events(workdir: str | pathlib.Path, step: int) -> int:
    """Remove the events of steps after `step` from the run's event files (a run resuming
    from `step` logs them again); returns how many were removed. Each changed file is
    replaced at once (`_replace`)."""
    from tensorboard.compat.proto import event_pb2

    removed = 0
    for path in sorted((pathlib.Path(workdir) / EVENTS).glob("events.out.tfevents.*")):
        records = list(_records(path))
        kept = [framed for framed, event in records if event_pb2.Event.FromString(event).step <= step]
        if len(kept) < len(records):
            _replace(path, b"".join(kept))
            removed += len(records) - len(kept)
    if removed:
        log.info("%s: %d events after step %d removed (this run logs those steps again)", EVENTS, removed, step)
    return removed
