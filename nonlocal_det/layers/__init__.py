from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock, check_choice

# The block types of the project, by the name MODEL.NONLOCAL.TYPE gives them.
BLOCK_TYPES = {"nonlocal": NonLocalBlock}

__all__ = ["BLOCK_TYPES", "NonLocalBlock", "PAIRWISE_FUNCTIONS", "NORMS", "check_choice"]
