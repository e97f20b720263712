"""nonlocal_det: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2."""

from .layers import NonLocalBlock

__version__ = "0.1.0"

__all__ = ["NonLocalBlock", "__version__"]
