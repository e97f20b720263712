"""Every config in configs/ loads, builds and runs; placements are the paper's."""

import glob
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from omegaconf import DictConfig, ListConfig
from utils import CONFIGS, DEMO_YAML, load_cfg

from nonlocal_det import NonLocalBlock
from nonlocal_det.layers import BLOCK_TYPES
from nonlocal_det.modeling import remove_blocks

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
RETINA_NL = {"backbone.bottom_up.res4.nonlocal4": (NL, 1024, 512)}
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
    "retinanet_R50_NL.yaml": R50_RES4,
    "retinanet_R50_GC_r16.yaml": GC,
    "cascade_mask_rcnn_R50_GC_r16.yaml": GC,
}
# Built here on the meta device (names checked) and run elsewhere: baselines equal to Detectron2's
# zoo configs (test_baselines_equal_detectron2_model_zoo), whose models test_zoo_models runs; the
# configs test_zoo_models trains.
RUN_ELSEWHERE = {
    "retinanet_R50.yaml",
    "cascade_mask_rcnn_R50.yaml",
    "retinanet_R50_NL.yaml",
    "cascade_mask_rcnn_R50_GC_r16.yaml",
}
# Baselines that restate a config of Detectron2's installed model zoo, and what they set apart.
ZOO_BASELINES = {
    "faster_rcnn_R50.yaml": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", []),
    "mask_rcnn_R50.yaml": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", []),
    "mask_rcnn_R50_3x.yaml": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", []),
    "keypoint_rcnn_R50.yaml": (
        "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
        ["TEST.KEYPOINT_OKS_SIGMAS"],  # COCO's 17 sigmas, stated (Detectron2: [] = COCO's)
    ),
    "retinanet_R50.yaml": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", []),
    "cascade_mask_rcnn_R50.yaml": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", []),
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
        # Everything but the blocks: the backbone's builder, the keypoint head's name and the
        # MODEL.NONLOCAL keys (which, for a baseline, nothing reads).
        for key in ("MODEL.BACKBONE.NAME", "MODEL.ROI_KEYPOINT_HEAD.NAME", "MODEL.NONLOCAL"):
            _set(a, key, _get(b, key))
        assert a == b, (leaf, _diff(a, b))
        paired += 1
    assert paired == len(EXPECTED)  # every config with blocks
    raw = open(os.path.join(CONFIGS, "mask_rcnn_R50_NL.yaml")).read()
    assert "ImageNetPretrained/MSRA/R-50.pkl" in raw


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg, key, value):
    *parents, last = key.split(".")
    _get(cfg, ".".join(parents))[last] = value


def _diff(a, b, prefix=""):
    """The keys whose values differ between two configs."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


@pytest.mark.parametrize("ours", sorted(ZOO_BASELINES))
def test_baselines_equal_detectron2_model_zoo(ours):
    """A baseline restated here (external projects cannot use Detectron2's _BASE_ paths) is the
    config of Detectron2's installed model zoo."""
    zoo_file, apart = ZOO_BASELINES[ours]
    zoo = load_cfg()
    zoo.merge_from_file(model_zoo.get_config_file(zoo_file))
    zoo.MODEL.WEIGHTS = ""
    assert _diff(load_cfg(ours), zoo) == apart


def test_lazy_config_with_blocks_differs_from_its_zoo_baseline_only_in_its_blocks():
    """configs/lazy/mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py is Detectron2's file with
    add_blocks on its backbone: without its blocks, the same config."""
    ours = LazyConfig.load(os.path.join(CONFIGS, "lazy", LAZY_GC))
    zoo = model_zoo.get_config("new_baselines/mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py")
    assert ours.model.backbone.nonlocal_spec.type == "global_context"
    assert _same(remove_blocks(ours), zoo)
    assert not _same(ours.model, zoo.model)


LAZY_GC = "mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py"


def _same(a, b):
    """Two LazyConfig trees alike (functions by their code: a file loaded twice makes new
    lambdas)."""
    if isinstance(a, (DictConfig, dict)) and isinstance(b, (DictConfig, dict)):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (ListConfig, list, tuple)) and isinstance(b, (ListConfig, list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if callable(a) and hasattr(a, "__code__"):
        return getattr(b, "__code__", None) == a.__code__
    return a == b


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
    if leaf in RUN_ELSEWHERE:
        cfg.MODEL.DEVICE = "meta"
    with torch.device(cfg.MODEL.DEVICE):
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
    if leaf in RUN_ELSEWHERE:
        return
    image = torch.rand(3, 64, 80) * 255
    with EventStorage():
        losses = model([{"image": image, "instances": _gt_instances(cfg)}])
    expected = {"loss_cls", "loss_box_reg"}
    expected |= (
        set() if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else {"loss_rpn_cls", "loss_rpn_loc"}
    )
    expected |= {"loss_mask"} if cfg.MODEL.MASK_ON else set()
    expected |= {"loss_keypoint"} if cfg.MODEL.KEYPOINT_ON else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 80}])[0]["instances"]
    assert out.image_size == (64, 80) and out.has("pred_boxes") and out.has("scores")


def test_one_override_turns_every_block_off():
    cfg = load_cfg(DEMO_YAML, ["MODEL.NONLOCAL.ENABLED", False])
    model = build_model(cfg)
    assert not any(isinstance(m, NonLocalBlock) for m in model.modules())
    on = build_model(load_cfg(DEMO_YAML))
    names = [n for n, m in on.named_modules() if isinstance(m, NonLocalBlock)]
    assert names == [
        "backbone.bottom_up.res4.nonlocal0",
        "roi_heads.keypoint_head.nonlocal2",
        "roi_heads.keypoint_head.nonlocal4",
    ]
    assert set(model.state_dict()) == {k for k in on.state_dict() if ".nonlocal" not in k}
