"""Mask R-CNN R50-FPN + global context blocks (GCNet, r = 1/16) in every residual block of res3-res5,
after conv3, 1x: the LazyConfig twin of mask_rcnn_R50_GC_r16.yaml.

Detectron2's own ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py``, its backbone wrapped by
:func:`add_blocks`; the block type, its options and its place are explicit arguments:

    python train_net.py --config-file configs/lazy/mask_rcnn_R50_GC_r16.py --num-gpus 8
"""

from detectron2 import model_zoo

from nonlocal_det.modeling import add_blocks  # the import also registers the YAML names

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader = _base.dataloader
lr_multiplier = _base.lr_multiplier
optimizer = _base.optimizer
train = _base.train
model = _base.model

add_blocks(
    model.backbone,
    nonlocal_spec=dict(  # MODEL.NONLOCAL.TYPE and MODEL.NONLOCAL.GC.*
        type="global_context", options=dict(ratio=1 / 16, fusion_types=["add"])
    ),
    nonlocal_placement="all_res3_res5",  # every residual block of res3, res4 and res5
    nonlocal_position="after_conv3",  # after conv3's norm, before the residual add
)
