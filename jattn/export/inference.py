"""Inpainting with a trained checkpoint: images in, completed images out.

`Inpainter.from_checkpoint(path)` takes a training workdir (its latest checkpoint), one
checkpoint folder (`WORKDIR/checkpoints/<step>`; the model config is the one saved with
the checkpoint) or a `jattn export --format jax-export` file (no jattn model code runs). Images of any size are padded by reflection to the model's multiple (8)
and cropped back; the result keeps every known pixel of the input exactly (prediction in
the hole, the input's own values elsewhere). Files are read as RGB (RGBA drops alpha,
grayscale and palette images are converted, 16-bit images scaled to 8 bits) and written
under a temporary name, then renamed, so a failed run leaves no partial output.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

__all__ = ["InferenceError", "InpaintError", "Inpainter", "restore_trained", "read_image", "read_mask", "write_image",
           "inpaint_file", "inpaint_files"]

MULTIPLE = 8  # DeepFill downsamples 3 times


class InferenceError(ValueError):
    """Bad input for inference: the message names the file and the problem."""


class InpaintError(InferenceError):
    """Bad input for inpainting: the message names the file and the problem."""


# --------------------------------------------------------------------------- files


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image file of any common mode."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise InpaintError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr[..., :3]
            return np.asarray(img.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InpaintError(f"{path}: not a readable image ({err})") from None


def read_mask(path: str | pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] hole mask from a mask image: white (> 127) = hole; must match `size`."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise InpaintError(f"{path}: mask not found")
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InpaintError(f"{path}: not a readable mask image ({err})") from None
    if arr.shape != tuple(size):
        raise InpaintError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {size[1]}x{size[0]}")
    return arr > 127


def write_image(path: str | pathlib.Path, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3] atomically (temporary name, then rename)."""
    from PIL import Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InpaintError(f"{path}: unknown image extension {path.suffix!r}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- model


def _resolve_checkpoint(path: str | pathlib.Path, error=InpaintError) -> tuple[pathlib.Path, int | None]:
    """(workdir, step or None for latest) from a workdir or a checkpoint step folder."""
    path = pathlib.Path(path)
    if not path.exists():
        raise error(f"{path}: checkpoint not found")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name == "checkpoints":
        return path.parent, None
    raise error(f"{path}: not a jattn workdir or checkpoint folder (no checkpoints/ inside)")


def restore_trained(path: str | pathlib.Path, config=None, error=InpaintError):
    """(task, state, config) of a workdir (latest checkpoint) or a checkpoint step folder.

    The model config is the one saved with the checkpoint unless `config` is given; a
    config whose model does not match the checkpoint's parameters is an `error` naming both.
    """
    from jattn.train.checkpoint import Checkpointer
    from jattn.train.setup import restore_for_eval

    workdir, step = _resolve_checkpoint(path, error)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        saved = ckpt.restore_config(step)
    except Exception as err:  # noqa: BLE001
        raise error(f"{path}: cannot read the checkpoint's config ({err})") from None
    finally:
        ckpt.close()
    if config is None:
        if not saved:
            raise error(f"{path}: no checkpoint with a saved config")
        config = ml_collections.ConfigDict(saved)
    elif saved and saved.get("model") is not None:
        given = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
        if given.get("name") != saved["model"].get("name"):
            raise error(f"{path}: the config is for model {given.get('name')!r} but the checkpoint holds "
                        f"{saved['model'].get('name')!r}")
    try:
        task, state, _, _ = restore_for_eval(config, workdir, step)
    except FileNotFoundError as err:
        raise error(f"{path}: checkpoint does not restore ({err})") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path}: checkpoint does not match the config's model {dict(config.model)} ({first})") from None
    return task, state, config


def _export_metadata(path: pathlib.Path) -> dict:
    """The `<export>.json` written beside a jax-export artifact ({} if absent)."""
    import json

    meta_path = pathlib.Path(str(path) + ".json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise InpaintError(f"{meta_path}: unreadable export metadata ({err})") from None


class Inpainter:
    """A restored generator: `inpainter(image uint8 [H, W, 3], hole bool [H, W]) -> uint8 [H, W, 3]`.

    `run(image [N, H', W', 3] in [-1, 1], mask [N, H', W', 1]) -> {name: [N, h, w, C]}`
    is the model at a padded size: H', W' multiples of `multiple`, or exactly `fixed_size`
    (an export of one size). "output" is the composite; a checkpoint also gives "flow",
    "coarse", ... (the task's outputs), an export only "output". `params` / `variables`:
    the restored networks (None for an export).
    """

    def __init__(self, run, config, *, multiple: int = MULTIPLE, fixed_size: tuple[int, int] | None = None,
                 source: str = "", params: dict | None = None, variables: dict | None = None):
        self.config, self.params, self.variables = config, params, variables
        self.multiple, self.fixed_size, self.source = multiple, fixed_size, source
        self._run = run

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path, config=None) -> Inpainter:
        """From a workdir, a checkpoint folder or a jax-export file (`jattn export --format
        jax-export`); `config` (optional, not for exports) replaces the saved one."""
        if pathlib.Path(path).is_file():
            if config is not None:
                raise InpaintError(f"{path}: an export carries its model; --config applies to checkpoints only")
            return cls.from_export(path)
        task, state, config = restore_trained(path, config, InpaintError)
        if "mask" not in task.fields:
            raise InpaintError(f"{path}: model {config.model.name!r} is not an inpainting model")
        predict = jax.jit(task.predict)
        params, variables = state.params, state.variables
        return cls(lambda x, m: predict(params, variables, {"image": x, "mask": m}), config, source=str(path),
                   params=params, variables=variables)

    @classmethod
    def from_export(cls, path: str | pathlib.Path) -> Inpainter:
        """From a `jax.export` artifact of the inpainting function (symbolic or fixed H, W)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise InpaintError(f"{path}: export not found")
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 - any failure here means "not a jax-export file"
            raise InpaintError(f"{path}: not a jattn workdir, checkpoint folder or jax-export file "
                               f"({type(err).__name__})") from None
        meta = _export_metadata(path)
        avals = exported.in_avals
        if len(avals) != 2 or len(avals[0].shape) != 4 or avals[0].shape[-1] != 3 or avals[1].shape[-1] != 1:
            raise InpaintError(f"{path}: a jax-export, but not of an inpainting function (image, mask) -> output "
                               f"(its inputs: {', '.join(str(a) for a in avals)})")
        if jax.default_backend() not in exported.platforms:
            raise InpaintError(f"{path}: exported for {', '.join(exported.platforms)}, not for this "
                               f"{jax.default_backend()} backend")
        _, h, w, _ = avals[0].shape
        fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        multiple = int(meta.get("multiple") or MULTIPLE)
        config = ml_collections.ConfigDict({"model": meta.get("model") or {}, "export": {**meta, "path": str(path)}})
        return cls(lambda x, m: {"output": exported.call(x, m)}, config, multiple=multiple, fixed_size=fixed,
                   source=str(path))

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        if self.fixed_size is None:
            return h + (-h) % self.multiple, w + (-w) % self.multiple
        fh, fw = self.fixed_size
        if h > fh or w > fw:
            raise InpaintError(f"{self.source}: this export takes images of at most {fw}x{fh} (fixed size), "
                               f"got {w}x{h}; export with spatial='any' or use the workdir")
        return fh, fw

    def predict_batch(self, images: np.ndarray, holes: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the model for same-size images: uint8 [N, H, W, 3], bool [N, H, W]
        -> name -> [N, h, w, C] float in [-1, 1], padded by reflection to the model's size
        and cropped back."""
        n, h, w = holes.shape
        th, tw = self._padded_size(h, w)
        ph, pw = th - h, tw - w
        mode = "reflect" if min(h, w) > max(ph, pw) else "symmetric"
        x = np.pad(images.astype(np.float32) / 127.5 - 1.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
        m = np.pad(holes.astype(np.float32), ((0, 0), (0, ph), (0, pw)))[..., None]
        out = self._run(jnp.asarray(x), jnp.asarray(m))
        return {k: np.asarray(v)[:, : h * v.shape[1] // th, : w * v.shape[2] // tw] for k, v in out.items()}

    def predict(self, image: np.ndarray, hole: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the model for one image ([H, W, C] float in [-1, 1]), unpadded."""
        return {k: v[0] for k, v in self.predict_batch(image[None], hole[None]).items()}

    def complete_batch(self, images: np.ndarray, holes: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] with the holes filled and every known pixel kept exactly."""
        pred = self.predict_batch(images, holes)["output"]
        pred = np.clip(np.round((pred + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return np.where(holes[..., None], pred, images)

    def __call__(self, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InpaintError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if hole.shape != image.shape[:2]:
            raise InpaintError(f"mask shape {hole.shape} does not match the image's {image.shape[:2]}")
        return self.complete_batch(image[None], hole[None])[0]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def inpaint_files(inpainter: Inpainter, triples, *, save_flow: bool = False, batch_size: int = 8, progress=None) -> list[pathlib.Path]:
    """Inpaint (image, mask, output) path triples: every input is read and checked first
    (nothing is written if one is bad), then images of equal size run in batches of
    `batch_size`. Outputs are written atomically; `<output>_flow` with `save_flow`."""
    loaded = []
    for image_path, mask_path, output_path in triples:
        image = read_image(image_path)
        loaded.append((image, read_mask(mask_path, image.shape[:2]), pathlib.Path(output_path)))
    groups: dict[tuple[int, int], list] = {}
    for item in loaded:
        groups.setdefault(item[0].shape[:2], []).append(item)
    written = []
    for items in groups.values():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = np.stack([c[0] for c in chunk])
            holes = np.stack([c[1] for c in chunk])
            outputs = inpainter.predict_batch(images, holes)
            if save_flow and "flow" not in outputs:  # found before anything is written
                raise InpaintError(f"{inpainter.source}: gives no attention flow picture (an export holds only "
                                   "the composite; models without contextual attention have none): drop --save-flow")
            pred = _to_uint8(outputs["output"])
            completed = np.where(holes[..., None], pred, images)
            for i, (_, _, out) in enumerate(chunk):
                write_image(out, completed[i])
                written.append(out)
                if save_flow and "flow" in outputs:
                    flow_path = out.with_name(out.stem + "_flow" + out.suffix)
                    write_image(flow_path, _to_uint8(outputs["flow"][i]))
                    written.append(flow_path)
            if progress is not None:
                progress(len(chunk))
    return written


def inpaint_file(inpainter: Inpainter, image_path, mask_path, output_path, *, save_flow: bool = False) -> pathlib.Path:
    """Inpaint one file; returns the output path. Nothing is written on error."""
    return inpaint_files(inpainter, [(image_path, mask_path, output_path)], save_flow=save_flow)[0]


def inpaint(params_or_path: Any, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Python API: `jattn.inpaint(workdir_or_inpainter, uint8 [H, W, 3], mask [H, W]) -> uint8 [H, W, 3]`."""
    inpainter = params_or_path if isinstance(params_or_path, Inpainter) else Inpainter.from_checkpoint(params_or_path)
    return inpainter(np.asarray(image, np.uint8), np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask))
