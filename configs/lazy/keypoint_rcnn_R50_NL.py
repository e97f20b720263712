"""Keypoint R-CNN R50-FPN, +4 non-local blocks in the head, +1 in res4, 1x: the LazyConfig twin of
keypoint_rcnn_R50_NL.yaml (paper §6, Table 6).

Detectron2's own ``COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py``, its backbone wrapped by
:func:`add_blocks` and its keypoint head swapped for :class:`NonLocalKRCNNHead` (the same 8-conv
head with a block after convs 2, 4, 6 and 8). Importing ``nonlocal_det`` here is what lets
Detectron2's generic LazyConfig tooling use this file unchanged:

    python train_net.py --config-file configs/lazy/keypoint_rcnn_R50_NL.py --num-gpus 8
"""

from detectron2 import model_zoo

from nonlocal_det.modeling import NonLocalKRCNNHead, add_blocks

_base = model_zoo.get_config("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py")
dataloader = _base.dataloader
lr_multiplier = _base.lr_multiplier
optimizer = _base.optimizer
train = _base.train
model = _base.model

# MODEL.NONLOCAL keys of configs/Base-Keypoint-RCNN-FPN-NL.yaml: one spec, backbone and head.
_spec = dict(
    type="nonlocal",
    options=dict(
        pairwise="embedded_gaussian",
        inner_ratio=0.5,  # C_inner = C / 2
        subsample=True,  # 2x2 max-pool of phi and g
        use_scale=True,  # 1/sqrt(C_inner) inside the softmax
        norm="",  # no norm after W_z; W_z starts at zero (identity block)
    ),
)

# One block right before the last residual block of res4.
add_blocks(model.backbone, nonlocal_spec=_spec, nonlocal_placement="paper_1")

# A block after every 2 of the head's 8 convs (C = 512, 14x14 ROI features).
model.roi_heads.keypoint_head._target_ = NonLocalKRCNNHead
model.roi_heads.keypoint_head.update(nonlocal_after=[2, 4, 6, 8], nonlocal_spec=_spec)
