"""Attention U-Net segmentation: per-pixel softmax cross-entropy (+ optional soft Dice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jattn.models.unet import AttentionUNet, unet_features
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._supervised import supervised_schema, supervised_task

__all__ = ["attention_unet_task", "schema", "pixel_cross_entropy", "soft_dice_loss", "segmentation_metrics", "labels_to_image"]


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over pixels of the softmax cross-entropy; ``logits [B, H, W, K]``, ``labels [B, H, W]`` int."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """``1 - mean_k (2 sum(p_k y_k) + s) / (sum(p_k) + sum(y_k) + s)`` over the batch's pixels,
    with ``p = softmax(logits)`` and ``y`` the one-hot labels (``s`` = ``smooth``)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    y = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    inter = jnp.sum(p * y, axis=(0, 1, 2))
    denom = jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(y, axis=(0, 1, 2))
    return 1.0 - jnp.mean((2.0 * inter + smooth) / (denom + smooth))


def segmentation_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Batch means of per-image scores of ``argmax(logits)`` against ``labels [B, H, W]``.

    ``pixel_accuracy``: fraction of correct pixels; ``mean_iou`` / ``mean_dice``: per image,
    the mean over the classes present in the prediction or the labels of
    ``|P & T| / |P | T|`` / ``2 |P & T| / (|P| + |T|)`` (classes absent from both are
    skipped); ``loss``: :func:`pixel_cross_entropy`.
    """
    k = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    pred = jnp.argmax(logits, axis=-1)
    p = jax.nn.one_hot(pred, k, dtype=jnp.float32)
    t = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    inter = jnp.sum(p * t, axis=(1, 2))  # [B, K]
    sizes = jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))
    union = sizes - inter
    present = union > 0
    count = jnp.maximum(jnp.sum(present, axis=-1), 1)
    iou = jnp.sum(jnp.where(present, inter / jnp.maximum(union, 1.0), 0.0), axis=-1) / count
    dice = jnp.sum(jnp.where(present, 2.0 * inter / jnp.maximum(sizes, 1.0), 0.0), axis=-1) / count
    return {
        "pixel_accuracy": jnp.mean((pred == labels).astype(jnp.float32)),
        "mean_iou": jnp.mean(iou),
        "mean_dice": jnp.mean(dice),
        "loss": pixel_cross_entropy(logits.astype(jnp.float32), labels),
    }


def labels_to_image(labels: jax.Array, num_classes: int) -> jax.Array:
    """Class indices ``[B, H, W]`` as gray levels on [-1, 1] (0 -> -1, K-1 -> 1): ``[B, H, W, 1]``."""
    return (labels.astype(jnp.float32) / max(num_classes - 1, 1) * 2.0 - 1.0)[..., None]


def schema():
    """Attention U-Net's config keys with their defaults (the paper's widths)."""
    return supervised_schema(
        {
            "num_classes": None,  # required: background included
            "features": None,  # widths per level; None: base * 2^i for depth levels
            "base": 64,
            "depth": 5,
            "attention": True,  # attention gates on the skips
        },
        {"dice_weight": 0.0, "dice_smooth": 1.0},  # loss: cross-entropy + dice_weight * soft Dice
    )


def _features(m) -> tuple[int, ...]:
    if m.features is not None:
        return tuple(int(f) for f in m.features)
    return unet_features(int(m.base), int(m.depth))


@register_task("attention_unet", schema=schema)
def attention_unet_task(config) -> Task:
    """Attention U-Net: one update per step on ("image", "segmentation") batches; batch norm
    statistics updated in the train step and used in ``predict``.

    Config (:func:`schema`): model.{num_classes, features | base + depth, attention};
    loss.{dice_weight, dice_smooth}; optimizer (`jattn.train.optim`); compute_dtype.
    predict: "input" (the image), "target" / "labels" (true / predicted classes as gray
    images), "attention_{i}" (gate coefficients of level i, mapped from (0, 1) to (-1, 1)
    for display), "output" (logits ``[B, H, W, num_classes]``).
    eval_metrics: :func:`segmentation_metrics`.
    """
    m = config.model
    k = int(m.num_classes)
    model = AttentionUNet(k, _features(m), attention=bool(m.attention), dtype=compute_dtype(config))
    dice_weight = float(config.loss.dice_weight)
    dice_smooth = float(config.loss.dice_smooth)

    def loss(logits, batch):
        ce = pixel_cross_entropy(logits, batch["segmentation"])
        metrics = {"ce_loss": ce}
        total = ce
        if dice_weight:
            dice = soft_dice_loss(logits, batch["segmentation"], dice_smooth)
            metrics["dice_loss"] = dice
            total = total + dice_weight * dice
        return total, metrics

    def predict(run, batch):
        logits, alphas = run(return_attention=True)
        out = {
            "input": batch["image"],
            "target": labels_to_image(batch["segmentation"], k),
            "labels": labels_to_image(jnp.argmax(logits, axis=-1), k),
        }
        levels = len(alphas)
        for j, alpha in enumerate(alphas):  # coarsest gate first
            out[f"attention_{levels - 1 - j}"] = 2.0 * alpha - 1.0
        out["output"] = logits
        return out

    def eval_metrics(outputs, batch):
        return segmentation_metrics(outputs["output"], batch["segmentation"])

    return supervised_task("attention_unet", config, model, inputs=lambda b: (b["image"],), loss=loss,
                           predict=predict, fields=("segmentation",), eval_metrics=eval_metrics)
