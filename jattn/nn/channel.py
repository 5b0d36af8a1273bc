"""Channel (and channel + spatial) attention modules over NHWC ``[B, H, W, C]``.

* :class:`SqueezeExcitation` -- SE block (Hu et al. 2018).
* :class:`ChannelAttention` -- RCAN's CA layer (Zhang et al. 2018).
* :class:`RCAB` -- RCAN's residual channel attention block.
* :class:`CBAM` -- Convolutional Block Attention Module (Woo et al. 2018).

All three channel gates share :func:`excite`: ``sigmoid(sum_d expand(relu(reduce(d))))``
over one (SE, CA) or two (CBAM: average and max) pooled descriptors.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype, reduced_width

__all__ = ["excite", "SqueezeExcitation", "ChannelAttention", "RCAB", "CBAM"]


def excite(
    descriptors: Sequence[jax.Array],
    reduce: Callable[[jax.Array], jax.Array],
    expand: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Channel gate ``sigmoid(sum_d expand(relu(reduce(d))))``.

    Args:
      descriptors: pooled descriptors, each ``[B, C]`` (or ``[B, 1, 1, C]``).
      reduce: map ``C -> C / r`` (Dense or 1x1 conv), shared across descriptors.
      expand: map ``C / r -> C``, shared across descriptors.

    Returns:
      Scales in (0, 1), shaped like one descriptor.
    """
    return nn.sigmoid(sum(expand(nn.relu(reduce(d))) for d in descriptors))


class SqueezeExcitation(nn.Module):
    """SE block: global average pool -> Dense C/r -> relu -> Dense C -> sigmoid -> scale.

    Attributes:
      reduction: r (16).
      return_scales: also return the scales ``[B, C]``.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``. Params: ``reduce``, ``expand`` (Dense).
    """

    reduction: int = 16
    return_scales: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        c = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        reduce = dense(reduced_width(c, self.reduction), name="reduce")
        expand = dense(c, name="expand")
        scales = excite([jnp.mean(x, axis=(1, 2))], reduce, expand)  # [B, C]
        y = x * scales[:, None, None, :]
        return (y, scales) if self.return_scales else y


class ChannelAttention(nn.Module):
    """RCAN CA layer: avg pool -> 1x1 conv C/r -> relu -> 1x1 conv C -> sigmoid -> scale.

    Same math as :class:`SqueezeExcitation` (1x1 convs on the pooled
    ``[B, 1, 1, C]`` map, RCAN's parameter layout).

    Attributes:
      reduction: r (16).
      return_scales: also return the scales ``[B, 1, 1, C]``.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``. Params: ``reduce``, ``expand`` (Conv).
    """

    reduction: int = 16
    return_scales: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        c = x.shape[-1]
        conv = functools.partial(
            nn.Conv, kernel_size=(1, 1), dtype=dtype, param_dtype=self.param_dtype
        )
        reduce = conv(reduced_width(c, self.reduction), name="reduce")
        expand = conv(c, name="expand")
        scales = excite([jnp.mean(x, axis=(1, 2), keepdims=True)], reduce, expand)
        y = x * scales
        return (y, scales) if self.return_scales else y


class RCAB(nn.Module):
    """Residual channel attention block: ``x + res_scale * CA(conv(relu(conv(x))))``.

    Both convs are ``kernel_size`` x ``kernel_size``, C -> C, with bias.

    Attributes:
      reduction: CA reduction (16).
      res_scale: residual scale (1.0).
      kernel_size: 3.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``.
    Params: ``conv1``, ``conv2`` (Conv), ``ca`` (:class:`ChannelAttention`).
    """

    reduction: int = 16
    res_scale: float = 1.0
    kernel_size: int = 3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        c = x.shape[-1]
        conv = functools.partial(
            nn.Conv, c, (self.kernel_size, self.kernel_size), padding="SAME",
            dtype=dtype, param_dtype=self.param_dtype,
        )
        res = conv(name="conv2")(nn.relu(conv(name="conv1")(x)))
        res = ChannelAttention(
            self.reduction, dtype=dtype, param_dtype=self.param_dtype, name="ca"
        )(res)
        return x + jnp.asarray(self.res_scale, dtype) * res


class CBAM(nn.Module):
    """CBAM: channel attention, then spatial attention.

    Channel: average- and max-pooled ``[B, C]`` descriptors through a shared MLP
    (Dense C/r -> relu -> Dense C), summed, sigmoid. Spatial: channel-wise mean and
    max maps concatenated ``[B, H, W, 2]`` -> ``kernel_size`` conv to 1 -> sigmoid.
    (The reference spatial conv is followed by BatchNorm; here it has a bias and no
    BatchNorm.)

    Attributes:
      reduction: r (16).
      kernel_size: spatial conv size (7).
      return_attention: also return ``(channel_scales [B, C], spatial_map [B, H, W, 1])``.

    Call: ``x [B, H, W, C] -> [B, H, W, C]``.
    Params: ``mlp_reduce``, ``mlp_expand`` (Dense), ``spatial`` (Conv).
    """

    reduction: int = 16
    kernel_size: int = 7
    return_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        x = check_nhwc("x", x)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        c = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        reduce = dense(reduced_width(c, self.reduction), name="mlp_reduce")
        expand = dense(c, name="mlp_expand")
        channel = excite([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], reduce, expand)
        x = x * channel[:, None, None, :]
        maps = jnp.concatenate(
            [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], -1
        )
        spatial = nn.sigmoid(
            nn.Conv(
                1, (self.kernel_size, self.kernel_size), padding="SAME",
                dtype=dtype, param_dtype=self.param_dtype, name="spatial",
            )(maps)
        )
        y = x * spatial
        return (y, (channel, spatial)) if self.return_attention else y
