from .criss_cross import CrissCrossAttention
from .disentangled_nonlocal import DisentangledNonLocalBlock
from .generalized_attention import GeneralizedAttention
from .global_context import FUSION_TYPES, GlobalContextBlock
from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock
from .simplified_nonlocal import SimplifiedNonLocalBlock

# The block types, by their name in a block spec (MODEL.NONLOCAL.TYPE).
BLOCK_TYPES = {
    "nonlocal": NonLocalBlock,
    "simplified": SimplifiedNonLocalBlock,
    "global_context": GlobalContextBlock,
    "disentangled": DisentangledNonLocalBlock,
    "criss_cross": CrissCrossAttention,
    "generalized_attention": GeneralizedAttention,
}

__all__ = [
    "BLOCK_TYPES",
    "CrissCrossAttention",
    "DisentangledNonLocalBlock",
    "FUSION_TYPES",
    "GeneralizedAttention",
    "GlobalContextBlock",
    "NORMS",
    "NonLocalBlock",
    "PAIRWISE_FUNCTIONS",
    "SimplifiedNonLocalBlock",
]
