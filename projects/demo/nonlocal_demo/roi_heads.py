"""Detectron2's ``StandardROIHeads`` whose mask and keypoint heads train on at most a given number
of foreground RoIs per image (``MODEL.ROI_MASK_HEAD.TRAIN_ROIS_PER_IMAGE``,
``MODEL.ROI_KEYPOINT_HEAD.TRAIN_ROIS_PER_IMAGE``; 0: every one, Detectron2's behaviour).

Late in training most sampled RoIs are foreground and the mask and keypoint heads run on all of
them: tens of near-duplicate boxes per object, each costing the heads as much as a distinct one
(their share of a CPU step: docs/demo.md). The cap draws a random subset (without replacement,
from torch's generator) of the RoIs Detectron2 would give each head: the foreground, and for
keypoints those with a visible keypoint. The box head and inference are unchanged; the losses
keep their normalisation (the mask loss is a mean over RoIs, the keypoint loss over visible
keypoints by default).

With ``MODEL.ROI_HEADS.GATHER_ROI_ALIGN`` the three poolers' ROIAlign gets a backward by gathers
(:class:`nonlocal_det.layers.GatherROIAlign`, torchvision's forward): the same numbers, and on CPU
a backward on every thread instead of torchvision's one.
"""

import copy
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ROIAlign
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.roi_heads import (
    select_foreground_proposals,
    select_proposals_with_visible_keypoints,
)
from detectron2.structures import Instances
from torch import nn

from nonlocal_det.layers._common import check_value, is_int

from .roi_align import GatherROIAlign

__all__ = ["HeadSampledROIHeads", "subsample_per_image"]


def subsample_per_image(instances: List[Instances], limit: int) -> List[Instances]:
    """At most ``limit`` of each image's instances, drawn at random without replacement (in their
    original order); ``limit`` 0 keeps them all."""
    if limit == 0:
        return instances
    out = []
    for x in instances:
        if len(x) > limit:
            keep = torch.randperm(len(x))[:limit].sort().values
            x = x[keep.to(x.proposal_boxes.device)]
        out.append(x)
    return out


@ROI_HEADS_REGISTRY.register()
class HeadSampledROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose mask and keypoint heads train on at most ``mask_train_rois`` /
    ``keypoint_train_rois`` foreground RoIs per image (0: all, as ``StandardROIHeads``).

    Args:
        mask_train_rois: ``MODEL.ROI_MASK_HEAD.TRAIN_ROIS_PER_IMAGE``.
        keypoint_train_rois: ``MODEL.ROI_KEYPOINT_HEAD.TRAIN_ROIS_PER_IMAGE``.
        gather_roi_align: ``MODEL.ROI_HEADS.GATHER_ROI_ALIGN``: the poolers' ``ROIAlign`` layers
            become :class:`GatherROIAlign` (same numbers; a fixed sampling ratio needed).
        kwargs: as ``StandardROIHeads``.
    """

    @configurable
    def __init__(
        self,
        *,
        mask_train_rois: int = 0,
        keypoint_train_rois: int = 0,
        gather_roi_align: bool = False,
        **kwargs,
    ):
        for key, value in (
            ("ROI_MASK_HEAD", mask_train_rois),
            ("ROI_KEYPOINT_HEAD", keypoint_train_rois),
        ):
            allowed = "an integer >= 0 (0: every foreground RoI, Detectron2's behaviour)"
            ok = is_int(value) and value >= 0
            check_value("", f"MODEL.{key}.TRAIN_ROIS_PER_IMAGE", value, ok, allowed)
        super().__init__(**kwargs)
        self.mask_train_rois = mask_train_rois
        self.keypoint_train_rois = keypoint_train_rois
        self.gather_roi_align = bool(gather_roi_align)
        if self.gather_roi_align:
            for name, head in _POOLERS.items():
                pooler = getattr(self, name, None)
                if pooler is not None:
                    _swap_level_poolers(pooler, lambda p: _to_gather(p, head))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["mask_train_rois"] = cfg.MODEL.ROI_MASK_HEAD.TRAIN_ROIS_PER_IMAGE
        ret["keypoint_train_rois"] = cfg.MODEL.ROI_KEYPOINT_HEAD.TRAIN_ROIS_PER_IMAGE
        ret["gather_roi_align"] = cfg.MODEL.ROI_HEADS.GATHER_ROI_ALIGN
        return ret

    def _forward_mask(self, features, instances):
        if self.training and self.mask_on and self.mask_train_rois > 0:
            instances = self._rois_for_head(instances, self.mask_train_rois, False)
        return super()._forward_mask(features, instances)

    def _forward_keypoint(self, features, instances):
        if self.training and self.keypoint_on and self.keypoint_train_rois > 0:
            instances = self._rois_for_head(instances, self.keypoint_train_rois, True)
        return super()._forward_keypoint(features, instances)

    def _rois_for_head(self, instances, limit: int, keypoints: bool):
        """At most ``limit`` per image of the RoIs Detectron2's head would train on: the
        foreground (and with ``keypoints``, those with a visible keypoint). Detectron2's method
        selects them again, which keeps them as they are."""
        instances, _ = select_foreground_proposals(instances, self.num_classes)
        if keypoints:
            instances = select_proposals_with_visible_keypoints(instances)
        return subsample_per_image(instances, limit)

    def __prepare_scriptable__(self):
        """For TorchScript, which has no ``super()``: this module as Detectron2's
        ``StandardROIHeads``, whose inference it is, with ``training`` a constant (as Detectron2's
        ``scripting_with_instances`` makes it for the model's own classes): the cap and the rest
        of the training branch are compiled away."""
        scriptable = copy.copy(self)
        scriptable.__class__ = StandardROIHeads
        scriptable.__constants__ = ["training"]
        # No new submodules here: TorchScript's preparation memo is keyed by id(), and a module
        # created now can take the address of one Detectron2's ResNet/FPN preparation freed
        # (their deep copies), and be typed as that one. GatherROIAlign scripts as it is.
        return scriptable


# pooler attribute of StandardROIHeads -> the config node of its POOLER_SAMPLING_RATIO
_POOLERS = {
    "box_pooler": "ROI_BOX_HEAD",
    "mask_pooler": "ROI_MASK_HEAD",
    "keypoint_pooler": "ROI_KEYPOINT_HEAD",
}


def _swap_level_poolers(pooler: nn.Module, convert) -> None:
    pooler.level_poolers = nn.ModuleList(convert(p) for p in pooler.level_poolers)


def _to_gather(layer: nn.Module, head: str) -> nn.Module:
    if not isinstance(layer, ROIAlign):
        raise ValueError(
            f"MODEL.ROI_HEADS.GATHER_ROI_ALIGN=True with MODEL.{head}.POOLER_TYPE giving "
            f"{type(layer).__name__}; allowed: ROIAlign or ROIAlignV2"
        )
    if layer.sampling_ratio < 1:
        raise ValueError(
            f"MODEL.ROI_HEADS.GATHER_ROI_ALIGN=True with MODEL.{head}.POOLER_SAMPLING_RATIO="
            f"{layer.sampling_ratio}; allowed: an integer >= 1 (0, adaptive sampling, has no "
            "fixed-shape gather)"
        )
    return GatherROIAlign(
        layer.output_size, layer.spatial_scale, layer.sampling_ratio, layer.aligned
    )

