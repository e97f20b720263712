"""Mask R-CNN RegNetY-4GF-FPN + global context blocks (GCNet, r = 1/16) in every residual block of
s2-s4 (strides 8-32, the stages of ResNet's res3-res5), after conv3 (after its norm, before the
residual add), Detectron2's new baseline recipe (100 epochs, large-scale jitter, SyncBN, from
scratch): ``new_baselines/mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py``, its backbone wrapped by
:func:`add_blocks`. Its baseline is that file itself (tests/test_configs.py checks that they
differ only in the blocks). Not trained by this project (it needs 64 images per batch).

    python train_net.py \\
        --config-file configs/lazy/mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py --num-gpus 8 ...
"""

from detectron2 import model_zoo

from nonlocal_det.modeling import add_blocks

_base = model_zoo.get_config("new_baselines/mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py")
dataloader = _base.dataloader
lr_multiplier = _base.lr_multiplier
optimizer = _base.optimizer
train = _base.train
model = _base.model

add_blocks(
    model.backbone,
    nonlocal_spec=dict(type="global_context", options=dict(ratio=1 / 16, fusion_types=["add"])),
    nonlocal_placement="all_res3_res5",  # RegNet: every block of s2, s3 and s4
    nonlocal_position="after_conv3",  # RegNet: after f.c_bn, before the residual add
)
