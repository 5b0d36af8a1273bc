"""Offline demos: the main job (train, then inpaint) and contextual attention on a photo.

`run_main_demo`: the embedded default run. Trains DeepFill v1 with
`configs/demo.py` (64x64 crops of scikit-image's bundled photos) into a
workdir, then fills a hole in a bundled photo with the trained checkpoint through the same
inference path as `jattn inpaint`.

`run_demo` (attention only, no training):

Fills a rectangular hole in one of scikit-image's bundled photos in two steps, the way
DeepFill's coarse-to-fine network uses the op but without a trained network:
  1. coarse: diffuse the known pixels into the hole (repeated masked 3x3 averaging);
  2. fine: contextual attention with f = b = the coarse image, so each hole cell is
     rebuilt from the best-matching known patches (rate 2, as in DeepFill v1).
Writes the masked input, the coarse fill, the attention fill and the attention flow picture.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn.ops.contextual import contextual_attention
from jattn.ops.flow import flow_to_color

__all__ = ["diffuse_fill", "attention_fill", "run_demo", "run_main_demo", "default_demo_config"]


def diffuse_fill(image: jax.Array, mask: jax.Array, iterations: int = 200) -> jax.Array:
    """Fill the hole by repeated averaging of the 3x3 neighbourhood.

    image: [B, H, W, C] in [-1, 1]; mask: [B, H, W, 1], 1 = hole. Known pixels are kept.
    """
    known = 1.0 - mask
    kernel = jnp.ones((3, 3, 1, 1), image.dtype)

    def blur(x):
        depthwise = jnp.tile(kernel, (1, 1, 1, x.shape[-1]))
        return jax.lax.conv_general_dilated(
            x, depthwise, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
        )

    def step(_, state):
        value, weight = state
        s, wsum = blur(value * weight), blur(weight)
        new_weight = jnp.maximum(weight, (wsum > 0).astype(weight.dtype))
        new_value = jnp.where(weight > 0, value, s / jnp.maximum(wsum, 1e-6))
        return new_value, new_weight

    filled, _ = jax.lax.fori_loop(0, iterations, step, (image * known, known))
    return filled * mask + image * known


def attention_fill(coarse: jax.Array, mask: jax.Array, *, rate: int = 2, block_size: int | None = None):
    """Rebuild the hole from known patches: ([B, H, W, C] composite, offsets [B, H/r, W/r, 2])."""
    y, offsets = contextual_attention(coarse, coarse, mask, rate=rate, block_size=block_size)
    return y * mask + coarse * (1.0 - mask), offsets


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _psnr(a, b, mask) -> float:
    m = np.asarray(mask) > 0
    mse = float(np.mean((np.asarray(a)[np.broadcast_to(m, a.shape)] - np.asarray(b)[np.broadcast_to(m, b.shape)]) ** 2))
    return 10.0 * np.log10(4.0 / max(mse, 1e-12))  # values in [-1, 1]: peak-to-peak 2


def run_demo(output: str | pathlib.Path, *, photo: str = "astronaut", size: int = 256, block_size: int | None = None):
    """Run the demo and write PNGs to `output`; returns a dict of the numbers printed."""
    import skimage.data
    from PIL import Image

    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    raw = getattr(skimage.data, photo)()
    if raw.ndim == 2:
        raw = np.stack([raw] * 3, axis=-1)
    img = np.asarray(Image.fromarray(raw[..., :3]).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0
    image = jnp.asarray(img)[None]
    mask = np.zeros((1, size, size, 1), np.float32)
    top, left, hole = size * 3 // 8, size * 5 // 8, size // 5
    mask[:, top : top + hole, left : left + hole] = 1.0
    mask = jnp.asarray(mask)

    t0 = time.perf_counter()
    coarse = jax.jit(diffuse_fill)(image, mask)
    fill_fn = jax.jit(lambda c, m: attention_fill(c, m, block_size=block_size))
    fine, offsets = jax.block_until_ready(fill_fn(coarse, mask))
    seconds = time.perf_counter() - t0
    flow = flow_to_color(offsets, rate=2)

    pictures = {
        "input": image * (1.0 - mask) + mask,  # the hole shown white
        "coarse": coarse,
        "attention_fill": fine,
        "flow": flow,
    }
    for name, arr in pictures.items():
        Image.fromarray(_to_uint8(arr[0])).save(out / f"{name}.png")
    result = {
        "photo": photo,
        "size": size,
        "hole": [int(top), int(left), int(hole), int(hole)],
        "psnr_hole_coarse": round(_psnr(coarse, image, mask), 2),
        "psnr_hole_attention": round(_psnr(fine, image, mask), 2),
        "seconds": round(seconds, 2),
        "output": str(out),
    }
    return result


def default_demo_config() -> pathlib.Path:
    """`configs/demo.py` of the source tree this package was installed from."""
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the demo config ships with the source tree; pass --config"
        )
    return path


def run_main_demo(workdir, output, *, config_path=None, overrides=(), photo: str = "astronaut", size: int = 128):
    """Train the demo config into `workdir` (resuming it if present), then inpaint a photo.

    Writes `output/{input,mask,inpainted,flow}.png`; returns a dict of what it did.
    """
    import skimage.data
    from PIL import Image

    from jattn.config import load_config
    from jattn.export.inference import Inpainter, write_image
    from jattn.train.loop import train

    config = load_config(config_path or default_demo_config(), overrides)
    t0 = time.perf_counter()
    result = train(config, workdir)
    train_seconds = time.perf_counter() - t0

    raw = getattr(skimage.data, photo)()
    raw = np.stack([raw] * 3, axis=-1) if raw.ndim == 2 else raw[..., :3]
    image = np.asarray(Image.fromarray(raw).resize((size, size), Image.BICUBIC), np.uint8)
    hole = np.zeros((size, size), bool)
    hole[size * 3 // 8 : size * 5 // 8, size * 3 // 8 : size * 5 // 8] = True
    inpainter = Inpainter.from_checkpoint(workdir)
    completed = inpainter(image, hole)
    flow = inpainter.predict(image, hole)["flow"]

    out = pathlib.Path(output)
    shown = image.copy()
    shown[hole] = 255
    write_image(out / "input.png", shown)
    write_image(out / "mask.png", np.repeat((hole * 255).astype(np.uint8)[..., None], 3, axis=-1))
    write_image(out / "inpainted.png", completed)
    write_image(out / "flow.png", _to_uint8(flow))
    return {
        "workdir": str(workdir),
        "steps": result["step"],
        "train_seconds": round(train_seconds, 1),
        "final_losses": {k: round(v, 4) for k, v in result["metrics"].items() if k.endswith("_loss")},
        "eval": {k: v for k, v in (result.get("eval") or {}).items() if k in ("eval_psnr", "eval_ssim", "eval_l1")},
        "outputs": [str(out / n) for n in ("input.png", "mask.png", "inpainted.png", "flow.png")],
    }
