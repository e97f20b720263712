from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock, check_choice

__all__ = ["NonLocalBlock", "PAIRWISE_FUNCTIONS", "NORMS", "check_choice"]
