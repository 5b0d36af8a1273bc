"""Super-resolution with a trained checkpoint: `jattn upscale` and `Upscaler`.

`Upscaler.from_checkpoint(path)` restores a super-resolution model (a task with the
"lowres" field, e.g. RCAN) from a workdir or a checkpoint folder; `upscaler(image)` maps a
uint8 [H, W, 3] image to uint8 [s*H, s*W, 3]. Large images can be processed in tiles
(`tile` low-res pixels a side, `overlap` pixels of context on each side that are computed
and dropped), which bounds memory; tiles of one size share one compiled function. Files
are read as RGB like `jattn inpaint` and written atomically. Running out of memory is an
`UpscaleError` naming `--tile` (`tile=`), never a traceback.

`upscale(path, image)` is the one-call Python API; module state: `LOADED`, the last two
models it loaded (a bounded cache, as `jattn.inpaint`'s), so repeated calls neither restore
nor compile again.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jattn.export.inference import (InferenceError, LoadedModels, _first_line, _is_out_of_memory, _on_one_device,
                                    check_outputs, checkpoint_identity, read_image, restore_trained, write_image)

__all__ = ["UpscaleError", "Upscaler", "upscale_files", "upscale", "LOADED"]


class UpscaleError(InferenceError):
    """Bad input for upscaling: the message names the file and the problem."""


class Upscaler:
    """A restored super-resolution model: `upscaler(uint8 [H, W, 3]) -> uint8 [sH, sW, 3]`.

    The model is compiled once per input (tile) size and kept with the instance."""

    def __init__(self, task, params: dict, variables: dict, config, source: str = ""):
        self.config, self.source = config, source
        self.scale = int(config.data.scale)
        self._params, self._variables = params, variables
        self._predict = jax.jit(task.predict)

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path, config=None) -> Upscaler:
        task, state, config = restore_trained(path, config, UpscaleError)
        if "lowres" not in task.fields or not config.data.get("scale"):
            raise UpscaleError(f"{path}: model {config.model.name!r} is not a super-resolution model")
        return cls(task, _on_one_device(state.params), _on_one_device(state.variables), config, str(path))

    def _run(self, lowres: np.ndarray) -> np.ndarray:
        """float [N, h, w, 3] in [-1, 1] -> float [N, s*h, s*w, 3]."""
        n, h, w, _ = lowres.shape
        s = self.scale
        batch = {"lowres": jnp.asarray(lowres), "image": jnp.zeros((n, h * s, w * s, 3), jnp.float32)}
        try:
            return np.asarray(self._predict(self._params, self._variables, batch)["output"], np.float32)
        except Exception as err:
            if not _is_out_of_memory(err):
                raise
            raise UpscaleError(f"{self.source}: out of memory upscaling {w}x{h} pixels at once ({_first_line(err)}); "
                               "process it in (smaller) tiles with --tile (tile=), e.g. --tile 256") from None

    def upscale_array(self, lowres: np.ndarray, tile: int | None = None, overlap: int = 8) -> np.ndarray:
        """float [N, h, w, 3] in [-1, 1] -> [N, s*h, s*w, 3], whole or in tiles."""
        n, h, w, _ = lowres.shape
        if tile is None or (h <= tile and w <= tile):
            return self._run(lowres)
        if tile <= 0 or overlap < 0:
            raise UpscaleError(f"tile must be positive and overlap >= 0, got {tile}, {overlap}")
        s = self.scale
        out = np.zeros((n, h * s, w * s, 3), np.float32)
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                # the tile plus `overlap` context pixels, shifted inward at the borders so
                # every tile has the same size (one compiled shape)
                th, tw = min(tile + 2 * overlap, h), min(tile + 2 * overlap, w)
                y0 = min(max(top - overlap, 0), h - th)
                x0 = min(max(left - overlap, 0), w - tw)
                up = self._run(lowres[:, y0 : y0 + th, x0 : x0 + tw])
                y1, x1 = min(top + tile, h), min(left + tile, w)
                out[:, top * s : y1 * s, left * s : x1 * s] = up[:, (top - y0) * s : (y1 - y0) * s,
                                                                  (left - x0) * s : (x1 - x0) * s]
        return out

    def __call__(self, image: np.ndarray, tile: int | None = None, overlap: int = 8) -> np.ndarray:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise UpscaleError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        x = image.astype(np.float32)[None] / 127.5 - 1.0
        y = self.upscale_array(x, tile, overlap)[0]
        return np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale_files(upscaler: Upscaler, pairs, *, tile: int | None = None, overlap: int = 8,
                  progress=None) -> list[pathlib.Path]:
    """Upscale (input, output) path pairs: every output path is checked and every input read
    first (nothing is written when one is bad), then each is upscaled and written atomically."""
    pairs = list(pairs)
    check_outputs([dst for _, dst in pairs], UpscaleError)
    loaded = [(read_image(src), pathlib.Path(dst)) for src, dst in pairs]
    written = []
    for image, dst in loaded:
        write_image(dst, upscaler(image, tile, overlap), UpscaleError)
        written.append(dst)
        if progress is not None:
            progress(1)
    return written


# The models `upscale` loaded from paths (module state: bounded, see LoadedModels).
LOADED = LoadedModels(size=2)


def upscale(path_or_upscaler, image: np.ndarray, *, tile: int | None = None, overlap: int = 8) -> np.ndarray:
    """Python API: `upscale(workdir_or_upscaler, uint8 [H, W, 3]) -> uint8 [sH, sW, 3]`
    (`tile`, `overlap`: see `Upscaler.upscale_array`). A path is loaded once: the last
    `LOADED.size` models stay loaded with their compiled programs, keyed by the checkpoint
    the path resolves to (`checkpoint_identity`: a newer checkpoint is loaded anew)."""
    if isinstance(path_or_upscaler, Upscaler):
        upscaler = path_or_upscaler
    else:
        key = checkpoint_identity(path_or_upscaler, UpscaleError)
        upscaler = LOADED.get(key, lambda: Upscaler.from_checkpoint(path_or_upscaler))
    return upscaler(np.asarray(image, np.uint8), tile, overlap)
