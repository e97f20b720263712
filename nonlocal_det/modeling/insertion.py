"""Blocks inserted into the residual stages of a network Detectron2 built: the one mechanism behind
the YAML builders and the LazyConfig helper.

:func:`insert_blocks` takes a backbone (a ``ResNet``, a ``RegNet``/``AnyNet``, or anything with
one of them as ``.bottom_up``, e.g. an ``FPN``, RetinaNet's and FCOS's included), finds its
residual stages and inserts blocks of one spec (:mod:`.blocks`) there, in place. Stages are named
as the network names them: ``res2``-``res5`` (ResNet), ``s1``-``s4`` (RegNet; placements and
config keys call them ``res2``-``res5`` too, by stride).

A block after residual block ``X`` of stage ``S`` is the stage's child ``S.nonlocal<n>``, ``<n>``
the digits of ``X`` (``res4.nonlocal4`` after ``res4.4``; ``s3.nonlocal4`` after RegNet's
``s3.b4``), registered right after it (the stages run their children in order); a block inside
residual block ``X`` is ``S.X.nonlocal_block``, the residual block's own children keeping their
names. No existing name changes: checkpoints of the network without blocks load with only the new
keys missing.
"""

import functools
import logging
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone.regnet import AnyNet, ResBottleneckBlock
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from torch import nn

from ..layers import BLOCK_TYPES
from ..layers._common import check_choice, is_int, key_name
from .blocks import block_builder

__all__ = [
    "PLACEMENTS",
    "POSITIONS",
    "RegNetResidualWithBlock",
    "ResidualWithBlock",
    "insert_blocks",
    "placement_indices",
    "residual_network",
]

logger = logging.getLogger(__name__)
STAGES = ("res2", "res3", "res4", "res5")
PLACEMENTS = ("none", "paper_1", "paper_5", "paper_10", "all_res3_res5", "all_res4_res5")
PLACEMENTS += ("paper_1_all_res5", "custom")
POSITIONS = ("after_block", "after_add", "after_conv1", "after_conv2", "after_conv3")
_INSIDE = "BottleneckBlock / BasicBlock (ResNet), ResBottleneckBlock (RegNet)"


def residual_network(backbone: nn.Module, owner: str) -> Tuple[nn.Module, str]:
    """The ResNet or RegNet of ``backbone`` (itself or its ``bottom_up``) and its name prefix."""
    for net, prefix in ((backbone, ""), (getattr(backbone, "bottom_up", None), "bottom_up.")):
        if isinstance(net, (ResNet, AnyNet)):
            return net, prefix
    inner = getattr(backbone, "bottom_up", None)
    what = type(backbone).__name__ + (f" (bottom_up: {type(inner).__name__})" if inner else "")
    raise ValueError(
        f"{owner}: the backbone is a {what}, which has no residual stages blocks can go into; "
        "allowed: a Detectron2 ResNet or RegNet, or a backbone with one as its bottom_up (FPN: "
        "Faster/Mask/Cascade/Keypoint R-CNN, Panoptic FPN, RetinaNet, FCOS)"
    )


def _stages(net: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """res2..res5 -> (the network's name for the stage, the stage), for the stages it builds."""
    if isinstance(net, ResNet):
        return {name: (name, stage) for name, stage in zip(net.stage_names, net.stages)}
    return {f"res{i + 2}": (name, stage) for i, (stage, name) in enumerate(net.stages_and_names)}


def _preset(placement: str, lengths: Mapping[str, int], owner: str, key) -> Dict[str, List[int]]:
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
            f"{_lead(owner)}{key('nonlocal_placement')}={placement!r} puts blocks in {missing}, "
            f"but the bottom-up network builds only {list(lengths)} (it stops at its last output "
            "feature); allowed: 'none', 'custom'"
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
                f"{_lead(owner)}{key('nonlocal_placement')}={placement!r} needs at least {count} "
                f"residual blocks in {stage}, but this network's {stage} has {lengths[stage]}; "
                "allowed for this depth: 'none', 'paper_1', 'paper_10', 'custom'"
            )
        out[stage] = [step * (k + 1) - 1 for k in range(count)]
    return out


def _lead(owner: str) -> str:
    return f"{owner}: " if owner else ""


def placement_indices(
    placement: str,
    blocks: Optional[Mapping[str, Sequence[int]]],
    lengths: Mapping[str, int],
    owner: str = "insert_blocks",
    names: Optional[Mapping[str, str]] = None,
    keys: Optional[Mapping[str, str]] = None,
) -> Dict[str, List[int]]:
    """Sorted, non-negative indices of the residual blocks that get a block, by stage.

    Args:
        placement, blocks, owner, keys: ``nonlocal_placement``, ``nonlocal_blocks`` (its stages
            ``res2``-``res5`` or the network's names), ``owner``, ``keys`` of :func:`insert_blocks`.
        lengths (dict): ``res2``.. -> number of residual blocks, for the stages the network builds.
        names (dict): ``res2``.. -> the network's name of that stage (RegNet: ``s1``..).
    """
    key = functools.partial(key_name, keys)
    check_choice(owner, key("nonlocal_placement"), placement, PLACEMENTS)
    alias = {v: k for k, v in (names or {}).items() if k != v}
    blocks = {alias.get(s, s): list(v) for s, v in (blocks or {}).items()}
    unknown = sorted(set(blocks) - set(STAGES))
    if unknown:
        raise ValueError(
            f"{_lead(owner)}nonlocal_blocks={blocks}: unknown stage(s) {unknown}; allowed keys: "
            f"{list(STAGES) + list(alias)}"
        )
    given = {s: v for s, v in blocks.items() if v}
    if placement != "custom":
        if given:
            p = key("nonlocal_placement")
            named = ", ".join(f"{key(f'nonlocal_blocks[{s!r}]')}={v}" for s, v in given.items())
            raise ValueError(
                f"{_lead(owner)}{named} is only used with {p}='custom', but {p}={placement!r}; "
                "set it to 'custom' or empty the list"
            )
        return {} if placement == "none" else _preset(placement, lengths, owner, key)
    out = {}
    for stage, indices in given.items():
        name = f"{_lead(owner)}{key(f'nonlocal_blocks[{stage!r}]')}={indices}"
        if stage not in lengths:
            raise ValueError(
                f"{name} asks for a block in {stage}, but the bottom-up network builds only "
                f"{list(lengths)} (it stops at its last output feature); allowed stages: "
                f"{list(lengths)}"
            )
        n = lengths[stage]
        bad = [i for i in indices if not (is_int(i) and -n <= i < n)]
        if bad:
            raise ValueError(
                f"{name}: index {bad[0]!r} is outside {stage}, which has {n} residual blocks in "
                f"this network; allowed indices: {-n}..{n - 1}"
            )
        resolved = sorted(i % n for i in indices)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"{name} names the same residual block twice ({resolved})")
        out[stage] = resolved
    return out


_AFTER = {"after_conv1": 1, "after_conv2": 2, "after_conv3": 3, "after_add": 4}


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
        after = _AFTER[position]
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


class RegNetResidualWithBlock(CNNBlockBase):
    """A RegNet ``ResBottleneckBlock`` (its own children ``proj``, ``bn``, ``f``, ``af``) with a
    block inserted at ``position``: inside its transform ``f`` after ``a_af`` (``after_conv1``),
    ``b_af`` (``after_conv2``, before the squeeze-excitation of RegNetY) or ``c_bn``
    (``after_conv3``, before the residual add), or after the add, before ``af`` (``after_add``).
    The block is the child ``nonlocal_block``.
    """

    _LAYER = {1: "a_af", 2: "b_af", 3: "c_bn"}

    def __init__(self, residual: CNNBlockBase, position: str, block: nn.Module):
        super().__init__(residual.in_channels, residual.out_channels, residual.stride)
        for name, child in residual.named_children():
            self.add_module(name, child)
        self.proj, self.bn = residual.proj, residual.bn
        self.nonlocal_block = block
        self.after = self._LAYER.get(_AFTER[position], "add")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.bn(self.proj(x)) if self.proj is not None else x
        out = x
        for name, layer in self.f.named_children():
            out = layer(out)
            if name == self.after:
                out = self.nonlocal_block(out)
        out = shortcut + out
        if self.after == "add":
            out = self.nonlocal_block(out)
        return self.af(out)


def _inside(residual: nn.Module, position: str, where: str, name: str) -> Tuple[type, int]:
    """The wrapper class for a block at ``position`` inside ``residual`` (``where``) and the
    channels the block sees there; errors name the position ``name``."""
    if isinstance(residual, ResBottleneckBlock):
        conv = {1: "a", 2: "b", 3: "c"}.get(_AFTER[position])
        width = getattr(residual.f, conv).out_channels if conv else residual.out_channels
        return RegNetResidualWithBlock, width
    if not isinstance(residual, (BottleneckBlock, BasicBlock)):
        raise ValueError(
            f"{name}={position!r} puts a block inside {where}, a "
            f"{type(residual).__name__}; allowed there: 'after_block' (inside positions: "
            f"{_INSIDE}, not deformable convs)"
        )
    if position == "after_conv3" and isinstance(residual, BasicBlock):
        raise ValueError(
            f"{name}={position!r}: the residual blocks of this ResNet "
            "(BasicBlock, depth 18/34) have 2 convs; allowed: 'after_block', 'after_add', "
            "'after_conv1', 'after_conv2'"
        )
    if position == "after_add":
        return ResidualWithBlock, residual.out_channels
    return ResidualWithBlock, getattr(residual, "conv" + position[-1]).out_channels


def _frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def insert_blocks(
    backbone: nn.Module,
    *,
    nonlocal_spec: Optional[Mapping] = None,
    nonlocal_placement: str = "paper_1",
    nonlocal_blocks: Optional[Mapping[str, Sequence[int]]] = None,
    nonlocal_position: str = "after_block",
    owner: str = "insert_blocks",
    keys: Optional[Mapping[str, str]] = None,
) -> List[str]:
    """Insert blocks into the residual stages of ``backbone``, in place.

    Blocks are initialised with the RNG state forked (the same seed gives the same weights
    everywhere else as without them) and frozen where the residual block they follow or sit in
    is frozen (``freeze_at``).

    Args:
        backbone (nn.Module): a Detectron2 ``ResNet`` or ``RegNet``, or a backbone with one as
            ``bottom_up``.
        nonlocal_spec (dict): the block, ``{"type": ..., "options": {...}}`` (:mod:`.blocks`);
            default the paper's non-local block.
        nonlocal_placement (str): which residual blocks, one of :data:`PLACEMENTS`.
        nonlocal_blocks (dict): with ``"custom"``, stage -> indices of the residual blocks,
            negative from the end.
        nonlocal_position (str): where in or after those residual blocks, one of
            :data:`POSITIONS`.
        owner (str): named in errors; "" with ``keys``.
        keys (dict): argument (``"nonlocal_placement"``, ``"nonlocal_blocks['res4']"``, a block
            option, ...) -> the name errors give it instead (:func:`.config_keys`).

    Returns:
        list[str]: the names of the inserted blocks, relative to ``backbone``, in forward order.

    Raises:
        ValueError: naming the argument, its value and what is allowed, before any change.
    """
    make_block = block_builder(owner, nonlocal_spec, keys)
    position_key = key_name(keys, "nonlocal_position")
    check_choice(owner, position_key, nonlocal_position, POSITIONS)
    net, prefix = residual_network(backbone, owner)
    if any(isinstance(m, tuple(BLOCK_TYPES.values())) for m in net.modules()):
        raise ValueError(f"{owner}: the {type(net).__name__} has blocks already; allowed: once")
    stages = _stages(net)
    residuals = {s: list(stage.named_children()) for s, (_, stage) in stages.items()}
    placement = placement_indices(
        nonlocal_placement,
        nonlocal_blocks,
        {s: len(children) for s, children in residuals.items()},
        owner,
        {s: name for s, (name, _) in stages.items()},
        keys,
    )
    plan = {s: {} for s in placement}  # stage -> child -> (wrapper class or None, block)
    with torch.random.fork_rng(devices=[]):  # every error before the first change
        for s, indices in placement.items():
            for i in indices:
                child, residual = residuals[s][i]
                wrapper, channels = (None, residual.out_channels)
                if nonlocal_position != "after_block":
                    where = f"{stages[s][0]}.{child}"
                    name = f"{_lead(owner)}{position_key}"
                    wrapper, channels = _inside(residual, nonlocal_position, where, name)
                plan[s][child] = (wrapper, make_block(channels))
    names = []
    for s, todo in plan.items():
        name, stage = stages[s]
        children = []
        for child, residual in residuals[s]:
            if child not in todo:
                children.append((child, residual))
                continue
            wrapper, block = todo[child]
            if _frozen(residual):
                block.freeze()
            if wrapper is None:
                extra = f"nonlocal{re.sub(r'[^0-9]', '', child)}"
                children += [(child, residual), (extra, block)]
                names.append(f"{prefix}{name}.{extra}")
            else:
                children.append((child, wrapper(residual, nonlocal_position, block)))
                names.append(f"{prefix}{name}.{child}.nonlocal_block")
        stage._modules.clear()
        stage._modules.update(children)
    kind = (nonlocal_spec or {}).get("type", "nonlocal")
    logger.info(f"Blocks ({kind}, {nonlocal_position}): {', '.join(names) or 'none'}")
    return names
