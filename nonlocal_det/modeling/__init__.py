# Importing these modules registers the backbones (BACKBONE_REGISTRY) and the keypoint head
# (ROI_KEYPOINT_HEAD_REGISTRY).
from .backbone import (
    build_nonlocal_backbone,
    build_resnet_nonlocal_backbone,
    build_resnet_nonlocal_fpn_backbone,
    last_level_max_pool,
)
from .blocks import block_builder, config_block_spec, config_keys
from .insertion import PLACEMENTS, POSITIONS, insert_blocks
from .keypoint_head import NonLocalKRCNNHead
from .lazy import add_blocks, build_with_blocks, remove_blocks
from .model_config import baseline_config, check_model_config

__all__ = [
    "PLACEMENTS",
    "POSITIONS",
    "NonLocalKRCNNHead",
    "add_blocks",
    "baseline_config",
    "block_builder",
    "build_nonlocal_backbone",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "build_with_blocks",
    "check_model_config",
    "config_block_spec",
    "config_keys",
    "insert_blocks",
    "last_level_max_pool",
    "remove_blocks",
]
