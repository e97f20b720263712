"""mmdetection's parameter names -> this project's Detectron2 names, and what the weights' names
and shapes say about the model (:class:`Layout`): Faster / Mask R-CNN with a ResNet(-Xt), an FPN,
and mmcv's ``ContextBlock`` / ``GeneralizedAttention`` plugins; anything else is refused."""

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.modeling import build_model

__all__ = [
    "PLUGIN_TYPES",
    "Layout",
    "UnsupportedCheckpoint",
    "convert_state_dict",
    "model_mismatches",
    "read_layout",
    "refused",
]

# mmcv's plugin names (its ``_abbr_``) -> MODEL.NONLOCAL.TYPE
PLUGIN_TYPES = {"context_block": "global_context", "gen_attention_block": "generalized_attention"}
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (or its config) that this converter cannot map; the message names what and
    why."""


def refused(where: str, value, why: str) -> UnsupportedCheckpoint:
    """The error for a config entry ``where`` of the checkpoint with ``value``, and why."""
    return UnsupportedCheckpoint(f"{where}={value!r} in the checkpoint's config: {why}")


_BOX, _MASK, _RPN = "roi_heads.box_", "roi_heads.mask_head.", "proposal_generator.rpn_head."
_STATS = "(running_mean|running_var|weight|bias)"
_LAYER, _RES = r"backbone\.layer([1-4])\.(\d+)\.", "backbone.bottom_up.res{n}.{1}."
_PLUGIN = rf"({'|'.join(PLUGIN_TYPES)})\.(?!local_constraint_map$)(.+)"
_RULES = [  # (mmdetection name pattern, Detectron2 name template, offset added to {n} = group 0)
    (_LAYER + r"conv([123])\.weight", _RES + "conv{2}.weight", 1),
    (_LAYER + rf"bn([123])\.{_STATS}", _RES + "conv{2}.norm.{3}", 1),
    (_LAYER + r"downsample\.0\.weight", _RES + "shortcut.weight", 1),
    (_LAYER + rf"downsample\.1\.{_STATS}", _RES + "shortcut.norm.{2}", 1),
    (_LAYER + _PLUGIN, _RES + "nonlocal_block.{3}", 1),  # ResidualWithBlock's block
    (r"backbone\.conv1\.weight", "backbone.bottom_up.stem.conv1.weight", 0),
    (rf"backbone\.bn1\.{_STATS}", "backbone.bottom_up.stem.conv1.norm.{0}", 0),
    (r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)", "backbone.fpn_lateral{n}.{1}", 2),
    (r"neck\.fpn_convs\.(\d)\.conv\.(weight|bias)", "backbone.fpn_output{n}.{1}", 2),
    (r"rpn_head\.rpn_conv\.(weight|bias)", _RPN + "conv.{0}", 0),
    (r"rpn_head\.rpn_cls\.(weight|bias)", _RPN + "objectness_logits.{0}", 0),
    (r"rpn_head\.rpn_reg\.(weight|bias)", _RPN + "anchor_deltas.{0}", 0),
    (r"roi_head\.bbox_head\.shared_fcs\.(\d)\.(weight|bias)", _BOX + "head.fc{n}.{1}", 1),
    (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", _BOX + "predictor.cls_score.{0}", 0),
    (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", _BOX + "predictor.bbox_pred.{0}", 0),
    (r"roi_head\.mask_head\.convs\.(\d)\.conv\.(weight|bias)", _MASK + "mask_fcn{n}.{1}", 1),
    (r"roi_head\.mask_head\.upsample\.(weight|bias)", _MASK + "deconv.{0}", 0),
    (r"roi_head\.mask_head\.conv_logits\.(weight|bias)", _MASK + "predictor.{0}", 0),
]


def _with_roi_head(key: str) -> str:
    """Very old files name the heads without ``roi_head.`` (mmdetection's upgrade adds it)."""
    return "roi_head." + key if key.startswith(("bbox_head.", "mask_head.")) else key


def detectron2_name(key: str) -> Optional[str]:
    """The Detectron2 name of an mmdetection parameter or buffer name, or None."""
    for pattern, template, offset in _RULES:
        m = re.fullmatch(pattern, _with_roi_head(key))
        if m:
            return template.format(*m.groups(), n=int(m[1]) + offset if offset else None)
    return None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of an mmdetection ``state_dict`` under its Detectron2 name (BN's
    ``num_batches_tracked`` dropped).

    Raises:
        UnsupportedCheckpoint: naming the tensors without a Detectron2 counterpart.
    """
    out, unmapped = OrderedDict(), []
    for key, value in state_dict.items():
        if key.endswith(".num_batches_tracked"):
            continue
        name = detectron2_name(key)
        if name is None:
            unmapped.append(key)
        else:
            out[name] = value
    if unmapped:
        shown = ", ".join(unmapped[:6]) + (f" and {len(unmapped) - 6} more" * (len(unmapped) > 6))
        raise UnsupportedCheckpoint(
            f"{len(unmapped)} tensor(s) of the checkpoint have no counterpart in this project's "
            f"Detectron2 R-CNN: {shown}"
        )
    return out


def model_mismatches(cfg, state: Mapping[str, torch.Tensor]) -> List[str]:
    """How the model of a Detectron2 config (built on the meta device: no memory, no arithmetic)
    and a converted state dict differ: tensors missing from either, shapes that differ
    (BatchNorm's ``num_batches_tracked``, which loading fills in, aside)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    shapes = {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    problems = [f"missing from the checkpoint: {k}" for k in shapes if k not in state]
    problems += [f"not in the model: {k}" for k in state if k not in shapes]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)}, model {shapes[k]}"
        for k, v in state.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    return problems


@dataclass
class Layout:
    """What a checkpoint's names and shapes say: the ResNet(-Xt), ``stage_lengths`` (stage ->
    residual blocks), ``plugins`` (stage -> {block index: mmcv plugin name}), the first plugin's
    tensor shapes and input channels (``plugin_on_width``: its bottleneck's width, after conv1 /
    conv2, rather than its output), the heads (``legacy_classes``: mmdetection 1's layout)."""

    depth: int = 0
    num_groups: int = 1
    width_per_group: int = 64
    stem_channels: int = 64
    res2_channels: int = 256
    stage_lengths: Dict[str, int] = field(default_factory=dict)
    plugins: Dict[str, Dict[int, str]] = field(default_factory=dict)
    plugin_kind: str = ""
    plugin_tensors: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    plugin_channels: int = 0
    plugin_on_width: bool = False
    fpn_channels: int = 256
    anchors_per_location: int = 3
    num_fc: int = 2
    fc_dim: int = 1024
    pooler_resolution: int = 7
    num_classes: int = 80
    cls_agnostic_bbox_reg: bool = False
    legacy_classes: bool = False
    mask_on: bool = False
    mask_num_conv: int = 4
    mask_conv_dim: int = 256
    cls_agnostic_mask: bool = False


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    return tuple(sd[key].shape)


def _refuse_structure(keys: List[str]) -> None:
    """The kinds of model this converter refuses, recognised from the names."""
    cascade = [k for k in keys if re.match(r"roi_head\.(bbox|mask)_head\.\d+\.", k)]
    if cascade:
        raise UnsupportedCheckpoint(
            f"cascade heads ({cascade[0]}, ...): Cascade R-CNN is not mapped: mmdetection averages "
            "the stages' class logits and the masks of one mask head per stage, Detectron2's "
            "CascadeROIHeads averages probabilities and has one mask head; the scores and masks "
            "would differ"
        )
    dcn = [k for k in keys if "conv_offset" in k or ".conv2.weight_offset" in k]
    if dcn:
        raise UnsupportedCheckpoint(
            f"deformable convolution ({dcn[0]}, ...): mmcv's DCN in the backbone has no "
            "counterpart in this project's backbones (Detectron2's needs its compiled ops)"
        )
    if not any(k.startswith("rpn_head.") for k in keys):
        raise UnsupportedCheckpoint(
            "no rpn_head.* tensors: only two-stage Faster / Mask R-CNN checkpoints are mapped"
        )
    norms = sorted({m[1] for k in keys for m in [re.match(r"backbone\..*\.(gn\d|ln\d)\.", k)] if m})
    if norms:
        raise UnsupportedCheckpoint(
            f"backbone norm {norms[0]} (GroupNorm or another norm than BatchNorm): only "
            "BN / SyncBN backbones are mapped (as Detectron2's FrozenBN or SyncBN)"
        )


def read_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    """Read the architecture from an mmdetection ``state_dict``'s names and shapes.

    Raises:
        UnsupportedCheckpoint: cascade heads, deformable convs, a one-stage detector, another
            norm, several plugin types or unknown plugins, or heads of another shape.
    """
    sd = {_with_roi_head(k): v for k, v in state_dict.items()}
    keys = list(sd)
    _refuse_structure(keys)
    lay = Layout()
    counts = []
    for layer in range(1, 5):
        ids = {
            int(m[1]) for k in keys for m in [re.match(rf"backbone\.layer{layer}\.(\d+)\.", k)] if m
        }
        counts.append(len(ids))
    if tuple(counts) not in _DEPTHS:
        raise UnsupportedCheckpoint(
            f"backbone with {counts} residual blocks in layer1-4: not a ResNet-50/101/152 of "
            "bottlenecks (allowed: [3, 4, 6, 3], [3, 4, 23, 3], [3, 8, 36, 3])"
        )
    lay.depth = _DEPTHS[tuple(counts)]
    width, per_group = _shape(sd, "backbone.layer1.0.conv2.weight")[:2]
    lay.num_groups = width // per_group
    lay.width_per_group = width // lay.num_groups
    lay.stem_channels = _shape(sd, "backbone.conv1.weight")[0]
    lay.res2_channels = _shape(sd, "backbone.layer1.0.conv3.weight")[0]
    for layer, count in zip(range(1, 5), counts):
        stage = f"res{layer + 1}"
        lay.stage_lengths[stage] = count
        for i in range(count):
            prefix = f"backbone.layer{layer}.{i}."
            extra = {k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)}
            extra -= {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "downsample"}
            unknown = sorted(extra - set(PLUGIN_TYPES))
            if unknown or len(extra) > 1:
                raise UnsupportedCheckpoint(
                    f"plugin(s) {sorted(extra)} in backbone.layer{layer}.{i}: only one of mmcv's "
                    f"{sorted(PLUGIN_TYPES)} per residual block is mapped"
                )
            if extra:
                lay.plugins.setdefault(stage, {})[i] = extra.pop()
    kinds = {name for blocks in lay.plugins.values() for name in blocks.values()}
    if len(kinds) > 1:
        raise UnsupportedCheckpoint(
            f"plugins of several types {sorted(kinds)}: this project's backbones hold one block "
            "type (MODEL.NONLOCAL.TYPE)"
        )
    if kinds:
        stage = next(iter(lay.plugins))
        i = next(iter(lay.plugins[stage]))
        layer = int(stage[3]) - 1
        lay.plugin_kind = kinds.pop()
        prefix = f"backbone.layer{layer}.{i}.{lay.plugin_kind}."
        lay.plugin_tensors = {k[len(prefix) :]: _shape(sd, k) for k in keys if k.startswith(prefix)}
        first = ("conv_mask", "channel_add_conv.0", "channel_mul_conv.0", "value_conv")
        conv = next(c for c in first if c + ".weight" in lay.plugin_tensors)
        lay.plugin_channels = lay.plugin_tensors[conv + ".weight"][1]
        width = _shape(sd, f"backbone.layer{layer}.{i}.conv2.weight")[0]
        lay.plugin_on_width = lay.plugin_channels == width
    _read_heads(sd, keys, lay)
    return lay


def _read_heads(sd: Mapping[str, torch.Tensor], keys: List[str], lay: Layout) -> None:
    lateral = sorted(k for k in keys if re.fullmatch(r"neck\.lateral_convs\.\d\.conv\.weight", k))
    outputs = sorted(k for k in keys if re.fullmatch(r"neck\.fpn_convs\.\d\.conv\.weight", k))
    if len(lateral) != 4 or len(outputs) != 4:
        raise UnsupportedCheckpoint(
            f"neck with {len(lateral)} lateral and {len(outputs)} output convs: only an FPN on "
            "the 4 ResNet stages without extra convs (its 5th level max-pooled) is mapped"
        )
    lay.fpn_channels = _shape(sd, "neck.lateral_convs.0.conv.weight")[0]
    lay.anchors_per_location = _shape(sd, "rpn_head.rpn_reg.weight")[0] // 4
    if _shape(sd, "rpn_head.rpn_cls.weight")[0] != lay.anchors_per_location:
        raise UnsupportedCheckpoint(
            "rpn_head.rpn_cls has 2 outputs per anchor (a softmax RPN): only the sigmoid RPN "
            "(one objectness logit per anchor, as Detectron2's) is mapped"
        )
    if any(k.startswith("roi_head.bbox_head.shared_convs.") for k in keys):
        raise UnsupportedCheckpoint(
            "roi_head.bbox_head.shared_convs: a box head with convs (4conv1fc) is not mapped; "
            "only the two-fc head (Shared2FCBBoxHead)"
        )
    fcs = sorted(k for k in keys if re.fullmatch(r"roi_head\.bbox_head\.shared_fcs\.\d\.weight", k))
    lay.num_fc = len(fcs)
    if lay.num_fc:
        lay.fc_dim = _shape(sd, fcs[0])[0]
        lay.pooler_resolution = round((_shape(sd, fcs[0])[1] / lay.fpn_channels) ** 0.5)
    cls_out = _shape(sd, "roi_head.bbox_head.fc_cls.weight")[0]
    reg_out = _shape(sd, "roi_head.bbox_head.fc_reg.weight")[0]
    lay.num_classes = cls_out - 1
    lay.cls_agnostic_bbox_reg = reg_out == 4
    lay.legacy_classes = reg_out == 4 * cls_out
    if reg_out not in (4, 4 * lay.num_classes, 4 * cls_out):
        raise UnsupportedCheckpoint(
            f"roi_head.bbox_head.fc_reg has {reg_out} outputs for {cls_out} class scores: "
            "neither class-specific nor class-agnostic box regression"
        )
    lay.mask_on = "roi_head.mask_head.conv_logits.weight" in sd
    if lay.mask_on:
        convs = [
            k for k in keys if re.fullmatch(r"roi_head\.mask_head\.convs\.\d\.conv\.weight", k)
        ]
        lay.mask_num_conv = len(convs)
        lay.mask_conv_dim = _shape(sd, "roi_head.mask_head.upsample.weight")[1]
        lay.cls_agnostic_mask = _shape(sd, "roi_head.mask_head.conv_logits.weight")[0] == 1
