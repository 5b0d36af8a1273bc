"""Attention R-CNN object detection: the model's RPN and box-head losses on ("image",
"boxes") batches, and COCO box metrics (pycocotools) over the whole evaluation set.

Config (:func:`schema`):

* ``model.num_classes`` (K, required), ``model.preset`` (`jattn.models.attention_rcnn.PRESETS`:
  "resnet50_fpn", "resnet18_fpn", "resnet101_fpn", "tiny"), and any attribute of
  :class:`jattn.models.AttentionRCNN` by name (``fpn_channels``, ``anchor_sizes``,
  ``attention_score``, ``rpn_post_nms_top_n_train``, ...; None: the preset's value);
* ``model.class_names`` / ``model.category_ids``: the names and COCO ids of the K classes
  (None: the data source's, or ``class k`` / ``1..K``), used by evaluation and `jattn detect`;
* ``loss.box_loss``: "smooth_l1" (torchvision) or "giou" for the box head;
* the ``optimizer`` block (`jattn.train.optim`).

The update's metrics are the loss parts (``rpn_objectness``, ``rpn_box``,
``roi_classification``, ``roi_box``) and the sample counts of `jattn.losses`. ``predict``
returns the fixed-size detections (``boxes [B, D, 4]`` in input pixels, ``scores``,
``classes``, ``valid``) and, for the image summaries, ``detections``: the image with its
ground truth in green and the detections scoring 0.5 or more in red.

Evaluation (`evaluate`): the detections of every eval image, mapped back to its original
pixels (``boxes / scale``), scored by COCOeval against the eval source's ground truth
(crowd regions and COCO's segment areas included): ``eval_map`` (AP@[.5:.95]),
``eval_map50``, ``eval_map75``, ``eval_map_small`` / ``_medium`` / ``_large``. With
``save_outputs`` it writes ``annotations.json`` (the evaluated images' ground truth, COCO
format) and ``detections.json`` (COCO results) there, so any tool can rescore them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jattn.config import ConfigError
from jattn.models.attention_rcnn import PRESETS, AttentionRCNN
from jattn.ops.boxes import draw_boxes
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._supervised import apply_net, supervised_schema, supervised_task

__all__ = ["schema", "build_attention_rcnn", "detection_task", "label_map", "evaluate_detections"]

#: AttentionRCNN attributes a config may set by name (besides num_classes).
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(AttentionRCNN)
                   if f.name not in ("num_classes", "dtype", "param_dtype", "box_loss", "parent", "name"))
#: Detections drawn in the summaries score at least this.
DRAW_SCORE = 0.5
GROUND_TRUTH_COLOUR = (-1.0, 1.0, -1.0)  # green in [-1, 1]
DETECTION_COLOUR = (1.0, -1.0, -1.0)  # red


def schema() -> ml_collections.ConfigDict:
    """Attention R-CNN's config keys with their defaults (None: the preset's value)."""
    model = {"num_classes": None, "preset": "resnet50_fpn", "class_names": None, "category_ids": None}
    model.update({k: None for k in MODEL_KEYS})
    return supervised_schema(model, {"box_loss": "smooth_l1"})


def _plain(value):
    """Config lists (nested) as tuples, as the module's attributes are."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def build_attention_rcnn(m, box_loss: str = "smooth_l1", dtype=None) -> AttentionRCNN:
    """The AttentionRCNN of a (complete) model block: ``PRESETS[m.preset]`` with the
    attributes the block sets; a ConfigError naming a bad preset or value."""
    if m.num_classes is None or int(m.num_classes) < 1:
        raise ConfigError(f"attention_rcnn: model.num_classes must be a positive number of classes, got {m.num_classes!r}")
    if m.preset not in PRESETS:
        raise ConfigError(f"unknown Attention R-CNN preset {m.preset!r}; known: {', '.join(sorted(PRESETS))}")
    if box_loss not in ("smooth_l1", "giou"):
        raise ConfigError(f"loss.box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
    if m.attention_score is not None and m.attention_score not in ("dot", "additive"):
        raise ConfigError(f"model.attention_score must be 'dot' or 'additive', got {m.attention_score!r}")
    kw = {**PRESETS[m.preset], **{k: _plain(m[k]) for k in MODEL_KEYS if m[k] is not None}}
    return AttentionRCNN(int(m.num_classes), box_loss=box_loss, dtype=dtype, **kw)


def label_map(config, source=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(class_names, category_ids)`` of the K classes: the config's ``model.class_names`` /
    ``model.category_ids``, else the data source's (given, or none), else ``class k`` and
    ``1..K``."""
    k = int(config.model.num_classes)
    names = config.model.class_names or getattr(source, "class_names", None)
    ids = config.model.category_ids or getattr(source, "category_ids", None)
    names = tuple(str(n) for n in names) if names else tuple(f"class {i}" for i in range(k))
    ids = tuple(int(i) for i in ids) if ids else tuple(range(1, k + 1))
    if len(names) != k or len(ids) != k:
        raise ConfigError(f"attention_rcnn: {k} classes, but {len(names)} class names and {len(ids)} category ids")
    return names, ids


@register_task("attention_rcnn", schema=schema)
def detection_task(config) -> Task:
    """Attention R-CNN: one update per step on the sum of the RPN and box-head losses
    (`AttentionRCNN.losses`, the step's PRNG key drawing the anchor and RoI samples);
    batch norm statistics are updated in the step. See the module docstring."""
    model = build_attention_rcnn(config.model, str(config.loss.box_loss), compute_dtype(config))

    def loss(outputs, batch):
        del batch
        return outputs["loss"], {k: v for k, v in outputs.items() if k != "loss"}

    def predict(run, batch):
        dets = run(method=AttentionRCNN.detect)
        picture = batch["image"].astype(jnp.float32)
        if "boxes" in batch:
            picture = draw_boxes(picture, batch["boxes"], batch["classes"] >= 0, GROUND_TRUTH_COLOUR)
        picture = draw_boxes(picture, dets["boxes"], dets["valid"] & (dets["scores"] >= DRAW_SCORE), DETECTION_COLOUR)
        return {**dets, "detections": picture}

    task = supervised_task(
        "attention_rcnn", config, model, inputs=lambda b: (b["image"],), loss=loss, predict=predict,
        fields=("boxes",), train_call=lambda b, key: ((b, key), {"method": AttentionRCNN.losses}),
    )

    def detect(params, variables, batch):
        out, _ = apply_net(model, params["model"], variables.get("model", {}), batch["image"], train=False,
                           method=AttentionRCNN.detect)
        return out

    detect_jit = jax.jit(detect)  # compiled at the first evaluation, reused by every later one

    truth: dict = {}  # the eval set's ground truth, built at the first evaluation

    def evaluate(state, config, mesh, host_batches, save_outputs=None):
        return evaluate_detections(detect_jit, state, config, mesh, host_batches, save_outputs, truth)

    return dataclasses.replace(task, evaluate=evaluate)


def _subset(ground_truth: dict, image_ids) -> dict:
    """The ground truth of the images ``image_ids`` only."""
    ids = {int(i) for i in image_ids}
    return {**ground_truth, "images": [im for im in ground_truth["images"] if int(im["id"]) in ids],
            "annotations": [a for a in ground_truth.get("annotations", []) if int(a["image_id"]) in ids]}


def evaluate_detections(detect, state, config, mesh, host_batches, save_outputs=None, cache=None) -> dict:
    """COCO box metrics of ``detect(params, variables, batch)`` (jitted detections) over the
    eval batches (module docstring); every process gets the same numbers. ``save_outputs``:
    a checked folder (`jattn.train.evaluate.check_save_outputs`) for ``annotations.json`` and
    ``detections.json``, written by process 0, whole or not at all. ``cache``: a dict that
    keeps the ground truth between calls."""
    from jattn.coco_eval import coco_ground_truth, coco_metrics, coco_results
    from jattn.train.evaluate import EvalDataError, _host_images, _ImageWriter, check_eval_data
    from jattn.train.sharding import to_global_array

    source = check_eval_data(config)
    names, category_ids = label_map(config, source)
    cache = {} if cache is None else cache
    if "truth" not in cache:
        try:
            cache["truth"] = coco_ground_truth(source, category_ids=category_ids, class_names=names)
        except ValueError as err:
            raise EvalDataError(f"eval data: {str(err).splitlines()[0]}") from None
    truth = cache["truth"]
    sizes = {int(im["id"]): (im["height"], im["width"]) for im in truth["images"]}
    results, image_ids = [], []
    for host in host_batches:
        batch = to_global_array(host, mesh)
        dets = _host_images(detect(state.params, state.variables, batch))  # every process's rows, on each
        meta = _host_images({"image_id": batch["image_id"], "scale": batch["scale"]})
        ids = [int(i) for i in meta["image_id"]]
        unknown = [i for i in ids if i not in sizes]
        if unknown:
            raise EvalDataError(f"eval data: image ids {unknown[:5]} are not in the eval source's ground truth")
        results += coco_results(ids, dets["boxes"], dets["scores"], dets["classes"], dets["valid"], meta["scale"],
                                category_ids, sizes=[sizes[i] for i in ids])
        image_ids += ids
    if not image_ids:
        raise EvalDataError("evaluation saw no images")
    try:
        metrics = coco_metrics(truth, results, image_ids=image_ids)
    except ValueError as err:
        raise EvalDataError(f"eval data: {str(err).splitlines()[0]}") from None
    if save_outputs is not None and jax.process_index() == 0:
        writer = _ImageWriter(pathlib.Path(save_outputs))
        try:
            writer.write_bytes("annotations.json", json.dumps(_subset(truth, image_ids)).encode())
            writer.write_bytes("detections.json", json.dumps(results).encode())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return {**{f"eval_{k}": v for k, v in metrics.items()}, "eval_images": len(image_ids),
            "eval_detections": len(results)}
