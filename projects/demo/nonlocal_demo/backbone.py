"""A ResNet-18/34 FPN of any width: the demo's half-width ResNet-18 (Detectron2's builders make
ResNet-18/34 only 64 wide). Its layers and parameter names are Detectron2's (``BasicStem``,
``BasicBlock``, ``FPN``); ``nonlocal_det``'s ``build_nonlocal_backbone`` inserts the blocks when
``MODEL.NONLOCAL.BASE_BACKBONE`` names it."""

import math
from typing import List

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from torch import nn

from nonlocal_det.layers._common import check_choice, check_value

__all__ = ["basic_resnet_stages", "build_basic_resnet_fpn_backbone"]

_BASIC_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # residual blocks per stage, res2-res5


def basic_resnet_stages(
    depth: int = 18, width: int = 64, norm: str = "BN", in_channels: int = 64
) -> List[List[nn.Module]]:
    """The stages res2-res5 of a ResNet-18 or -34 whose res2 is ``width`` channels wide (then 2x,
    4x, 8x), of Detectron2's ``BasicBlock``, for its ``ResNet``; ``in_channels``: the stem's
    output channels. For a LazyConfig::

        model.backbone.bottom_up.stages = L(basic_resnet_stages)(depth=18, width=32, in_channels=32)
    """
    check_choice("basic_resnet_stages", "depth", depth, sorted(_BASIC_BLOCKS))
    stages = []
    for i, n in enumerate(_BASIC_BLOCKS[depth]):
        stride = [1 if i == 0 else 2] + [1] * (n - 1)
        out = width * 2**i
        stages.append(
            ResNet.make_stage(
                BasicBlock, n, stride_per_block=stride, in_channels=in_channels,
                out_channels=out, norm=norm,
            )
        )  # fmt: skip
        in_channels = out
    return stages


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ``build_resnet_fpn_backbone`` for ``MODEL.RESNETS.DEPTH`` 18 or 34 at the
    width ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (a multiple of 8), P6 max-pooled from the last FPN
    level (``p4`` when ``MODEL.FPN.IN_FEATURES`` ends at ``res4``)."""
    r, f = cfg.MODEL.RESNETS, cfg.MODEL.FPN
    check_choice("", "MODEL.RESNETS.DEPTH", r.DEPTH, sorted(_BASIC_BLOCKS))
    width = r.RES2_OUT_CHANNELS
    check_value("", "MODEL.RESNETS.RES2_OUT_CHANNELS", width,
                isinstance(width, int) and 8 <= width <= 64 and width % 8 == 0,
                "a multiple of 8 in [8, 64]")  # fmt: skip
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = basic_resnet_stages(r.DEPTH, width, r.NORM, r.STEM_OUT_CHANNELS)
    bottom_up = ResNet(
        stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )
    top_block = LastLevelMaxPool()
    stride = bottom_up.output_shape()[f.IN_FEATURES[-1]].stride
    top_block.in_feature = f"p{int(math.log2(stride))}"
    return FPN(
        bottom_up=bottom_up, in_features=f.IN_FEATURES, out_channels=f.OUT_CHANNELS,
        norm=f.NORM, top_block=top_block, fuse_type=f.FUSE_TYPE,
    )  # fmt: skip
