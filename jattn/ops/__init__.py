"""Pure functions on arrays (jit / vmap / grad friendly)."""

from jattn.ops.attention import additive_attention, attention_weights, dot_product_attention, multi_head_attention
from jattn.ops.contextual import ContextualAttentionOutput, contextual_attention
from jattn.ops.conv import conv2d, cpu_kernels, cpu_kernels_enabled
from jattn.ops.flow import color_wheel, flow_to_color
from jattn.ops.resize import resize_bilinear_align_corners, resize_nearest_align_corners

__all__ = [
    "ContextualAttentionOutput",
    "additive_attention",
    "attention_weights",
    "color_wheel",
    "contextual_attention",
    "conv2d",
    "cpu_kernels",
    "cpu_kernels_enabled",
    "dot_product_attention",
    "flow_to_color",
    "multi_head_attention",
    "resize_bilinear_align_corners",
    "resize_nearest_align_corners",
]

from jattn.ops.boxes import (
    anchors,
    box_area,
    box_iou,
    cell_anchors,
    clip_boxes,
    decode,
    encode,
    generalized_box_iou,
    giou,
)
from jattn.ops.nms import batched_nms, detections, nms
from jattn.ops.roi_align import roi_align, roi_align_levels

__all__ += [
    "anchors",
    "batched_nms",
    "box_area",
    "box_iou",
    "cell_anchors",
    "clip_boxes",
    "decode",
    "detections",
    "encode",
    "generalized_box_iou",
    "giou",
    "nms",
    "roi_align",
    "roi_align_levels",
]
