from .criss_cross import CrissCrossAttention
from .disentangled_nonlocal import DisentangledNonLocalBlock
from .generalized_attention import GeneralizedAttention
from .global_context import FUSION_TYPES, GlobalContextBlock
from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock
from .simplified_nonlocal import SimplifiedNonLocalBlock

__all__ = [
    "NonLocalBlock",
    "PAIRWISE_FUNCTIONS",
    "NORMS",
    "SimplifiedNonLocalBlock",
    "GlobalContextBlock",
    "FUSION_TYPES",
    "DisentangledNonLocalBlock",
    "CrissCrossAttention",
    "GeneralizedAttention",
]
