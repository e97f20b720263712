"""Mask R-CNN R50-FPN + 1 non-local block (res4), 1x: the LazyConfig twin of mask_rcnn_R50_NL.yaml.

Detectron2's own ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` (model, COCO data, SGD,
1x schedule, ImageNet R-50 weights), its backbone wrapped by :func:`add_blocks` (the same network
plus the paper's block right before the last residual block of res4). Importing ``nonlocal_det``
here is what lets Detectron2's generic LazyConfig tooling use this file unchanged:

    python train_net.py --config-file configs/lazy/mask_rcnn_R50_NL.py --num-gpus 8
    python train_net.py --config-file configs/lazy/mask_rcnn_R50_NL.py \\
        --eval-only train.init_checkpoint=output/model_final.pth
"""

from detectron2 import model_zoo

from nonlocal_det.modeling import add_blocks  # the import also registers the YAML names

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader = _base.dataloader
lr_multiplier = _base.lr_multiplier
optimizer = _base.optimizer
train = _base.train
model = _base.model

# MODEL.BACKBONE.NAME "build_resnet_nonlocal_fpn_backbone" + the MODEL.NONLOCAL keys of
# configs/Base-RCNN-FPN-NL.yaml.
add_blocks(
    model.backbone,
    nonlocal_spec=dict(
        type="nonlocal",
        options=dict(
            pairwise="embedded_gaussian",
            inner_ratio=0.5,  # C_inner = C / 2 = 512
            subsample=True,  # 2x2 max-pool of phi and g
            use_scale=True,  # 1/sqrt(C_inner) inside the softmax
            norm="",  # no norm after W_z; W_z starts at zero (identity block)
        ),
    ),
    nonlocal_placement="paper_1",  # res4.nonlocal4 for R50, res4.nonlocal21 for R101
)
