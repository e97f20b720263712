"""The demo's config keys (read by :class:`.roi_heads.HeadSampledROIHeads`)."""

__all__ = ["add_demo_config"]


def add_demo_config(cfg):
    """Add ``MODEL.ROI_{MASK,KEYPOINT}_HEAD.TRAIN_ROIS_PER_IMAGE`` and
    ``MODEL.ROI_HEADS.GATHER_ROI_ALIGN`` to a config. Idempotent; returns ``cfg``."""
    for head in (cfg.MODEL.ROI_MASK_HEAD, cfg.MODEL.ROI_KEYPOINT_HEAD):
        if "TRAIN_ROIS_PER_IMAGE" not in head:
            # The head trains on at most this many foreground RoIs per image, drawn at random;
            # 0: all (Detectron2's behaviour).
            head.TRAIN_ROIS_PER_IMAGE = 0
    if "GATHER_ROI_ALIGN" not in cfg.MODEL.ROI_HEADS:
        # The box, mask and keypoint poolers' ROIAlign with a backward by gathers
        # (.roi_align.GatherROIAlign; POOLER_SAMPLING_RATIO >= 1): the same numbers, a CPU
        # backward on every thread (torchvision's: one).
        cfg.MODEL.ROI_HEADS.GATHER_ROI_ALIGN = False
    return cfg
