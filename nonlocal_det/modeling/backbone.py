"""ResNet and ResNet-FPN with blocks of the non-local family.

:class:`NonLocalResNet` is Detectron2's ``ResNet`` (same arguments) plus explicit ``nonlocal_*``
arguments; LazyConfig files use it directly. The registered YAML builders build Detectron2's own
ResNet from ``MODEL.RESNETS`` and hand its stem and stages to :class:`NonLocalResNet` with the
``MODEL.NONLOCAL`` keys as arguments.

A block after residual block ``i`` of stage ``resK`` is registered as ``resK.nonlocal{i}`` right
after ``resK.{i}`` (a stage is an ``nn.Sequential``: children run in registration order); a block
inside residual block ``i`` as ``resK.{i}.nonlocal_block``, the residual block's own children
keeping their names. No existing name changes, so ImageNet ``.pkl`` files and baseline checkpoints
load with only the new keys missing.
"""

import logging
import math
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BottleneckBlock,
    ResNet,
    build_resnet_backbone,
)
from torch import nn

from ..layers import check_choice
from .blocks import block_factory, config_block_args, config_wording

__all__ = [
    "PLACEMENTS",
    "POSITIONS",
    "ResidualWithBlock",
    "NonLocalResNet",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "placement_indices",
]

logger = logging.getLogger(__name__)
STAGES = ("res2", "res3", "res4", "res5")
PLACEMENTS = (
    "none",
    "paper_1",
    "paper_5",
    "paper_10",
    "all_res3_res5",
    "all_res4_res5",
    "paper_1_all_res5",
    "custom",
)
POSITIONS = ("after_block", "after_add", "after_conv1", "after_conv2", "after_conv3")
_DEPTHS = (18, 34, 50, 101, 152)  # what Detectron2's ResNet builds
_FEATURES = ("stem",) + STAGES


def _check_resnet_keys(cfg) -> None:
    """The ``MODEL.RESNETS`` / ``MODEL.FPN`` values Detectron2 rejects with bare asserts."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _DEPTHS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={r.DEPTH!r} is not supported; allowed: {list(_DEPTHS)}"
        )
    if r.DEPTH in (18, 34):
        for key, need in (("RES2_OUT_CHANNELS", 64), ("RES5_DILATION", 1)):
            if r.get(key) != need:
                raise ValueError(
                    f"MODEL.RESNETS.{key}={r.get(key)!r} is not supported with MODEL.RESNETS."
                    f"DEPTH={r.DEPTH} (basic blocks); allowed: {need}"
                )
    outs = list(r.OUT_FEATURES)
    if not outs or any(f not in _FEATURES for f in outs):
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={outs} is not supported; allowed: a non-empty list of "
            f"{list(_FEATURES)}"
        )
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in outs]
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_nonlocal_fpn_backbone" and missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} uses {missing}, which the "
            f"ResNet does not output (MODEL.RESNETS.OUT_FEATURES={outs}); allowed: features of "
            f"{outs}"
        )


def _preset(placement: str, lengths: Mapping[str, int]) -> Dict[str, List[int]]:
    """Block indices of the named settings (paper_5: "every other block", evenly spaced)."""
    stages = {
        "paper_1": ("res4",),
        "all_res3_res5": ("res3", "res4", "res5"),
        "all_res4_res5": ("res4", "res5"),
        "paper_1_all_res5": ("res4", "res5"),
    }.get(placement, ("res3", "res4"))
    missing = [s for s in stages if s not in lengths]
    if missing:
        raise ValueError(
            f"NonLocalResNet: nonlocal_placement={placement!r} puts blocks in {missing}, but the "
            f"backbone builds only {list(lengths)} (out_features, MODEL.RESNETS.OUT_FEATURES); "
            "allowed: 'none', 'custom'"
        )
    if placement in ("paper_1", "paper_1_all_res5"):
        out = {"res4": [lengths["res4"] - 2]}
        return dict(out, res5=list(range(lengths["res5"]))) if "res5" in stages else out
    if placement != "paper_5":  # paper_10, all_*: every block of the stages
        return {s: list(range(lengths[s])) for s in stages}
    out = {}
    for stage, count in zip(stages, (2, 3)):
        step = lengths[stage] // count
        if step == 0:
            raise ValueError(
                f"NonLocalResNet: nonlocal_placement={placement!r} needs at least {count} residual "
                f"blocks in {stage}, but this ResNet's {stage} has {lengths[stage]}; allowed for "
                "this depth: 'none', 'paper_1', 'paper_10', 'custom'"
            )
        out[stage] = [step * (k + 1) - 1 for k in range(count)]
    return out


def placement_indices(
    placement: str, blocks: Optional[Mapping[str, Sequence[int]]], lengths: Mapping[str, int]
) -> Dict[str, List[int]]:
    """Sorted, non-negative indices of the residual blocks followed by a non-local block.

    Args:
        placement: one of :data:`PLACEMENTS`.
        blocks: with ``"custom"``, stage name -> indices (negative from the end); else empty.
        lengths: stage name -> number of residual blocks, for the stages the ResNet builds.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    check_choice("NonLocalResNet", "nonlocal_placement", placement, PLACEMENTS)
    blocks = {s: list(v) for s, v in (blocks or {}).items()}
    unknown = sorted(set(blocks) - set(STAGES))
    if unknown:
        raise ValueError(
            f"NonLocalResNet: nonlocal_blocks={blocks}: unknown stage(s) {unknown}; allowed keys: "
            f"{list(STAGES)}"
        )
    given = {s: v for s, v in blocks.items() if v}
    if placement != "custom":
        if given:
            named = ", ".join(f"nonlocal_blocks[{s!r}]={v}" for s, v in given.items())
            raise ValueError(
                f"NonLocalResNet: {named} is only used with nonlocal_placement='custom', but "
                f"nonlocal_placement={placement!r}; set it to 'custom' or empty the list"
            )
        return {} if placement == "none" else _preset(placement, lengths)
    out = {}
    for stage, indices in given.items():
        name = f"NonLocalResNet: nonlocal_blocks[{stage!r}]={indices}"
        if stage not in lengths:
            raise ValueError(
                f"{name} asks for a non-local block in {stage}, but the backbone builds only "
                f"{list(lengths)} (out_features, MODEL.RESNETS.OUT_FEATURES); allowed stages: "
                f"{list(lengths)}"
            )
        n = lengths[stage]
        bad = [
            i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n
        ]
        if bad:
            raise ValueError(
                f"{name}: index {bad[0]!r} is outside {stage}, which has {n} residual blocks at "
                f"this depth; allowed indices: {-n}..{n - 1}"
            )
        resolved = sorted(i % n for i in indices)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"{name} names the same residual block twice ({resolved})")
        out[stage] = resolved
    return out


class ResidualWithBlock(CNNBlockBase):
    """A Detectron2 ``BottleneckBlock`` or ``BasicBlock`` (its own children, so its own parameter
    names) with a block inserted at ``position``: ``after_conv1`` / ``after_conv2`` (after that
    conv's norm and ReLU), ``after_conv3`` (after its norm, before the residual add; the last
    conv of a ``BasicBlock`` is conv2) or ``after_add`` (after the add, before the final ReLU).
    The block is the child ``nonlocal_block``.
    """

    def __init__(self, residual: CNNBlockBase, position: str, block: nn.Module):
        super().__init__(residual.in_channels, residual.out_channels, residual.stride)
        for name, child in residual.named_children():
            self.add_module(name, child)
        self.conv3 = getattr(residual, "conv3", None)
        self.shortcut = residual.shortcut
        self.nonlocal_block = block
        after = {"after_conv1": 1, "after_conv2": 2, "after_conv3": 3, "after_add": 4}[position]
        self.after = 3 if after == 2 and self.conv3 is None else after  # a BasicBlock's last conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        if self.after == 1:
            out = self.nonlocal_block(out)
        out = self.conv2(out)
        conv3 = self.conv3
        if conv3 is not None:
            out = F.relu_(out)
            if self.after == 2:
                out = self.nonlocal_block(out)
            out = conv3(out)
        if self.after == 3:
            out = self.nonlocal_block(out)
        shortcut = self.shortcut
        out = out + (shortcut(x) if shortcut is not None else x)
        if self.after == 4:
            out = self.nonlocal_block(out)
        return F.relu_(out)


def _channels_at(residual: nn.Module, position: str, where: str) -> int:
    """The channels a block sees at ``position`` of a residual block (errors name ``where``)."""
    if not isinstance(residual, (BottleneckBlock, BasicBlock)):
        raise ValueError(
            f"NonLocalResNet: nonlocal_position={position!r} puts a block inside {where}, a "
            f"{type(residual).__name__}; allowed there: 'after_block', or a ResNet of "
            "BottleneckBlock / BasicBlock (not deformable convs)"
        )
    if position == "after_conv3" and isinstance(residual, BasicBlock):
        raise ValueError(
            f"NonLocalResNet: nonlocal_position={position!r}: the residual blocks of this ResNet "
            "(BasicBlock, depth 18/34) have 2 convs; allowed: 'after_block', 'after_add', "
            "'after_conv1', 'after_conv2'"
        )
    if position == "after_add":
        return residual.out_channels
    return getattr(residual, "conv" + position[-1]).out_channels


class NonLocalResNet(ResNet):
    """Detectron2's ``ResNet`` with blocks of the non-local family in or between residual blocks.

    To add the blocks to a Detectron2 LazyConfig, swap the target of its ResNet::

        model.backbone.bottom_up._target_ = NonLocalResNet
        model.backbone.bottom_up.nonlocal_placement = "paper_1"

    Blocks are initialised with the RNG state forked (the rest of the model is initialised as
    without them) and frozen with the stage they sit in (``freeze_at``).

    Args:
        stem, stages, num_classes, out_features, freeze_at: as :class:`detectron2.modeling.ResNet`.
        nonlocal_placement (str): which residual blocks, one of :data:`PLACEMENTS`
            (``MODEL.NONLOCAL.PLACEMENT``).
        nonlocal_blocks (dict): with ``"custom"``, stage -> indices of the residual blocks,
            negative from the end (``MODEL.NONLOCAL.RES{2..5}_BLOCKS``).
        nonlocal_position (str): where in or after those residual blocks, one of
            :data:`POSITIONS` (``MODEL.NONLOCAL.POSITION``).
        nonlocal_type (str): the block, a key of ``nonlocal_det.layers.BLOCK_TYPES``
            (``MODEL.NONLOCAL.TYPE``); ``nonlocal_options`` its arguments (the type's node).
        nonlocal_pairwise, nonlocal_inner_ratio, nonlocal_subsample, nonlocal_use_scale,
            nonlocal_norm: the non-local block (``MODEL.NONLOCAL.{PAIRWISE, INNER_RATIO, ...}``).
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[Sequence[nn.Module]],
        num_classes: Optional[int] = None,
        out_features: Optional[Sequence[str]] = None,
        freeze_at: int = 0,
        *,
        nonlocal_placement: str = "paper_1",
        nonlocal_blocks: Optional[Mapping[str, Sequence[int]]] = None,
        nonlocal_position: str = "after_block",
        nonlocal_type: str = "nonlocal",
        nonlocal_options: Optional[Mapping] = None,
        nonlocal_pairwise: str = "embedded_gaussian",
        nonlocal_inner_ratio: float = 0.5,
        nonlocal_subsample: bool = True,
        nonlocal_use_scale: bool = True,
        nonlocal_norm: str = "",
    ):
        super().__init__(stem, stages, num_classes, out_features, freeze_at)
        make_block = block_factory(
            "NonLocalResNet",
            type=nonlocal_type,
            options=nonlocal_options,
            pairwise=nonlocal_pairwise,
            inner_ratio=nonlocal_inner_ratio,
            subsample=nonlocal_subsample,
            use_scale=nonlocal_use_scale,
            norm=nonlocal_norm,
        )
        check_choice("NonLocalResNet", "nonlocal_position", nonlocal_position, POSITIONS)
        lengths = {name: len(stage) for name, stage in zip(self.stage_names, self.stages)}
        placement = placement_indices(nonlocal_placement, nonlocal_blocks, lengths)
        names = []
        with torch.random.fork_rng(devices=[]):
            for stage_idx, name in enumerate(self.stage_names):
                if not placement.get(name):
                    continue
                frozen = freeze_at >= stage_idx + 2  # res2 is stage 2, as in ResNet.freeze
                children = OrderedDict()
                for child_name, residual in self.stages[stage_idx].named_children():
                    children[child_name] = residual
                    if int(child_name) not in placement[name]:
                        continue
                    where = f"{name}.{child_name}"
                    if nonlocal_position == "after_block":
                        block = make_block(residual.out_channels)
                        children[f"nonlocal{child_name}"] = block
                        names.append(f"{name}.nonlocal{child_name}")
                    else:
                        block = make_block(_channels_at(residual, nonlocal_position, where))
                        children[child_name] = ResidualWithBlock(residual, nonlocal_position, block)
                        names.append(f"{where}.nonlocal_block")
                    if frozen:
                        block.freeze()
                stage = nn.Sequential(children)
                setattr(self, name, stage)
                self.stages[stage_idx] = stage
        logger.info(f"Blocks ({nonlocal_type}, {nonlocal_position}): {', '.join(names) or 'none'}")


def _nonlocal_resnet_args(cfg) -> dict:
    """The ``nonlocal_*`` arguments of :class:`NonLocalResNet` given by ``cfg.MODEL.NONLOCAL``."""
    args = config_block_args(cfg)
    nl = cfg.MODEL.NONLOCAL
    if not nl.ENABLED:
        return dict(args, nonlocal_placement="none")
    blocks = {s: list(nl.get(f"{s.upper()}_BLOCKS")) for s in STAGES}
    return dict(
        args,
        nonlocal_placement=nl.PLACEMENT,
        nonlocal_blocks=blocks,
        nonlocal_position=nl.POSITION,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet (every ``MODEL.RESNETS`` key) with the blocks of ``MODEL.NONLOCAL``."""
    args = _nonlocal_resnet_args(cfg)
    _check_resnet_keys(cfg)
    resnet = build_resnet_backbone(cfg, input_shape)
    stages = [list(stage) for stage in resnet.stages]
    with config_wording():
        return NonLocalResNet(
            resnet.stem, stages, None, resnet._out_features, cfg.MODEL.BACKBONE.FREEZE_AT, **args
        )


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN (same ``MODEL.FPN`` keys and names) with non-local blocks in the
    ResNet (:func:`build_resnet_nonlocal_backbone`). The extra max-pooled level reads the last
    FPN level: ``p5`` with Detectron2's ``res2``-``res5`` inputs (as Detectron2), ``p4`` when
    ``MODEL.FPN.IN_FEATURES`` ends at ``res4`` (Detectron2's own builder fails there)."""
    bottom_up = build_resnet_nonlocal_backbone(cfg, input_shape)
    top_block = LastLevelMaxPool()
    last_stride = bottom_up.output_shape()[cfg.MODEL.FPN.IN_FEATURES[-1]].stride
    top_block.in_feature = f"p{int(math.log2(last_stride))}"
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
