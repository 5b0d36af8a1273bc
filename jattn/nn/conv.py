"""Convolutions of DeepFill and spectrally normalised layers (NHWC ``[B, H, W, C]``).

* :class:`GenConv` -- DeepFill v1 ``gen_conv``: conv (+ dilation) then ELU.
* :class:`GatedConv` -- DeepFill v2 ``gen_conv``: ``activation(a) * sigmoid(g)``.
* :class:`GenDeconv` -- DeepFill ``gen_deconv``: TF1 nearest (align_corners) 2x
  upsampling, then a 3x3 GenConv (or GatedConv).
* :class:`SNConv`, :class:`SNDense` -- ``flax.linen.SpectralNorm`` wrappers.

GenConv / GatedConv keep ``kernel [k, k, Cin, Cout]`` (HWIO, as TF stores it) and
``bias [Cout]`` directly in their own scope, so official DeepFill variables
``inpaint_net/conv1/{kernel,bias}`` map one to one onto ``{"conv1": {"kernel",
"bias"}}``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.ops.activations import elu
from jattn.ops.conv import NARROW_MAX_CHANNELS, conv3x3, narrow_conv2d, strided_conv2d, upsample_conv3x3
from jattn.ops.resize import resize_nearest_align_corners

__all__ = ["GenConv", "GatedConv", "GenDeconv", "SNConv", "SNDense"]

Initializer = Any
Activation = Callable[[jax.Array], jax.Array] | None
_PADDINGS = ("SAME", "VALID", "SYMMETRIC", "REFLECT")


def _gen_conv(
    module: nn.Module, x: jax.Array | tuple[jax.Array, ...], out_features: int, dtype: Dtype
) -> jax.Array:
    """Declares ``kernel``/``bias`` in ``module``'s scope and convolves ``x`` with them.

    Uses ``module.ksize``, ``stride``, ``rate`` (dilation), ``padding``, ``upsample``,
    ``kernel_init``, ``bias_init``, ``param_dtype``. Padding "SAME" / "VALID" is
    TF's; "SYMMETRIC" / "REFLECT" pad ``rate * (ksize - 1) // 2`` on each side
    with that mode, then convolve "VALID" (as DeepFill's gen_conv does). With
    ``upsample`` the conv reads ``x`` 2x nearest-upsampled (TF1 align corners); a 3x3
    stride-1 conv then runs on ``x`` itself (:func:`jattn.ops.conv.upsample_conv3x3`).
    Other 3x3 stride-1 convs go through :func:`jattn.ops.conv.conv3x3` (Winograd's
    forward pass and gradients on CPU for wide float32 layers), stride-1 convs with at
    most ``NARROW_MAX_CHANNELS`` input or output channels through ``narrow_conv2d``,
    stride > 1 through ``strided_conv2d``.

    Args:
      x: ``[B, H, W, Cin]`` (already in ``dtype``), or a tuple of such arrays whose
        channels concatenate to the input: ``narrow_conv2d`` then computes input
        gradients only for the parts that need one (other paths concatenate them).
      out_features: Cout.

    Returns:
      ``[B, H', W', Cout]`` pre-activation, accumulated and returned in
      ``promote(dtype, float32)`` (callers cast to ``dtype`` after the activation).
    """
    if module.padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {module.padding!r}")
    if module.ksize < 1 or module.stride < 1 or module.rate < 1:
        raise ValueError(
            f"ksize, stride, rate must be >= 1, got {module.ksize}, {module.stride}, {module.rate}"
        )
    k = module.ksize
    parts = x if isinstance(x, tuple) else (x,)
    channels = sum(p.shape[-1] for p in parts)
    kernel = module.param(
        "kernel", module.kernel_init, (k, k, channels, out_features), module.param_dtype
    )
    bias = module.param("bias", module.bias_init, (out_features,), module.param_dtype)
    padding = module.padding
    acc = jnp.promote_types(dtype, jnp.float32)
    if (module.stride == 1 and module.rate == 1 and not module.upsample and padding in ("SAME", "VALID")
            and min(channels, out_features) <= NARROW_MAX_CHANNELS):
        # few channels in or out: planes and shifted sums on CPU (jattn.ops.conv.narrow_conv2d)
        y = narrow_conv2d(parts, kernel.astype(dtype), padding, preferred_element_type=acc)
        return y + bias.astype(acc)
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    if module.upsample:
        if k == 3 and module.stride == 1 and module.rate == 1:
            y = upsample_conv3x3(x, kernel.astype(acc), padding, preferred_element_type=acc)
            return y + bias.astype(acc)
        x = resize_nearest_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
    if padding in ("SYMMETRIC", "REFLECT"):
        p = module.rate * (k - 1) // 2
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=padding.lower())
        padding = "VALID"
    if module.stride > 1 and module.rate == 1:  # fast derivatives on CPU (polyphase parts, or Winograd after space-to-depth)
        y = strided_conv2d(x, kernel.astype(dtype), module.stride, padding, preferred_element_type=acc)
        return y + bias.astype(acc)
    if k == 3 and module.stride == 1:  # Winograd on CPU where it is faster (jattn.ops.conv.conv3x3)
        y = conv3x3(x, kernel.astype(dtype), module.rate, padding, preferred_element_type=acc)
        return y + bias.astype(acc)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(dtype),
        window_strides=(module.stride, module.stride),
        padding=padding,
        rhs_dilation=(module.rate, module.rate),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=acc,
    )
    return y + bias.astype(acc)


def _channel_parts(x) -> tuple[jax.Array, ...]:
    """``x`` as a tuple of NHWC arrays: an array, or a sequence of arrays (parts of one
    input along channels) with equal ``[B, H, W]``."""
    parts = (x,) if hasattr(x, "ndim") else tuple(x)
    if not parts:
        raise ValueError("x must be an NHWC array or a non-empty sequence of them")
    parts = tuple(check_nhwc("x", p) for p in parts)
    if any(p.shape[:3] != parts[0].shape[:3] for p in parts):
        raise ValueError(f"x's parts must share [B, H, W], got {[tuple(p.shape) for p in parts]}")
    return parts


class _ConvAttributes(nn.Module):
    """The attributes GenConv and GatedConv share (DeepFill's ``gen_conv`` arguments)."""

    features: int
    ksize: int
    stride: int = 1
    rate: int = 1
    activation: Activation = elu
    padding: str = "SAME"
    upsample: bool = False
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32


class GenConv(_ConvAttributes):
    """DeepFill v1 ``gen_conv``: conv2d (stride, dilation ``rate``, bias) then activation.

    No activation when ``activation is None`` or ``features == 3`` (DeepFill's
    output layer).

    Attributes:
      features: Cout.
      ksize: square kernel size.
      stride: 1.
      rate: dilation (1).
      activation: default ELU; None for none.
      padding: "SAME" (TF semantics, dilation aware), "VALID", "SYMMETRIC", "REFLECT".
      upsample: convolve ``x`` 2x nearest-upsampled (as :class:`GenDeconv`), without
        building the upsampled image when the conv is 3x3 stride 1.
      kernel_init: glorot uniform (TF ``conv2d`` default); bias_init: zeros.

    Call: ``x [B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), features]``
    for "SAME" (``2H, 2W`` in place of ``H, W`` with ``upsample``). ``x`` may also be
    a sequence of ``[B, H, W, Ci]`` arrays, the input's channels in parts (the same
    values as their concatenation): a layer with few input channels then computes an
    input gradient only for the parts that need one.
    Params: ``kernel [ksize, ksize, Cin, features]``, ``bias [features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
        parts = _channel_parts(x)
        dtype = compute_dtype(parts[0], self.dtype, self.param_dtype)
        y = _gen_conv(self, tuple(p.astype(dtype) for p in parts), self.features, dtype)
        if self.activation is not None and self.features != 3:
            y = self.activation(y)
        return y.astype(dtype)


class GatedConv(_ConvAttributes):
    """DeepFill v2 gated ``gen_conv``: conv to ``2 * features``, split channels into
    ``(a, g)``, output ``activation(a) * sigmoid(g)``.

    When ``features == 3`` or ``activation is None`` it is a plain conv to
    ``features`` (DeepFill v2's output layer). Note the official v2 ``cnum``
    argument is the conv width, i.e. ``2 * features`` here.

    Attributes: as :class:`GenConv`.

    Call: ``x [B, H, W, Cin] -> [B, H', W', features]`` (``x`` in parts as for
    :class:`GenConv`).
    Params: ``kernel [ksize, ksize, Cin, 2 * features]``, ``bias [2 * features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
        parts = _channel_parts(x)
        dtype = compute_dtype(parts[0], self.dtype, self.param_dtype)
        parts = tuple(p.astype(dtype) for p in parts)
        if self.activation is None or self.features == 3:
            return _gen_conv(self, parts, self.features, dtype).astype(dtype)
        y = _gen_conv(self, parts, 2 * self.features, dtype)
        a, g = jnp.split(y, 2, axis=-1)
        return (self.activation(a) * nn.sigmoid(g)).astype(dtype)


class GenDeconv(nn.Module):
    """DeepFill ``gen_deconv``: 2x nearest upsampling, then a 3x3 stride-1 conv.

    The upsampling is TF1 ``resize_nearest_neighbor(align_corners=True)`` to
    ``(2H, 2W)`` (:func:`jattn.ops.resize.resize_nearest_align_corners`); the conv
    is a :class:`GenConv` (v1) or, with ``gated=True``, a :class:`GatedConv` (v2),
    named ``f"{name}_conv"`` as in the official code (``conv13_upsample`` holds
    ``conv13_upsample_conv``), or ``conv`` when the module has no name. The upsampled
    image is never built: the conv runs on the input as four 2x2 convolutions
    (:func:`jattn.ops.conv.upsample_conv3x3`, 2.25x fewer FLOPs, the same values up to
    float rounding).

    Call: ``x [B, H, W, Cin] -> [B, 2H, 2W, features]``.
    Params: ``{f"{name}_conv": {"kernel", "bias"}}`` (``{"conv": ...}`` when unnamed).
    """

    features: int
    activation: Activation = elu
    padding: str = "SAME"
    gated: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_nhwc("x", x)
        layer = GatedConv if self.gated else GenConv
        return layer(
            self.features, 3, 1, activation=self.activation, padding=self.padding, upsample=True,
            dtype=self.dtype, param_dtype=self.param_dtype,
            name=f"{self.name}_conv" if self.name else "conv",
        )(x)


def _pair(v: int | Sequence[int]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


class SNConv(nn.Module):
    """Spectrally normalised 2-D conv: ``flax.linen.SpectralNorm(nn.Conv(...))``.

    The kernel is divided by its largest singular value (of the reshaped
    ``[kh * kw * Cin, Cout]`` matrix), estimated by power iteration. The iteration
    vector ``u`` and the estimate ``sigma`` live in the mutable ``"batch_stats"``
    collection; with ``update_stats=True`` one (``n_steps``) power iteration runs
    per call and they are updated (apply with ``mutable=["batch_stats"]``); with
    ``update_stats=False`` they are left as they are (evaluation).

    Call: ``x [B, H, W, Cin], update_stats: bool -> [B, H', W', features]``.
    Params: ``{"conv": {"kernel", "bias"}}``;
    batch_stats: ``{"sn": {"conv/kernel/u", "conv/kernel/sigma"}}``.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = True
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        x = check_nhwc("x", x)
        conv = nn.Conv(
            self.features, _pair(self.kernel_size), strides=_pair(self.strides),
            padding=self.padding, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, name="conv",
        )
        return nn.SpectralNorm(
            conv, n_steps=self.n_steps, epsilon=self.epsilon, dtype=None,  # a bf16 dtype here would store the kernel params in bf16
            param_dtype=self.param_dtype, name="sn",
        )(x, update_stats=update_stats)


class SNDense(nn.Module):
    """Spectrally normalised dense layer: ``flax.linen.SpectralNorm(nn.Dense(...))``.

    See :class:`SNConv` for the ``"batch_stats"`` / ``update_stats`` contract.

    Call: ``x [..., Din], update_stats: bool -> [..., features]``.
    Params: ``{"dense": {"kernel", "bias"}}``;
    batch_stats: ``{"sn": {"dense/kernel/u", "dense/kernel/sigma"}}``.
    """

    features: int
    use_bias: bool = True
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        dense = nn.Dense(
            self.features, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, name="dense",
        )
        return nn.SpectralNorm(
            dense, n_steps=self.n_steps, epsilon=self.epsilon, dtype=None,  # a bf16 dtype here would store the kernel params in bf16
            param_dtype=self.param_dtype, name="sn",
        )(x, update_stats=update_stats)
