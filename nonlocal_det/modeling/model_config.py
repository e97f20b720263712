"""The model side of a YAML config: :func:`check_model_config` reports its errors before any
training work (naming the key, the bad value and what is allowed, instead of an ``assert`` inside
Detectron2 minutes later); :func:`baseline_config` is the same config without the blocks."""

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import build_keypoint_head

from .backbone import OURS as NONLOCAL_BACKBONES
from .blocks import config_block_spec

__all__ = ["NONLOCAL_BACKBONES", "baseline_config", "check_model_config"]


def check_model_config(cfg) -> None:
    """Check the backbone and keypoint head of ``cfg`` where they are this project's, by building
    them on the ``meta`` device (no memory, no arithmetic): every check of their builders runs.

    Raises:
        ValueError: naming the key, its value and what is allowed.
        KeyError: ``MODEL.NONLOCAL`` is missing (:func:`nonlocal_det.add_nonlocal_config`).
    """
    config_block_spec(cfg)  # the KeyError naming add_nonlocal_config
    head = cfg.MODEL.ROI_KEYPOINT_HEAD
    with torch.device("meta"):
        if cfg.MODEL.BACKBONE.NAME in NONLOCAL_BACKBONES:
            build_backbone(cfg)
        if cfg.MODEL.KEYPOINT_ON and head.NAME == "NonLocalKRCNNHead":
            shape = ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, height=14, width=14)
            build_keypoint_head(cfg, shape)


def baseline_config(cfg):
    """A copy of ``cfg`` without any block: the backbone of Detectron2's builder as it returns it
    (``MODEL.NONLOCAL.ENABLED False``) and Detectron2's keypoint head (the same parameter names,
    minus the blocks')."""
    base = cfg.clone()
    base.defrost()
    base.MODEL.NONLOCAL.ENABLED = False
    if base.MODEL.ROI_KEYPOINT_HEAD.NAME == "NonLocalKRCNNHead":
        base.MODEL.ROI_KEYPOINT_HEAD.NAME = "KRCNNConvDeconvUpsampleHead"
    return base
