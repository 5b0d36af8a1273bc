"""Metrics of a run: `WORKDIR/metrics.jsonl` and TensorBoard event files.

Every logged step appends one JSON object (with `step`) to `metrics.jsonl`, flushed at
once, so a crash loses nothing logged. A resumed run first cuts the file back to the step
it resumes from (`truncate_metrics`), so the steps it replays are not logged twice. TensorBoard events (scalars and images) are written
with the `tensorboard` package's own event writer, without importing TensorFlow.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Mapping

import numpy as np

__all__ = ["MetricWriter", "read_metrics", "truncate_metrics"]

log = logging.getLogger(__name__)


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


class MetricWriter:
    """Writes scalars (jsonl + TensorBoard) and images (TensorBoard) under `workdir`."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, process_index: int = 0):
        self.workdir = pathlib.Path(workdir)
        self.enabled = process_index == 0  # one writer per run, on the first process
        self._events = None
        self._jsonl = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(self.workdir / "tensorboard"))

    def _add(self, step: int, values) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values(summary_pb2))
        self._events.add_event(event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else repr(v)) for k, v in clean.items()}}
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
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
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
    beside it, then renamed), so a crash leaves the old or the new file, never half of one."""
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
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        log.info("metrics.jsonl: %d records after step %d removed (this run logs those steps again)", removed, step)
    return removed
