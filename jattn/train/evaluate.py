"""Evaluation on a fixed set: the same images (and the same hashed masks) every time.

The eval images are the first `config.eval_images` examples of the eval source (centre
crops, in order) with the task's fields (labels, low-res inputs, segmentation maps). For
inpainting, example i gets mask i of the eval mask set, built from `config.data.eval_mask`
(default: the training masks) with a fixed seed and written to `WORKDIR/eval_masks/` with
its SHA-256, so every evaluation of every run with that config sees bit-identical masks.
Metrics: the task's `eval_metrics(outputs, batch)` averaged over the set; by default the
inpainting ones (PSNR, SSIM, L1, L2, TV, and L1 inside the hole of "output" against
"image"). A task with its own whole-set evaluation (`Task.evaluate`, e.g. FID) uses it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import metrics as M
from jattn.config import with_defaults
from jattn.train.sharding import to_global_array

__all__ = ["EVAL_MASK_SEED", "eval_mask_set", "eval_batches", "make_evaluator", "evaluate", "inpainting_metrics"]

EVAL_MASK_SEED = 20181  # fixed: eval masks never depend on the training seed


def _plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else x


def eval_mask_set(config, workdir: str | pathlib.Path):
    """The hashed eval mask set of this config (built once, then reloaded and verified)."""
    from jattn.data.masks import eval_set

    config = with_defaults(config)
    d = config.data
    spec = _plain(d.eval_mask or d.mask)
    return eval_set(
        "eval", int(config.eval_images), d.image_size, EVAL_MASK_SEED,
        directory=pathlib.Path(workdir) / "eval_masks", spec=spec,
    )


def eval_batches(config, fields=("mask",)):
    """Host batches of this process: images in order, with the task's fields (the eval
    set's masks for inpainting)."""
    from jattn.data import make_dataset
    from jattn.data.sharding import per_process_batch_size

    config = with_defaults(config)
    d = config.data
    mask = d.eval_mask or d.mask
    n = int(config.eval_images)
    batch = per_process_batch_size(int(config.eval_batch_size or config.batch_size), jax.process_count())
    it = make_dataset(
        _plain(d.eval_source or d.source),
        loader="grain",
        image_size=d.image_size,
        batch_size=batch,
        mask_spec=_plain(mask) if "mask" in fields else None,
        fields=tuple(fields),
        scale=d.scale,
        seed=config.seed,
        mask_seed=EVAL_MASK_SEED,
        train=False,
        num_epochs=1,
        drop_remainder=True,
    )
    per_process = n // jax.process_count()
    seen = 0
    for b in it:
        if seen + len(b["image"]) > per_process:  # keep global batches whole
            break
        # mask index = source index, so these are the eval set's masks (checked by the data tests)
        yield {k: b[k] for k in ("image", *fields)}
        seen += len(b["image"])


def inpainting_metrics(outputs: dict, batch: dict) -> dict[str, jax.Array]:
    """PSNR, SSIM, L1, L2, TV of outputs["output"] against batch["image"], and the L1
    inside the hole."""
    output = outputs["output"].astype(jnp.float32)
    out = M.summarize(output, batch["image"])
    out["l1_hole"] = jnp.mean(M.l1(output, batch["image"], mask=batch["mask"]))
    return out


def make_evaluator(task, config, mesh, workdir: str | pathlib.Path):
    """`evaluator(state) -> dict`: the metrics of `evaluate`, with the metric program
    compiled once (at its first call) for every later evaluation of the run, and the eval
    mask set built and hashed once."""
    config = with_defaults(config)
    if getattr(task, "evaluate", None) is not None:
        def whole_set(state):
            result = task.evaluate(state, config, mesh, eval_batches(config, task.fields))
            return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()}

        return whole_set
    mask_set = eval_mask_set(config, workdir) if "mask" in task.fields else None
    metric_fn = task.eval_metrics or inpainting_metrics
    batch_metrics = jax.jit(lambda params, variables, batch: metric_fn(task.predict(params, variables, batch), batch))

    def per_batch_means(state):
        totals: dict[str, float] = {}
        count = 0
        for host in eval_batches(config, task.fields):
            batch = to_global_array(host, mesh)
            size = batch["image"].shape[0]
            for k, v in jax.device_get(batch_metrics(state.params, state.variables, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v) * size
            count += size
        if count == 0:
            raise ValueError("evaluation saw no images: eval_images must be at least the eval batch size")
        result = {f"eval_{k}": v / count for k, v in totals.items()}
        result["eval_images"] = count
        if mask_set is not None:
            result["eval_masks_sha256"] = mask_set.sha256
        return result

    return per_batch_means


def evaluate(task, state, config, mesh, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Mean metrics over the eval set (`eval_` prefixed), plus the mask set's SHA-256."""
    return make_evaluator(task, config, mesh, workdir)(state)
