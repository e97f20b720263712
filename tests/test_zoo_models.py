"""Blocks in every model of Detectron2's installed model zoo, through the one mechanism.

Each model is read from the zoo (``model_zoo.get_config_file`` / ``get_config``; YAML and Lazy
where it has both) and gets every block type whose initialisation is the identity (SNL and DNL
with ``zero_init``), one block at ``paper_1`` (right before the last residual block of res4, s3 in
RegNet) at each type's authors' position. For each cell: the model with blocks builds through the
YAML builder or ``add_blocks`` (on the meta device); the baseline's state dict loads into it with
only the blocks' keys missing; it predicts what the baseline predicts. The baseline of a model is
built once: each cell inserts its blocks into it with ``insert_blocks`` (what both paths call) and
takes them out again, after checking that this is, name for name and shape for shape, the model
the real path builds. RetinaNet + NL, FCOS + GC, Cascade + GC and RegNetY + GC also train.
"""

import contextlib
import functools
import inspect
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf
from torch import nn
from utils import CONFIGS, load_cfg

from nonlocal_det.layers import BLOCK_TYPES
from nonlocal_det.modeling import add_blocks, insert_blocks
from nonlocal_det.modeling.backbone import config_insert_args
from nonlocal_det.modeling.blocks import CONFIG_NODES
from nonlocal_det.modeling.flops import count_flops

# Model -> its file in Detectron2's model zoo (a .yaml is built by build_model, a .py by
# instantiate).
MODELS = {
    "RetinaNet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "RetinaNet-lazy": "COCO-Detection/retinanet_R_50_FPN_1x.py",
    "FCOS-lazy": "COCO-Detection/fcos_R_50_FPN_1x.py",
    "FasterC4": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
    "MaskC4-lazy": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.py",
    "FasterDC5": "COCO-Detection/faster_rcnn_R_50_DC5_1x.yaml",
    "FasterFPN": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "MaskFPN": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "MaskFPN-lazy": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py",
    "Cascade": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "Keypoint": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
    "Keypoint-lazy": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py",
    "Panoptic": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
    "Panoptic-lazy": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.py",
    "LSJ-R50-lazy": "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
    "LSJ-RegNetY-lazy": "new_baselines/mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py",
}
# Block type -> (options making it start as the identity, its authors' position).
TYPES = {
    "nonlocal": ({}, "after_block"),
    "global_context": ({}, "after_conv3"),
    "criss_cross": ({}, "after_block"),
    "generalized_attention": ({}, "after_conv2"),
    "simplified": ({"zero_init": True}, "after_add"),
    "disentangled": ({"zero_init": True}, "after_add"),
}
CELLS = [(m, t) for m in MODELS for t in TYPES]
# Lazy twins of a YAML model above: the same network, so built (through add_blocks) and checked
# for their names and keys on the meta device; their predictions are their YAML twins'.
LAZY_TWINS = ("RetinaNet-lazy", "MaskFPN-lazy", "Keypoint-lazy", "Panoptic-lazy")
# Test-time sizes: few proposals and detections, every score kept, slim keypoint/mask/box convs.
SMALL_YAML = [
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 10,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 10,
    "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 100,
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (64,) * 8, "MODEL.ROI_MASK_HEAD.CONV_DIM", 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 256, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 20,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
]  # fmt: skip
SMALL_LAZY = {
    "proposal_generator.pre_nms_topk": [200, 200],
    "proposal_generator.post_nms_topk": [20, 10],
    "roi_heads.batch_size_per_image": 64,
    "roi_heads.box_predictor.test_score_thresh": 0.0,
    "roi_heads.box_predictor.test_topk_per_image": 10,
    "roi_heads.box_head.conv_dims": [64] * 4,  # LSJ's 4conv1fc head
    "roi_heads.keypoint_head.conv_dims": [64] * 8,
    "test_score_thresh": 0.0,
    "test_topk_candidates": 100,
    "max_detections_per_image": 10,
}
H, W = 64, 96


def _is_yaml(model_id):
    return MODELS[model_id].endswith(".yaml")


def _yaml_cfg(zoo_file, opts=()):
    cfg = load_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_file))
    cfg.merge_from_list(SMALL_YAML + list(opts))
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _yaml_opts(cfg, kind):
    """The overrides that add one block of ``kind`` to a zoo config."""
    options, position = TYPES[kind]
    node = CONFIG_NODES[kind]
    opts = ["MODEL.BACKBONE.NAME", "build_nonlocal_backbone"]
    opts += ["MODEL.NONLOCAL.BASE_BACKBONE", cfg.MODEL.BACKBONE.NAME, "MODEL.NONLOCAL.TYPE", kind]
    opts += ["MODEL.NONLOCAL.PLACEMENT", "paper_1", "MODEL.NONLOCAL.POSITION", position]
    for k, v in options.items():
        opts += [f"MODEL.NONLOCAL.{node}.{k.upper()}", v]
    return opts


def _small(model):
    """SMALL_LAZY applied to a LazyConfig model: each key whose node's class takes it."""
    for key, value in SMALL_LAZY.items():
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(model, parent, default=None) if parent else model
        if node is not None and name in inspect.signature(node._target_).parameters:
            OmegaConf.update(model, key, value, merge=False)
    return model


def _lazy_model(zoo_file, kind=None):
    model = _small(model_zoo.get_config(zoo_file).model)
    if kind:
        options, position = TYPES[kind]
        spec = dict(type=kind, options=options)
        add_blocks(model.backbone, nonlocal_spec=spec, nonlocal_position=position)
    return model


def _build(model_id, kind=None):
    """The model through its real path: a YAML config + build_model, or a Lazy config +
    instantiate (with ``kind``: one block of that type)."""
    zoo_file = MODELS[model_id]
    if not _is_yaml(model_id):
        return instantiate(_lazy_model(zoo_file, kind))
    cfg = _yaml_cfg(zoo_file)
    if kind:
        cfg.merge_from_list(_yaml_opts(cfg, kind))
    if torch.empty(0).is_meta:
        cfg.MODEL.DEVICE = "meta"
    return build_model(cfg)


def _insert_args(model_id, kind):
    """What the real path passes to insert_blocks for one block of ``kind``."""
    if _is_yaml(model_id):
        cfg = _yaml_cfg(MODELS[model_id])
        return config_insert_args(_yaml_cfg(MODELS[model_id], _yaml_opts(cfg, kind)))
    node = _lazy_model(MODELS[model_id], kind).backbone
    return {k: node[k] for k in node if k.startswith("nonlocal_") and k != "nonlocal_base"}


def _damp(model):
    """Halve the (frozen or running-statistics) norms of an untrained network, whose identity
    norms make its activations explode; outputs stay sensitive to every layer."""
    for m in model.modules():
        if (
            isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm))
            and m.weight is not None
        ):
            m.weight.data.mul_(0.5)


def _image():
    return (torch.rand(3, H, W, generator=torch.Generator().manual_seed(3)) * 255).round()


def _predict(model):
    with torch.no_grad():
        return model([{"image": _image(), "height": H, "width": W}])[0]


_BASELINE = {}  # model id -> (baseline model, its prediction); one model at a time


def _baseline(model_id):
    if model_id not in _BASELINE:
        _BASELINE.clear()
        torch.manual_seed(0)
        model = _build(model_id).eval()
        _damp(model)
        _BASELINE[model_id] = (model, _predict(model))
    return _BASELINE[model_id]


@contextlib.contextmanager
def _blocks_in(backbone, args):
    """``insert_blocks`` on ``backbone``; everything as it was afterwards."""
    saved = [(m, dict(m._modules)) for m in backbone.modules()]
    try:
        yield insert_blocks(backbone, **args)
    finally:
        for m, children in saved:
            m._modules.clear()
            m._modules.update(children)


def _structure(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def _assert_same_prediction(a, b):
    assert a.keys() == b.keys()
    ia, ib = a["instances"], b["instances"]
    assert len(ia) > 0 and len(ia) == len(ib)
    assert ia.get_fields().keys() == ib.get_fields().keys()
    for key, value in ia.get_fields().items():
        value, other = getattr(value, "tensor", value), getattr(ib.get(key), "tensor", ib.get(key))
        if value.dtype in (torch.int64, torch.bool):
            assert torch.equal(value, other), key
        else:
            torch.testing.assert_close(value, other, atol=1e-4, rtol=0, msg=key)
    if "sem_seg" in a:
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-4, rtol=0)


# RetinaNet with one non-local block at res4 of a 64x96 image: L = 4x6 queries, M = 2x3 keys after
# the 2x2 max-pool, C = 1024, C_inner = 512: 4 1x1 convs and the attention (L*M*C_inner twice).
RETINANET_NL_FLOPS = 4 * 24 * 1024 * 512 + 24 * 6 * 2 * 512


def _backbone_flops(backbone):
    """fvcore with the blocks' handles (nonlocal_det.modeling.flops.count_flops) on the backbone,
    where the blocks are."""
    with torch.no_grad():
        analysis = count_flops(backbone, torch.zeros(1, 3, H, W))
        analysis.total()
    return analysis


def _keys(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=1)
def _meta_keys(model_id):
    """The state-dict keys and shapes of the model without blocks."""
    with torch.device("meta"):
        return _keys(_build(model_id))


@pytest.mark.parametrize("model_id,kind", CELLS, ids=[f"{m}-{t}" for m, t in CELLS])
def test_blocks_in_zoo_model_build_load_and_start_as_the_baseline(model_id, kind):
    with torch.device("meta"):
        built = _build(model_id, kind)  # the real path: it builds, its blocks where they belong
    names = [n for n, m in built.named_modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
    assert len(names) == 1
    stage = "s3" if "RegNet" in model_id else "res4"
    assert names[0].split(".")[-2 if TYPES[kind][1] == "after_block" else -3] == stage
    if model_id in LAZY_TWINS:
        base_keys = _meta_keys(model_id)
        new = {k: v for k, v in _keys(built).items() if k not in base_keys}
        assert new and all(k.startswith(names[0] + ".") for k in new)
        assert {k: v for k, v in _keys(built).items() if k in base_keys} == base_keys
        return
    base, expected = _baseline(model_id)
    flops_before = _backbone_flops(base.backbone).total() if kind == "nonlocal" else None
    with _blocks_in(base.backbone, _insert_args(model_id, kind)) as inserted:
        assert _structure(base) == _structure(built)  # the model the real path builds
        block_keys = {k for k in base.state_dict() if k.startswith(f"{names[0]}.")}
        checkpoint = {"model": {k: v for k, v in base.state_dict().items() if k not in block_keys}}
        incompatible = DetectionCheckpointer(base)._load_model(checkpoint)
        assert block_keys and set(incompatible.missing_keys) == block_keys
        assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
        _assert_same_prediction(_predict(base), expected)
        if flops_before is not None:  # analyze's counting: the blocks and nothing else
            analysis = _backbone_flops(base.backbone)
            blocks = sum(analysis.by_module()[f"model.{n}"] for n in inserted)
            assert blocks > 0 and analysis.total() - flops_before == blocks
            if model_id == "RetinaNet":
                assert blocks == RETINANET_NL_FLOPS
        if model_id == "RetinaNet":  # the test can fail: a block that is not the identity
            block = base.get_submodule(names[0])
            for p in block.parameters():
                if not p.any():
                    nn.init.normal_(p, std=0.5)
            changed = _predict(base)["instances"]
            assert not torch.equal(changed.scores, expected["instances"].scores)


def _generated_image(masks: bool):
    """One 64x64 image of two objects (bright rectangles) on noise, as a training input."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=g) * 60
    boxes = torch.tensor([[8, 10, 40, 50], [44, 4, 62, 30]])
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(boxes.float())
    gt.gt_classes = torch.tensor([0, 1])
    inside = torch.zeros(2, 64, 64, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        inside[i, y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] += 100 + 50 * i
    if masks:
        gt.gt_masks = BitMasks(inside)
    return [{"image": image, "instances": gt}]


def _train_model(name):
    """RetinaNet + NL and Cascade + GC from this project's YAML configs, RegNetY + GC from its
    LazyConfig, FCOS + GC from Detectron2's FCOS with add_blocks."""
    if name.endswith(".yaml"):
        return build_model(load_cfg(name, SMALL_YAML))
    if name.endswith(".py"):
        return instantiate(_small(LazyConfig.load(os.path.join(CONFIGS, "lazy", name)).model))
    model = _lazy_model(MODELS["FCOS-lazy"])
    spec = dict(type="global_context", options=dict(ratio=1 / 16))
    add_blocks(
        model.backbone,
        nonlocal_spec=spec,
        nonlocal_placement="all_res3_res5",
        nonlocal_position="after_conv3",
    )
    return instantiate(model)


TRAINED = {
    "retinanet_R50_NL.yaml": 1,
    "cascade_mask_rcnn_R50_GC_r16.yaml": 13,
    "mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py": 20,
    "fcos+GC": 13,
}


@pytest.mark.parametrize("name", TRAINED)
def test_models_with_blocks_train(name):
    """10 Adam iterations on one generated image: finite losses, its loss goes down (the same
    sampling seed before and after, every proposal in the box head's batch, the dense detectors'
    loss normalizer not averaged over the calls), and the blocks leave the identity."""
    torch.manual_seed(0)
    model = _train_model(name).train()
    _damp(model)
    if hasattr(model, "roi_heads"):  # every proposal (20 + the 2 objects): no sampling noise
        model.roi_heads.batch_size_per_image = 256
    blocks = [m for m in model.modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
    assert len(blocks) == TRAINED[name]
    start = [p.detach().clone() for b in blocks for p in b.parameters()]
    batch = _generated_image(masks=getattr(getattr(model, "roi_heads", None), "mask_on", False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def loss():
        torch.manual_seed(1)  # the same proposal and anchor sampling every time
        model.__dict__.pop("loss_normalizer", None)  # RetinaNet, FCOS: not the running average
        with EventStorage():
            losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        return sum(losses.values())

    with torch.no_grad():
        before = loss()
    for _ in range(10):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before, (before, after)
    now = [p.detach() for b in blocks for p in b.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, now))
