"""Squeeze-and-excitation ResNets (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

A ResNet whose residual blocks scale their residual branch by a :class:`jattn.nn.SqueezeExcitation`
gate before the identity is added (the paper's "SE-ResNet module"):

* basic block (ResNet-18/34): 3x3 conv, BN, relu, 3x3 conv, BN, SE, + shortcut, relu;
* bottleneck (ResNet-50/101/152): 1x1 conv, BN, relu, 3x3 conv (stride), BN, relu,
  1x1 conv to 4x width, BN, SE, + shortcut, relu.

Convs have no bias (BN follows); a projection shortcut (1x1 conv with the block's stride,
BN) is used where the shape changes. The stride sits on the 3x3 conv (torchvision /
"ResNet v1.5"; the Caffe SE-ResNet strides the first 1x1 conv: same parameter count).
ImageNet stem: 7x7 conv stride 2, BN, relu, 3x3 max pool stride 2; CIFAR stem
(``cifar_stem=True``): one 3x3 conv stride 1, BN, relu. Then global average pooling and a
dense classifier.

``se=False`` drops the SE gates (a plain ResNet: the same parameters less every ``se``
subtree). ``features_only=True`` returns the stage outputs instead of logits (no pooling, no
``head`` parameters): with the ImageNet stem and four stages these are C2..C5 of the FPN paper
(strides 4, 8, 16, 32), the backbone of :class:`jattn.models.AttentionRCNN`.

Batch norm statistics live in the ``"batch_stats"`` collection: call with ``train=True``
and ``mutable=["batch_stats"]`` to use and update batch statistics, ``train=False`` to use
the running averages (momentum 0.9, epsilon 1e-5, as PyTorch's 0.1 / 1e-5).

Parameter counts (1000 classes): SE-ResNet-50 28,088,024 (the paper's 28.09 M; ResNet-50
25,557,032 + 2,530,992 for the SE gates), SE-ResNet-18 11,778,592.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, check_nhwc, compute_dtype
from jattn.nn.channel import SqueezeExcitation

__all__ = ["SEResNet", "SEResidualBlock", "se_resnet18", "se_resnet50", "se_resnet_cifar", "PRESETS"]


def _norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
        scale_init=nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init(), name=name,
    )


class SEResidualBlock(nn.Module):
    """One SE-ResNet block (basic or bottleneck, see the module docstring).

    Attributes:
      width: the block's inner width (output width: ``width`` basic, ``4 * width`` bottleneck).
      strides: stride of the block (1 or 2).
      bottleneck: bottleneck (1x1, 3x3, 1x1) or basic (3x3, 3x3) block.
      reduction: SE reduction r.
      zero_init_last_bn: start the residual branch's last BN scale at 0 (block = identity).
      se: with the SE gate (False: a plain ResNet block, no ``se`` parameters).

    Call: ``x [B, H, W, Cin], train -> [B, H / s, W / s, Cout]``.
    Params: ``conv1``, ``bn1``, ``conv2``, ``bn2`` (+ ``conv3``, ``bn3``), ``se`` (``reduce``,
    ``expand``; only with ``se``), and ``proj_conv``, ``proj_bn`` when the shape changes.
    """

    width: int
    strides: int = 1
    bottleneck: bool = False
    reduction: int = 16
    zero_init_last_bn: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    se: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        norm = functools.partial(_norm, train, self.dtype, self.param_dtype)
        s = (self.strides, self.strides)
        if self.bottleneck:
            out_width = 4 * self.width
            y = nn.relu(norm("bn1")(conv(self.width, (1, 1), name="conv1")(x)))
            y = nn.relu(norm("bn2")(conv(self.width, (3, 3), s, name="conv2")(y)))
            y = norm("bn3", self.zero_init_last_bn)(conv(out_width, (1, 1), name="conv3")(y))
        else:
            out_width = self.width
            y = nn.relu(norm("bn1")(conv(self.width, (3, 3), s, name="conv1")(x)))
            y = norm("bn2", self.zero_init_last_bn)(conv(self.width, (3, 3), name="conv2")(y))
        if self.se:
            y = SqueezeExcitation(self.reduction, dtype=self.dtype, param_dtype=self.param_dtype, name="se")(y)
        shortcut = x
        if x.shape[-1] != out_width or self.strides != 1:
            shortcut = norm("proj_bn")(conv(out_width, (1, 1), s, name="proj_conv")(x))
        return nn.relu(y + shortcut.astype(y.dtype))


class SEResNet(nn.Module):
    """SE-ResNet classifier.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for SE-ResNet-50; stage i has width
        ``width * 2**i`` and (from the second stage on) starts with a stride-2 block.
      num_classes: classifier outputs.
      width: first stage's width (64; 16 for the CIFAR ResNet-20 layout).
      bottleneck: bottleneck blocks (ResNet-50 and deeper) or basic blocks.
      reduction: SE reduction r (16).
      cifar_stem: 3x3 stride-1 stem without max pool (32x32 inputs).
      zero_init_last_bn: see :class:`SEResidualBlock`.
      dtype: compute dtype (None: promote input and params); logits are float32.
      se: SE gates in every block (False: a plain ResNet).
      features_only: return the stage outputs (see Call) instead of logits; ``num_classes``
        is then unused and there is no ``head``.

    Call: ``image [B, H, W, 3]`` (jattn's [-1, 1]), ``train: bool -> logits [B, num_classes]``;
    with ``features_only`` a tuple of the stage outputs, stage i ``[B, H / s_i, W / s_i, C_i]``
    (ImageNet stem: ``s_i = 2**(i + 2)``, C2..C5 for four stages; CIFAR stem: ``2**i``;
    ``C_i = width * 2**i``, times 4 with bottlenecks), in the compute dtype.
    Params: ``stem_conv``, ``stem_bn``, ``stage{i}_block{j}`` (:class:`SEResidualBlock`), ``head``.
    """

    stage_sizes: Sequence[int]
    num_classes: int
    width: int = 64
    bottleneck: bool = True
    reduction: int = 16
    cifar_stem: bool = False
    zero_init_last_bn: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    se: bool = True
    features_only: bool = False

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False):
        x = check_nhwc("image", image)
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        stem = functools.partial(nn.Conv, self.width, use_bias=False, padding="SAME", dtype=dtype,
                                 param_dtype=self.param_dtype, name="stem_conv")
        if self.cifar_stem:
            x = nn.relu(_norm(train, dtype, self.param_dtype, "stem_bn")(stem((3, 3))(x)))
        else:
            x = nn.relu(_norm(train, dtype, self.param_dtype, "stem_bn")(stem((7, 7), (2, 2))(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        stages = []
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = SEResidualBlock(
                    self.width * 2**i, 2 if (i > 0 and j == 0) else 1, self.bottleneck, self.reduction,
                    self.zero_init_last_bn, dtype=dtype, param_dtype=self.param_dtype, se=self.se,
                    name=f"stage{i}_block{j}",
                )(x, train)
            stages.append(x)
        if self.features_only:
            return tuple(stages)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=dtype, param_dtype=self.param_dtype, name="head")(x).astype(jnp.float32)


def se_resnet18(num_classes: int = 1000, **kw) -> SEResNet:
    """SE-ResNet-18: basic blocks (2, 2, 2, 2), width 64, ImageNet stem."""
    return SEResNet((2, 2, 2, 2), num_classes, width=64, bottleneck=False, **kw)


def se_resnet50(num_classes: int = 1000, **kw) -> SEResNet:
    """SE-ResNet-50: bottleneck blocks (3, 4, 6, 3), width 64, ImageNet stem."""
    return SEResNet((3, 4, 6, 3), num_classes, width=64, bottleneck=True, **kw)


def se_resnet_cifar(num_classes: int = 10, depth: int = 20, **kw) -> SEResNet:
    """SE version of the CIFAR ResNet-``depth`` (He et al. 2016, depth = 6n + 2): three stages
    of n basic blocks, widths 16, 32, 64, 3x3 stem without max pool."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return SEResNet((n, n, n), num_classes, width=16, bottleneck=False, cifar_stem=True, **kw)


#: Preset name -> factory(num_classes, **kw).
PRESETS = {"se_resnet18": se_resnet18, "se_resnet50": se_resnet50, "se_resnet_cifar": se_resnet_cifar}
