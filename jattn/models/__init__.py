"""Models and their registry."""

from jattn.models import registry
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, DisConv, offsets_to_flow
from jattn.models.registry import DeepFillV1, get, names, register

__all__ = [
    "DeepFillV1",
    "DeepFillV1Critics",
    "DeepFillV1Generator",
    "DisConv",
    "get",
    "names",
    "offsets_to_flow",
    "register",
    "registry",
]
