"""Every config in configs/ loads, builds and runs; placements are the paper's."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from utils import CONFIGS, load_cfg

from nonlocal_det import NonLocalBlock
from nonlocal_det.layers import BLOCK_TYPES

# configs/mmdet (models of mmdetection's checkpoints): each is built on the meta device and matched
# with mmdetection's own model in tests/test_convert_mmdet*.py, five of them run there.
LEAVES = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
    and not p.startswith(os.path.join(CONFIGS, "mmdet"))
)

# Blocks expected in each config: name -> (class, in_channels, C_inner of a non-local block).
NL = "NonLocalBlock"
R50_RES4 = {"backbone.bottom_up.res4.nonlocal4": (NL, 1024, 512)}
R101_RES4 = {"backbone.bottom_up.res4.nonlocal21": (NL, 1024, 512)}
KP_HEAD = {f"roi_heads.keypoint_head.nonlocal{k}": (NL, 512, 256) for k in (2, 4, 6, 8)}
R50 = {"res3": (4, 512, 128), "res4": (6, 1024, 256), "res5": (3, 2048, 512)}  # blocks, C, width


def _inside(cls, stages, channels_of, only=None):
    """Blocks inside every residual block of ``stages`` (or only the given indices)."""
    return {
        f"backbone.bottom_up.{s}.{i}.nonlocal_block": (cls, channels_of(R50[s]), None)
        for s in stages
        for i in (only or {}).get(s, range(R50[s][0]))
    }


GC = _inside("GlobalContextBlock", ("res3", "res4", "res5"), lambda s: s[1])
DNL = _inside("DisentangledNonLocalBlock", ("res4",), lambda s: s[1], {"res4": [4]})
EXPECTED = {
    "mask_rcnn_R50_NL.yaml": R50_RES4,
    "mask_rcnn_R50_NL_3x.yaml": R50_RES4,
    "mask_rcnn_R50_NL_warmstart.yaml": R50_RES4,
    "faster_rcnn_R50_NL.yaml": R50_RES4,
    "mask_rcnn_R101_NL.yaml": R101_RES4,
    "mask_rcnn_X101_32x8d_NL.yaml": R101_RES4,
    "keypoint_rcnn_R50_NL.yaml": {**R50_RES4, **KP_HEAD},
    "keypoint_rcnn_R101_NL.yaml": {**R101_RES4, **KP_HEAD},
    "keypoint_rcnn_R101_NL_head.yaml": KP_HEAD,
    "mask_rcnn_R50_GC_r16.yaml": GC,
    "mask_rcnn_R50_GC_r4.yaml": GC,
    "mask_rcnn_R50_SNL.yaml": _inside(
        "SimplifiedNonLocalBlock", ("res4",), lambda s: s[1], {"res4": [4]}
    ),
    "mask_rcnn_R50_DNL.yaml": DNL,
    "mask_rcnn_R50_DNL_c4c5.yaml": {
        **DNL,
        **_inside("DisentangledNonLocalBlock", ("res5",), lambda s: s[1]),
    },
    "mask_rcnn_R50_CC.yaml": {
        "backbone.bottom_up.res4.nonlocal4": ("CrissCrossAttention", 1024, None)
    },
    "faster_rcnn_R50_GA_0010.yaml": _inside(
        "GeneralizedAttention", ("res4", "res5"), lambda s: s[2]
    ),
    "faster_rcnn_R50_GA_1111.yaml": _inside(
        "GeneralizedAttention", ("res4", "res5"), lambda s: s[2]
    ),
}
# The part of a config's name that says which blocks it has; without it: its baseline.
BLOCK_SUFFIXES = ("_NL_head", "_NL", "_GC_r16", "_GC_r4", "_SNL", "_DNL_c4c5", "_DNL", "_CC")
BLOCK_SUFFIXES += ("_GA_0010", "_GA_1111")


def test_every_config_with_blocks_has_a_same_schedule_baseline():
    paired = 0
    for leaf in LEAVES:
        suffix = next((x for x in BLOCK_SUFFIXES if x + "." in leaf or x + "_" in leaf), None)
        if suffix is None or leaf.startswith(("demo", "probe")):
            continue
        base = leaf.replace(suffix, "", 1)
        assert base in LEAVES, f"{leaf} has no baseline {base}"
        a, b = load_cfg(leaf), load_cfg(base)
        raw_a, raw_b = (open(os.path.join(CONFIGS, f)).read() for f in (leaf, base))
        weights = [line.strip() for line in raw_a.splitlines() if "WEIGHTS" in line]
        assert weights and weights == [l.strip() for l in raw_b.splitlines() if "WEIGHTS" in l]
        assert a.SOLVER == b.SOLVER and a.INPUT == b.INPUT and a.DATASETS == b.DATASETS, leaf
        assert a.MODEL.RESNETS == b.MODEL.RESNETS and a.MODEL.PIXEL_STD == b.MODEL.PIXEL_STD
        assert a.MODEL.MASK_ON == b.MODEL.MASK_ON and a.MODEL.KEYPOINT_ON == b.MODEL.KEYPOINT_ON
        paired += 1
    assert paired == len(EXPECTED)  # every config with blocks
    raw = open(os.path.join(CONFIGS, "mask_rcnn_R50_NL.yaml")).read()
    assert "ImageNetPretrained/MSRA/R-50.pkl" in raw


def _gt_instances(cfg, h=64, w=80):
    """One ground-truth object with box, mask and keypoints, for a training forward."""
    gt = Instances((h, w))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0]]))
    gt.gt_classes = torch.tensor([0])
    gt.gt_masks = BitMasks(
        torch.zeros(1, h, w, dtype=torch.bool).index_fill_(1, torch.arange(12, 60), True)
    )
    k = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    kp = torch.stack(
        [torch.linspace(12, 48, k), torch.linspace(14, 58, k), torch.full((k,), 2.0)], 1
    )
    gt.gt_keypoints = Keypoints(kp[None])
    return gt


@pytest.mark.parametrize("leaf", LEAVES)
def test_config_builds_and_runs(leaf):
    cfg = load_cfg(
        leaf,
        [
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            100,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            100,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            64,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    blocks = {
        n: (type(m).__name__, m.in_channels, getattr(m, "inner_channels", None))
        for n, m in model.named_modules()
        if isinstance(m, tuple(BLOCK_TYPES.values()))
    }
    for name, (cls, c, inner) in EXPECTED.get(leaf, {}).items():
        if cls != NL:  # the other types: their own channel arguments, checked in their tests
            blocks[name] = blocks[name][:2] + (None,)
    if not leaf.startswith(("demo", "probe")):
        assert blocks == EXPECTED.get(leaf, {}), leaf
    image = torch.rand(3, 64, 80) * 255
    with EventStorage():
        losses = model([{"image": image, "instances": _gt_instances(cfg)}])
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    expected |= {"loss_mask"} if cfg.MODEL.MASK_ON else set()
    expected |= {"loss_keypoint"} if cfg.MODEL.KEYPOINT_ON else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 80}])[0]["instances"]
    assert out.image_size == (64, 80) and out.has("pred_boxes") and out.has("scores")


def test_one_override_turns_every_block_off():
    cfg = load_cfg("demo/mask_rcnn_R18_NL_demo.yaml", ["MODEL.NONLOCAL.ENABLED", False])
    model = build_model(cfg)
    assert not any(isinstance(m, NonLocalBlock) for m in model.modules())
    on = build_model(load_cfg("demo/mask_rcnn_R18_NL_demo.yaml"))
    names = [n for n, m in on.named_modules() if isinstance(m, NonLocalBlock)]
    assert names == [
        "backbone.bottom_up.res4.nonlocal0",
        "roi_heads.keypoint_head.nonlocal2",
        "roi_heads.keypoint_head.nonlocal4",
    ]
    assert set(model.state_dict()) == {k for k in on.state_dict() if ".nonlocal" not in k}
