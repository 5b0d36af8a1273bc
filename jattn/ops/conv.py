"""TF 'SAME' patches and convolution as patches + one matrix product (im2col).

`conv2d_im2col` equals `jax.lax.conv_general_dilated(..., "SAME")` (TF padding), but its
derivatives are matrix products, slices and pads. On XLA:CPU that makes second-order
gradients (the WGAN-GP penalty differentiates the critic w.r.t. its input, then the
result w.r.t. the critic's weights) about 9x faster than differentiating the native
convolution twice (measured: `docs/benchmarks.md`). Memory: the patches are k*k times
the input, fine for DeepFill's critics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

__all__ = ["same_padding", "extract_patches", "conv2d_im2col"]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def extract_patches(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """TF `extract_image_patches` with 'SAME' zero padding and rate 1.

    x: [B, H, W, C] -> [B, ceil(H/stride), ceil(W/stride), kernel*kernel*C], the last axis
    ordered (dy, dx, c) like TF (and like an HWIO kernel reshaped to [k*k*C, O]).
    """
    _, height, width, _ = x.shape
    pad_h = same_padding(height, kernel, stride)
    pad_w = same_padding(width, kernel, stride)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    out_h, out_w = -(-height // stride), -(-width // stride)
    windows = [
        xp[:, dy : dy + (out_h - 1) * stride + 1 : stride, dx : dx + (out_w - 1) * stride + 1 : stride]
        for dy in range(kernel)
        for dx in range(kernel)
    ]
    return rearrange(jax.numpy.stack(windows, axis=3), "b h w k c -> b h w (k c)")


def conv2d_im2col(x: jax.Array, kernel: jax.Array, stride: int = 1, *, precision=None, preferred_element_type=None) -> jax.Array:
    """TF 'SAME' conv of x [B, H, W, Cin] with a square HWIO kernel [k, k, Cin, O]."""
    k = kernel.shape[0]
    if kernel.shape[1] != k or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv2d_im2col: kernel {tuple(kernel.shape)} does not fit input {tuple(x.shape)}")
    patches = extract_patches(x, k, stride)
    return jnp.einsum(
        "bhwk,ko->bhwo", patches, kernel.reshape(-1, kernel.shape[-1]),
        precision=precision, preferred_element_type=preferred_element_type,
    )
