from ._common import check_choice
from .criss_cross import CrissCrossAttention
from .disentangled_nonlocal import DisentangledNonLocalBlock
from .generalized_attention import GeneralizedAttention
from .global_context import FUSION_TYPES, GlobalContextBlock
from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock
from .roi_align import GatherROIAlign, roi_align_fast_backward, roi_align_gather
from .simplified_nonlocal import SimplifiedNonLocalBlock

# The block types, by the name MODEL.NONLOCAL.TYPE (nonlocal_type) gives them.
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
    "GatherROIAlign",
    "GeneralizedAttention",
    "GlobalContextBlock",
    "NORMS",
    "NonLocalBlock",
    "PAIRWISE_FUNCTIONS",
    "SimplifiedNonLocalBlock",
    "check_choice",
    "roi_align_fast_backward",
    "roi_align_gather",
]
