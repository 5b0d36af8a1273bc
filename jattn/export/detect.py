"""Object detection with a trained checkpoint: `jattn detect` and `Detector`.

`Detector.from_checkpoint(path)` restores a detection model (a task with the "boxes" field,
e.g. Attention R-CNN) from a workdir or a checkpoint folder. Images are prepared as in
evaluation (`jattn.data.detection.preprocess`): resized, aspect preserved, to fit the run's
``data.image_size``, padded bottom / right; the detections are mapped back to the image's
own pixels. Files are read as RGB like `jattn inpaint` (no EXIF rotation: COCO's boxes are
in the stored pixels' frame). Images go through the network ``batch_size`` at a time, all
of one shape: one compiled program.

`detect_files` writes COCO results JSON, one entry per detection scoring at least
``score_threshold``::

    {"image_id": i, "file_name": "cat.jpg", "category_id": 3, "category_name": "cat",
     "bbox": [x, y, width, height], "score": 0.93}

``image_id`` is the image's index in the (sorted) input list, ``bbox`` in the image's
pixels, ``category_id`` / ``category_name`` the class's COCO id and name
(`jattn.train.tasks.detection.label_map`). With ``draw``, each image is also written
there as PNG with its detections scoring at least ``max(score_threshold, draw_threshold)``
outlined and labelled. Every output is checked before the model loads, and every image is
read and detected before the first file is written (a batch at a time: memory stays bounded
by the batch for any folder); files are written atomically.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jattn.export.inference import (InferenceError, _first_line, _is_out_of_memory, _on_one_device, check_outputs,
                                    read_image, restore_trained, write_image)

__all__ = ["DetectError", "Detector", "check_detect_files", "detect_files", "draw_detections"]

#: Outline colours of the drawn classes, cycled (RGB).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128))


class DetectError(InferenceError):
    """Bad input for detection: the message names the file and the problem."""


def _source_labels(config):
    """The data source of the run, when it can be made here (its class names and ids), else None."""
    from jattn.data import source_from_config

    spec = config.data.get("eval_source") or config.data.get("source")
    spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
    if not isinstance(spec, dict):
        return None
    try:
        return source_from_config(spec)
    except Exception:  # noqa: BLE001 - the training data need not be on this machine
        return None


class Detector:
    """A restored detection model: `detector(uint8 [H, W, 3]) -> list of detections`
    (dicts of ``box`` (x1, y1, x2, y2 in the image's pixels), ``score``, ``class`` (index),
    ``category_id``, ``label``), by decreasing score."""

    def __init__(self, model, params: dict, variables: dict, config, source: str = ""):
        from jattn.data.detection import COCO_2017_CATEGORY_IDS, default_category_ids
        from jattn.train.tasks.detection import label_map

        self.config, self.source = config, source
        size = config.data.image_size
        self.image_size = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
        labels = None if config.model.class_names and config.model.category_ids else _source_labels(config)
        self.class_names, self.category_ids = label_map(config, labels)
        spec = config.data.get("source")
        name = str(spec.get("name", "")) if hasattr(spec, "get") else ""
        if labels is None and not config.model.category_ids and name:
            ids = default_category_ids(name, int(config.model.num_classes))
            if ids is COCO_2017_CATEGORY_IDS:
                self.category_ids = ids
        self._params, self._variables = params, variables
        self._detect = jax.jit(lambda p, v, image: model.apply({"params": p, **v}, image, method=model.detect))

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path, config=None) -> Detector:
        from jattn.config import ConfigError
        from jattn.train.task import compute_dtype
        from jattn.train.tasks.detection import build_attention_rcnn

        task, state, config = restore_trained(path, config, DetectError)
        if "boxes" not in task.fields:
            raise DetectError(f"{path}: model {config.model.name!r} is not a detection model")
        from jattn.config import with_defaults

        config = with_defaults(config)
        try:
            model = build_attention_rcnn(config.model, str(config.loss.box_loss), compute_dtype(config))
            return cls(model, _on_one_device(state.params)["model"], _on_one_device(state.variables).get("model", {}),
                       config, str(path))
        except ConfigError as err:
            raise DetectError(f"{path}: {err}") from None

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """uint8 ``[h, w, 3]`` -> (float32 ``[H, W, 3]`` network input, scale: input pixels per image pixel)."""
        from jattn.data.detection import preprocess
        from jattn.data.sources import Objects

        empty = Objects(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32))
        out, _ = preprocess(image, empty, self.image_size, max_boxes=1)
        return out["image"], float(out["scale"])

    def detect_batch(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """float32 ``[N, H, W, 3]`` prepared inputs -> the model's fixed-size detections (numpy):
        ``boxes [N, D, 4]`` (input pixels), ``scores``, ``classes``, ``valid``."""
        try:
            out = self._detect(self._params, self._variables, jnp.asarray(inputs))
            return {k: np.asarray(v) for k, v in jax.device_get(out).items()}
        except Exception as err:
            if not _is_out_of_memory(err):
                raise
            raise DetectError(f"{self.source}: out of memory detecting {len(inputs)} images of "
                              f"{self.image_size[1]}x{self.image_size[0]} at once ({_first_line(err)}); "
                              "use a smaller --batch-size") from None

    def _entries(self, dets: dict, i: int, scale: float, size: tuple[int, int], threshold: float) -> list[dict]:
        """Image i's detections scoring at least ``threshold``, in its own pixels (``size``
        ``(h, w)``: a box reaching into the input's padding ends at the image's border)."""
        out = []
        limit = np.asarray([size[1], size[0], size[1], size[0]], np.float64)
        for j in np.nonzero(dets["valid"][i] & (dets["scores"][i] >= threshold))[0]:
            k = int(dets["classes"][i, j])
            box = np.clip(dets["boxes"][i, j].astype(np.float64) / scale, 0.0, limit)
            out.append({"box": [float(v) for v in box], "score": float(dets["scores"][i, j]),
                        "class": k, "category_id": int(self.category_ids[k]), "label": self.class_names[k]})
        return out

    def detect_images(self, images, *, score_threshold: float = 0.05, batch_size: int = 8,
                      progress=None, pad_to: int | None = None) -> list[list[dict]]:
        """The detections of each uint8 ``[h, w, 3]`` image (``__call__``'s lists), in batches
        of ``n = pad_to or min(batch_size, len(images))`` (the last one padded to n: one
        compiled shape); ``progress(k)`` is called after each batch of k images."""
        n = pad_to or min(batch_size, len(images))
        results = []
        for start in range(0, len(images), n):
            chunk = images[start:start + n]
            prepared = [self.prepare(im) for im in chunk]
            inputs = np.stack([p[0] for p in prepared])
            if len(prepared) < n:
                inputs = np.concatenate([inputs, np.zeros((n - len(prepared), *inputs.shape[1:]), inputs.dtype)])
            dets = self.detect_batch(inputs)
            results += [self._entries(dets, i, p[1], im.shape[:2], score_threshold)
                        for i, (p, im) in enumerate(zip(prepared, chunk))]
            if progress is not None:
                progress(len(prepared))
        return results

    def __call__(self, image: np.ndarray, score_threshold: float = 0.05) -> list[dict]:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise DetectError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return self.detect_images([image], score_threshold=score_threshold, batch_size=1)[0]


def draw_detections(image: np.ndarray, detections: list[dict]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` with each detection's box outlined (a colour per class) and labelled
    ``"label score"``."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(image.shape[:2]) / 200))
    for det in sorted(detections, key=lambda d: d["score"]):  # the best drawn last, on top
        colour = PALETTE[det["class"] % len(PALETTE)]
        x1, y1, x2, y2 = det["box"]
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return np.asarray(picture)


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DetectError(f"{name} must be in [0, 1], got {value}")


def check_detect_files(images, output, draw=None, *, score_threshold: float = 0.05,
                       draw_threshold: float = 0.5, batch_size: int = 8) -> list[pathlib.Path]:
    """The drawn images' paths, once the arguments and every output path are checked (a
    `DetectError` naming the first bad one), before any model loads."""
    from jattn._paths import write_problem

    _check_threshold("--score-threshold", score_threshold)
    _check_threshold("--draw-threshold", draw_threshold)
    if batch_size < 1:
        raise DetectError(f"--batch-size must be positive, got {batch_size}")
    output = pathlib.Path(output)
    if output.suffix.lower() != ".json":
        raise DetectError(f"{output}: the output is a COCO results file and must end in .json")
    problem = write_problem(output, folder=False)
    if problem is not None:
        raise DetectError(f"cannot write {output}: {problem}")
    if draw is None:
        return []
    drawn = [pathlib.Path(draw) / (pathlib.Path(p).stem + ".png") for p in images]
    stems = [p.name for p in drawn]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise DetectError(f"{draw}: two images would be drawn to the same file ({', '.join(twice[:3])})")
    check_outputs(drawn, DetectError)
    return drawn


def detect_files(detector: Detector, images, output, draw=None, *, score_threshold: float = 0.05,
                 draw_threshold: float = 0.5, batch_size: int = 8, progress=None) -> dict:
    """Detect objects in image files (module docstring): every output is checked and every
    image read and detected first (nothing is written when one is bad), then the drawings
    and the JSON (last) are written. Returns ``{"output", "drawn", "images", "detections"}``."""
    from jattn._paths import WriteError, write_atomic

    images = [pathlib.Path(p) for p in images]
    drawn = check_detect_files(images, output, draw, score_threshold=score_threshold, draw_threshold=draw_threshold,
                               batch_size=batch_size)
    # every image is read and detected before anything is written, a batch at a time (memory
    # bounded by the batch, not the folder); drawing reads the images again
    n = min(batch_size, len(images))
    found = []
    for start in range(0, len(images), n):
        pixels = [read_image(p) for p in images[start:start + n]]
        found += detector.detect_images(pixels, score_threshold=score_threshold, pad_to=n, progress=progress)
    for source, path, dets in zip(images, drawn, found):
        shown = [d for d in dets if d["score"] >= max(score_threshold, draw_threshold)]
        write_image(path, draw_detections(read_image(source), shown), DetectError)
    results = []
    for i, (path, dets) in enumerate(zip(images, found)):
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            results.append({"image_id": i, "file_name": path.name, "category_id": d["category_id"],
                            "category_name": d["label"], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    try:
        pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, json.dumps(results, indent=1))
    except OSError as err:
        raise DetectError(f"cannot write {output}: {err.strerror or err}") from None
    except WriteError as err:
        raise DetectError(str(err)) from None
    return {"output": str(output), "drawn": [str(p) for p in drawn], "images": len(images),
            "detections": len(results)}
