"""SAGAN (Zhang et al. 2019, "Self-Attention Generative Adversarial Networks") in Flax Linen.

ResNet generator and discriminator of the SNGAN / BigGAN family, as in the official SAGAN code
(brain-research/self-attention-gan) and BigGAN's "SA-GAN baseline" (Brock et al. 2019, Table 1):

* every conv / dense layer of both networks is spectrally normalised (:class:`SNConv`,
  :class:`SNDense`; their power-iteration vectors live in the ``"batch_stats"`` collection);
* generator blocks: BN -> ReLU -> 2x nearest upsample -> 3x3 conv -> BN -> ReLU -> 3x3 conv,
  plus a 2x upsampled 1x1-conv shortcut; the BNs are class-conditional when
  ``num_classes > 0`` (per-class gains, initialised to 1, and biases, initialised to 0);
  z (``z_dim``) -> dense -> ``4 x 4 x widths[0]``; output BN -> ReLU -> 3x3 conv to 3 -> tanh;
* discriminator blocks: ReLU -> 3x3 conv -> ReLU -> 3x3 conv -> 2x2 average pool, with a
  1x1-conv shortcut (pooled) when the block downsamples or changes width; the first block
  has no leading ReLU and pools its input before the shortcut conv; then ReLU, sum over
  positions, a dense layer to one logit plus, when conditional, the projection
  ``<embed(y), h>`` (a spectrally normalised class embedding);
* one self-attention block (:class:`SNSelfAttention2D`, ``gamma = 0`` at init) after the
  block of each network whose output has ``attention_resolution`` pixels per side.

Widths are ``ch`` times the multipliers of :data:`G_WIDTHS` / :data:`D_WIDTHS` (BigGAN's
architectures for 32, 64 and 128 pixel images; ``ch = 64`` is the paper's).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, reduced_width
from jattn.nn.conv import SNConv, SNDense
from jattn.ops.attention import dot_product_attention

__all__ = [
    "D_WIDTHS",
    "G_WIDTHS",
    "ConditionalBatchNorm",
    "DBlock",
    "GBlock",
    "SAGANDiscriminator",
    "SAGANGenerator",
    "SNSelfAttention2D",
    "attention_resolutions",
]

# Width multipliers of `ch`: the generator's 4x4 input, then each upsampling block's output.
G_WIDTHS = {32: (4, 4, 4, 4), 64: (16, 16, 8, 4, 2), 128: (16, 16, 8, 4, 2, 1)}
# Discriminator blocks: (output width multiplier, downsamples).
D_WIDTHS = {
    32: ((4, True), (4, True), (4, False), (4, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
}


def _check_size(image_size: int) -> None:
    if image_size not in G_WIDTHS:
        raise ValueError(f"SAGAN image_size must be one of {sorted(G_WIDTHS)}, got {image_size}")


def attention_resolutions(image_size: int) -> dict[str, tuple[int, ...]]:
    """The block output resolutions where attention may go: {"generator": ..., "discriminator": ...}."""
    _check_size(image_size)
    g = tuple(4 * 2 ** (i + 1) for i in range(len(G_WIDTHS[image_size]) - 1))
    d, r = [], image_size
    for _, down in D_WIDTHS[image_size]:
        r = r // 2 if down else r
        d.append(r)
    return {"generator": g, "discriminator": tuple(dict.fromkeys(d))}


def _attention_block(resolutions: tuple[int, ...], attention_resolution: int | None, which: str) -> int | None:
    """Index of the first block whose output resolution is `attention_resolution` (None: no attention)."""
    if not attention_resolution:
        return None
    if attention_resolution not in resolutions:
        raise ValueError(
            f"attention_resolution={attention_resolution} is not a {which} block resolution; "
            f"choose one of {sorted(set(resolutions))} (or 0 / None for no attention)"
        )
    return resolutions.index(attention_resolution)


def _upsample(x: jax.Array) -> jax.Array:
    """2x nearest: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x: jax.Array) -> jax.Array:
    """2x2 average pool: ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _flatten(x: jax.Array) -> jax.Array:
    return einops.rearrange(x, "b h w c -> b (h w) c")


class SNSelfAttention2D(nn.Module):
    """SAGAN self-attention with spectrally normalised 1x1 convs (official ``sn_non_local_block_sim``).

    ``theta``, ``phi``: 1x1 convs to ``C // reduction``; ``g``: to ``C // value_reduction``;
    with ``pool`` phi and g are 2x2 max-pooled (keys / values at a quarter of the positions,
    as in the official code); ``o = softmax(theta phi^T) g`` (unscaled logits, softmax over
    keys) is mapped back to C by the 1x1 conv ``out``; ``y = x + gamma * out(o)`` with the
    scalar ``gamma`` initialised to 0 (the block is the identity at init). No biases.
    (:class:`jattn.nn.SelfAttention2D` is the unnormalised, unpooled variant of the paper's
    figure.)

    Call: ``x [B, H, W, C], update_stats: bool -> [B, H, W, C]`` (H, W even with ``pool``).
    Params: ``theta``, ``phi``, ``g``, ``out`` (SNConv), ``gamma`` []; batch_stats: the SN vectors.
    """

    reduction: int = 8
    value_reduction: int = 2
    pool: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        x = check_nhwc("x", x)
        _, h, w, c = x.shape
        if self.pool and (h % 2 or w % 2):
            raise ValueError(f"SNSelfAttention2D with pool=True needs even H, W, got {h}x{w}")
        conv = functools.partial(
            SNConv, kernel_size=1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        d = reduced_width(c, self.reduction)
        dv = reduced_width(c, self.value_reduction, "value_reduction")
        theta = conv(d, name="theta")(x, update_stats)
        phi = conv(d, name="phi")(x, update_stats)
        g = conv(dv, name="g")(x, update_stats)
        if self.pool:
            phi = nn.max_pool(phi, (2, 2), strides=(2, 2))
            g = nn.max_pool(g, (2, 2), strides=(2, 2))
        o = dot_product_attention(_flatten(theta), _flatten(phi), _flatten(g), scale=1.0)
        o = einops.rearrange(o, "b (h w) c -> b h w c", h=h, w=w)
        o = conv(c, name="out")(o, update_stats)
        gamma = self.param("gamma", nn.initializers.zeros_init(), (), self.param_dtype)
        return (x + gamma.astype(o.dtype) * o).astype(o.dtype)


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose gain and bias are looked up by class (``num_classes > 0``), else plain BN.

    Conditional: ``BN(x) * gain[y] + bias[y]`` with tables ``gain [K, C]`` (init 1) and
    ``bias [K, C]`` (init 0), as the official SAGAN ``ConditionalBatchNorm``. Statistics are
    over the (global) batch in training, running averages otherwise.

    Call: ``x [B, H, W, C], labels [B] int | None, train: bool -> [B, H, W, C]``.
    Params: ``gain``, ``bias`` (or ``bn/{scale, bias}``); batch_stats: ``bn/{mean, var}``.
    """

    num_classes: int = 0
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array | None, train: bool) -> jax.Array:
        conditional = self.num_classes > 0
        y = nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
            use_scale=not conditional, use_bias=not conditional, dtype=self.dtype,
            param_dtype=self.param_dtype, name="bn",
        )(x)
        if not conditional:
            return y
        if labels is None:
            raise ValueError(f"a class-conditional model ({self.num_classes} classes) needs labels")
        c = x.shape[-1]
        gain = self.param("gain", nn.initializers.ones_init(), (self.num_classes, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes, c), self.param_dtype)
        labels = jnp.asarray(labels, jnp.int32)
        return y * gain[labels][:, None, None, :].astype(y.dtype) + bias[labels][:, None, None, :].astype(y.dtype)


class GBlock(nn.Module):
    """Generator residual block, 2x upsampling.

    ``relu(cbn0(x)) -> up -> conv1 3x3 -> relu(cbn1) -> conv2 3x3``, plus ``conv_sc(up(x))`` (1x1).

    Call: ``x [B, H, W, Cin], labels [B] | None, train -> [B, 2H, 2W, features]``.
    """

    features: int
    num_classes: int = 0
    bn_momentum: float = 0.9
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array | None, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = functools.partial(ConditionalBatchNorm, self.num_classes, self.bn_momentum, **kw)
        h = _upsample(nn.relu(bn(name="bn0")(x, labels, train)))
        h = SNConv(self.features, 3, name="conv1", **kw)(h, train)
        h = nn.relu(bn(name="bn1")(h, labels, train))
        h = SNConv(self.features, 3, name="conv2", **kw)(h, train)
        return h + SNConv(self.features, 1, name="conv_sc", **kw)(_upsample(x), train)


class DBlock(nn.Module):
    """Discriminator residual block.

    ``[relu] -> conv1 3x3 -> relu -> conv2 3x3 -> [avgpool]``; shortcut (when downsampling or
    the width changes) ``conv_sc 1x1 -> [avgpool]``, or for the first block (``first=True``:
    no leading ReLU) ``avgpool -> conv_sc``; else the identity.

    Call: ``x [B, H, W, Cin], update_stats -> [B, H', W', features]``.
    """

    features: int
    downsample: bool = True
    first: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool) -> jax.Array:
        conv = functools.partial(SNConv, dtype=self.dtype, param_dtype=self.param_dtype)
        pool = _downsample if self.downsample else (lambda t: t)
        h = x if self.first else nn.relu(x)
        h = conv(self.features, 3, name="conv1")(h, update_stats)
        h = pool(conv(self.features, 3, name="conv2")(nn.relu(h), update_stats))
        if self.first:
            return h + conv(self.features, 1, name="conv_sc")(pool(x), update_stats)
        if self.downsample or x.shape[-1] != self.features:
            return h + pool(conv(self.features, 1, name="conv_sc")(x, update_stats))
        return h + x


class SAGANGenerator(nn.Module):
    """SAGAN generator: ``z [B, z_dim], labels [B] | None -> images [B, S, S, 3]`` in [-1, 1].

    Attributes:
      image_size: S in {32, 64, 128}: ``log2(S / 4)`` upsampling blocks from 4x4.
      ch: base width (64 in the paper); widths are ``ch * G_WIDTHS[S]``.
      z_dim: latent size (128).
      num_classes: 0 = unconditional; else class-conditional batch norm.
      attention_resolution: self-attention after the block with this output size
        (one of 8, 16, ..., S; 0 / None: none). The paper's best at 128 px: 32.
      bn_momentum: running-average momentum of the batch norms.

    Call: ``(z, labels=None, train=True)``; ``train``: batch statistics and SN power
    iteration updates (apply with ``mutable=["batch_stats"]``), else running averages.
    Params: ``dense``, ``block{i}``, ``attention``, ``bn_out``, ``conv_out``.
    """

    image_size: int = 128
    ch: int = 64
    z_dim: int = 128
    num_classes: int = 0
    attention_resolution: int | None = 32
    bn_momentum: float = 0.9
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None, train: bool = True) -> jax.Array:
        _check_size(self.image_size)
        attn_at = _attention_block(
            attention_resolutions(self.image_size)["generator"], self.attention_resolution, "generator"
        )
        if z.ndim != 2 or z.shape[-1] != self.z_dim:
            raise ValueError(f"z must be [B, {self.z_dim}], got shape {tuple(z.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = [self.ch * m for m in G_WIDTHS[self.image_size]]
        h = SNDense(4 * 4 * widths[0], name="dense", **kw)(z, train)
        h = h.reshape(z.shape[0], 4, 4, widths[0])
        for i, features in enumerate(widths[1:]):
            h = GBlock(features, self.num_classes, self.bn_momentum, name=f"block{i}", **kw)(h, labels, train)
            if i == attn_at:
                h = SNSelfAttention2D(name="attention", **kw)(h, train)
        h = nn.relu(ConditionalBatchNorm(0, self.bn_momentum, name="bn_out", **kw)(h, None, train))
        h = SNConv(3, 3, name="conv_out", **kw)(h, train)
        return jnp.tanh(h.astype(jnp.float32))


class SAGANDiscriminator(nn.Module):
    """SAGAN projection discriminator: ``images [B, S, S, 3], labels [B] | None -> logits [B]``.

    Attributes:
      image_size: S in {32, 64, 128}; blocks as :data:`D_WIDTHS`.
      ch: base width (64); widths are ``ch * D_WIDTHS[S]``.
      num_classes: 0 = unconditional; else the projection term ``<embed(y), h>``.
      attention_resolution: self-attention after the first block with this output size
        (0 / None: none).

    Call: ``(x, labels=None, update_stats=True)``: ``update_stats`` runs the SN power
    iteration updates (apply with ``mutable=["batch_stats"]``). There is no batch norm: the
    output of an example does not depend on the rest of the batch.
    Params: ``block{i}``, ``attention``, ``dense``, ``embed``.
    """

    image_size: int = 128
    ch: int = 64
    num_classes: int = 0
    attention_resolution: int | None = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array | None = None, update_stats: bool = True) -> jax.Array:
        _check_size(self.image_size)
        x = check_nhwc("x", x)
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, C], got {tuple(x.shape)}")
        resolutions, r = [], self.image_size
        for _, down in D_WIDTHS[self.image_size]:
            r = r // 2 if down else r
            resolutions.append(r)
        attn_at = _attention_block(tuple(resolutions), self.attention_resolution, "discriminator")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x
        for i, (mult, down) in enumerate(D_WIDTHS[self.image_size]):
            h = DBlock(self.ch * mult, down, first=i == 0, name=f"block{i}", **kw)(h, update_stats)
            if i == attn_at:
                h = SNSelfAttention2D(name="attention", **kw)(h, update_stats)
        h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))  # [B, C]
        out = SNDense(1, name="dense", **kw)(h, update_stats)[:, 0].astype(jnp.float32)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"a class-conditional discriminator ({self.num_classes} classes) needs labels")
            onehot = jax.nn.one_hot(labels, self.num_classes, dtype=h.dtype)
            embed = SNDense(h.shape[-1], use_bias=False, name="embed", **kw)(onehot, update_stats)
            out = out + jnp.sum(embed.astype(jnp.float32) * h, axis=-1)
        return out


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
