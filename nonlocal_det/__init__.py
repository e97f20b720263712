"""nonlocal_det: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2.

Importing the package registers, as a side effect, the backbones ``build_nonlocal_backbone``,
``build_resnet_nonlocal_backbone`` and ``build_resnet_nonlocal_fpn_backbone`` in Detectron2's
``BACKBONE_REGISTRY`` and the keypoint head ``NonLocalKRCNNHead`` in ``ROI_KEYPOINT_HEAD_REGISTRY``;
nothing else happens at import.
"""

from . import modeling  # noqa: F401  (side effect: registers the backbones and the head)
from .config import add_nonlocal_config
from .layers import NonLocalBlock

__version__ = "0.1.0"

__all__ = ["NonLocalBlock", "add_nonlocal_config", "__version__"]
