"""Convolutions: `conv2d`, the one convolution of jattn's DeepFill models, plain XLA
everywhere except on CPU, where it is a formulation XLA:CPU runs faster.

`conv2d(x, kernel, stride, rate, padding, upsample=...)` is `jax.lax.conv_general_dilated`
(NHWC, HWIO; with `upsample`, of x 2x nearest-upsampled). On GPU and TPU it is exactly
that, and so are its derivatives. On CPU, for the shapes where it is faster, it is one of
the kernels below, chosen when the program is lowered (`jax.lax.platform_dependent`); each
is written with `jax.custom_jvp`, `jax.checkpoint` or plain linear operations, so that
forward mode (`jax.jvp`), reverse mode (`jax.grad`) and their compositions (the WGAN-GP
penalty differentiates the critics twice) all work:

* strides > 1: the input gradient is `stride**2` stride-1 convolutions of the output
  gradient (its polyphase parts) instead of XLA's convolution of the zero-dilated gradient,
  which does 4x the FLOPs; its second derivative is made of stride-1 convolutions too
  (XLA:CPU's second derivative of a native strided convolution is an order of magnitude
  slower: `benchmarks/cpu_kernels.py`, "critic layer 2 with penalty"). A 5x5 stride-2 kernel on wide enough maps is the
  Winograd convolution of the input's space-to-depth image, value and derivatives.
* `upsample` with a 3x3 kernel: four 2x2 convolutions of the input (`upsample_conv3x3`),
  2.25x fewer FLOPs, no upsampled image. (An identity valid on any platform, but its
  values differ from the convolution of the upsampled image by float rounding, the taps
  being summed first: GPU and TPU keep XLA's convolution, as for every other kernel here.)
* 3x3 stride-1 (any dilation), wide float32 layers: Winograd's F(4x4, 3x3)
  (`winograd_conv3x3`), value and gradients: no convolution, hence none of XLA:CPU's layout
  transposes for the kernel gradient.
* at most `NARROW_MAX_CHANNELS` input or output channels, stride 1: the value (few
  outputs) or the input gradient (few inputs) as matrix products to per-tap planes plus a
  fused shifted sum.

Where the backward pass is not autodiff of the value (the polyphase and few-input input
gradients), the kernel is a `jax.custom_jvp` whose primal is XLA's convolution and whose
tangent is conv(dx, kernel) written as the transpose of the wanted gradient function
(`_transposed`), so that reverse mode, transposing the tangent, runs that function
itself. Winograd is autodiff under `jax.checkpoint`, its tile transforms written so that
their transposes are the hand-derived ones (`_unstack`, `_output_transform`).

The switch: the environment variable `JATTN_CPU_KERNELS=0` (or `false`, `off`, `no`), read
when a convolution is traced (`cpu_kernels_enabled`), turns these kernels off: the CPU
program is then plain XLA as well (and `jattn.ops.activations.elu` is `jax.nn.elu`).
`cpu_kernels(False)` sets it in-process, for a `with` block or from then on (clearing JAX's
caches, so that jitted functions are traced again under the new setting).

`conv2d_im2col`: TF 'SAME' convolution as patches + one matrix product, equal to
`jax.lax.conv_general_dilated(..., "SAME")`; `extract_patches` is TF's
`extract_image_patches` (contextual attention uses it).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.custom_derivatives import SymbolicZero

from jattn.ops.resize import resize_nearest_align_corners

__all__ = ["conv2d", "cpu_kernels", "cpu_kernels_enabled", "same_padding", "extract_patches", "conv2d_im2col",
           "upsample_conv3x3", "winograd_conv3x3"]

DN = ("NHWC", "HWIO", "NHWC")
_DN_HWOI = ("NHWC", "HWOI", "NHWC")  # the kernel's last axis is the input's channels

# --------------------------------------------------------------------------- the switch

_ENV = "JATTN_CPU_KERNELS"
_OFF = ("0", "false", "off", "no")
_setting: list[bool | None] = [None]  # cpu_kernels' in-process setting; None: the environment's


def cpu_kernels_enabled() -> bool:
    """Whether `conv2d` (and `jattn.ops.activations.elu`) use their CPU kernels: the
    in-process setting of `cpu_kernels`, else the environment variable `JATTN_CPU_KERNELS`
    (unset or anything but 0 / false / off / no: on). Read when a function is traced."""
    if _setting[0] is not None:
        return _setting[0]
    return os.environ.get(_ENV, "1").strip().lower() not in _OFF


def _set(enabled: bool | None) -> None:
    """Sets the in-process setting; where that changes `cpu_kernels_enabled()`, clears
    JAX's trace and compilation caches, whose keys do not hold it, so that every function
    is traced again with the new setting."""
    before = cpu_kernels_enabled()
    _setting[0] = enabled
    if cpu_kernels_enabled() != before:
        jax.clear_caches()


class cpu_kernels:  # noqa: N801  (a function that is also a context manager)
    """Turns the CPU kernels on (True) or off (False) in this process, over
    `JATTN_CPU_KERNELS`; None goes back to the environment variable. Called, it holds from
    then on; as a context manager (`with cpu_kernels(False): ...`) it is undone on exit.
    A change clears JAX's caches (`jax.clear_caches`): a jitted function is traced and
    compiled again at its next call, under the setting then in force (to compare both,
    keep `jax.jit(f).lower(...).compile()` of each). The environment variable itself is
    read at every trace but is not part of JAX's cache keys: set it before the process
    traces anything."""

    def __init__(self, enabled: bool | None):
        self._previous = _setting[0]
        _set(None if enabled is None else bool(enabled))

    def __enter__(self) -> "cpu_kernels":
        return self

    def __exit__(self, *exc) -> None:
        _set(self._previous)


# --------------------------------------------------------------------------- TF helpers


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


# --------------------------------------------------------------------------- conv2d


def _xla_conv(x, kernel, stride, rate, padding, preferred_element_type):
    """`jax.lax.conv_general_dilated`, NHWC / HWIO, the kernel cast to x's dtype."""
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), padding, rhs_dilation=(rate, rate),
                                        dimension_numbers=DN, preferred_element_type=preferred_element_type)


def _plain(x, kernel, stride, rate, padding, upsample, preferred_element_type):
    """`conv2d` as XLA's convolution (of the upsampled x with `upsample`)."""
    if upsample:
        x = resize_nearest_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
    return _xla_conv(x, kernel, stride, rate, padding, preferred_element_type)


def _explicit_pads(hw, window, stride: int, rate: int, padding):
    """((top, bottom), (left, right)) of `padding` ("SAME" / "VALID" as TF's, or pairs);
    None where "SAME" at a stride > 1 depends on symbolic sizes."""
    if not isinstance(padding, str):
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    if padding == "VALID":
        return ((0, 0), (0, 0))
    dilated = [rate * (k - 1) + 1 for k in window]
    if stride == 1:  # independent of the (possibly symbolic) size
        return tuple(((d - 1) // 2, d - 1 - (d - 1) // 2) for d in dilated)
    if not all(isinstance(n, int) for n in hw):
        return None
    return tuple(tuple(p) for p in jax.lax.padtype_to_pads(hw, dilated, (stride, stride), "SAME"))


def _upsample_fits(kernel, stride: int, rate: int, pads) -> bool:
    """Whether `upsample_conv3x3` computes this upsampling conv: 3x3, stride 1, rate 1,
    pads of the upsampled image between -1 and 1."""
    return (tuple(kernel.shape[:2]) == (3, 3) and stride == rate == 1 and pads is not None
            and all(-1 <= p <= 1 for pair in pads for p in pair))


def _cpu_kernel(x, kernel, stride: int, rate: int, pads, preferred_element_type):
    """The CPU formulation of a (not upsampling) `conv2d`, as a function (x, kernel) -> y,
    or None where XLA's convolution is kept (`conv2d`'s docstring lists the rules)."""
    kh, kw, c, o = kernel.shape
    concrete = all(isinstance(n, int) for n in x.shape[1:])
    if pads is None or (stride > 1 and (rate > 1 or not concrete)):
        return None
    if stride > 1:
        if _space_to_depth_fits(x, kernel, stride, pads):
            return functools.partial(_space_to_depth_conv, stride=stride, pads=pads,
                                     preferred_element_type=preferred_element_type)
        return functools.partial(_polyphase_conv, stride=stride, pads=pads,
                                 preferred_element_type=preferred_element_type)
    float32 = x.dtype == jnp.float32 and kernel.dtype == jnp.float32
    if rate == 1 and float32 and (_narrow(c) or _narrow(o)) and _narrow_fits(x.shape[1:3], (kh, kw), pads):
        return functools.partial(_narrow_conv, pads=pads, preferred_element_type=preferred_element_type)
    if (kh, kw) == (3, 3) and concrete:
        out = [n + lo + hi - 2 * rate for n, (lo, hi) in zip(x.shape[1:3], pads)]
        if _winograd_fits(out, c, o, x.dtype, kernel.dtype, rate):
            return functools.partial(_winograd_conv, rate=rate, pads=pads, preferred_element_type=preferred_element_type)
    return None


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, rate: int = 1, padding="SAME", *,
           upsample: bool = False, preferred_element_type=None) -> jax.Array:
    """`jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
    rhs_dilation=(rate, rate))`, NHWC / HWIO, fast on CPU with its derivatives.

    x: [B, H, W, C]; kernel: [kh, kw, C, O], cast to x's dtype (an upsampling 3x3 conv
    sums its taps in the kernel's dtype first); padding: "SAME" / "VALID" (TF's, dilation
    aware) or ((top, bottom), (left, right)). upsample: convolve x 2x nearest-upsampled
    (TF1 align corners, `jattn.ops.resize.resize_nearest_align_corners`); padding then
    applies to the upsampled image. Returns [B, H', W', O] in `preferred_element_type`
    (default: x's dtype).

    On GPU and TPU, and on CPU with `cpu_kernels_enabled()` False, it is XLA's convolution
    (after the resize). On CPU otherwise (see the module docstring), in this order:
    - `upsample`, 3x3, stride 1, rate 1, pads within -1..1: `upsample_conv3x3` (other
      upsampling convs resize x, then follow the rules below);
    - stride > 1 (rate 1, concrete sizes): a 5x5 stride-2 (3 taps per axis after
      space-to-depth) float32 kernel that Winograd fits is the Winograd convolution of the
      space-to-depth image; otherwise XLA's value and kernel gradient with the polyphase
      input gradient;
    - stride 1, rate 1, float32, at most `NARROW_MAX_CHANNELS` input or output channels:
      planes and shifted sums;
    - 3x3, stride 1, float32, at least `WINOGRAD_MIN_CHANNELS` channels in and out, outputs
      of at least `WINOGRAD_MIN_SIZE` whose tiles fit (`_tiles_fit`): Winograd;
    - anything else: XLA's convolution.
    Winograd's values and derivatives differ from the exact ones by about 1e-5 of their
    largest value (1e-7 for XLA's); the others by float32 rounding (sums in another order).
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv2d: kernel {tuple(kernel.shape)} does not fit input {tuple(x.shape)}")
    stride, rate = int(stride), int(rate)
    if stride < 1 or rate < 1:
        raise ValueError(f"conv2d: stride and rate must be >= 1, got {stride}, {rate}")
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise ValueError(f"conv2d: padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    if not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    plain = functools.partial(_plain, stride=stride, rate=rate, padding=padding, upsample=upsample,
                              preferred_element_type=preferred_element_type)
    if not cpu_kernels_enabled():
        return plain(x, kernel)
    if upsample:
        hw = tuple(2 * n for n in x.shape[1:3])
        pads = _explicit_pads(hw, kernel.shape[:2], stride, rate, padding)
        if _upsample_fits(kernel, stride, rate, pads):
            fast = functools.partial(upsample_conv3x3, padding=pads, preferred_element_type=preferred_element_type)
            return jax.lax.platform_dependent(x, kernel, cpu=fast, default=plain)
        x = resize_nearest_align_corners(x, *hw)
        return conv2d(x, kernel, stride, rate, padding, preferred_element_type=preferred_element_type)
    kernel = kernel.astype(x.dtype)
    pads = _explicit_pads(x.shape[1:3], kernel.shape[:2], stride, rate, padding)
    fast = _cpu_kernel(x, kernel, stride, rate, pads, preferred_element_type)
    if fast is None:
        return plain(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=fast, default=plain)


def _add(terms):
    """The sum of the tangent terms that are not symbolic zeros (at least one is not)."""
    terms = [t for t in terms if t is not None]
    return functools.reduce(jnp.add, terms)


def _tangents(dx, dkernel, of_input, of_kernel):
    """A bilinear conv's tangent: of_input(dx) + of_kernel(dkernel), skipping the terms
    whose tangent is a symbolic zero (an input or kernel that is not differentiated)."""
    return _add([None if isinstance(dx, SymbolicZero) else of_input(dx),
                 None if isinstance(dkernel, SymbolicZero) else of_kernel(dkernel)])


# --------------------------------------------------------------------------- strided conv


# Below this many input channels the phases are merged into one convolution (see
# `_polyphase_input_grad`): a convolution to few output channels runs far below XLA:CPU's rate.
MERGE_PHASES_BELOW_CHANNELS = 16


def _space_to_depth_kernel(kernel: jax.Array, stride: int) -> jax.Array:
    """HWIO kernel [kh, kw, C, O] -> [M, M', s*s*C, O] with M = ceil(kh / s),
    M' = ceil(kw / s): tap (s*m + py, s*n + px) of channel c moves to tap (m, n) of channel
    (py, px, c); taps past the kernel's end are zeros. A stride-s convolution of x is the
    stride-1 convolution of x's space-to-depth image with it (`_space_to_depth_image`)."""
    s = stride
    kh, kw = kernel.shape[:2]
    mh, mw = -(-kh // s), -(-kw // s)
    kt = jnp.pad(kernel, ((0, s * mh - kh), (0, s * mw - kw), (0, 0), (0, 0)))  # tap p + s*m -> [m, p]
    return rearrange(kt, "(m p) (n q) c o -> m n (p q c) o", p=s, q=s)


def _space_to_depth_image(x, window, stride: int, pads):
    """z[b, i, j, (py, px, c)] = x_pad[b, s i + py, s j + px, c], x padded by `pads` and cut
    or extended to whole s x s blocks covering every tap of every output: the stride-s
    convolution of x is the stride-1 "VALID" convolution of z with
    `_space_to_depth_kernel`: y[i] = sum_{m, p} x_pad[s (i + m) + p] w[s m + p]
    = sum_m z[i + m] w'[m]. [B, Ho + M - 1, Wo + M' - 1, s*s*C] with M = ceil(kh / s)."""
    s, (kh, kw) = stride, window
    (h, w), (pad_t, pad_b), (pad_l, pad_r) = x.shape[1:3], pads[0], pads[1]
    out_h, out_w = (h + pad_t + pad_b - kh) // s + 1, (w + pad_l + pad_r - kw) // s + 1
    rows, cols = s * (out_h + -(-kh // s) - 1), s * (out_w + -(-kw // s) - 1)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (pad_t, rows - h - pad_t, 0), (pad_l, cols - w - pad_l, 0), (0, 0, 0)))
    return rearrange(xp, "b (i p) (j q) c -> b i j (p q c)", p=s, q=s)


def _phase_kernels(kernel: jax.Array, stride: int) -> jax.Array:
    """[M, M', s*s*C, O] (to be read as HWOI): for every phase (py, px) (channel block
    py*s + px) the flipped sub-kernel w[py::s, px::s], zero-padded in front to M x M' taps."""
    return _space_to_depth_kernel(kernel, stride)[::-1, ::-1]


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

    # Under the WGAN-GP's second derivative:
    # - the sub-kernels are flipped slices of the kernel in its own layout, read as HWOI
    #   (the phase convs map O channels to C), so the kernel's gradient arrives in its
    #   layout, not as transposed parts that every optimizer fusion re-reads;
    # - every phase convolves the same g, padded for the longest sub-kernel (M x M'
    #   taps), and crops its output by the taps it lacks, so XLA:CPU makes one
    #   channel-major transpose of g for all the phases' kernel gradients.
    m_h, m_w = -(-kh // s), -(-kw // s)
    gp = jnp.pad(g, ((0, 0), (m_h - 1, max(0, q_h - g.shape[1])), (m_w - 1, max(0, q_w - g.shape[2])), (0, 0)))

    def phase_conv(sub):  # sub: flipped [mh, mw, C', O] -> [B, Qh, Qw, C']
        top, left = m_h - sub.shape[0], m_w - sub.shape[1]
        out = jax.lax.conv_general_dilated(gp, sub.astype(g.dtype), (1, 1), "VALID", dimension_numbers=_DN_HWOI,
                                           preferred_element_type=dtype)
        return out[:, top : top + q_h, left : left + q_w]

    if channels < MERGE_PHASES_BELOW_CHANNELS:
        full = rearrange(phase_conv(_phase_kernels(kernel, s)), "b qh qw (py px c) -> b (qh py) (qw px) c", py=s, px=s)
        return full[:, pad_t : pad_t + h, pad_l : pad_l + w]

    kernel_t = kernel[::-1, ::-1]  # [kh, kw, C, O], flipped
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


def _transposed(grad, dx, cotangent):
    """The linear map whose transpose is `grad` (a linear map of the output's cotangent to
    the input's), applied to the input tangent dx: conv(dx, kernel) written so that
    reverse mode, transposing it, runs `grad` itself (the transpose of a transpose is the
    original operations: convolutions, pads, slices, products), to any order.
    cotangent: the output's shape and dtype."""
    cotangent = jax.ShapeDtypeStruct(cotangent.shape, cotangent.dtype)
    (dy,) = jax.linear_transpose(lambda g: grad(g).astype(dx.dtype), cotangent)(dx)
    return dy


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _polyphase_conv(x, kernel, stride, pads, preferred_element_type):
    """XLA's strided convolution; its tangent in x is conv(dx, kernel) as the transpose of
    `_polyphase_input_grad` (`_transposed`: stride-1 convolutions of dx's space-to-depth
    image or phases), so that its input gradient is the polyphase one; its tangent in the
    kernel is XLA's, and so is the kernel gradient."""
    return _xla_conv(x, kernel, stride, 1, pads, preferred_element_type)


@functools.partial(_polyphase_conv.defjvp, symbolic_zeros=True)
def _polyphase_conv_jvp(stride, pads, preferred_element_type, primals, tangents):
    x, kernel = primals
    y = _polyphase_conv(x, kernel, stride, pads, preferred_element_type)
    grad = functools.partial(_polyphase_input_grad, kernel=kernel, x_hw=x.shape[1:3], stride=stride, pads=pads)
    dy = _tangents(*tangents, lambda dx: _transposed(grad, dx, y),
                   lambda dk: _xla_conv(x, dk, stride, 1, pads, preferred_element_type))
    return y, dy


def _space_to_depth_conv(x, kernel, stride: int, pads, preferred_element_type):
    """A stride-s convolution with a kernel of ceil(k / s) = 3 taps per axis (5x5 at
    stride 2) as the 3x3 stride-1 "VALID" Winograd convolution (`_winograd_conv`) of the
    padded input's space-to-depth image (`_space_to_depth_image`)."""
    z = _space_to_depth_image(x, kernel.shape[:2], stride, pads)
    return _winograd_conv(z, _space_to_depth_kernel(kernel, stride), 1, ((0, 0), (0, 0)), preferred_element_type)


def _space_to_depth_fits(x, kernel, stride, pads) -> bool:
    """Whether `_space_to_depth_conv` applies and Winograd fits its 3x3 convolution."""
    kh, kw, c, o = kernel.shape
    if -(-kh // stride) != 3 or -(-kw // stride) != 3:
        return False
    out = [(n + lo + hi - k) // stride + 1 for n, (lo, hi), k in zip(x.shape[1:3], pads, (kh, kw))]
    return _winograd_fits(out, stride * stride * c, o, x.dtype, kernel.dtype, 1)


# --------------------------------------------------------------------------- upsample + conv


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """A 3-tap kernel axis seen from a 2x nearest-upsampled input, per output phase:
    phase 0 reads input offsets (-1, 0) with taps (w0, w1 + w2), phase 1 reads (0, +1)
    with taps (w0 + w1, w2). Returns the two 2-tap kernels (axis `axis` has length 2)."""
    w0, w1, w2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack([w0, w1 + w2], axis=axis), jnp.stack([w0 + w1, w2], axis=axis)


def _phase_range(size: int, pads: tuple[int, int]) -> tuple[int, int, int]:
    """Along one axis of size n, for pads (lo, hi) of the upsampled image within -1..1:
    (a, b, start): the phase convolutions compute input rows a .. b - 1, i.e. rows 2a ..
    2b - 1 of the "SAME" result (pads (1, 1)), whose rows start .. start + 2n + lo + hi - 3
    are the output."""
    lo, hi = pads
    start, stop = 1 - lo, 2 * size - 1 + hi
    a, b = start // 2, -(-stop // 2)
    return a, b, start - 2 * a


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, padding="SAME", *, preferred_element_type=None) -> jax.Array:
    """2x nearest upsampling (TF1 align-corners, which for exact doubling repeats each
    pixel, `jattn.ops.resize`) then a 3x3 stride-1 convolution, computed on the input.

    Each of the four output phases (row parity, column parity) of the convolution of the
    upsampled image is a 2x2 convolution of the input with sums of the kernel's taps: 16
    taps per input pixel instead of 36 (2.25x fewer FLOPs), and no upsampled intermediate
    (nor its gradient). Padding of the upsampled image maps onto the input: "SAME" zeros
    are zeros, "SYMMETRIC" and "REFLECT" by one pixel repeat the edge pixel, "VALID" is
    "SAME" without its border; explicit pads ((top, bottom), (left, right)) of the
    upsampled image may be -1 (cropping), 0 or 1.

    x: [B, H, W, C]; kernel: [3, 3, C, O] (HWIO), its taps summed in its own dtype, then
    cast to x's. Returns [B, 2H, 2W, O] ("VALID": [B, 2H - 2, 2W - 2, O]), equal to
    `conv(resize_nearest_align_corners(x, 2H, 2W))` up to float rounding (the taps are
    summed first). Linear in x and in the kernel: autodiff gives its derivatives.
    """
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"upsample_conv3x3: kernel {tuple(kernel.shape)} is not a 3x3 kernel for input {tuple(x.shape)}")
    named = {"SAME": ((1, 1), (1, 1)), "VALID": ((0, 0), (0, 0)), "SYMMETRIC": ((-1, -1), (-1, -1)),
             "REFLECT": ((-1, -1), (-1, -1))}
    if isinstance(padding, str):
        if padding not in named:
            raise ValueError(f"upsample_conv3x3: padding must be one of {tuple(named)} or pairs, got {padding!r}")
        if padding in ("SYMMETRIC", "REFLECT"):  # the edge pixel, upsampled, cropped to one
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        padding = named[padding]
    if not all(-1 <= p <= 1 for pair in padding for p in pair):
        raise ValueError(f"upsample_conv3x3: explicit pads must be within -1..1, got {padding}")
    (a_h, b_h, start_h), (a_w, b_w, start_w) = (_phase_range(n, p) for n, p in zip(x.shape[1:3], padding))
    n_h, n_w = x.shape[1:3]
    out_h, out_w = (2 * n + lo + hi - 2 for n, (lo, hi) in zip(x.shape[1:3], padding))
    # Phase (py, px) reads the input padded by one pixel, rows py - 1 + a .. py - 1 + b,
    # expressed as each conv's padding of x itself (negative = cropping), so that the four
    # kernel gradients share one layout transpose of x on CPU.
    rows = []
    for py, k_rows in enumerate(_phase_taps(kernel, 0)):
        cols = [
            jax.lax.conv_general_dilated(
                x, k_phase.astype(x.dtype), (1, 1),
                ((1 - py - a_h, py - n_h + b_h), (1 - px - a_w, px - n_w + b_w)),
                dimension_numbers=DN, preferred_element_type=preferred_element_type,
            )
            for px, k_phase in enumerate(_phase_taps(k_rows, 1))
        ]
        rows.append(jnp.stack(cols, axis=3))  # [B, b_h - a_h, b_w - a_w, 2 (px), O]
    y = jnp.stack(rows, axis=2)  # [B, b_h - a_h, 2 (py), b_w - a_w, 2 (px), O]
    y = y.reshape(x.shape[0], 2 * (b_h - a_h), 2 * (b_w - a_w), y.shape[-1])
    if (start_h, start_w, out_h, out_w) == (0, 0) + y.shape[1:3]:
        return y
    return y[:, start_h : start_h + out_h, start_w : start_w + out_w]


# --------------------------------------------------------------------------- Winograd

# Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016), interpolation points 0, +-1, +-2 and infinity: a 6x6 input tile d gives the 4x4
# output tile A^T [(G w G^T) * (B^T d B)] A of the 3x3 correlation with w.
_WINO_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
WINOGRAD_TILE = 4


def _lincomb(coefficients, parts):
    """sum(c * p) over the nonzero coefficients, as adds (XLA fuses them into one loop)."""
    total = None
    for c, p in zip(coefficients, parts):
        if c == 0:
            continue
        term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, p.dtype)
        total = term if total is None else total + term
    return total


def _lincombs(coefficients, parts, axis: int = 0) -> jax.Array:
    """sum_i c[p][i] parts[i] for each row p of `coefficients`, stacked along `axis` (one
    array per transform stage, which XLA fuses into one loop)."""
    return jnp.stack([_lincomb(row, parts) for row in coefficients], axis=axis)


def _unstack(a: jax.Array, axis: int = 0) -> list[jax.Array]:
    """The slices of `a` along `axis`, as one `lax.split`: its transpose (in the backward
    pass) is one concatenation, where indexing's would be a pad and an add per slice."""
    return [jnp.squeeze(p, axis) for p in jax.lax.split(a, (1,) * a.shape[axis], axis)]


def _tile_elements(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
    """The 6 elements of every input tile along `axis` (tile t starts at 4 t): six
    stride-4 slices, each `tiles` long."""
    return [jax.lax.slice_in_dim(x, a, a + WINOGRAD_TILE * (tiles - 1) + 1, WINOGRAD_TILE, axis=axis) for a in range(6)]


def _winograd(x: jax.Array, kernel: jax.Array, preferred_element_type) -> jax.Array:
    """`winograd_conv3x3` at rate 1."""
    b, h, w, _ = x.shape
    out_h, out_w = h - 2, w - 2
    tiles_h, tiles_w = -(-out_h // WINOGRAD_TILE), -(-out_w // WINOGRAD_TILE)
    x = jnp.pad(x, ((0, 0), (0, tiles_h * WINOGRAD_TILE + 2 - h), (0, tiles_w * WINOGRAD_TILE + 2 - w), (0, 0)))
    # Input transform B^T d B: rows (one [6, B, tiles_h, W', C] array), then columns.
    # (Stacking each stage into one array lets XLA:CPU fuse its derivative into a few
    # loops: building it per row instead made the backward pass twice as slow.)
    r = _lincombs(_WINO_BT, _tile_elements(x, 1, tiles_h))  # [6, B, th, W', C]
    v = _lincombs(_WINO_BT, _tile_elements(r, 3, tiles_w), axis=1)  # [6, 6, B, th, tw, C]
    v = v.reshape(36, -1, x.shape[-1])
    u = _kernel_transform(kernel).reshape(36, *kernel.shape[2:])
    m = jnp.einsum("ptc,pco->pto", v, u, preferred_element_type=preferred_element_type)
    m = m.reshape(6, 6, b, tiles_h, tiles_w, m.shape[-1])
    # Output transform A^T m A (sums of slices, derivative by hand), tiles in place.
    y = _output_transform(m)
    y = y.reshape(b, tiles_h * WINOGRAD_TILE, tiles_w * WINOGRAD_TILE, -1)
    return y[:, :out_h, :out_w]


def _kernel_transform(kernel: jax.Array) -> jax.Array:
    """G w G^T per channel pair: [3, 3, C, O] -> [6, 6, C, O], as sums of the kernel's taps
    (rows, then columns). (As an einsum with the 6 x 3 matrix G, XLA:CPU made it and its
    derivative matrix products 6 wide.)"""
    r = _lincombs(_WINO_G, _unstack(kernel))  # [6, 3 (j), C, O]
    return _lincombs(_WINO_G, _unstack(r, 1), axis=1)


def _output_transform(m: jax.Array) -> jax.Array:
    """Output tiles A^T m A: [6, 6, B, th, tw, O] -> [B, th, 4, tw, 4, O], as sums of m's
    slices (columns, then rows, stacked straight into the tiles' places). As an einsum
    with the 4 x 6 matrix A, XLA:CPU ran it as matrix products 6 wide: the whole Winograd
    forward pass of a [4, 64, 64, 128] layer took 18.6 ms that way, 11.7 ms this way
    (XLA's convolution: 20.1 ms). Its transpose, the backward pass, is then the same
    construction, A dy A^T as sums of the tile's rows, then columns, each stage one
    stacked array that XLA fuses into one loop (autodiff of the einsum made matrix
    products 6 wide plus layout transposes: 39 ms against 28 ms for that layer's
    backward pass)."""
    columns = _lincombs(_WINO_AT, _unstack(m, 1), axis=-2)  # [6 (p), B, th, tw, 4 (j), O]
    return _lincombs(_WINO_AT, _unstack(columns), axis=2)  # [B, th, 4 (i), tw, 4 (j), O]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, rate: int = 1, *, preferred_element_type=None) -> jax.Array:
    """A "VALID" 3x3 stride-1 convolution (dilation `rate`) by Winograd's F(4x4, 3x3).

    Each 4x4 output tile takes 36 products per channel pair instead of 144 (4x fewer
    FLOPs); the tile transforms are sums of slices that XLA fuses, and the 36 products
    are one batched matrix product. A dilated convolution tiles each of its rate x rate
    sub-grids. Its derivatives are those of these linear maps (transposed transforms and
    matrix products): no convolution, hence none of XLA:CPU's layout transposes for the
    kernel gradient.

    The result equals `jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
    rhs_dilation=(rate, rate))` up to float rounding: about 1e-5 of the output's largest
    value in float32, against 1e-7 for the direct convolution (the transforms' constants
    reach 8 and 1/24). Use it in float32.

    x: [B, H, W, C]; kernel: [3, 3, C, O] (HWIO). Returns [B, H - 2 rate, W - 2 rate, O].
    The output is computed in whole tiles (4 rate rows and columns) and cropped.
    """
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"winograd_conv3x3: kernel {tuple(kernel.shape)} is not a 3x3 kernel for input {tuple(x.shape)}")
    if rate < 1:
        raise ValueError(f"winograd_conv3x3: rate must be >= 1, got {rate}")
    b, h, w, _ = x.shape
    out_h, out_w = h - 2 * rate, w - 2 * rate
    if out_h < 1 or out_w < 1:
        raise ValueError(f"winograd_conv3x3: input {tuple(x.shape)} is smaller than the dilated kernel (rate {rate})")
    if rate == 1:
        return _winograd(x, kernel, preferred_element_type)
    # Rate r: each of the r x r sub-grids (rows and columns c + r s) is a rate-1 convolution.
    ph, pw = -h % rate, -w % rate
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    x = rearrange(x, "b (h i) (w j) c -> (b i j) h w c", i=rate, j=rate)
    y = _winograd(x, kernel, preferred_element_type)
    y = rearrange(y, "(b i j) h w o -> b (h i) (w j) o", i=rate, j=rate)
    return y[:, :out_h, :out_w]


WINOGRAD_MIN_CHANNELS = 48


WINOGRAD_MIN_SIZE = 32


def _tiles_fit(out: int, rate: int) -> bool:
    """Whether an output axis of `out` is at least `WINOGRAD_MIN_SIZE` long and
    Winograd's whole tiles along it (each of the `rate` sub-grids in 4-long tiles) cover
    at most 25% more than `out`. (On 16 x 16 maps, `jattn demo`'s, Winograd's gradients
    made training slower: 46-49 s against 44.5 s.)"""
    covered = -(-(-(-out // rate)) // WINOGRAD_TILE) * WINOGRAD_TILE * rate
    return out >= WINOGRAD_MIN_SIZE and covered <= 1.25 * out


def _winograd_fits(out_hw, channels_in: int, channels_out: int, x_dtype, kernel_dtype, rate: int) -> bool:
    """`conv2d`'s rule for Winograd on CPU: float32, at least `WINOGRAD_MIN_CHANNELS`
    channels in and out, and `_tiles_fit` along both output axes. Winograd does 2.25x fewer
    multiplications, and its gradients need no convolution, so none of XLA:CPU's
    channel-major layout transposes for the kernel gradient (`benchmarks/cpu_kernels.py`,
    "conv3" and "conv7")."""
    return (x_dtype == jnp.float32 and kernel_dtype == jnp.float32
            and min(channels_in, channels_out) >= WINOGRAD_MIN_CHANNELS
            and all(_tiles_fit(n, rate) for n in out_hw))


def _winograd_padded(x, kernel, rate: int, pads, preferred_element_type):
    (pad_t, pad_b), (pad_l, pad_r) = pads
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pad_t, pad_b, 0), (pad_l, pad_r, 0), (0, 0, 0)))
    return winograd_conv3x3(x, kernel, rate, preferred_element_type=preferred_element_type)


def _winograd_conv(x, kernel, rate: int, pads, preferred_element_type):
    """The 3x3 stride-1 convolution of x padded by `pads` as `winograd_conv3x3`, under
    `jax.checkpoint`: the backward pass keeps only x and the kernel and recomputes the
    input and kernel transforms (not the products, which it does not need)."""
    padded = functools.partial(_winograd_padded, rate=rate, pads=pads, preferred_element_type=preferred_element_type)
    return jax.checkpoint(padded)(x, kernel)


# --------------------------------------------------------------------------- few channels

NARROW_MAX_CHANNELS = 5
"""A side with at most this many channels is "narrow". XLA:CPU runs such convolutions far
below its rate (DeepFill v1's 16 -> 3 output layer, the 5-channel input gradient of its
refinement branches' first layers); at 8 channels the planes below are no faster."""


def _narrow(n: int) -> bool:
    return n <= NARROW_MAX_CHANNELS


def _shift(z: jax.Array, offset, growth) -> jax.Array:
    """out[..., y, x] = z[..., y + dy, x + dx], zero outside z: one pad (negative where it
    crops). z: [..., H, W]; offset (dy, dx); growth: the output's size minus the input's,
    static even where H and W are symbolic (`jax.export`). Returns [..., H + gy, W + gx]."""
    (dy, dx), (gy, gx) = offset, growth
    return jax.lax.pad(z, jnp.zeros((), z.dtype), [(0, 0, 0)] * (z.ndim - 2) + [(-dy, gy + dy, 0), (-dx, gx + dx, 0)])


def _reaches(size, growth: int, d: int) -> bool:
    """Whether a shift by d along an axis of `size` (growth as `_shift`) reads any of z."""
    return not isinstance(size, int) or -(size + growth) < d < size


def _shifted_sum(planes, offsets, growth) -> jax.Array:
    """out[..., y, x] = sum_t planes[t][..., y + dy_t, x + dx_t], zero where that is outside.

    planes: T arrays [..., H, W]; offsets: T pairs (dy, dx); growth as `_shift`. Returns
    [..., H + gy, W + gx]. Each term is one pad, so XLA fuses the whole sum into one pass."""
    h, w = planes[0].shape[-2:]
    terms = [_shift(z, off, growth) for z, off in zip(planes, offsets)
             if _reaches(h, growth[0], off[0]) and _reaches(w, growth[1], off[1])]
    if not terms:
        return jnp.zeros(planes[0].shape[:-2] + (h + growth[0], w + growth[1]), planes[0].dtype)
    return functools.reduce(jnp.add, terms)


def _tap_offsets(window, pads):
    """(dy, dx) per tap, row-major: output p reads input p + offset (stride 1, rate 1)."""
    (kh, kw), ((pt, _), (pl, _)) = window, pads
    return [(ty - pt, tx - pl) for ty in range(kh) for tx in range(kw)]


def _growth(window, pads):
    """The output's size minus the input's per axis (stride 1, rate 1): static ints."""
    return tuple(lo + hi - k + 1 for (lo, hi), k in zip(pads, window))


def _narrow_fits(hw, window, pads) -> bool:
    """Whether the planes apply: a non-empty output; with symbolic sizes (`jax.export`),
    not one smaller than the input ("VALID"), whose planes' sizes export cannot prove
    non-negative (XLA's convolution exports as it is)."""
    growth = _growth(window, pads)
    if all(isinstance(n, int) for n in hw):
        return min(n + g for n, g in zip(hw, growth)) >= 1
    return min(growth) >= 0


def _narrow_output_conv(x, kernel, pads, preferred_element_type):
    """The convolution for few output channels O: one product to the kh*kw*O channel-major
    planes z[t, o] = x . kernel[t, :, o], then their shifted sum; [B, H', W', O]."""
    kh, kw, c, o = kernel.shape
    z = jnp.einsum("bhwc,tco->tobhw", x, kernel.reshape(kh * kw, c, o), preferred_element_type=preferred_element_type)
    y = _shifted_sum(list(z), _tap_offsets((kh, kw), pads), _growth((kh, kw), pads))
    return jnp.moveaxis(y, 0, -1)


def _narrow_input_grad(g, kernel, pads):
    """The input gradient for few input channels, channel by channel: one product to the
    kh*kw planes z[..., t] = g . kernel[t, c, :] and their shifted sum (taps mirrored).
    The planes are tap-minor ([B, H', W', T], the product's own output layout): reverse
    mode runs this function as the transpose of its transpose (`_transposed`), whose
    product puts the pixels first. Where the input is a concatenation whose other parts
    need no gradient (DeepFill's [image, ones, mask]), XLA drops the channels that are
    sliced away. g: [B, H', W', O]; returns [B, H, W, C]."""
    kh, kw, c, o = kernel.shape
    back = [(-dy, -dx) for dy, dx in _tap_offsets((kh, kw), pads)]
    shrink = tuple(-n for n in _growth((kh, kw), pads))

    def channel(ci):
        z = jnp.einsum("bhwo,to->bhwt", g, kernel[:, :, ci].reshape(kh * kw, o))
        return _shifted_sum([z[..., t] for t in range(kh * kw)], back, shrink)

    return jnp.stack([channel(ci) for ci in range(c)], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _narrow_conv(x, kernel, pads, preferred_element_type):
    """A stride-1 conv with few input or output channels: the value is
    `_narrow_output_conv` for few outputs, else XLA's; the tangent in x is, for few inputs,
    conv(dx, kernel) as the transpose of `_narrow_input_grad` (`_transposed`: the input
    gradient is planes and shifted sums), else XLA's; the tangent in the kernel, hence the
    kernel gradient, is XLA's."""
    if _narrow(kernel.shape[-1]):
        return _narrow_output_conv(x, kernel, pads, preferred_element_type)
    return _xla_conv(x, kernel, 1, 1, pads, preferred_element_type)


@functools.partial(_narrow_conv.defjvp, symbolic_zeros=True)
def _narrow_conv_jvp(pads, preferred_element_type, primals, tangents):
    x, kernel = primals
    conv = functools.partial(_xla_conv, stride=1, rate=1, padding=pads, preferred_element_type=preferred_element_type)
    y = _narrow_conv(x, kernel, pads, preferred_element_type)
    if _narrow(x.shape[-1]):
        grad = functools.partial(_narrow_input_grad, kernel=kernel, pads=pads)
        of_input = lambda dx: _transposed(grad, dx, y)  # noqa: E731
    else:
        of_input = functools.partial(conv, kernel=kernel)
    return y, _tangents(*tangents, of_input, functools.partial(conv, x))
