# Importing these modules registers the backbones (BACKBONE_REGISTRY), the keypoint head
# (ROI_KEYPOINT_HEAD_REGISTRY) and the RoI heads (ROI_HEADS_REGISTRY).
from .backbone import (
    NonLocalResNet,
    basic_resnet_stages,
    build_nonlocal_backbone,
    build_resnet_nonlocal_backbone,
    build_resnet_nonlocal_fpn_backbone,
    last_level_max_pool,
)
from .blocks import block_builder, config_block_spec
from .insertion import PLACEMENTS, POSITIONS, insert_blocks
from .keypoint_head import NonLocalKRCNNHead
from .lazy import add_blocks, build_with_blocks, remove_blocks
from .model_config import baseline_config, check_model_config
from .roi_heads import HeadSampledROIHeads, subsample_per_image

__all__ = [
    "PLACEMENTS",
    "POSITIONS",
    "HeadSampledROIHeads",
    "NonLocalKRCNNHead",
    "NonLocalResNet",
    "add_blocks",
    "baseline_config",
    "basic_resnet_stages",
    "block_builder",
    "build_nonlocal_backbone",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "build_with_blocks",
    "check_model_config",
    "config_block_spec",
    "insert_blocks",
    "last_level_max_pool",
    "remove_blocks",
    "subsample_per_image",
]
