"""RCAN super-resolution: L1 between ``model(lowres)`` and the high-res image."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn import metrics as M
from jattn.models.rcan import DIV2K_RGB_MEAN, RCAN, init_rcan
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._supervised import supervised_schema, supervised_task

__all__ = ["rcan_task", "schema", "sr_metrics", "quantize_8bit", "upscale_bicubic", "PSNR_CAP"]

#: Per-image Y-PSNR cap in dB (identical images would give +inf, which poisons means).
PSNR_CAP = 100.0


def quantize_8bit(x: jax.Array) -> jax.Array:
    """Clip to [-1, 1] and round to the 256 levels of an 8-bit image (still on [-1, 1])."""
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def upscale_bicubic(lowres: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bicubic upscaling (``jax.image.resize``, Keys a = -0.5, MATLAB's kernel) to ``size``,
    clipped to [-1, 1]: ``[B, h, w, 3] -> [B, H, W, 3]``."""
    b, _, _, c = lowres.shape
    return jnp.clip(jax.image.resize(lowres.astype(jnp.float32), (b, *size, c), "bicubic"), -1.0, 1.0)


def sr_metrics(pred: jax.Array, target: jax.Array, scale: int, prefix: str = "") -> dict[str, jax.Array]:
    """Batch means of the super-resolution benchmark metrics of ``pred`` against ``target``
    (both ``[B, H, W, 3]`` in [-1, 1]).

    Both are quantised to 8 bits (:func:`quantize_8bit`, as the official evaluation does),
    converted to MATLAB's BT.601 luma (:func:`jattn.metrics.rgb_to_y`, 16..235), shaved by
    ``scale`` pixels on each border, then scored with ``data_range = 255``. Per-image PSNR is
    capped at :data:`PSNR_CAP` dB.

    Returns: ``{prefix + "psnr_y", prefix + "ssim_y"}``.
    """
    y_pred = M.shave(M.rgb_to_y(quantize_8bit(pred)), scale)
    y_true = M.shave(M.rgb_to_y(quantize_8bit(target)), scale)
    psnr = jnp.minimum(M.psnr(y_pred, y_true, data_range=255.0), PSNR_CAP)
    return {prefix + "psnr_y": jnp.mean(psnr), prefix + "ssim_y": jnp.mean(M.ssim(y_pred, y_true, data_range=255.0))}


def schema():
    """RCAN's config keys with the paper's defaults (no loss settings: L1 only)."""
    return supervised_schema({
        "scale": None,  # None: data.scale (when set, it must equal data.scale)
        "n_resgroups": 10,
        "n_resblocks": 20,
        "n_feats": 64,
        "reduction": 16,
        "non_local": False,
        "res_scale": 1.0,
        "rgb_mean": DIV2K_RGB_MEAN,  # subtracted from the input, added to the output; None: no mean shift
    })


def _scale(config) -> int:
    scale, model_scale = config.data.scale, config.model.scale
    if scale is None:
        raise ValueError("the rcan task needs config.data.scale (the super-resolution factor)")
    if model_scale is not None and int(model_scale) != int(scale):
        raise ValueError(f"config.model.scale={model_scale} differs from config.data.scale={scale}")
    return int(scale)


@register_task("rcan", schema=schema)
def rcan_task(config) -> Task:
    """RCAN: one L1 update per step on ("image", "lowres") batches.

    Initialisation: :func:`jattn.models.rcan.init_rcan` (PyTorch's conv variance).
    Config (:func:`schema`): data.scale; model.{n_resgroups, n_resblocks, n_feats, reduction, non_local,
    res_scale, rgb_mean (None: no mean shift)}; optimizer (Adam; paper: lr 1e-4, betas
    0.9 / 0.999, halved every 200k steps); compute_dtype.
    predict: "output" (the upscaled image, clipped to [-1, 1]), "bicubic" (bicubic
    upscaling of "lowres", the baseline), "target" (the high-res image).
    eval_metrics: :func:`sr_metrics` of "output" (``psnr_y``, ``ssim_y``) and of "bicubic"
    (``bicubic_psnr_y``, ``bicubic_ssim_y``).
    """
    m, scale = config.model, _scale(config)
    model = RCAN(
        scale,
        n_resgroups=int(m.n_resgroups),
        n_resblocks=int(m.n_resblocks),
        n_feats=int(m.n_feats),
        reduction=int(m.reduction),
        non_local=bool(m.non_local),
        res_scale=float(m.res_scale),
        rgb_mean=None if m.rgb_mean is None else tuple(float(v) for v in m.rgb_mean),
        dtype=compute_dtype(config),
    )

    def inputs(batch):
        lowres = batch.get("lowres")
        if lowres is None:  # an example batch without the field (init): its shape from the image
            b, h, w, _ = batch["image"].shape
            lowres = jnp.zeros((b, h // scale, w // scale, 3), jnp.float32)
        return (lowres,)

    def loss(output, batch):
        l1 = jnp.mean(jnp.abs(output - batch["image"]))
        return l1, {"l1_loss": l1}

    def predict(run, batch):
        size = batch["image"].shape[1:3]
        return {
            "output": jnp.clip(run(), -1.0, 1.0),
            "bicubic": upscale_bicubic(batch["lowres"], size),
            "target": batch["image"],
        }

    def eval_metrics(outputs, batch):
        return {
            **sr_metrics(outputs["output"], batch["image"], scale),
            **sr_metrics(outputs["bicubic"], batch["image"], scale, prefix="bicubic_"),
        }

    return supervised_task("rcan", config, model, inputs=inputs, loss=loss, predict=predict, fields=("lowres",),
                           eval_metrics=eval_metrics, train_arg=None,
                           init_variables=functools.partial(init_rcan, model))
