"""Flax Linen modules: thin wrappers over `jattn.ops` (parameters are plain pytrees)."""

from jattn.nn.attention import AdditiveAttention, AttentionGate, MultiHeadAttention2D, NonLocalBlock, SelfAttention2D
from jattn.nn.channel import CBAM, RCAB, ChannelAttention, SqueezeExcitation, excite
from jattn.nn.contextual import ContextualAttention
from jattn.nn.conv import GatedConv, GenConv, GenDeconv, SNConv, SNDense
from jattn.nn.proposal_attention import ProposalAttention

__all__ = [
    "AdditiveAttention",
    "AttentionGate",
    "CBAM",
    "ChannelAttention",
    "ContextualAttention",
    "GatedConv",
    "GenConv",
    "GenDeconv",
    "MultiHeadAttention2D",
    "NonLocalBlock",
    "RCAB",
    "SNConv",
    "SNDense",
    "SelfAttention2D",
    "SqueezeExcitation",
    "excite",
    "ProposalAttention",
]
