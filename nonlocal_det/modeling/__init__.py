# Importing these modules registers the backbones (BACKBONE_REGISTRY) and the keypoint head
# (ROI_KEYPOINT_HEAD_REGISTRY).
from .backbone import (
    PLACEMENTS,
    NonLocalResNet,
    build_resnet_nonlocal_backbone,
    build_resnet_nonlocal_fpn_backbone,
)
from .keypoint_head import NonLocalKRCNNHead
from .model_config import baseline_config, check_model_config

__all__ = [
    "PLACEMENTS",
    "NonLocalKRCNNHead",
    "NonLocalResNet",
    "build_resnet_nonlocal_backbone",
    "baseline_config",
    "build_resnet_nonlocal_fpn_backbone",
    "check_model_config",
]
