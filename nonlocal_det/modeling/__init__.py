# Importing these modules registers the backbones (BACKBONE_REGISTRY) and keypoint head.
from .backbone import (
    NonLocalResNet,
    build_resnet_nonlocal_backbone,
    build_resnet_nonlocal_fpn_backbone,
    insert_nonlocal_blocks,
    nonlocal_block_names,
    resolve_placement,
)
from .keypoint_head import NonLocalKRCNNHead

__all__ = [
    "NonLocalKRCNNHead",
    "NonLocalResNet",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "insert_nonlocal_blocks",
    "nonlocal_block_names",
    "resolve_placement",
]
