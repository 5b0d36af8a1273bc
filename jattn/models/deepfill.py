"""DeepFill v1 (Yu et al., "Generative Image Inpainting with Contextual Attention", CVPR 2018).

The generator and the two WGAN critics of the official TF1 code
(JiahuiYu/generative_inpainting, tag v1.0.0), with the official variable-scope names as
Flax module names, so an official checkpoint imports by renaming only
(:mod:`jattn.export.deepfill_import`): ``inpaint_net/conv1/kernel`` is
``params["conv1"]["kernel"]`` of :class:`DeepFillV1Generator`, and
``discriminator/discriminator_local/conv1/kernel`` is
``params["discriminator_local"]["conv1"]["kernel"]`` of :class:`DeepFillV1Critics`.

Conventions: NHWC, images in [-1, 1], masks 1 = hole. The models are channel-order
agnostic, but the weights are not: jattn's data pipeline is **RGB**, while the official
code reads images with OpenCV, so official checkpoints expect **BGR**. Convert at the
boundary: either feed BGR images to official weights, or import them with
``channel_order="rgb"`` (:func:`jattn.export.deepfill_import.load_official_generator`),
which permutes the first and last convs so that the network takes and returns RGB.

Improvement over the official code: the mask may be one per image ([B, H, W, 1]); it is
passed on to contextual attention, which then masks each image's own hole.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype
from jattn.nn.contextual import ContextualAttention
from jattn.nn.conv import GenConv, GenDeconv
from jattn.ops.activations import elu
from jattn.ops.conv import conv2d
from jattn.ops.flow import flow_to_color
from jattn.ops.resize import resize_nearest_align_corners

__all__ = [
    "DeepFillV1Critics",
    "DeepFillV1Generator",
    "DisConv",
    "offsets_to_flow",
]

#: The attention branch's contextual attention runs at 1/4 resolution with this rate.
CA_RATE = 2


def offsets_to_flow(offsets: jax.Array, rate: int = CA_RATE) -> jax.Array:
    """The official v1 ``offset_flow`` picture from the generator's offsets.

    Args:
      offsets: int32 ``[B, h, w, 2]`` (third output of :class:`DeepFillV1Generator`;
        h = H // 8 for an H x W input).

    Returns:
      float32 ``[B, h * rate, w * rate, 3]`` in [-1, 1] (Middlebury colours, nearest
      upsampling, as ``flow_to_image_tf`` + ``resize_nearest_neighbor`` in v1).
    """
    return flow_to_color(offsets, rate, "nearest")


def _check_inputs(x_in: jax.Array, mask: jax.Array) -> None:
    if x_in.ndim != 4 or x_in.shape[-1] != 3:
        raise ValueError(f"x_in must be [B, H, W, 3], got shape {tuple(x_in.shape)}")
    batch, height, width, _ = x_in.shape
    if height % 8 or width % 8:
        raise ValueError(f"DeepFill v1 needs H and W divisible by 8, got H={height}, W={width}")
    if mask.ndim != 4 or mask.shape[-1] != 1 or tuple(mask.shape[1:3]) != (height, width):
        raise ValueError(
            f"mask must be [1 or B, H, W, 1] with (H, W) = {(height, width)}, got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"mask batch must be 1 (shared) or B={batch} (one per image), got {mask.shape[0]}")


class DeepFillV1Generator(nn.Module):
    """The official two-stage v1 generator (``inpaint_net``, 3,601,542 params at cnum 32).

    Attributes:
      cnum: base width (official 32); every width scales with it.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); None: float32 (promote input, params).
      param_dtype: parameter dtype.
      ca_block_size: None: dense contextual attention; an int: its blocked evaluation
        (memory O(N * block) instead of O(N^2); same result).
      ca_precision: ``jax.lax.Precision`` of contextual attention's matrix products
        (use HIGHEST on GPU/TPU for parity with the float32 official op).

    Call: ``(x_in [B, H, W, 3], mask [1 or B, H, W, 1]) -> (x1, x2, offsets)`` with
    x_in = image * (1 - mask) in [-1, 1] and H, W multiples of 8; x1, x2
    ``[B, H, W, 3]`` in [-1, 1] (coarse and refined), offsets int32
    ``[B, H // 8, W // 8, 2]`` (contextual attention's argmax offsets; see
    :func:`offsets_to_flow`).

    Intermediates are sown into the ``"intermediates"`` collection (apply with
    ``mutable=["intermediates"]``): ``mask_s`` [1 or B, H/4, W/4, 1], ``ca_f`` and
    ``ca_y`` [B, H/4, W/4, 4 cnum] (contextual attention's input and output),
    ``x_hallu`` and ``pm`` [B, H/4, W/4, 4 cnum] (the two branches' outputs).
    """

    cnum: int = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    ca_block_size: int | None = None
    ca_precision: Any = None

    def _conv(self, x, features, ksize, stride=1, rate=1, activation=elu, *, name):
        return GenConv(
            features, ksize, stride, rate, activation=activation, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name,
        )(x)

    def _deconv(self, x, features, *, name):
        return GenDeconv(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    def _decoder(self, x, prefix: str, first: int):
        """Shared tail: two convs at 1/4, two (deconv, conv) up, 16-ch conv, 3-ch conv, clip."""
        c = self.cnum
        x = self._conv(x, 4 * c, 3, name=f"{prefix}{first}")
        x = self._conv(x, 4 * c, 3, name=f"{prefix}{first + 1}")
        x = self._deconv(x, 2 * c, name=f"{prefix}{first + 2}_upsample")
        x = self._conv(x, 2 * c, 3, name=f"{prefix}{first + 3}")
        x = self._deconv(x, c, name=f"{prefix}{first + 4}_upsample")
        x = self._conv(x, c // 2, 3, name=f"{prefix}{first + 5}")
        x = self._conv(x, 3, 3, activation=None, name=f"{prefix}{first + 6}")
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def _refine_input(self, x, ones, mask_ch):
        """The refinement branches' input: ``[x, ones, mask]`` (``[B, H, W, 5]``)."""
        return jnp.concatenate([x, ones, mask_ch], axis=-1)

    def _atrous(self, x, prefix: str, first: int):
        for i, rate in enumerate((2, 4, 8, 16)):
            x = self._conv(x, 4 * self.cnum, 3, rate=rate, name=f"{prefix}{first + i}_atrous")
        return x

    @nn.compact
    def __call__(self, x_in: jax.Array, mask: jax.Array):
        x_in = jnp.asarray(x_in)
        mask = jnp.asarray(mask, jnp.float32)
        _check_inputs(x_in, mask)
        c = self.cnum
        x_in = x_in.astype(jnp.float32)
        ones = jnp.ones_like(x_in[..., :1])
        mask_ch = ones * mask  # [B, H, W, 1]

        # Stage 1 (coarse) on [x, ones, mask].
        x = jnp.concatenate([x_in, ones, mask_ch], axis=-1)
        x = self._conv(x, c, 5, name="conv1")
        x = self._conv(x, 2 * c, 3, 2, name="conv2_downsample")
        x = self._conv(x, 2 * c, 3, name="conv3")
        x = self._conv(x, 4 * c, 3, 2, name="conv4_downsample")
        x = self._conv(x, 4 * c, 3, name="conv5")
        x = self._conv(x, 4 * c, 3, name="conv6")
        mask_s = resize_nearest_align_corners(mask, x.shape[1], x.shape[2])
        self.sow("intermediates", "mask_s", mask_s)
        x = self._atrous(x, "conv", 7)
        x1 = self._decoder(x, "conv", 11)

        # Stage 2 (refinement) on the composite.
        x = x1 * mask + x_in * (1.0 - mask)
        xnow = self._refine_input(x, ones, mask_ch)
        # Conv (hallucination) branch.
        x = self._conv(xnow, c, 5, name="xconv1")
        x = self._conv(x, c, 3, 2, name="xconv2_downsample")
        x = self._conv(x, 2 * c, 3, name="xconv3")
        x = self._conv(x, 2 * c, 3, 2, name="xconv4_downsample")
        x = self._conv(x, 4 * c, 3, name="xconv5")
        x = self._conv(x, 4 * c, 3, name="xconv6")
        x_hallu = self._atrous(x, "xconv", 7)
        self.sow("intermediates", "x_hallu", x_hallu)
        # Attention branch.
        x = self._conv(xnow, c, 5, name="pmconv1")
        x = self._conv(x, c, 3, 2, name="pmconv2_downsample")
        x = self._conv(x, 2 * c, 3, name="pmconv3")
        x = self._conv(x, 4 * c, 3, 2, name="pmconv4_downsample")
        x = self._conv(x, 4 * c, 3, name="pmconv5")
        x = self._conv(x, 4 * c, 3, activation=nn.relu, name="pmconv6")
        self.sow("intermediates", "ca_f", x)
        x, offsets = ContextualAttention(
            ksize=3, stride=1, rate=CA_RATE, block_size=self.ca_block_size,
            precision=self.ca_precision, name="contextual_attention",
        )(x, x, mask_s)
        self.sow("intermediates", "ca_y", x)
        x = self._conv(x, 4 * c, 3, name="pmconv9")
        pm = self._conv(x, 4 * c, 3, name="pmconv10")
        self.sow("intermediates", "pm", pm)
        # Merge.
        x = jnp.concatenate([x_hallu, pm], axis=-1)
        x2 = self._decoder(x, "allconv", 11)
        return x1, x2, offsets


class DisConv(nn.Module):
    """DeepFill v1 ``dis_conv``: 5x5 stride-2 'SAME' conv with bias, then LeakyReLU(0.2).

    Call: ``x [B, H, W, Cin] -> [B, ceil(H / 2), ceil(W / 2), features]``.
    Params: ``kernel [5, 5, Cin, features]`` (glorot uniform, as TF), ``bias [features]``.
    """

    features: int
    ksize: int = 5
    stride: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"DisConv: x must be [B, H, W, C], got shape {tuple(x.shape)}")
        dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
        k = self.ksize
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        acc = jnp.promote_types(dtype, jnp.float32)
        # The gradient penalty differentiates the critics twice: on CPU conv2d's derivatives
        # are stride-1 (polyphase) or Winograd convolutions there (jattn.ops.conv).
        y = conv2d(x.astype(dtype), kernel, self.stride, preferred_element_type=acc)
        return nn.leaky_relu(y + bias.astype(acc), 0.2).astype(dtype)


class _DisStack(nn.Module):
    """dis_conv stack then NHWC flatten: ``[B, H, W, Cin] -> [B, H/16 * W/16 * widths[-1]]``."""

    widths: Sequence[int]
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = DisConv(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
        return x.reshape(x.shape[0], -1)


class DeepFillV1Critics(nn.Module):
    """The official v1 WGAN critics (``discriminator``: 7,072,770 params at 256 / 128 input).

    ``discriminator_local`` (dis_conv 64, 128, 256, 512) sees the hole's bounding-box crop,
    ``discriminator_global`` (dis_conv 64, 128, 256, 256) the whole image; each is flattened
    (NHWC order, as TF) and scored by ``dout_local_fc`` / ``dout_global_fc`` (dense to 1).
    The dense layers' input size fixes the crop / image size at init.

    Attributes: ``cnum`` (64), ``dtype``, ``param_dtype``.

    Call: ``(local [B, h, w, 3], global_ [B, H, W, 3]) -> (d_local [B, 1], d_global [B, 1])``.
    Methods :meth:`score_local` and :meth:`score_global` evaluate one critic
    (``critics.apply(params, x, method="score_local")``).
    """

    cnum: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.cnum
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense_kw = dict(kernel_init=nn.initializers.glorot_uniform(), **kw)
        self.discriminator_local = _DisStack((c, 2 * c, 4 * c, 8 * c), **kw)
        self.discriminator_global = _DisStack((c, 2 * c, 4 * c, 4 * c), **kw)
        self.dout_local_fc = nn.Dense(1, **dense_kw)
        self.dout_global_fc = nn.Dense(1, **dense_kw)

    def score_local(self, x: jax.Array) -> jax.Array:
        """Local critic: crops ``[B, h, w, 3]`` -> ``[B, 1]`` (float32)."""
        return self.dout_local_fc(self.discriminator_local(x)).astype(jnp.float32)

    def score_global(self, x: jax.Array) -> jax.Array:
        """Global critic: images ``[B, H, W, 3]`` -> ``[B, 1]`` (float32)."""
        return self.dout_global_fc(self.discriminator_global(x)).astype(jnp.float32)

    def __call__(self, local: jax.Array, global_: jax.Array):
        return self.score_local(local), self.score_global(global_)
