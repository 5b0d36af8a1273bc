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
from jattn.ops.conv import conv2d
from jattn.ops.resize import resize_nearest_align_corners

__all__ = ["GenConv", "GatedConv", "GenDeconv", "SNConv", "SNDense"]

Initializer = Any
Activation = Callable[[jax.Array], jax.Array] | None
_PADDINGS = ("SAME", "VALID", "SYMMETRIC", "REFLECT")


def _mode_padding(x: jax.Array, padding: str, ksize: int, rate: int, upsample: bool):
    """DeepFill's "SYMMETRIC" / "REFLECT" padding as an explicit pad of ``x`` by
    ``rate * (ksize - 1) // 2``, then a "VALID" conv: returns ``(x, padding, upsample)``
    for :func:`jattn.ops.conv.conv2d`. With ``upsample`` the upsampled image is padded: by
    one pixel (3x3, rate 1) that is ``x``'s edge pixel, so ``x`` is padded by its edge and
    the conv crops one upsampled pixel (pads -1) without building the upsampled image;
    wider pads upsample ``x`` first."""
    if padding not in ("SYMMETRIC", "REFLECT"):
        return x, padding, upsample
    p = rate * (ksize - 1) // 2
    if upsample and p == 1:
        return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), ((-1, -1), (-1, -1)), True
    if upsample:
        x = resize_nearest_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=padding.lower()), "VALID", False


def _gen_conv(module: nn.Module, x: jax.Array, out_features: int, dtype: Dtype) -> jax.Array:
    """Declares ``kernel``/``bias`` in ``module``'s scope and convolves ``x`` with them.

    Uses ``module.ksize``, ``stride``, ``rate`` (dilation), ``padding``, ``upsample``,
    ``kernel_init``, ``bias_init``, ``param_dtype``. Padding "SAME" / "VALID" is
    TF's; "SYMMETRIC" / "REFLECT" pad ``rate * (ksize - 1) // 2`` on each side
    with that mode, then convolve "VALID" (as DeepFill's gen_conv does). With
    ``upsample`` the conv reads ``x`` 2x nearest-upsampled (TF1 align corners). The
    convolution is :func:`jattn.ops.conv.conv2d` (XLA's; on CPU a faster formulation
    where there is one).

    Args:
      x: ``[B, H, W, Cin]``, already in ``dtype``.
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
    kernel = module.param("kernel", module.kernel_init, (k, k, x.shape[-1], out_features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (out_features,), module.param_dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    x, padding, upsample = _mode_padding(x, module.padding, k, module.rate, module.upsample)
    y = conv2d(x, kernel, module.stride, module.rate, padding, upsample=upsample, preferred_element_type=acc)
    return y + bias.astype(acc)


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
      upsample: convolve ``x`` 2x nearest-upsampled (as :class:`GenDeconv`); on CPU
        without building the upsampled image when the conv is 3x3 stride 1.
      kernel_init: glorot uniform (TF ``conv2d`` default); bias_init: zeros.

    Call: ``x [B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), features]``
    for "SAME" (``2H, 2W`` in place of ``H, W`` with ``upsample``).
    Params: ``kernel [ksize, ksize, Cin, features]``, ``bias [features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        y = _gen_conv(self, x.astype(dtype), self.features, dtype)
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

    Call: ``x [B, H, W, Cin] -> [B, H', W', features]``.
    Params: ``kernel [ksize, ksize, Cin, 2 * features]``, ``bias [2 * features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        if self.activation is None or self.features == 3:
            return _gen_conv(self, x, self.features, dtype).astype(dtype)
        y = _gen_conv(self, x, 2 * self.features, dtype)
        a, g = jnp.split(y, 2, axis=-1)
        return (self.activation(a) * nn.sigmoid(g)).astype(dtype)


class GenDeconv(nn.Module):
    """DeepFill ``gen_deconv``: 2x nearest upsampling, then a 3x3 stride-1 conv.

    The upsampling is TF1 ``resize_nearest_neighbor(align_corners=True)`` to
    ``(2H, 2W)`` (:func:`jattn.ops.resize.resize_nearest_align_corners`); the conv
    is a :class:`GenConv` (v1) or, with ``gated=True``, a :class:`GatedConv` (v2),
    named ``f"{name}_conv"`` as in the official code (``conv13_upsample`` holds
    ``conv13_upsample_conv``), or ``conv`` when the module has no name. On CPU the
    upsampled image is never built: the conv runs on the input as four 2x2 convolutions
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
