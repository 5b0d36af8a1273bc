"""Attention R-CNN: Faster R-CNN (Ren et al., NeurIPS 2015) with a feature pyramid (Lin et al.,
"Feature Pyramid Networks for Object Detection", CVPR 2017) and a class-embedding attention
over each image's proposals before the box predictor.

Layout (torchvision's ``fasterrcnn_resnet50_fpn`` unless stated)::

    image [B, H, W, 3] in [-1, 1]
      -> backbone: SE-ResNet (jattn.models.classifiers, features_only) -> C2..C5 (strides 4..32)
      -> FPN: 1x1 laterals to F channels, top-down nearest upsampling + add, 3x3 outputs
              -> P2..P5, P6 = P5 subsampled by 2 (max pool 1x1 stride 2)          [F = 256]
      -> RPN: on P2..P6, a shared 3x3 conv F -> F + relu, 1x1 objectness (A) and box deltas
              (4A); A = len(aspect_ratios) anchors per cell, one size per level
              (32, 64, 128, 256, 512 for P2..P6)
      -> proposals (no gradient): decode (weights 1, 1, 1, 1), clip, per level the top
              pre_nms_top_n by objectness, drop boxes under min_size, NMS 0.7 within each
              level, the best post_nms_top_n over the levels: [B, P, 4] + valid [B, P]
      -> training only: the RoI sampler (jattn.losses.sample_rois: ground truth appended,
              512 per image, 25% foreground at IoU >= 0.5)
      -> RoIAlign 7x7 (sampling ratio 2, aligned=True as Detectron2; torchvision's
              MultiScaleRoIAlign is aligned=False) from level
              k = clamp(floor(4 + log2(sqrt(wh) / 224) + 1e-6), 2, 5) of P2..P5
      -> box head: flatten, fc6 (1024) + relu, fc7 (representation_size, 1024) + relu: x_i
      -> attention (jattn.nn.ProposalAttention): class embeddings h [K, A'] attend over the
              image's proposals, e_ki = f(x_i, h_k), a_k = softmax_i(e_k), z_k = sum_i a_ki x_i;
              each proposal adds the contexts of the classes it resembles,
              x_i' = x_i + W_o sum_k softmax_k(e_.i)_k z_k   (see that module)
      -> predictor on x': class logits [K + 1] (column 0 background) and class-specific
              box deltas [K, 4] (weights 10, 10, 5, 5; torchvision also predicts the
              background's 4, never used: left out)

**FPN, not C4.** The FPN variant is torchvision's default and scales to small objects; the
cost here is one gather of every box's samples from its own level (`multiscale_roi_align`).

**Static shapes.** Every stage has a fixed size: ``P`` proposals and ``S`` sampled RoIs per
image (padded, with ``valid`` masks), detections padded to ``detections_per_img``. Padded
proposals are zero boxes: RoIAlign pools them (finite) and the attention gives them weight 0.
The whole of `AttentionRCNN.losses` and `AttentionRCNN.detect` jits; NMS is
`jattn.ops.nms` (a while loop per image, vmapped).

**Images.** One size per batch: boxes are clipped to the (padded) input size ``(H, W)``;
anchors are laid out with the nominal strides ``2**level`` (torchvision's
``image_size // feature_size``, the same when H and W are multiples of 64). The backbone
takes jattn's [-1, 1] range (no ImageNet mean / std: trained from scratch, or adapt that
for converted weights).

**Batch norm.** The backbone's BN statistics live in ``"batch_stats"`` (``train=True`` with
``mutable=["batch_stats"]``); ``frozen_bn=True`` always uses the running statistics
(torchvision's FrozenBatchNorm2d for a pretrained backbone and small batches; the BN scales
and offsets still get gradients: mask them in the optimiser to freeze them too).

**Losses** (`AttentionRCNN.losses`, built on the detection section of `jattn.losses`):
``loss = rpn_objectness + rpn_box + roi_classification + roi_box`` (weights 1, as
torchvision), each a sum over the sampled anchors / RoIs of the whole batch divided by their
number (torchvision's normalisation; see `jattn.losses`).

**Training vs test distribution.** The attention sees the sampled RoIs in training (ground
truth included, about 25% foreground) and the NMS'd proposals at test time, as the box head
of Faster R-CNN does.

Batch interface: ``image`` float32 ``[B, H, W, 3]`` in [-1, 1]; ``boxes`` float32
``[B, M, 4]`` (x1, y1, x2, y2 in input pixels, zero rows for padding); ``classes`` int32
``[B, M]`` in ``[0, K)``, ``-1`` for padding.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn import losses as L
from jattn.models.classifiers import SEResNet
from jattn.nn._util import Dtype, check_nhwc
from jattn.nn.proposal_attention import ProposalAttention
from jattn.ops import boxes as B
from jattn.ops.nms import batched_nms, detections
from jattn.ops.roi_align import roi_align_levels

__all__ = [
    "AttentionRCNN",
    "FPN",
    "PRESETS",
    "RPNHead",
    "TwoMLPHead",
    "attention_rcnn_tiny",
    "flatten_levels",
    "multiscale_roi_align",
    "postprocess_detections",
    "roi_levels",
    "rpn_proposals",
    "upsample_nearest",
]


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of ``[B, h, w, C]`` to ``size = (H, W)`` (PyTorch's
    ``F.interpolate(mode="nearest")``: source index ``floor(i * h / H)``); static indices."""
    (h, w), (oh, ow) = x.shape[1:3], size
    iy = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
    ix = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
    return x[:, iy][:, :, ix]


class FPN(nn.Module):
    """Feature pyramid (torchvision ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``).

    Attributes:
      channels: F, the width of every output level (256).
      extra_level: append ``P6 = P5[:, ::2, ::2]`` (max pool, kernel 1, stride 2).

    Call: ``features`` (C2..C5, ``[B, H_i, W_i, C_i]``, finest first) ``-> (P2, ..., P5[, P6])``,
    each ``[B, H_i, W_i, F]``. Params: ``lateral{i}`` (1x1 conv), ``output{i}`` (3x3 conv).
    """

    channels: int = 256
    extra_level: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        conv = functools.partial(nn.Conv, self.channels, padding="SAME", dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        laterals = [conv(kernel_size=(1, 1), name=f"lateral{i}")(c) for i, c in enumerate(features)]
        n = len(laterals)
        outs = [None] * n
        top = laterals[-1]
        outs[-1] = conv(kernel_size=(3, 3), name=f"output{n - 1}")(top)
        for i in range(n - 2, -1, -1):
            top = laterals[i] + upsample_nearest(top, laterals[i].shape[1:3])
            outs[i] = conv(kernel_size=(3, 3), name=f"output{i}")(top)
        if self.extra_level:
            outs.append(outs[-1][:, ::2, ::2, :])
        return tuple(outs)


class RPNHead(nn.Module):
    """RPN head shared by all levels (torchvision ``RPNHead``; weights ~ N(0, 0.01), bias 0).

    Attributes:
      num_anchors: A per cell.

    Call: levels ``[B, H_l, W_l, F]`` ``-> (objectness, deltas)``: lists of per-level maps
    ``[B, H_l, W_l, A]`` and ``[B, H_l, W_l, 4 A]`` (channel ``4 a + j``: delta j of anchor a).
    Params: ``conv`` (3x3, F -> F), ``cls_logits`` (1x1, A), ``bbox_pred`` (1x1, 4A).
    """

    num_anchors: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]):
        init = {"kernel_init": nn.initializers.normal(0.01), "bias_init": nn.initializers.zeros_init(),
                "dtype": self.dtype, "param_dtype": self.param_dtype}
        conv = nn.Conv(levels[0].shape[-1], (3, 3), padding="SAME", name="conv", **init)
        cls = nn.Conv(self.num_anchors, (1, 1), name="cls_logits", **init)
        bbox = nn.Conv(4 * self.num_anchors, (1, 1), name="bbox_pred", **init)
        objectness, deltas = [], []
        for x in levels:
            t = nn.relu(conv(x))
            objectness.append(cls(t))
            deltas.append(bbox(t))
        return objectness, deltas


def flatten_levels(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array]):
    """Per-level RPN maps -> ``objectness [B, N]`` (float32) and ``deltas [B, N, 4]`` in the
    order of `jattn.ops.boxes.anchors` (level, row, column, cell anchor), ``N = sum H_l W_l A``."""
    b = objectness[0].shape[0]
    obj = jnp.concatenate([o.reshape(b, -1) for o in objectness], axis=1)
    dl = jnp.concatenate([d.reshape(b, -1, 4) for d in deltas], axis=1)
    return obj.astype(jnp.float32), dl.astype(jnp.float32)


class TwoMLPHead(nn.Module):
    """Box head (torchvision ``TwoMLPHead``): flatten, ``fc6`` + relu, ``fc7`` + relu.

    Call: ``[B, R, oh, ow, C] -> [B, R, representation_size]``. Params: ``fc6``, ``fc7``.
    """

    hidden_size: int = 1024
    representation_size: int = 1024
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[:2] + (-1,))
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(dense(self.hidden_size, name="fc6")(x))
        return nn.relu(dense(self.representation_size, name="fc7")(x))


# --------------------------------------------------------------------------- #
# pure functions: proposals, RoI pooling, post-processing
# --------------------------------------------------------------------------- #
def rpn_proposals(
    objectness: jax.Array,
    deltas: jax.Array,
    anchors: np.ndarray,
    level_sizes: Sequence[int],
    image_size: tuple[int, int],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float = 0.7,
    min_size: float = 1e-3,
    score_thresh: float = 0.0,
):
    """Proposals from RPN outputs (torchvision ``RegionProposalNetwork.filter_proposals``).

    Per image: decode every anchor's deltas (weights 1, 1, 1, 1), clip to ``image_size``,
    keep per level the ``pre_nms_top_n`` highest objectness logits, drop boxes narrower or
    lower than ``min_size`` and those with ``sigmoid(logit) < score_thresh``, NMS at
    ``nms_thresh`` within each level (`jattn.ops.nms.batched_nms`, level as class), and keep
    the ``post_nms_top_n`` best over all levels, by decreasing score.

    Args:
      objectness: ``[B, N]`` logits; deltas ``[B, N, 4]``; anchors ``[N, 4]`` (static).
      level_sizes: anchors per level (static, sums to N).
      image_size: static ``(H, W)``.

    Returns:
      ``(boxes [B, P, 4], scores [B, P], valid [B, P])`` with ``P = post_nms_top_n``; padded
      slots have zero boxes and scores. No gradient flows out (stop_gradient).
    """
    objectness = jax.lax.stop_gradient(jnp.asarray(objectness, jnp.float32))
    deltas = jax.lax.stop_gradient(jnp.asarray(deltas, jnp.float32))
    n = objectness.shape[1]
    if sum(level_sizes) != n or np.shape(anchors) != (n, 4):
        raise ValueError(f"{n} RPN outputs, but levels of {list(level_sizes)} anchors and anchors {np.shape(anchors)}")
    height, width = image_size
    starts = np.cumsum([0, *level_sizes])
    ks = [min(pre_nms_top_n, s) for s in level_sizes]
    level_of = jnp.asarray(np.concatenate([np.full(k, lv, np.int32) for lv, k in enumerate(ks)]))
    anchors = jnp.asarray(anchors, jnp.float32)

    def one(obj, dl):
        idx = jnp.concatenate([
            jax.lax.top_k(obj[s:e], k)[1] + s for s, e, k in zip(starts[:-1], starts[1:], ks)
        ])
        boxes = B.clip_boxes(B.decode(dl[idx], anchors[idx], L.RPN_BOX_WEIGHTS), height, width)
        prob = jax.nn.sigmoid(obj[idx])
        ok = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
        ok &= prob >= score_thresh
        keep, kept = batched_nms(boxes, prob, level_of, nms_thresh, post_nms_top_n, valid=ok)
        safe = jnp.maximum(keep, 0)
        return jnp.where(kept[:, None], boxes[safe], 0.0), jnp.where(kept, prob[safe], 0.0), kept

    return jax.vmap(one)(objectness, deltas)


def roi_levels(
    boxes: jax.Array, k_min: int = 2, k_max: int = 5, canonical_scale: float = 224.0, canonical_level: int = 4
) -> jax.Array:
    """FPN level of each box (FPN paper eq. 1, torchvision ``LevelMapper``):
    ``clamp(floor(k0 + log2(sqrt(w h) / s0) + 1e-6), k_min, k_max)``, int32 ``[...]``
    (empty boxes go to ``k_min``)."""
    area = jnp.maximum(B.box_area(boxes), 0.0)
    k = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(area) / canonical_scale) + 1e-6)
    return jnp.clip(k, k_min, k_max).astype(jnp.int32)


def multiscale_roi_align(
    levels: Sequence[jax.Array],
    boxes: jax.Array,
    strides: Sequence[int],
    *,
    output_size: int = 7,
    sampling_ratio: int = 2,
    aligned: bool = True,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
) -> jax.Array:
    """RoIAlign of each box from its FPN level (torchvision ``MultiScaleRoIAlign``).

    Each box is pooled from its `roi_levels` level (``log2(stride)``, clamped to the given
    levels) with ``spatial_scale = 1 / stride``, all boxes in one gather over the flattened
    levels (`jattn.ops.roi_align.roi_align_levels`): the cost of one RoIAlign, whatever the
    number of levels; gradients reach only each box's level.

    Args:
      levels: ``[B, H_l, W_l, C]`` per level; strides: their strides, powers of 2, increasing.
      boxes: ``[B, R, 4]`` image pixels.

    Returns:
      ``[B, R, output_size, output_size, C]``.
    """
    ks = [int(round(math.log2(s))) for s in strides]
    if any(2**k != s for k, s in zip(ks, strides)) or ks != list(range(ks[0], ks[0] + len(ks))):
        raise ValueError(f"strides must be consecutive powers of 2, got {list(strides)}")
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    target = roi_levels(boxes, ks[0], ks[-1], canonical_scale, canonical_level)
    return roi_align_levels(levels, boxes, target - ks[0], [1.0 / s for s in strides], output_size,
                            sampling_ratio, aligned)


def postprocess_detections(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    valid: jax.Array,
    image_size: tuple[int, int],
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
    pre_nms_topk: int | None = None,
) -> dict[str, jax.Array]:
    """Detections of a batch, fixed size (torchvision ``RoIHeads.postprocess_detections``).

    Softmax over ``K + 1`` classes, per-class boxes decoded from the proposals (weights 10,
    10, 5, 5) and clipped, background dropped, then per image `jattn.ops.nms.detections`
    (score ``> score_thresh``, width and height ``>= min_size``, NMS within each class at
    ``nms_thresh``, the ``detections_per_img`` best).

    Args:
      class_logits: ``[B, R, K + 1]``; box_deltas ``[B, R, K, 4]``; proposals ``[B, R, 4]``;
      valid ``[B, R]``; image_size static ``(H, W)``.

    Returns:
      dict of ``boxes [B, D, 4]``, ``scores [B, D]``, ``classes [B, D]`` int32 in ``[0, K)``
      (-1 on padding), ``valid [B, D]`` bool, ``D = detections_per_img``, by decreasing score.
    """
    probs = jax.nn.softmax(jnp.asarray(class_logits, jnp.float32), axis=-1)[..., 1:]
    boxes = B.decode(jnp.asarray(box_deltas, jnp.float32), jnp.asarray(proposals, jnp.float32)[:, :, None, :],
                     L.ROI_BOX_WEIGHTS)
    boxes = B.clip_boxes(boxes, *image_size)
    run = functools.partial(detections, score_threshold=score_thresh, iou_threshold=nms_thresh,
                            max_per_image=detections_per_img, min_size=min_size, pre_nms_topk=pre_nms_topk)
    out_boxes, scores, classes, ok = jax.vmap(lambda b, s, v: run(b, s, valid=v))(boxes, probs, valid)
    return {"boxes": out_boxes, "scores": scores, "classes": classes, "valid": ok}


# --------------------------------------------------------------------------- #
# the model
# --------------------------------------------------------------------------- #
class AttentionRCNN(nn.Module):
    """Attention R-CNN (module docstring): SE-ResNet + FPN + RPN + RoIAlign + box head +
    class-embedding attention + predictor.

    Attributes (torchvision's defaults where it has them):
      num_classes: K foreground classes (the logits have K + 1, column 0 background).
      stage_sizes, width, bottleneck, se, reduction: the SE-ResNet backbone (four stages:
        C2..C5); ``se=False`` is a plain ResNet. Default: ResNet-50's (3, 4, 6, 3), 64.
      frozen_bn: the backbone's BN always uses its running statistics.
      fpn_channels: F (256).
      anchor_sizes: one size per level P2..P6 (or a sequence per level, all of one length).
      aspect_ratios: anchor ``h / w`` ratios (0.5, 1, 2).
      rpn_pre_nms_top_n_train / _test, rpn_post_nms_top_n_train / _test: 2000 / 1000 each.
      rpn_nms_thresh (0.7), rpn_min_size (1e-3), rpn_score_thresh (0).
      rpn_fg_iou_thresh (0.7), rpn_bg_iou_thresh (0.3), rpn_batch_size_per_image (256),
      rpn_positive_fraction (0.5): RPN targets (`jattn.losses.rpn_targets`).
      box_fg_iou_thresh (0.5), box_bg_iou_thresh (0.5), box_batch_size_per_image (512),
      box_positive_fraction (0.25): RoI sampling (`jattn.losses.sample_rois`).
      box_loss: ``"smooth_l1"`` (torchvision) or ``"giou"`` for the box head.
      roi_output_size (7), roi_sampling_ratio (2), roi_aligned (True),
      canonical_scale (224), canonical_level (4): `multiscale_roi_align`.
      hidden_size (1024), representation_size (1024): the box head's fc6 / fc7.
      attention: with the class-embedding attention (False: plain Faster R-CNN).
      attention_score: ``"dot"`` or ``"additive"``; attention_dim: A' (256).
      box_score_thresh (0.05), box_nms_thresh (0.5), detections_per_img (100),
      detections_pre_nms_topk (None): `postprocess_detections`.
      dtype: compute dtype of the networks (None: float32 inputs, params); outputs, boxes
        and losses are float32.

    Methods (``model.apply(variables, ..., method=...)``):
      ``__call__(image, train=False)``: the forward pass at test time: dict of
        ``objectness [B, N]``, ``rpn_deltas [B, N, 4]``, ``proposals [B, P, 4]``,
        ``proposal_scores [B, P]``, ``proposal_valid [B, P]``, ``class_logits [B, P, K+1]``,
        ``box_deltas [B, P, K, 4]``, and with ``attention`` ``attention_weights [B, K, P]``
        (``a``: sums to 1 over an image's valid proposals, 0 on padding) and
        ``class_weights [B, P, K]``.
      ``losses(batch, key, train=True)``: dict of ``loss`` (the total) and the parts and
        counts of `jattn.losses.rpn_loss` and `jattn.losses.roi_loss`; ``key`` draws the
        anchor and RoI samples (deterministic by key).
      ``detect(image, train=False)``: `postprocess_detections` of the forward pass.
      ``features(image, train)``, ``rpn(levels)``, ``heads(levels, rois, valid)``: the stages.

    Params: ``backbone`` (:class:`jattn.models.SEResNet`), ``fpn``, ``rpn_head``, ``box_head``,
    ``proposal_attention``
    (:class:`jattn.nn.ProposalAttention`, with ``attention``), ``cls_score`` (~N(0, 0.01)),
    ``bbox_pred`` (~N(0, 0.001); Detectron's initialisation of the predictor).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    bottleneck: bool = True
    se: bool = True
    reduction: int = 16
    frozen_bn: bool = False
    fpn_channels: int = 256
    anchor_sizes: Sequence = (32, 64, 128, 256, 512)
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 1e-3
    rpn_score_thresh: float = 0.0
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_loss: str = "smooth_l1"
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_aligned: bool = True
    canonical_scale: float = 224.0
    canonical_level: int = 4
    hidden_size: int = 1024
    representation_size: int = 1024
    attention: bool = True
    attention_score: str = "dot"
    attention_dim: int = 256
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    detections_pre_nms_topk: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    #: FPN levels of the RPN (P2..P6) and of the RoI pooling (P2..P5).
    RPN_LEVELS = (2, 3, 4, 5, 6)
    ROI_LEVELS = (2, 3, 4, 5)

    def setup(self):
        if len(self.stage_sizes) != 4:
            raise ValueError(f"the FPN needs four backbone stages (C2..C5), got stage_sizes={tuple(self.stage_sizes)}")
        if self.box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {self.box_loss!r}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.backbone = SEResNet(tuple(self.stage_sizes), 0, width=self.width, bottleneck=self.bottleneck,
                                 reduction=self.reduction, se=self.se, features_only=True, **kw)
        self.fpn = FPN(self.fpn_channels, extra_level=True, **kw)
        self.rpn_head = RPNHead(self._num_anchors(), **kw)
        self.box_head = TwoMLPHead(self.hidden_size, self.representation_size, **kw)
        if self.attention:
            self.proposal_attention = ProposalAttention(
                self.num_classes, self.attention_score, self.attention_dim, return_attention=True, **kw
            )
        self.cls_score = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01), **kw)
        self.bbox_pred = nn.Dense(4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), **kw)

    # ------------------------------------------------------------------ anchors
    def _level_sizes_and_ratios(self):
        n = len(self.RPN_LEVELS)
        sizes = [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in self.anchor_sizes]
        if len(sizes) != n:
            raise ValueError(f"anchor_sizes needs one entry per RPN level P2..P6 ({n}), got {self.anchor_sizes}")
        return sizes, [tuple(self.aspect_ratios)] * n

    def _num_anchors(self) -> int:
        sizes, ratios = self._level_sizes_and_ratios()
        counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
        if len(counts) != 1:
            raise ValueError(f"every level needs as many anchors per cell (a shared RPN head), got {self.anchor_sizes}")
        return counts.pop()

    def anchors(self, levels: Sequence[jax.Array]) -> tuple[np.ndarray, list[int]]:
        """Static anchors ``[N, 4]`` (`jattn.ops.boxes.anchors` order) for the RPN levels'
        shapes, and the number per level."""
        sizes, ratios = self._level_sizes_and_ratios()
        shapes = [tuple(x.shape[1:3]) for x in levels]
        anchors = B.anchors(shapes, [2**k for k in self.RPN_LEVELS], sizes, ratios)
        return anchors, [h * w * self._num_anchors() for h, w in shapes]

    # ------------------------------------------------------------------ stages
    def features(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """``image [B, H, W, 3] -> (P2, P3, P4, P5, P6)``, each ``[B, ceil(H / 2**l), ceil(W / 2**l), F]``."""
        image = check_nhwc("image", image)
        if image.shape[-1] != 3:
            raise ValueError(f"image must have 3 channels, got shape {tuple(image.shape)}")
        c = self.backbone(image, train=train and not self.frozen_bn)
        return self.fpn(c)

    def rpn(self, levels: Sequence[jax.Array]):
        """RPN outputs over P2..P6: ``objectness [B, N]``, ``deltas [B, N, 4]``, static
        ``anchors [N, 4]`` in the same order, anchors per level."""
        obj, dl = flatten_levels(*self.rpn_head(levels))
        anchors, sizes = self.anchors(levels)
        return obj, dl, anchors, sizes

    def proposals(self, objectness, deltas, anchors, level_sizes, image_size, train: bool):
        """`rpn_proposals` with the model's settings (train or test numbers)."""
        return rpn_proposals(
            objectness, deltas, anchors, level_sizes, image_size,
            pre_nms_top_n=self.rpn_pre_nms_top_n_train if train else self.rpn_pre_nms_top_n_test,
            post_nms_top_n=self.rpn_post_nms_top_n_train if train else self.rpn_post_nms_top_n_test,
            nms_thresh=self.rpn_nms_thresh, min_size=self.rpn_min_size, score_thresh=self.rpn_score_thresh,
        )

    def heads(self, levels: Sequence[jax.Array], rois: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
        """RoI features of ``rois [B, R, 4]`` from P2..P5, box head, attention, predictor:
        dict of ``class_logits [B, R, K + 1]``, ``box_deltas [B, R, K, 4]``, ``features
        [B, R, D]`` (x', after the attention), with ``attention`` also
        ``attention_weights [B, K, R]``, ``class_weights [B, R, K]``."""
        n = len(self.ROI_LEVELS)
        pooled = multiscale_roi_align(
            levels[:n], rois, [2**k for k in self.ROI_LEVELS], output_size=self.roi_output_size,
            sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned,
            canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        )
        x = self.box_head(pooled)
        out = {}
        if self.attention:
            x, att = self.proposal_attention(x, valid)
            out["attention_weights"] = att["weights"]
            out["class_weights"] = att["class_weights"]
        b, r = x.shape[:2]
        out["class_logits"] = self.cls_score(x).astype(jnp.float32)
        out["box_deltas"] = self.bbox_pred(x).astype(jnp.float32).reshape(b, r, self.num_classes, 4)
        out["features"] = x
        return out

    # ------------------------------------------------------------------ entry points
    def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        levels = self.features(image, train)
        obj, dl, anchors, sizes = self.rpn(levels)
        boxes, scores, valid = self.proposals(obj, dl, anchors, sizes, tuple(image.shape[1:3]), train)
        out = self.heads(levels, boxes, valid)
        del out["features"]
        return {"objectness": obj, "rpn_deltas": dl, "proposals": boxes, "proposal_scores": scores,
                "proposal_valid": valid, **out}

    def losses(self, batch: dict, key: jax.Array, train: bool = True) -> dict[str, jax.Array]:
        """The training losses of ``batch`` (``image``, ``boxes``, ``classes``; module
        docstring); ``key`` is split for the anchor and the RoI sampling."""
        image = batch["image"]
        gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
        gt_classes = jnp.asarray(batch["classes"], jnp.int32)
        k_rpn, k_roi = jax.random.split(key)
        levels = self.features(image, train)
        obj, dl, anchors, sizes = self.rpn(levels)
        rpn = L.rpn_loss(
            obj, dl, anchors, gt_boxes, gt_classes, k_rpn,
            fg_iou_thresh=self.rpn_fg_iou_thresh, bg_iou_thresh=self.rpn_bg_iou_thresh,
            batch_size=self.rpn_batch_size_per_image, positive_fraction=self.rpn_positive_fraction,
        )
        boxes, _, valid = self.proposals(obj, dl, anchors, sizes, tuple(image.shape[1:3]), train)
        samples = L.sample_rois(
            boxes, valid, gt_boxes, gt_classes, k_roi,
            batch_size=self.box_batch_size_per_image, positive_fraction=self.box_positive_fraction,
            fg_iou_thresh=self.box_fg_iou_thresh, bg_iou_thresh=self.box_bg_iou_thresh,
        )
        out = self.heads(levels, samples["rois"], samples["valid"])
        roi = L.roi_loss(out["class_logits"], out["box_deltas"], samples, box_loss=self.box_loss)
        total = rpn["rpn_objectness"] + rpn["rpn_box"] + roi["roi_classification"] + roi["roi_box"]
        return {"loss": total, **rpn, **roi}

    def detect(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Fixed-size detections of ``image`` (`postprocess_detections` of the forward pass)."""
        out = self(image, train)
        return postprocess_detections(
            out["class_logits"], out["box_deltas"], out["proposals"], out["proposal_valid"],
            tuple(image.shape[1:3]), score_thresh=self.box_score_thresh, nms_thresh=self.box_nms_thresh,
            detections_per_img=self.detections_per_img, pre_nms_topk=self.detections_pre_nms_topk,
        )


#: Backbone and size presets (`jattn.train.tasks.detection`'s ``model.preset``): the
#: attributes each sets; the rest keep AttentionRCNN's (torchvision's) defaults.
PRESETS = {
    "resnet50_fpn": {},  # torchvision's fasterrcnn_resnet50_fpn layout, SE blocks
    "resnet18_fpn": {"stage_sizes": (2, 2, 2, 2), "bottleneck": False},
    "resnet101_fpn": {"stage_sizes": (3, 4, 23, 3)},
    # ResNet-10-like (one basic block per stage, width 8), F = 16, fc 64 / 32, A' = 16,
    # anchors 8..128 px, 100 / 32 proposals per image, 64 anchors and 32 RoIs sampled per image
    "tiny": {
        "stage_sizes": (1, 1, 1, 1), "width": 8, "bottleneck": False, "reduction": 4, "fpn_channels": 16,
        "anchor_sizes": (8, 16, 32, 64, 128), "hidden_size": 64, "representation_size": 32, "attention_dim": 16,
        "rpn_pre_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_train": 32,
        "rpn_post_nms_top_n_test": 32, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32,
        "detections_per_img": 10,
    },
}


def attention_rcnn_tiny(num_classes: int, **kw) -> AttentionRCNN:
    """A small Attention R-CNN for tests and demos on ~64-128 px images (``PRESETS["tiny"]``)."""
    return AttentionRCNN(num_classes, **{**PRESETS["tiny"], **kw})
