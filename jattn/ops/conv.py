"""Convolutions whose derivatives XLA:CPU runs slowly, written so that they run fast.

`strided_conv2d`: a stride > 1 convolution whose input gradient on CPU is its polyphase
parts, stride**2 stride-1 convolutions (2.2-2.8x faster than XLA's for DeepFill's
stride-2 layers, `docs/benchmarks.md`). Its second derivative is made of stride-1
convolutions too, which is why DeepFill v1's critics use it: the WGAN-GP penalty
differentiates them twice, and XLA:CPU's second derivative of a native strided
convolution is ~20x slower.

`upsample_conv3x3`: 2x nearest upsampling then a 3x3 convolution (DeepFill's
`gen_deconv`) as four 2x2 convolutions of the input, 2.25x fewer FLOPs.

`conv2d_im2col`: TF 'SAME' convolution as patches + one matrix product, equal to
`jax.lax.conv_general_dilated(..., "SAME")`; its derivatives are matrix products, slices
and pads (DeepFill v1's critics used it before `strided_conv2d`, which is faster).
`extract_patches` is TF's `extract_image_patches` (contextual attention uses it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

__all__ = ["same_padding", "extract_patches", "conv2d_im2col", "strided_conv2d", "upsample_conv3x3"]

DN = ("NHWC", "HWIO", "NHWC")


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


# --------------------------------------------------------------------------- strided conv


# Below this many input channels the phases are merged into one convolution (see
# `_polyphase_input_grad`); measured on DeepFill's layers (docs/benchmarks.md).
MERGE_PHASES_BELOW_CHANNELS = 16


def _phase_kernels(kernel: jax.Array, stride: int) -> jax.Array:
    """HWIO kernel [kh, kw, C, O] -> [M, M', O, s*s*C] with M = ceil(kh / s), M' = ceil(kw / s):
    for every phase (py, px) (channel block py*s + px) the flipped sub-kernel w[py::s, px::s],
    zero-padded in front to M x M' taps."""
    s = stride
    kh, kw = kernel.shape[:2]
    mh, mw = -(-kh // s), -(-kw // s)
    kt = jnp.swapaxes(kernel, 2, 3)  # [kh, kw, O, C]
    kt = jnp.pad(kt, ((0, s * mh - kh), (0, s * mw - kw), (0, 0), (0, 0)))  # tap p + s*m -> [m, p]
    return rearrange(kt, "(m p) (n q) o c -> m n o (p q c)", p=s, q=s)[::-1, ::-1]


def _polyphase_input_grad(g: jax.Array, kernel: jax.Array, x_hw: tuple[int, int], stride: int, pads) -> jax.Array:
    """dL/dx of a stride-`stride` conv (rate 1) as stride x stride phases of stride-1 convs.

    Input position i (per axis) with u = i + pad_lo gets sum_m g[u // s - m] * w[u % s + s*m]:
    for each phase p = u % s, a stride-1 convolution of g with the flipped sub-kernel
    w[p::s]. XLA instead convolves g dilated by s (zeros between its pixels), s*s times
    the FLOPs, which XLA:CPU runs at a quarter of the forward rate.

    With fewer than `MERGE_PHASES_BELOW_CHANNELS` input channels C the s*s phases are one
    convolution with s*s*C output channels (sub-kernels zero-padded to ceil(k/s) taps):
    more FLOPs (36 / 25 taps at k = 5, s = 2), but a conv with 3 output channels runs far
    below the machine's rate (3x faster for DeepFill's critics' first layer), and under a
    second derivative (the WGAN-GP penalty) one conv is one layout transpose of g, not s*s.

    g: [B, Ho, Wo, O]; kernel: [kh, kw, C, O]; x_hw: (H, W); pads: ((top, bottom), (left,
    right)). Returns [B, H, W, C] in g's dtype promoted with the kernel's.
    """
    s = stride
    (h, w), (pad_t, _), (pad_l, _) = x_hw, pads[0], pads[1]
    q_h, q_w = -(-(h + pad_t) // s), -(-(w + pad_l) // s)
    kh, kw, channels = kernel.shape[:3]
    dtype = jnp.promote_types(g.dtype, kernel.dtype)

    def phase_conv(sub):  # sub: flipped [mh, mw, O, C'] -> [B, Qh, Qw, C']
        mh, mw = sub.shape[:2]
        gp = jnp.pad(g, ((0, 0), (mh - 1, max(0, q_h - g.shape[1])), (mw - 1, max(0, q_w - g.shape[2])), (0, 0)))
        out = jax.lax.conv_general_dilated(gp, sub.astype(g.dtype), (1, 1), "VALID", dimension_numbers=DN,
                                           preferred_element_type=dtype)
        return out[:, :q_h, :q_w]

    if channels < MERGE_PHASES_BELOW_CHANNELS:
        full = rearrange(phase_conv(_phase_kernels(kernel, s)), "b qh qw (py px c) -> b (qh py) (qw px) c", py=s, px=s)
        return full[:, pad_t : pad_t + h, pad_l : pad_l + w]

    kernel_t = jnp.swapaxes(kernel, 2, 3)[::-1, ::-1]  # [kh, kw, O, C], flipped
    phases = []
    for py in range(s):
        row = []
        for px in range(s):
            # sub-kernel w[py::s, px::s] flipped = the flipped kernel's taps ending at the phase
            sub = kernel_t[(kh - 1 - py) % s :: s, (kw - 1 - px) % s :: s] if py < kh and px < kw else None
            if sub is None or sub.shape[0] == 0 or sub.shape[1] == 0:
                row.append(jnp.zeros((g.shape[0], q_h, q_w, channels), dtype))
                continue
            row.append(phase_conv(sub))
        phases.append(jnp.stack(row, axis=3))  # [B, Qh, Qw, s(px), C]
    full = rearrange(jnp.stack(phases, axis=2), "b qh py qw px c -> b (qh py) (qw px) c")
    return full[:, pad_t : pad_t + h, pad_l : pad_l + w]


def _conv(x, kernel, stride, padding, preferred_element_type):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=DN,
                                        preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, kernel, stride, padding, preferred_element_type):
    return _conv(x, kernel, stride, padding, preferred_element_type)


def _strided_conv_fwd(x, kernel, stride, padding, preferred_element_type):
    return _conv(x, kernel, stride, padding, preferred_element_type), (x, kernel)


def _strided_conv_bwd(stride, padding, preferred_element_type, residuals, g):
    x, kernel = residuals
    conv = functools.partial(_conv, stride=stride, padding=padding, preferred_element_type=preferred_element_type)
    window = kernel.shape[:2]
    pads = padding if not isinstance(padding, str) else tuple(
        jax.lax.padtype_to_pads(x.shape[1:3], window, (stride, stride), padding))
    dx = jax.lax.platform_dependent(
        g, kernel,
        cpu=lambda g_, k_: _polyphase_input_grad(g_, k_, x.shape[1:3], stride, pads).astype(x.dtype),
        default=lambda g_, k_: jax.vjp(lambda x_: conv(x_, k_), x)[1](g_)[0],
    )
    dw = jax.vjp(lambda k_: conv(x, k_), kernel)[1](g)[0]
    return dx, dw


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def strided_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding="SAME", *, preferred_element_type=None):
    """`jax.lax.conv_general_dilated` (NHWC, HWIO, rate 1) with stride > 1 whose input
    gradient on CPU is `stride**2` stride-1 convolutions of the output gradient (its
    polyphase parts) instead of XLA's convolution of the zero-dilated gradient. The value
    and the kernel gradient are XLA's; on GPU and TPU the input gradient is XLA's too.
    padding: "SAME" / "VALID" (TF's) or ((top, bottom), (left, right))."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"strided_conv2d: kernel {tuple(kernel.shape)} does not fit input {tuple(x.shape)}")
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return _strided_conv(x, kernel, int(stride), padding, preferred_element_type)


# --------------------------------------------------------------------------- upsample + conv


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """A 3-tap kernel axis seen from a 2x nearest-upsampled input, per output phase:
    phase 0 reads input offsets (-1, 0) with taps (w0, w1 + w2), phase 1 reads (0, +1)
    with taps (w0 + w1, w2). Returns the two 2-tap kernels (axis `axis` has length 2)."""
    w0, w1, w2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack([w0, w1 + w2], axis=axis), jnp.stack([w0 + w1, w2], axis=axis)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, padding: str = "SAME", *, preferred_element_type=None) -> jax.Array:
    """2x nearest upsampling (TF1 align-corners, which for exact doubling repeats each
    pixel, `jattn.ops.resize`) then a 3x3 stride-1 convolution, computed on the input.

    Each of the four output phases (row parity, column parity) of the convolution of the
    upsampled image is a 2x2 convolution of the input with sums of the kernel's taps: 16
    taps per input pixel instead of 36 (2.25x fewer FLOPs), and no upsampled intermediate
    (nor its gradient). Padding of the upsampled image maps onto the input: "SAME" zeros
    are zeros, "SYMMETRIC" and "REFLECT" by one pixel repeat the edge pixel, "VALID" is
    "SAME" without its border.

    x: [B, H, W, C]; kernel: [3, 3, C, O] (HWIO). Returns [B, 2H, 2W, O] ("VALID":
    [B, 2H - 2, 2W - 2, O]), equal to `conv(resize_nearest_align_corners(x, 2H, 2W))` up to
    float rounding (the taps are summed first).
    """
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"upsample_conv3x3: kernel {tuple(kernel.shape)} is not a 3x3 kernel for input {tuple(x.shape)}")
    modes = {"SAME": "constant", "VALID": "constant", "SYMMETRIC": "edge", "REFLECT": "edge"}
    if padding not in modes:
        raise ValueError(f"upsample_conv3x3: padding must be one of {tuple(modes)}, got {padding!r}")
    b, h, w, _ = x.shape
    # Phase (py, px) reads the input padded by one pixel, rows py .. py + H, columns
    # px .. px + W. Zero padding is the convolution's own; edge padding is padded once.
    # Expressed as each conv's padding of one shared operand (negative = cropping), so
    # that the four kernel gradients share one layout transpose of it on CPU.
    if modes[padding] == "edge":
        operand, base = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), 0
    else:
        operand, base = x, 1
    rows = []
    for py, k_rows in enumerate(_phase_taps(kernel, 0)):
        cols = [
            jax.lax.conv_general_dilated(
                operand, k_phase.astype(x.dtype), (1, 1),
                ((base - py, base + py - 1), (base - px, base + px - 1)),
                dimension_numbers=DN, preferred_element_type=preferred_element_type,
            )
            for px, k_phase in enumerate(_phase_taps(k_rows, 1))
        ]
        rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (px), O]
    y = jnp.stack(rows, axis=2)  # [B, H, 2 (py), W, 2 (px), O]
    y = y.reshape(b, 2 * h, 2 * w, y.shape[-1])
    return y[:, 1:-1, 1:-1] if padding == "VALID" else y
