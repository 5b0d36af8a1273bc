"""DeepFill v2 (Yu et al., "Free-Form Image Inpainting with Gated Convolution", ICCV 2019).

The generator and the SN-PatchGAN critic of the official TF1 code (JiahuiYu/generative_inpainting,
master, with neuralgym's ``conv2d_spectral_norm``), with the official variable-scope names as
Flax module names, so that an official checkpoint imports by renaming only
(:mod:`jattn.export.deepfill_import`):

* ``inpaint_net/conv1/kernel`` is ``params["conv1"]["kernel"]`` of :class:`DeepFillV2Generator`;
* ``discriminator/sn_patch_gan/conv1/kernel`` is ``params["sn_patch_gan"]["conv1"]["kernel"]``
  of :class:`SNPatchGANCritic`, and its power-iteration vector
  ``discriminator/sn_patch_gan/conv1/kernel_sn/u`` is
  ``batch_stats["sn_patch_gan"]["conv1"]["kernel_sn"]["u"]``.

The generator is v1's (:class:`jattn.models.deepfill.DeepFillV1Generator`, whose layout it
reuses) with three differences: every conv but the two 3-channel outputs is gated
(:class:`jattn.nn.GatedConv`: a conv to ``c`` channels, ``act(a) * sigmoid(g)`` on its two
halves, so the features are half of v1's: contextual attention runs on ``2 * cnum`` = 96
channels at cnum 48); both stage outputs are ``tanh`` (v1 clips); the stage-2 branches read
only the 3-channel composite (v1 adds the ones and mask channels). ``cnum`` here is the
official one: the conv width of ``conv1`` (48).

Conventions as v1: NHWC, images in [-1, 1], masks 1 = hole, one mask per image allowed;
official checkpoints expect **BGR** images (import with ``channel_order="rgb"`` for jattn's
RGB pipeline).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.models.deepfill import CA_RATE, DeepFillV1Generator
from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.nn.conv import GatedConv, GenDeconv
from jattn.ops.activations import elu
from jattn.ops.conv import conv2d
from jattn.ops.flow import flow_to_color

__all__ = [
    "DeepFillV2Generator",
    "KernelSpectralNorm",
    "SNDisConv",
    "SNPatchGANCritic",
    "offsets_to_flow_v2",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def offsets_to_flow_v2(offsets: jax.Array, rate: int = CA_RATE) -> jax.Array:
    """The official v2 ``offset_flow`` picture: as v1's, but upsampled bilinearly.

    Args:
      offsets: int32 ``[B, h, w, 2]`` (third output of :class:`DeepFillV2Generator`).

    Returns:
      float32 ``[B, h * rate, w * rate, 3]`` in [-1, 1].
    """
    return flow_to_color(offsets, rate, "bilinear")


# --------------------------------------------------------------------------- generator


class DeepFillV2Generator(DeepFillV1Generator):
    """The official two-stage v2 generator (``inpaint_net``, 4,052,478 params at cnum 48).

    Attributes:
      cnum: the official base width (48): conv widths cnum, 2 cnum, 4 cnum and cnum / 2,
        gated to half of that. Must be a multiple of 4 other than 12 (a gated layer of
        3 features would be taken for an output layer by :class:`GatedConv`).
      dtype, param_dtype, ca_block_size, ca_precision: as :class:`DeepFillV1Generator`.

    Call: ``(x_in [B, H, W, 3], mask [1 or B, H, W, 1]) -> (x1, x2, offsets)`` with
    x_in = image * (1 - mask) in [-1, 1], H and W multiples of 8; x1, x2 ``[B, H, W, 3]``
    float32 in (-1, 1) (tanh); offsets int32 ``[B, H // 8, W // 8, 2]``
    (:func:`offsets_to_flow_v2` draws them). Intermediates as v1 (``ca_f`` etc. have
    ``2 * cnum`` channels).

    The layout is v1's ``__call__``; this class changes its layers through the ``_conv`` /
    ``_deconv`` hooks: gated convs; ``tanh`` on the 3-channel outputs (v1's final clip is
    then the identity); and through ``_refine_input``: the stage-2 branches (``xconv1``,
    ``pmconv1``) read the 3-channel composite alone (v1: ``[composite, ones, mask]``).
    """

    cnum: int = 48

    def __post_init__(self):
        if self.cnum < 4 or self.cnum % 4 or self.cnum == 12:
            raise ValueError(
                f"DeepFillV2Generator: cnum must be a positive multiple of 4 other than 12, got {self.cnum}"
            )
        super().__post_init__()

    def _refine_input(self, x, ones, mask_ch):
        """The refinement branches' input: the composite ``[B, H, W, 3]`` alone."""
        del ones, mask_ch
        return x

    def _conv(self, x, features, ksize, stride=1, rate=1, activation=elu, *, name):
        output = activation is None
        y = GatedConv(
            3 if output else features // 2, ksize, stride, rate, activation=activation,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )(x)
        return jnp.tanh(y.astype(jnp.float32)) if output else y

    def _deconv(self, x, features, *, name):
        return GenDeconv(features // 2, gated=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)


# --------------------------------------------------------------------------- critic


def _l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """neuralgym ``l2_norm``: ``x / (sqrt(sum(x ** 2)) + eps)`` over all elements."""
    return x / (jnp.sqrt(jnp.sum(jnp.square(x))) + eps)


def _truncated_normal(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    """TF ``truncated_normal_initializer()``: N(0, 1) redrawn outside 2 standard deviations."""
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


class KernelSpectralNorm(nn.Module):
    """neuralgym ``kernel_spectral_norm`` (one power iteration per call).

    With ``W`` the kernel reshaped to ``[k * k * Cin, Cout]`` and ``u`` the stored vector
    ``[1, Cout]``: ``v = l2(u W^T)``, ``u' = l2(v W)``, ``sigma = v W u'^T``; returns
    ``W / sigma`` in the kernel's shape, where ``l2(x) = x / (||x|| + eps)``. As in the
    official code the gradient flows through ``v``, ``u'`` and ``sigma`` (not stopped),
    and the stored ``u`` (variable ``"u"`` of collection ``"batch_stats"``, initialised
    by TF's truncated normal) becomes ``u'`` when ``update_stats`` is True (never at init).
    The normalisation runs in float32.

    Call: ``(kernel [..., Cout], update_stats: bool) -> float32 [..., Cout]``.
    """

    epsilon: float = 1e-12

    @nn.compact
    def __call__(self, kernel: jax.Array, update_stats: bool) -> jax.Array:
        w = jnp.asarray(kernel, jnp.float32).reshape(-1, kernel.shape[-1])
        u_var = self.variable(
            "batch_stats", "u", lambda: _truncated_normal(self.make_rng("params"), (1, w.shape[-1]))
        )
        u = jax.lax.stop_gradient(u_var.value.astype(jnp.float32))
        v_hat = _l2_norm(jnp.matmul(u, w.T, precision=_HIGHEST), self.epsilon)
        u_hat = _l2_norm(jnp.matmul(v_hat, w, precision=_HIGHEST), self.epsilon)
        sigma = jnp.matmul(jnp.matmul(v_hat, w, precision=_HIGHEST), u_hat.T, precision=_HIGHEST)
        if update_stats and not self.is_initializing():
            u_var.value = jax.lax.stop_gradient(u_hat).astype(u_var.value.dtype)
        return (w / sigma).reshape(kernel.shape)


class SNDisConv(nn.Module):
    """DeepFill v2 ``dis_conv``: neuralgym ``conv2d_spectral_norm`` (5x5, stride 2, TF
    'SAME', bias) then ``tf.nn.leaky_relu`` (slope 0.2).

    Call: ``(x [B, H, W, Cin], update_stats) -> [B, ceil(H / 2), ceil(W / 2), features]``.
    Params: ``kernel [5, 5, Cin, features]`` (glorot uniform), ``bias [features]`` (zeros);
    batch_stats: ``{"kernel_sn": {"u": [1, features]}}``.
    """

    features: int
    ksize: int = 5
    stride: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        k = self.ksize
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        kernel = KernelSpectralNorm(name="kernel_sn")(kernel, update_stats)
        acc = jnp.promote_types(dtype, jnp.float32)
        y = conv2d(x.astype(dtype), kernel.astype(dtype), self.stride, 1, "SAME", preferred_element_type=acc)
        return nn.leaky_relu(y + bias.astype(acc), 0.2).astype(dtype)


class _SNStack(nn.Module):
    """SNDisConv layers ``conv1``, ``conv2``, ... then NHWC flatten (``flatten`` of the official code)."""

    widths: Sequence[int]
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = SNDisConv(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x, update_stats)
        return x.reshape(x.shape[0], -1)


class SNPatchGANCritic(nn.Module):
    """The official SN-PatchGAN critic (``discriminator/sn_patch_gan``; 5,946,816 params
    and 1,216 power-iteration entries at cnum 64 with a 4-channel input).

    Six :class:`SNDisConv` (5x5, stride 2: widths cnum, 2, 4, 4, 4, 4 cnum), flattened:
    every output is the score of one patch.

    The official input (``gan_with_mask``) is ``concat([images, mask], -1)``: 3 image
    channels (BGR for official weights) and the hole mask; :func:`jattn.losses.deepfill_v2_losses`
    builds it.

    Call: ``(x [B, H, W, C], update_stats: bool) -> float32 [B, ceil(H/64) * ceil(W/64) * 4 cnum]``
    (4096 scores for a 256x256 input). Apply with ``mutable=["batch_stats"]`` and
    ``update_stats=True`` in training: each call runs one power iteration per layer and
    returns the updated vectors, as every run of the official graph does.
    """

    cnum: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        c = self.cnum
        widths = (c, 2 * c, 4 * c, 4 * c, 4 * c, 4 * c)
        out = _SNStack(widths, dtype=self.dtype, param_dtype=self.param_dtype, name="sn_patch_gan")(x, update_stats)
        return out.astype(jnp.float32)
