"""Models and their registry."""

from jattn.models import registry
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, DisConv, offsets_to_flow
from jattn.models.deepfill_v2 import DeepFillV2Generator, SNPatchGANCritic, offsets_to_flow_v2
from jattn.models.registry import DeepFillV1, DeepFillV2, get, names, register

__all__ = [
    "DeepFillV1",
    "DeepFillV1Critics",
    "DeepFillV1Generator",
    "DeepFillV2",
    "DeepFillV2Generator",
    "DisConv",
    "SNPatchGANCritic",
    "get",
    "names",
    "offsets_to_flow",
    "offsets_to_flow_v2",
    "register",
    "registry",
]
