from .nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock

__all__ = ["NonLocalBlock", "PAIRWISE_FUNCTIONS", "NORMS"]
