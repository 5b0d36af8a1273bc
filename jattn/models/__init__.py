"""Models: Flax modules. How each trains, and the registry by model name, are the tasks of
`jattn.train.task` (`build_task(config)`, `task_names()`)."""

from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, DisConv, offsets_to_flow
from jattn.models.deepfill_v2 import DeepFillV2Generator, SNPatchGANCritic, offsets_to_flow_v2
from jattn.models.classifiers import SEResNet, se_resnet18, se_resnet50, se_resnet_cifar
from jattn.models.rcan import RCAN
from jattn.models.sa_inpaint import PatchCritic, SAInpaintGenerator
from jattn.models.sagan import SAGANDiscriminator, SAGANGenerator
from jattn.models.unet import AttentionUNet
from jattn.models.attention_rcnn import AttentionRCNN, attention_rcnn_tiny

__all__ = [
    "AttentionUNet",
    "PatchCritic",
    "RCAN",
    "SAGANDiscriminator",
    "SAGANGenerator",
    "SAInpaintGenerator",
    "SEResNet",
    "se_resnet18",
    "se_resnet50",
    "se_resnet_cifar",
    "DeepFillV1Critics",
    "DeepFillV1Generator",
    "DeepFillV2Generator",
    "DisConv",
    "SNPatchGANCritic",
    "offsets_to_flow",
    "offsets_to_flow_v2",
    "AttentionRCNN",
    "attention_rcnn_tiny",
]
