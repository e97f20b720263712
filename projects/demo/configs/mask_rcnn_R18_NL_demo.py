"""The CPU demo as a LazyConfig: the twin of mask_rcnn_R18_NL_demo.yaml beside it.

Mask R-CNN + keypoints, a half-width ResNet-18 (32-128 channels) without res5 and a 64-channel
FPN, slim heads whose mask and keypoint heads train on a few RoIs per image, from scratch, one
non-local block in res4 and two in the keypoint head, on the demo's generated dataset (made
and registered on first use when the config is instantiated). Small enough to run Detectron2's
LazyConfig tools end to end on a laptop CPU:

    python projects/demo/train_net.py --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.py
    python projects/demo/train_net.py --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.py \\
        --eval-only train.init_checkpoint=output/demo_lazy/model_final.pth
"""

import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data.detection_utils import create_keypoint_hflip_indices
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from nonlocal_det.engine import optimizer_with_gradient_clipping
from nonlocal_det.modeling import NonLocalKRCNNHead, add_blocks, last_level_max_pool
from nonlocal_demo import HeadSampledROIHeads, basic_resnet_stages, synthetic_dataset
from nonlocal_demo.synthetic import SYNTHETIC_KEYPOINT_OKS_SIGMAS

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
train = _base.train

# ---- model (MODEL.*) ---------------------------------------------------------------------------
model.pixel_std = [57.375, 57.120, 58.395]  # normalised inputs: the network trains from scratch
_bottom_up = model.backbone.bottom_up
_bottom_up.freeze_at = 0
_bottom_up.stem.update(out_channels=32, norm="BN")
# ResNet-18 at half width (res2-res4: 32-128 channels; Detectron2's ResNet-18 is 64 wide)
_bottom_up.stages = L(basic_resnet_stages)(depth=18, width=32, norm="BN", in_channels=32)
_bottom_up.out_features = ["res2", "res3", "res4"]  # no res5; P5 is P4 max-pooled
model.backbone.update(out_channels=64, norm="GN")
model.backbone.top_block = L(last_level_max_pool)(in_feature="p4")  # P5: P4 max-pooled
add_blocks(model.backbone, nonlocal_placement="paper_1")  # ResNet-18: after block 0 of res4's 2

_rpn = model.proposal_generator
_rpn.head.in_channels = 64
_rpn.in_features = ["p3", "p4", "p5"]  # no 16-px anchors on P2: the objects are 36-100 px
_rpn.anchor_generator.sizes = [[32], [64], [128]]
_rpn.anchor_generator.strides = [8, 16, 32]
_rpn.pre_nms_topk = (300, 500)  # (train, test)
_rpn.post_nms_topk = (100, 200)

_heads = model.roi_heads
_heads._target_ = HeadSampledROIHeads
_heads.mask_train_rois = 6  # the mask / keypoint heads train on at most 6 / 4 foreground RoIs
_heads.keypoint_train_rois = 4  # per image, drawn at random
_heads.gather_roi_align = True  # ROIAlign's backward by gathers: same numbers, on every CPU thread
_heads.num_classes = 4
_heads.batch_size_per_image = 32
_heads.positive_fraction = 0.5  # twice the positives per step for every head
_heads.box_pooler.sampling_ratio = 1  # torchvision's CPU ROIAlign backward is slow with adaptive
_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
_heads.box_head.fc_dims = [256, 256]
_heads.box_predictor.input_shape = ShapeSpec(channels=256)
_heads.box_predictor.cls_agnostic_bbox_reg = True
_heads.mask_pooler.sampling_ratio = 1
_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
_heads.mask_head.conv_dims = [64, 64, 64, 64, 64]  # 4 convs + the deconv
_heads.mask_head.num_classes = 1  # class-agnostic masks
_heads.update(
    keypoint_in_features=["p2", "p3", "p4", "p5"],
    keypoint_pooler=L(ROIPooler)(
        output_size=14,
        scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
        sampling_ratio=1,
        pooler_type="ROIAlignV2",
    ),
    keypoint_head=L(NonLocalKRCNNHead)(
        input_shape=ShapeSpec(channels=64, width=14, height=14),
        num_keypoints=5,
        conv_dims=[64, 64, 64, 64],
        loss_weight=0.2,  # its loss is ~10x the others early on
        loss_normalizer="visible",
        nonlocal_after=[2, 4],  # the paper's non-local block (the default nonlocal_spec)
    ),
)

# ---- data (DATASETS.*, DATALOADER.*, INPUT.*) --------------------------------------------------
dataloader.train.dataset.names = L(synthetic_dataset)(split="train")
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.train.mapper.augmentations[0].update(
    short_edge_length=(144, 160, 176, 192), sample_style="choice", max_size=192
)
dataloader.train.mapper.update(
    use_keypoint=True,
    keypoint_hflip_indices=L(create_keypoint_hflip_indices)(dataset_names="${...dataset.names}"),
)
dataloader.test.dataset.names = L(synthetic_dataset)(split="val")
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations[0].update(short_edge_length=192, max_size=192)
dataloader.evaluator.kpt_oks_sigmas = list(SYNTHETIC_KEYPOINT_OKS_SIGMAS)

# ---- solver (SOLVER.*) -------------------------------------------------------------------------
optimizer = L(optimizer_with_gradient_clipping)(
    optimizer="torch.optim.SGD",
    clip_type="norm",  # SOLVER.CLIP_GRADIENTS: each parameter's gradient norm <= 1
    clip_value=1.0,
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.03,
    momentum=0.9,
    weight_decay=1e-4,
)
train.max_iter = 750
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[565, 700], num_updates=train.max_iter
    ),
    warmup_length=50 / train.max_iter,
    warmup_method="linear",
    warmup_factor=0.001,
)

# ---- training loop (train.*) -------------------------------------------------------------------
train.init_checkpoint = ""
train.output_dir = "output/demo_lazy"
train.checkpointer.period = 200
train.eval_period = 0  # evaluate once, at the end
train.seed = 42
train.device = "cuda" if torch.cuda.is_available() else "cpu"
