"""SE-ResNet image classification: softmax cross-entropy on ("image", "label") batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jattn.models.classifiers import PRESETS, SEResNet
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._supervised import supervised_schema, supervised_task

__all__ = ["se_resnet_task", "schema", "build_se_resnet", "cross_entropy", "classification_metrics"]

#: Model keys that set the layout without a preset (None: SEResNet's default); a preset fixes them.
LAYOUT = ("stage_sizes", "width", "bottleneck", "cifar_stem")


def schema():
    """SE-ResNet's config keys with their defaults."""
    return supervised_schema(
        {
            "num_classes": None,  # required
            "preset": None,  # "se_resnet18" | "se_resnet50" | "se_resnet_cifar"; None: the layout keys
            "depth": None,  # se_resnet_cifar: 6n + 2 (None: 20)
            "stage_sizes": None,  # blocks per stage, without a preset
            "width": None,
            "bottleneck": None,
            "cifar_stem": None,
            "reduction": 16,  # SE reduction
            "zero_init_last_bn": False,
        },
        {"label_smoothing": 0.0},
    )


def build_se_resnet(m, dtype=None) -> SEResNet:
    """The SE-ResNet of a config's (complete) model block: a ``preset`` ("se_resnet18",
    "se_resnet50", "se_resnet_cifar" with ``depth``), or without one the layout keys
    ``stage_sizes`` / ``width`` / ``bottleneck`` / ``cifar_stem``; ``num_classes``,
    ``reduction``, ``zero_init_last_bn`` in either case."""
    kw = {"reduction": int(m.reduction), "zero_init_last_bn": bool(m.zero_init_last_bn), "dtype": dtype}
    given = {k: m[k] for k in LAYOUT if m[k] is not None}
    if m.preset is None:
        if "stage_sizes" not in given:
            raise ValueError("se_resnet: set model.preset or model.stage_sizes")
        given["stage_sizes"] = tuple(int(n) for n in given["stage_sizes"])
        return SEResNet(num_classes=int(m.num_classes), **given, **kw)
    if m.preset not in PRESETS:
        raise ValueError(f"unknown SE-ResNet preset {m.preset!r}; known: {sorted(PRESETS)}")
    if given:
        raise ValueError(f"se_resnet: model.preset {m.preset!r} fixes the layout; unset model.{', model.'.join(given)}")
    if m.depth is not None:
        kw["depth"] = int(m.depth)
    return PRESETS[m.preset](int(m.num_classes), **kw)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy of ``logits [B, K]`` against int ``labels [B]``, with
    optional label smoothing (targets ``(1 - s) one_hot + s / K``)."""
    if label_smoothing:
        k = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, k), label_smoothing)
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Batch means: ``accuracy`` (top-1), ``top5_accuracy`` (when there are >= 5 classes) and
    ``loss`` (cross-entropy, no smoothing). ``logits [B, K]``, ``labels [B]`` int."""
    labels = labels.astype(jnp.int32)
    out = {"accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
    if logits.shape[-1] >= 5:
        top5 = jax.lax.top_k(logits, 5)[1]
        out["top5_accuracy"] = jnp.mean(jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32))
    out["loss"] = cross_entropy(logits.astype(jnp.float32), labels)
    return out


@register_task("se_resnet", schema=schema)
def se_resnet_task(config) -> Task:
    """SE-ResNet: one cross-entropy update per step; batch norm statistics are updated in
    the train step (returned as the network's new variables) and used in ``predict``.

    Config (:func:`schema`): model.{num_classes, preset | stage_sizes, width, bottleneck,
    cifar_stem; reduction, zero_init_last_bn, depth (cifar preset)}; loss.label_smoothing;
    optimizer (`jattn.train.optim`: adam, adamw, sgd); compute_dtype.
    predict: "output" (logits ``[B, num_classes]``).
    eval_metrics: :func:`classification_metrics`.
    """
    model = build_se_resnet(config.model, compute_dtype(config))
    smoothing = float(config.loss.label_smoothing)

    def loss(logits, batch):
        value = cross_entropy(logits, batch["label"], smoothing)
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return value, {"accuracy": acc}

    def predict(run, batch):
        return {"output": run()}

    def eval_metrics(outputs, batch):
        return classification_metrics(outputs["output"], batch["label"])

    return supervised_task("se_resnet", config, model, inputs=lambda b: (b["image"],), loss=loss, predict=predict,
                           fields=("label",), eval_metrics=eval_metrics)
