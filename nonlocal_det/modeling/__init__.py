# Importing these modules registers the backbones (BACKBONE_REGISTRY) and the keypoint head
# (ROI_KEYPOINT_HEAD_REGISTRY).
from .backbone import (
    NonLocalResNet,
    build_nonlocal_backbone,
    build_resnet_nonlocal_backbone,
    build_resnet_nonlocal_fpn_backbone,
)
from .blocks import block_builder, config_block_spec
from .insertion import PLACEMENTS, POSITIONS, insert_blocks
from .keypoint_head import NonLocalKRCNNHead
from .lazy import add_blocks, build_with_blocks, remove_blocks
from .model_config import baseline_config, check_model_config

__all__ = [
    "PLACEMENTS",
    "POSITIONS",
    "NonLocalKRCNNHead",
    "NonLocalResNet",
    "add_blocks",
    "baseline_config",
    "block_builder",
    "build_nonlocal_backbone",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "build_with_blocks",
    "check_model_config",
    "config_block_spec",
    "insert_blocks",
    "remove_blocks",
]
