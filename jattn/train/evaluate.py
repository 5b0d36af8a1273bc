"""Evaluation on a fixed set: the same images (and the same hashed masks) every time.

The eval images are the first `config.eval_images` examples of the eval source (centre
crops, in order) with the task's fields (labels, low-res inputs, segmentation maps). For
inpainting, example i gets mask i of the eval mask set, built from `config.data.eval_mask`
(default: the training masks) with a fixed seed and written to `WORKDIR/eval_masks/` with
its SHA-256, so every evaluation of every run with that config sees bit-identical masks.
Metrics: the task's `eval_metrics(outputs, batch)` averaged over the set; by default the
inpainting ones (PSNR, SSIM, L1, L2, TV, and L1 inside the hole of "output" against
"image"). A task with its own whole-set evaluation (`Task.evaluate`, e.g. FID) uses it.
Eval data that gives no eval batch (a source that cannot be made or holds no image, fewer
images than one batch, eval_images below one batch) is an `EvalDataError` naming the
source, raised before anything is written.

Image-to-image tasks (inpainting, super-resolution) add the distribution and perceptual
metrics of their outputs against the targets when the config names weight files (nothing
downloads; docs/metrics.md): `eval_inception_weights` gives `eval_fid` and `eval_kid` (FID
and KID of the FID Inception's pool features, outputs against targets, over the whole set),
`eval_lpips_weights` gives `eval_lpips` (the mean LPIPS distance, `eval_lpips_net`'s
backbone).

With `save_outputs=DIR` every evaluated example is written as PNG files too, so any tool
can score them: `DIR/NNNN_output.png` (the model's output: the completed image, the
super-resolved image, the coloured label map), `DIR/NNNN_target.png` and, for inpainting,
`DIR/NNNN_mask.png` (white = hole), NNNN the example's index in the eval set. Pixel values
in [-1, 1] become round((x + 1) * 127.5). The metrics reported are those of the float
outputs; computed from the files they agree up to this 8-bit rounding.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import metrics as M
from jattn.config import with_defaults
from jattn.train.sharding import to_global_array

__all__ = ["EVAL_MASK_SEED", "EvalDataError", "EvalMetricError", "SaveOutputsError", "check_eval_metrics", "eval_networks", "check_eval_data", "eval_mask_set", "eval_batches",
           "make_evaluator", "evaluate", "inpainting_metrics", "saved_images", "check_save_outputs"]

EVAL_MASK_SEED = 20181  # fixed: eval masks never depend on the training seed


class EvalDataError(ValueError):
    """The eval data gives no eval batch; the message is one line naming the source (its
    config key and kind, and a folder's path or a dataset's name)."""


class EvalMetricError(ValueError):
    """A metric the config asks for that cannot be computed (a weight file that is missing
    or wrong, images too small for the network); the message is one line."""


class SaveOutputsError(ValueError):
    """Evaluation outputs that cannot be saved as images (the task has none, or the folder
    cannot be written); the message is one line."""


def _plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else x


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _where(config) -> str:
    """The eval source as the config gives it, e.g. `data.eval_source (folder /x)`."""
    key = "data.eval_source" if config.data.eval_source is not None else "data.source"
    spec = _plain(config.data.eval_source or config.data.source)
    if not isinstance(spec, dict):
        return f"{key} ({type(spec).__name__})"
    named = [str(spec[k]) for k in ("root", "name", "split") if spec.get(k) is not None]
    return f"{key} ({' '.join([str(spec.get('kind')), *named])})"


def _eval_batch_size(config) -> int:
    return int(config.eval_batch_size or config.batch_size)


def check_eval_data(config):
    """The eval source of `config`, made (nothing is read but its index: a folder's file
    names, a TFDS dataset's info) and checked to hold at least one eval batch; an
    `EvalDataError` naming it otherwise, or when eval_images is less than one batch."""
    from jattn.data import source_from_config

    config = with_defaults(config)
    batch, n = _eval_batch_size(config), int(config.eval_images)
    if n < batch:
        raise EvalDataError(f"eval_images={n} is less than one eval batch ({batch}): there is nothing to evaluate")
    if config.data.eval_mask is not None:  # a mask spec that cannot be parsed, before anything is written
        from jattn.data.masks import parse_mask_spec

        try:
            parse_mask_spec(_plain(config.data.eval_mask))
        except ValueError as err:
            raise EvalDataError(f"data.eval_mask: {_first_line(err)}") from None
    spec = _plain(config.data.eval_source or config.data.source)
    if spec is None:
        raise EvalDataError("no eval data: data.source and data.eval_source are not set")
    try:
        source = source_from_config(spec) if isinstance(spec, dict) else spec
    except (ValueError, OSError) as err:
        raise EvalDataError(f"eval data {_where(config)}: {_first_line(err)}") from None
    if hasattr(source, "__len__") and len(source) < batch:
        raise EvalDataError(f"eval data {_where(config)}: {len(source)} image(s), fewer than one eval batch "
                            f"({batch})")
    return source


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
    set's masks for inpainting). The data is checked (`check_eval_data`) and its pipeline
    made at once, the batches read as they are iterated; an `EvalDataError` naming the
    source where there is none to read."""
    from jattn.data import make_dataset
    from jattn.data.detection import DETECTION_KEYS
    from jattn.data.sharding import per_process_batch_size

    config = with_defaults(config)
    source = check_eval_data(config)
    d = config.data
    mask = d.eval_mask or d.mask
    n = int(config.eval_images)
    batch = per_process_batch_size(_eval_batch_size(config), jax.process_count())
    try:
        it = make_dataset(
            source,
            loader="grain",
            image_size=d.image_size,
            batch_size=batch,
            mask_spec=_plain(mask) if "mask" in fields else None,
            fields=tuple(fields),
            scale=d.scale,
            max_boxes=d.max_boxes,
            resize_shorter=d.eval_resize_shorter,
            seed=config.seed,
            mask_seed=EVAL_MASK_SEED,
            train=False,
            num_epochs=1,
            drop_remainder=True,
        )
    except (ValueError, OSError) as err:  # e.g. no readable image
        raise EvalDataError(f"eval data {_where(config)}: {_first_line(err)}") from None
    per_process = n // jax.process_count()

    def batches():
        seen = 0
        for b in it:
            if seen + len(b["image"]) > per_process:  # keep global batches whole
                break
            # mask index = source index, so these are the eval set's masks (checked by the data tests)
            yield {k: b[k] for k in ("image", *fields, *(DETECTION_KEYS if "boxes" in fields else ()))}
            seen += len(b["image"])
        if not seen:
            raise EvalDataError(f"eval data {_where(config)}: no eval batch of {batch} readable images")

    return batches()


def inpainting_metrics(outputs: dict, batch: dict) -> dict[str, jax.Array]:
    """PSNR, SSIM, L1, L2, TV of outputs["output"] against batch["image"], and the L1
    inside the hole."""
    output = outputs["output"].astype(jnp.float32)
    out = M.summarize(output, batch["image"])
    out["l1_hole"] = jnp.mean(M.l1(output, batch["image"], mask=batch["mask"]))
    return out


def _to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8 round((x + 1) * 127.5), clipped."""
    return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def saved_images(outputs: dict, batch: dict) -> dict[str, jax.Array]:
    """The images `--save-outputs` writes per example, uint8 `[B, H, W, C]`: "output" (the
    task's "labels" picture if it has one, else its "output"), "target" (its "target", else
    the batch's "image") and "mask" (inpainting: 255 = hole). A `SaveOutputsError` when
    the output is not an image batch (1 or 3 channels, the target's size)."""
    output = outputs.get("labels", outputs.get("output"))
    target = outputs.get("target", batch["image"])
    if output is None or output.ndim != 4 or output.shape[-1] not in (1, 3) or output.shape[:3] != target.shape[:3]:
        shape = None if output is None else tuple(output.shape)
        raise SaveOutputsError(f"--save-outputs writes images, and this model's output (shape {shape}) is not an "
                               "image of the target's size")
    out = {"output": _to_uint8(output), "target": _to_uint8(target)}
    if "mask" in batch:
        out["mask"] = (jnp.round(batch["mask"].astype(jnp.float32)) * 255).astype(jnp.uint8)
    return out


def check_save_outputs(directory: str | os.PathLike) -> pathlib.Path:
    """`directory` as a Path when the outputs can be saved there (it does not exist, or is an
    empty folder, and its parent can be written); a `SaveOutputsError` saying why not."""
    from jattn._paths import write_problem

    directory = pathlib.Path(directory)
    problem = write_problem(directory, folder=True)
    if problem is None and directory.is_dir() and any(directory.iterdir()):
        problem = "the folder is not empty"
    if problem is not None:
        raise SaveOutputsError(f"cannot save outputs to {directory}: {problem}")
    return directory


class _ImageWriter:
    """Writes `saved_images` batches into a temporary folder beside `directory` and moves
    it into place when every example is written (`finish`), so a failed evaluation leaves
    no partial folder (`abort`)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.count = 0

    def write(self, images: dict[str, np.ndarray]) -> None:
        from PIL import Image

        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            for i in range(len(images["output"])):
                for name, batch in images.items():
                    picture = batch[i][..., 0] if batch.shape[-1] == 1 else batch[i]
                    buffer = io.BytesIO()
                    Image.fromarray(picture).save(buffer, format="PNG")
                    (self.tmp / f"{self.count:04d}_{name}.png").write_bytes(buffer.getvalue())
                self.count += 1
        except OSError as err:
            self.abort()
            raise SaveOutputsError(f"cannot save outputs to {self.directory}: {err.strerror or err}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            (self.tmp / name).write_bytes(data)
        except OSError as err:
            self.abort()
            raise SaveOutputsError(f"cannot save outputs to {self.directory}: {err.strerror or err}") from None

    def finish(self) -> None:
        try:
            if self.directory.is_dir():
                self.directory.rmdir()  # checked empty before the evaluation
            self.tmp.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, self.directory)
        except OSError as err:
            self.abort()
            raise SaveOutputsError(f"cannot save outputs to {self.directory}: {err.strerror or err}") from None

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _output_and_target(outputs: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The model's image output and its target ([B, H, W, 3] in [-1, 1]) for FID, KID, LPIPS."""
    output = outputs.get("output")
    target = outputs.get("target", batch["image"])
    if output is None or output.ndim != 4 or output.shape != target.shape or output.shape[-1] != 3:
        shape = None if output is None else tuple(output.shape)
        raise EvalMetricError(f"FID, KID and LPIPS compare RGB outputs with their targets, and this model's output "
                              f"(shape {shape}) is not one")
    return output.astype(jnp.float32), target.astype(jnp.float32)


def _gathered(x: jax.Array) -> np.ndarray:
    """Every process's rows of a global array, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_images(images: dict) -> dict[str, np.ndarray]:
    """Every process's examples of a global batch, on every process, as numpy."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in jax.device_get(images).items()}
    from jax.experimental import multihost_utils

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(images, tiled=True).items()}


def eval_networks(config) -> tuple[Any, Any]:
    """(inception, lpips) of the config's weight files, each None when not configured:
    `inception(images) -> (pool [B, 2048], logits)`, `lpips(a, b) -> [B]`, images in
    [-1, 1]. An `EvalMetricError` naming the key when a file is missing or wrong, or when
    the images are smaller than LPIPS's network takes."""
    from jattn import gan_metrics, lpips

    config = with_defaults(config)

    def load(key, make):
        try:
            return make() if config[key] else None
        except (OSError, ValueError) as err:
            raise EvalMetricError(f"{key}: {_first_line(err)}") from None

    def lpips_net():
        size = config.data.image_size
        smallest = min(size) if isinstance(size, (list, tuple)) else int(size)
        minimum = lpips.lpips_min_size(config.eval_lpips_net)
        if smallest < minimum:
            raise ValueError(f"images of {size} px are smaller than LPIPS {config.eval_lpips_net}'s {minimum} px")
        return lpips.lpips_network(config.eval_lpips_weights, config.eval_lpips_net)

    return (load("eval_inception_weights", lambda: gan_metrics.inception_network(config.eval_inception_weights)),
            load("eval_lpips_weights", lpips_net))


def check_eval_metrics(config) -> None:
    """`eval_networks` loaded once (and cached), so that a bad weight file is reported
    before a run writes anything."""
    eval_networks(config)


def _distribution_metrics(fake: list, real: list) -> dict[str, float]:
    """FID and KID of Inception pool features [N, 2048] of outputs (`fake`) and targets."""
    from jattn import gan_metrics

    fake, real = np.concatenate(fake).astype(np.float64), np.concatenate(real).astype(np.float64)
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (fake, real)]
    kid, _ = gan_metrics.kernel_inception_distance(fake, real, subset_size=min(1000, len(fake)))
    return {"fid": gan_metrics.frechet_distance(*stats[0], *stats[1]), "kid": kid}


def make_evaluator(task, config, mesh, workdir: str | pathlib.Path, save_outputs: str | os.PathLike | None = None):
    """`evaluator(state) -> dict`: the metrics of `evaluate`, with the metric program
    compiled once (at its first call) for every later evaluation of the run, and the eval
    mask set built and hashed once. With `save_outputs`, each call also writes the eval
    set's images there (module docstring); process 0 writes them."""
    config = with_defaults(config)
    if getattr(task, "evaluate", None) is not None:
        folder = None if save_outputs is None else check_save_outputs(save_outputs)

        def whole_set(state):
            result = task.evaluate(state, config, mesh, eval_batches(config, task.fields), save_outputs=folder)
            return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()}

        return whole_set
    check_eval_data(config)  # before the eval masks are written
    mask_set = eval_mask_set(config, workdir) if "mask" in task.fields else None
    metric_fn = task.eval_metrics or inpainting_metrics
    directory = None if save_outputs is None else check_save_outputs(save_outputs)
    inception, lpips_net = eval_networks(config)

    def metrics_and_images(params, variables, batch):
        outputs = task.predict(params, variables, batch)
        pair = _output_and_target(outputs, batch) if inception is not None or lpips_net is not None else ()
        return metric_fn(outputs, batch), (saved_images(outputs, batch) if directory is not None else {}), pair

    batch_metrics = jax.jit(metrics_and_images)

    def per_batch_means(state):
        totals: dict[str, float] = {}
        count = 0
        writer = _ImageWriter(directory) if directory is not None and jax.process_index() == 0 else None
        fake: list[np.ndarray] = []
        real: list[np.ndarray] = []
        try:
            for host in eval_batches(config, task.fields):
                batch = to_global_array(host, mesh)
                size = batch["image"].shape[0]
                metrics, images, pair = batch_metrics(state.params, state.variables, batch)
                metrics = dict(jax.device_get(metrics))
                if pair:
                    if lpips_net is not None:
                        metrics["lpips"] = float(jnp.mean(lpips_net(*pair)))
                    if inception is not None:
                        for features, image in zip((fake, real), pair):
                            features.append(_gathered(inception(image)[0]))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * size
                if directory is not None:
                    images = _host_images(images)  # every process takes part in the gather
                    if writer is not None:
                        writer.write(images)
                count += size
            if count == 0:  # eval_batches says why first
                raise EvalDataError(f"eval data {_where(config)}: evaluation saw no images")
            if writer is not None:
                writer.finish()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        result = {f"eval_{k}": v / count for k, v in totals.items()}
        if inception is not None:
            result.update({f"eval_{k}": v for k, v in _distribution_metrics(fake, real).items()})
        result["eval_images"] = count
        if mask_set is not None:
            result["eval_masks_sha256"] = mask_set.sha256
        return result

    return per_batch_means


def evaluate(task, state, config, mesh, workdir: str | pathlib.Path,
             save_outputs: str | os.PathLike | None = None) -> dict[str, Any]:
    """Mean metrics over the eval set (`eval_` prefixed), plus the mask set's SHA-256; with
    `save_outputs`, the eval set's images written there (module docstring)."""
    return make_evaluator(task, config, mesh, workdir, save_outputs)(state)
