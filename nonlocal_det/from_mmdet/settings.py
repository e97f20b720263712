"""The Detectron2 config values that compute what mmdetection computed, read from a checkpoint's
:class:`~nonlocal_det.from_mmdet.keys.Layout` and its embedded training config (mmdetection's
defaults for what it leaves out), and their comparison with a config. What Detectron2 cannot
compute the same is refused, naming the config entry."""

import math
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .blocks import STAGES, block_settings
from .keys import Layout, UnsupportedCheckpoint, refused

__all__ = ["CHECKED_BY_KEYS", "config_mismatches", "mmdet_settings"]

# Settings the key and shape comparison with the model checks (where the blocks are, whether the
# backbone builds them), not compared value by value.
CHECKED_BY_KEYS = {
    "MODEL.BACKBONE.NAME",
    "MODEL.NONLOCAL.ENABLED",
    "MODEL.NONLOCAL.PLACEMENT",
    *(f"MODEL.NONLOCAL.{s.upper()}_BLOCKS" for s in STAGES),
}
# mmcv's / mmdetection's defaults where a config leaves a value out.
_RPN_TEST = dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0)
_RCNN_TEST = dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100, mask_thr_binary=0.5)
_MEAN, _STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # torchvision's, RGB


def _get(d: Optional[dict], path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _listed(value: Any) -> Any:
    """Tuples as lists (YAML and config text differ there), recursively."""
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    return value


def _walk(node: Any) -> Iterator[dict]:
    """Every dict inside ``node`` (lists, tuples and dicts, depth first)."""
    if isinstance(node, dict):
        yield node
        children = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return
    for child in children:
        yield from _walk(child)


def _iou(nms: Any, fallback: Any, where: str, default: float) -> float:
    """The IoU threshold of an mmdetection NMS setting (``nms=dict(type='nms', iou_threshold)``,
    older ``iou_thr``, or ``nms_thr`` beside it)."""
    if isinstance(nms, dict):
        if nms.get("type", "nms") != "nms":
            raise refused(f"{where}.nms.type", nms.get("type"), "only plain NMS is mapped")
        return nms.get("iou_threshold", nms.get("iou_thr", default))
    return fallback if fallback is not None else default


def _test_settings(config: dict, model: dict, mask_on: bool) -> "OrderedDict[str, Any]":
    test = model.get("test_cfg") or config.get("test_cfg") or {}
    rpn, rcnn = test.get("rpn") or {}, test.get("rcnn") or {}
    out = OrderedDict()
    out["MODEL.RPN.PRE_NMS_TOPK_TEST"] = rpn.get("nms_pre", _RPN_TEST["nms_pre"])
    out["MODEL.RPN.POST_NMS_TOPK_TEST"] = rpn.get(
        "max_per_img", rpn.get("max_num", _RPN_TEST["max_per_img"])
    )
    out["MODEL.RPN.NMS_THRESH"] = _iou(
        rpn.get("nms"), rpn.get("nms_thr"), "test_cfg.rpn", _RPN_TEST["iou_threshold"]
    )
    out["MODEL.PROPOSAL_GENERATOR.MIN_SIZE"] = rpn.get("min_bbox_size", _RPN_TEST["min_bbox_size"])
    out["MODEL.ROI_HEADS.SCORE_THRESH_TEST"] = rcnn.get("score_thr", _RCNN_TEST["score_thr"])
    out["MODEL.ROI_HEADS.NMS_THRESH_TEST"] = _iou(
        rcnn.get("nms"), None, "test_cfg.rcnn", _RCNN_TEST["iou_threshold"]
    )
    out["TEST.DETECTIONS_PER_IMAGE"] = rcnn.get("max_per_img", _RCNN_TEST["max_per_img"])
    threshold = rcnn.get("mask_thr_binary", _RCNN_TEST["mask_thr_binary"])
    if mask_on and threshold != 0.5:
        raise refused(
            "test_cfg.rcnn.mask_thr_binary", threshold, "Detectron2 binarises masks at 0.5"
        )
    return out


def _input_settings(config: dict, model: dict) -> "OrderedDict[str, Any]":
    pipelines = [
        config.get("test_pipeline"),
        _get(config, "test_dataloader.dataset.pipeline"),
        _get(config, "data.test.pipeline"),
    ]
    steps = [d for p in pipelines for d in _walk(p)]
    preprocessor = model.get("data_preprocessor")  # mmdetection 3; 2: Normalize in the pipeline
    norm = preprocessor or next(
        (d for d in steps if d.get("type") == "Normalize"), config.get("img_norm_cfg") or {}
    )
    to_rgb = norm.get("bgr_to_rgb", False) if preprocessor else norm.get("to_rgb", True)
    divisor = norm.get("pad_size_divisor")
    if divisor is None:
        divisor = next((d.get("size_divisor") for d in steps if d.get("type") == "Pad"), 32)
    if divisor not in (None, 32):
        raise refused("pad size_divisor", divisor, "Detectron2's FPN pads to multiples of 32")
    out = OrderedDict()
    out["MODEL.PIXEL_MEAN"] = [float(v) for v in norm.get("mean", _MEAN)]
    out["MODEL.PIXEL_STD"] = [float(v) for v in norm.get("std", _STD)]
    out["INPUT.FORMAT"] = "RGB" if to_rgb else "BGR"
    for step in steps:
        scale = step.get("scale", step.get("img_scale"))
        if step.get("type") in ("Resize", "MultiScaleFlipAug") and scale is not None:
            if not step.get("keep_ratio", True) or len(scale) != 2 or isinstance(scale[0], list):
                why = "only one scale, keeping the aspect ratio (Detectron2's ResizeShortestEdge)"
                raise refused(f"test pipeline {step['type']}", scale, why + ", is mapped")
            out["INPUT.MIN_SIZE_TEST"], out["INPUT.MAX_SIZE_TEST"] = min(scale), max(scale)
            break
    return out


def _roi_settings(roi_head: dict, lay: Layout) -> "OrderedDict[str, Any]":
    out = OrderedDict()
    heads = [("bbox", "ROI_BOX_HEAD", 7)] + ([("mask", "ROI_MASK_HEAD", 14)] if lay.mask_on else [])
    for name, node, resolution in heads:
        extractor = roi_head.get(f"{name}_roi_extractor") or {}
        layer = extractor.get("roi_layer") or {}
        where = f"model.roi_head.{name}_roi_extractor"
        if layer.get("type", "RoIAlign") != "RoIAlign" or layer.get("pool_mode", "avg") != "avg":
            raise refused(f"{where}.roi_layer", layer, "only RoIAlign with average pooling")
        if extractor.get("finest_scale", 56) != 56:
            why = "Detectron2 maps boxes to levels as finest_scale 56 does (224 at level 4)"
            raise refused(f"{where}.finest_scale", extractor["finest_scale"], why)
        get = layer.get
        out[f"MODEL.{node}.POOLER_TYPE"] = "ROIAlignV2" if get("aligned", True) else "ROIAlign"
        out[f"MODEL.{node}.POOLER_SAMPLING_RATIO"] = get("sampling_ratio", get("sample_num", 0))
        out[f"MODEL.{node}.POOLER_RESOLUTION"] = get("output_size", get("out_size", resolution))
    box = roi_head.get("bbox_head") or {}
    stds = _coder(box, "target_stds", [0.1, 0.1, 0.2, 0.2])
    if any(_coder(box, "target_means", [0.0] * 4)):
        raise refused("model.roi_head.bbox_head.bbox_coder.target_means", box, "only zero means")
    out["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"] = [1.0 / s for s in stds]
    return out


def _anchors(rpn: dict) -> dict:
    """The RPN's ``anchor_generator``, or the older head keys ``anchor_scales`` ..."""
    if rpn.get("anchor_generator") or not any(k.startswith("anchor_") for k in rpn):
        return dict(rpn.get("anchor_generator") or {})
    old = {"scales": "anchor_scales", "ratios": "anchor_ratios", "strides": "anchor_strides"}
    return dict({k: rpn[v] for k, v in old.items() if v in rpn}, type="AnchorGenerator")


def _coder(head: dict, key: str, default: List[float]) -> List[float]:
    """``target_means`` / ``target_stds`` of a head's ``bbox_coder`` (older: head keys)."""
    return list(_get(head, f"bbox_coder.{key}", head.get(key, default)))


def _rpn_settings(rpn: dict) -> "OrderedDict[str, Any]":
    where = "model.rpn_head.anchor_generator"
    anchors = _anchors(rpn)
    if anchors and (anchors.get("type") != "AnchorGenerator" or "scales" not in anchors):
        raise refused(where, anchors, "only AnchorGenerator with scales")
    scales = anchors.get("scales", [8])
    strides = anchors.get("strides", [4, 8, 16, 32, 64])
    strides = [s if isinstance(s, (int, float)) else s[0] for s in strides]
    if len(scales) != 1 or len(strides) != 5 or anchors.get("base_sizes"):
        raise refused(
            where,
            anchors,
            "only one scale on each of the 5 FPN levels, the stride as base size "
            "(Detectron2 orders several sizes differently)",
        )
    if any(_coder(rpn, "target_means", [0.0] * 4)):
        raise refused("model.rpn_head.bbox_coder.target_means", rpn, "only zero means")
    ratios = anchors.get("ratios", [0.5, 1.0, 2.0])
    out = OrderedDict()
    out["MODEL.ANCHOR_GENERATOR.SIZES"] = [[float(st * scales[0])] for st in strides]
    out["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"] = [[float(r) for r in ratios]]
    out["MODEL.ANCHOR_GENERATOR.OFFSET"] = float(anchors.get("center_offset", 0.0))
    stds = _coder(rpn, "target_stds", [1.0] * 4)
    out["MODEL.RPN.BBOX_REG_WEIGHTS"] = [1.0 / s for s in stds]
    return out


def _backbone_settings(lay: Layout, backbone: dict, has_config: bool) -> "OrderedDict[str, Any]":
    where = "model.backbone"
    kind = backbone.get("type", "ResNet")
    if kind not in ("ResNet", "ResNeXt"):
        raise refused(f"{where}.type", kind, "only ResNet and ResNeXt backbones are mapped")
    if backbone.get("dcn") or any(backbone.get("stage_with_dcn") or []):
        raise refused(f"{where}.dcn", backbone.get("dcn"), "deformable convs are not mapped")
    for key, value in (("depth", lay.depth), ("num_stages", 4), ("out_indices", [0, 1, 2, 3])):
        if _listed(backbone.get(key, value)) != value:
            raise refused(f"{where}.{key}", backbone[key], f"the weights have {value}")
    if tuple(backbone.get("dilations", (1, 1, 1, 1))) != (1, 1, 1, 1):
        raise refused(f"{where}.dilations", backbone["dilations"], "only (1, 1, 1, 1)")
    style = backbone.get("style", "pytorch")
    if style not in ("pytorch", "caffe"):
        raise refused(f"{where}.style", style, "allowed: 'pytorch', 'caffe'")
    norm = backbone.get("norm_cfg") or {"type": "BN"}
    if norm.get("type") not in ("BN", "SyncBN", "MMSyncBN", "NaiveSyncBN"):
        raise refused(f"{where}.norm_cfg", norm, "only BN / SyncBN backbones are mapped")
    frozen = backbone.get("norm_eval", True)
    out = OrderedDict()
    out["MODEL.BACKBONE.FREEZE_AT"] = backbone.get("frozen_stages", 1 if not has_config else -1) + 1
    out["MODEL.RESNETS.DEPTH"] = lay.depth
    out["MODEL.RESNETS.OUT_FEATURES"] = list(STAGES)
    out["MODEL.RESNETS.NUM_GROUPS"] = lay.num_groups
    out["MODEL.RESNETS.WIDTH_PER_GROUP"] = lay.width_per_group
    out["MODEL.RESNETS.STRIDE_IN_1X1"] = style == "caffe"
    out["MODEL.RESNETS.NORM"] = (
        "FrozenBN" if frozen else ("BN" if norm["type"] == "BN" else "SyncBN")
    )
    out["MODEL.RESNETS.STEM_OUT_CHANNELS"] = lay.stem_channels
    out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = lay.res2_channels
    out["MODEL.RESNETS.RES5_DILATION"] = 1
    out["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] = [False] * 4
    return out


def _neck_settings(lay: Layout, neck: dict) -> "OrderedDict[str, Any]":
    where = "model.neck"
    expected = {"type": "FPN", "num_outs": 5, "start_level": 0, "add_extra_convs": False}
    for key, value in expected.items():
        if (neck.get(key) or value) != value:
            raise refused(f"{where}.{key}", neck.get(key), f"only {value!r} is mapped")
    if neck.get("norm_cfg") or (neck.get("upsample_cfg") or {}).get("mode", "nearest") != "nearest":
        raise refused(where, neck, "only an FPN without norms, upsampled by nearest neighbours")
    out = OrderedDict()
    out["MODEL.FPN.IN_FEATURES"] = list(STAGES)
    out["MODEL.FPN.OUT_CHANNELS"] = lay.fpn_channels
    out["MODEL.FPN.NORM"] = ""
    out["MODEL.FPN.FUSE_TYPE"] = "sum"
    return out


def _head_settings(lay: Layout, model: dict) -> "OrderedDict[str, Any]":
    heads = ("bbox_roi_extractor", "bbox_head", "mask_roi_extractor", "mask_head")
    roi_head = model.get("roi_head") or {k: model[k] for k in heads if k in model}  # older: top
    types = [
        ("model.type", model.get("type"), ("FasterRCNN", "MaskRCNN")),
        ("model.rpn_head.type", _get(model, "rpn_head.type"), ("RPNHead",)),
        ("model.roi_head.type", roi_head.get("type"), ("StandardRoIHead",)),
        (
            "model.roi_head.bbox_head.type",
            _get(roi_head, "bbox_head.type"),
            ("Shared2FCBBoxHead", "ConvFCBBoxHead"),
        ),
        ("model.roi_head.mask_head.type", _get(roi_head, "mask_head.type"), ("FCNMaskHead",)),
    ]
    for where, value, allowed in types:
        if value is not None and value not in allowed:
            raise refused(where, value, f"only {list(allowed)} are mapped")
    num_classes = _get(roi_head, "bbox_head.num_classes", lay.num_classes)
    if lay.legacy_classes or num_classes == lay.num_classes + 1:
        raise UnsupportedCheckpoint(
            f"mmdetection 1.x class layout (fc_cls with {lay.num_classes + 1} outputs, the "
            "background first, box regression with a background row): not mapped; its legacy "
            "box geometry (+1 widths, anchors at offset 0.5) has no Detectron2 counterpart "
            "(docs/published_models.md)"
        )
    if num_classes != lay.num_classes:
        why = f"fc_cls has {lay.num_classes + 1} outputs ({lay.num_classes} classes + background)"
        raise refused("model.roi_head.bbox_head.num_classes", num_classes, why)
    out = OrderedDict()
    out["MODEL.META_ARCHITECTURE"] = "GeneralizedRCNN"
    out["MODEL.MASK_ON"] = lay.mask_on
    out["MODEL.KEYPOINT_ON"] = False
    out["MODEL.PROPOSAL_GENERATOR.NAME"] = "RPN"
    out["MODEL.RPN.HEAD_NAME"] = "StandardRPNHead"
    out["MODEL.RPN.IN_FEATURES"] = ["p2", "p3", "p4", "p5", "p6"]
    out["MODEL.RPN.CONV_DIMS"] = [-1]
    out.update(_rpn_settings(model.get("rpn_head") or {}))
    out["MODEL.ROI_HEADS.NAME"] = "StandardROIHeads"
    out["MODEL.ROI_HEADS.IN_FEATURES"] = ["p2", "p3", "p4", "p5"]
    out["MODEL.ROI_HEADS.NUM_CLASSES"] = lay.num_classes
    out["MODEL.ROI_BOX_HEAD.NAME"] = "FastRCNNConvFCHead"
    out["MODEL.ROI_BOX_HEAD.NUM_CONV"] = 0
    out["MODEL.ROI_BOX_HEAD.NUM_FC"] = lay.num_fc
    out["MODEL.ROI_BOX_HEAD.FC_DIM"] = lay.fc_dim
    out["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"] = lay.cls_agnostic_bbox_reg
    if lay.mask_on:
        out["MODEL.ROI_MASK_HEAD.NAME"] = "MaskRCNNConvUpsampleHead"
        out["MODEL.ROI_MASK_HEAD.NUM_CONV"] = lay.mask_num_conv
        out["MODEL.ROI_MASK_HEAD.CONV_DIM"] = lay.mask_conv_dim
        out["MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK"] = lay.cls_agnostic_mask
    out.update(_roi_settings(roi_head, lay))
    if out["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"] != lay.pooler_resolution:
        why = f"the box head's fc1 reads {lay.pooler_resolution} x {lay.pooler_resolution} bins"
        where = "model.roi_head.bbox_roi_extractor.roi_layer.output_size"
        raise refused(where, out["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"], why)
    return out


def mmdet_settings(
    layout: Layout,
    config: Optional[Dict[str, Any]] = None,
    *,
    version: Optional[str] = None,
    assume_defaults: bool = False,
) -> Tuple["OrderedDict[str, Any]", List[str]]:
    """The Detectron2 config values for a checkpoint (every key an FPN R-CNN needs over
    Detectron2's defaults, its input and test settings) in config order, and notes on what was
    assumed.

    Args:
        layout: :func:`~nonlocal_det.from_mmdet.read_layout` of the weights.
        config: the embedded training config (:func:`nonlocal_det.utils.read_config_text`).
        version: ``meta['mmdet_version']``.
        assume_defaults: mmdetection's R-CNN defaults for what the config and weights leave open.

    Raises:
        UnsupportedCheckpoint: naming what cannot be mapped and why.
    """
    notes: List[str] = []
    if config is None:
        if not assume_defaults:
            raise UnsupportedCheckpoint(
                "the checkpoint holds no training config (meta['config'] or meta['cfg']): the "
                "ResNet's style, the RoIAlign settings, the input normalisation and the test "
                "thresholds are not in the weights; pass --assume-defaults to take mmdetection's "
                "R-CNN defaults (pytorch style, RGB with torchvision's mean and std, aligned "
                "RoIAlign with sampling ratio 0, its test thresholds)"
            )
        notes.append("no config in the checkpoint: mmdetection's R-CNN defaults assumed")
    major = str(version).split(".")[0]
    if major.isdigit() and int(major) < 2 and not layout.legacy_classes:
        notes.append(
            f"trained with mmdetection {version} (legacy +1 box geometry) and upgraded to the 2.x "
            "layout: the converted model computes 2.x geometry, as mmdetection 2 does with it "
            "(mmdetection reports 0.3-0.5 AP less for such files)"
        )
    cfg = config or {}
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    out = _head_settings(layout, model)
    out.update(_backbone_settings(layout, backbone, config is not None))
    out.update(_neck_settings(layout, model.get("neck") or {}))
    out.update(block_settings(layout, backbone, config is not None, assume_defaults, notes))
    out.update(_test_settings(cfg, model, layout.mask_on))
    out.update(_input_settings(cfg, model))
    return out, notes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def config_mismatches(cfg, settings: Dict[str, Any]) -> List[str]:
    """The settings a Detectron2 config does not have, as ``"KEY: the config has X, the
    checkpoint needs Y"`` (the keys of :data:`CHECKED_BY_KEYS` left to the model's keys)."""
    out = []
    for key, needed in settings.items():
        if key in CHECKED_BY_KEYS:
            continue
        node = cfg
        for part in key.split("."):
            node = node[part]
        if not _same(node, needed):
            out.append(f"{key}: the config has {node!r}, the checkpoint needs {needed!r}")
    return out
