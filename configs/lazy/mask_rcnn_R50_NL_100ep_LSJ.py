"""Mask R-CNN R50-FPN + 1 non-local block, Detectron2's new baseline recipe (100 epochs, large-scale
jitter, SyncBN, from scratch): ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``, its backbone
wrapped by :func:`add_blocks`.

The recipe trains every norm (SyncBN), so the block gets a norm after W_z whose gamma starts at
zero, as in the authors' code. Not trained by this project (it needs 64 images per batch).

    python train_net.py --config-file configs/lazy/mask_rcnn_R50_NL_100ep_LSJ.py \\
        --num-gpus 8 --num-machines 8 ...
"""

from detectron2 import model_zoo

from nonlocal_det.modeling import add_blocks

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader = _base.dataloader
lr_multiplier = _base.lr_multiplier
optimizer = _base.optimizer
train = _base.train
model = _base.model

# The paper's block (NonLocalBlock's defaults: embedded Gaussian, C_inner = C / 2, subsampled keys,
# scaled dot products) with a norm after W_z like the rest of this recipe's backbone.
add_blocks(
    model.backbone,
    nonlocal_spec=dict(type="nonlocal", options=dict(norm="SyncBN")),  # gamma starts at zero
    nonlocal_placement="paper_1",
)
