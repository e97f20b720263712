"""ResNet and ResNet-FPN backbones with non-local blocks, registered in ``BACKBONE_REGISTRY``.

The ResNet is Detectron2's own (``build_resnet_backbone``: every ``MODEL.RESNETS`` key is honoured);
non-local blocks are then inserted into its stages. A stage is an ``nn.Sequential`` whose children
run in registration order, so a block inserted after residual block ``i`` of ``res4`` is registered
right after it under the name ``res4.nonlocal{i}``. Every pretrained name stays unchanged
(``res4.5.conv1.weight`` is still the last block), so ImageNet ``.pkl`` files and baseline
Detectron2 checkpoints load with only the ``nonlocal`` keys missing.

:class:`NonLocalResNet` builds the same network from ``ResNet``'s own arguments, for LazyConfig
files (``configs/lazy/``).
"""

import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone
from torch import nn

from ..config import PLACEMENTS, cfg_key_name, nonlocal_block_kwargs
from ..layers import NonLocalBlock

__all__ = [
    "NonLocalResNet",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "resolve_placement",
    "insert_nonlocal_blocks",
    "nonlocal_block_names",
]

logger = logging.getLogger(__name__)
_STAGES = ("res2", "res3", "res4", "res5")


def _preset(
    placement: str, lengths: Dict[str, int], key_name: Callable[[str], str] = cfg_key_name
) -> Dict[str, List[int]]:
    """Block indices of the paper's settings, for stages of the given lengths."""
    if placement == "none":
        return {}
    if placement == "paper_1":
        return {"res4": [lengths["res4"] - 2]}
    if placement == "paper_10":
        return {s: list(range(lengths[s])) for s in ("res3", "res4")}
    # paper_5: 2 in res3 and 3 in res4, evenly spaced ("every other block" for R50).
    out = {}
    for stage, count in (("res3", 2), ("res4", 3)):
        step = lengths[stage] // count
        if step == 0:
            raise ValueError(
                f"{key_name('PLACEMENT')}='paper_5' needs at least {count} residual blocks in "
                f"{stage}, but this ResNet's {stage} has {lengths[stage]}; allowed for this depth: "
                "'none', 'paper_1', 'paper_10', 'custom'"
            )
        out[stage] = [step * (k + 1) - 1 for k in range(count)]
    return out


def resolve_placement(
    nl_cfg,
    lengths: Dict[str, int],
    built: List[str],
    key_name: Callable[[str], str] = cfg_key_name,
) -> Dict[str, List[int]]:
    """Turn ``MODEL.NONLOCAL`` placement keys into sorted non-negative block indices per stage.

    Args:
        nl_cfg: the ``cfg.MODEL.NONLOCAL`` node.
        lengths: number of residual blocks of each stage of the chosen depth (``res2``..``res5``).
        built: the stages the backbone actually builds (it stops at its last output feature).
        key_name: maps a key (``"PLACEMENT"``) to the name errors use for it (default
            ``MODEL.NONLOCAL.PLACEMENT``).

    Returns:
        dict: stage name -> sorted indices of the residual blocks followed by a non-local block.

    Raises:
        ValueError: naming the offending key, its value and what is allowed.
    """
    placement = nl_cfg.PLACEMENT
    if not nl_cfg.ENABLED:
        return {}
    if placement not in PLACEMENTS:
        raise ValueError(
            f"{key_name('PLACEMENT')}={placement!r} is not supported; allowed: {list(PLACEMENTS)}"
        )
    lists = {s: list(nl_cfg.get(f"{s.upper()}_BLOCKS")) for s in _STAGES}
    if placement != "custom":
        given = [f"{key_name(s.upper() + '_BLOCKS')}={v}" for s, v in lists.items() if v]
        if given:
            raise ValueError(
                f"{', '.join(given)} is only used with {key_name('PLACEMENT')}='custom', but "
                f"PLACEMENT={placement!r}; set PLACEMENT to 'custom' or empty the list"
            )
        requested = _preset(placement, lengths, key_name)
    else:
        requested = {s: v for s, v in lists.items() if v}

    resolved = {}
    for stage, indices in requested.items():
        key = key_name(f"{stage.upper()}_BLOCKS")
        if stage not in built:
            raise ValueError(
                f"{key}={indices} (PLACEMENT={placement!r}) asks for a non-local block in {stage}, "
                f"but the backbone builds only {built} (its out_features: MODEL.RESNETS.OUT_FEATURES "
                f"in a YAML config); allowed "
                f"stages: {built}"
            )
        n = lengths[stage]
        out = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(
                    f"{key}={indices}: index {i!r} is outside {stage}, which has {n} residual "
                    f"blocks at this depth; allowed indices: {-n}..{n - 1}"
                )
            out.append(i % n)
        if len(set(out)) != len(out):
            raise ValueError(f"{key}={indices} names the same residual block twice ({out})")
        resolved[stage] = sorted(out)
    return resolved


def insert_nonlocal_blocks(
    resnet: ResNet,
    placement: Dict[str, List[int]],
    nl_cfg,
    freeze_at: int = 0,
    key_name: Callable[[str], str] = cfg_key_name,
) -> List[str]:
    """Insert non-local blocks into a built Detectron2 ``ResNet``, in place.

    The block after residual block ``i`` of stage ``resK`` is registered as ``resK.nonlocal{i}``,
    between ``resK.{i}`` and ``resK.{i+1}``; no existing name changes. Blocks in stages frozen by
    ``freeze_at`` are frozen too. The global RNG state is restored afterwards, so the rest of the
    model is initialised exactly as it would be without non-local blocks.

    Args:
        resnet: the backbone, e.g. from ``build_resnet_backbone``.
        placement: stage -> residual-block indices, from :func:`resolve_placement`.
        nl_cfg: the ``cfg.MODEL.NONLOCAL`` node (pairwise function, ratio, norm, ...).
        freeze_at: ``MODEL.BACKBONE.FREEZE_AT``.
        key_name: how errors name the keys of ``nl_cfg`` (see :func:`resolve_placement`).

    Returns:
        list[str]: the names (relative to ``resnet``) of the inserted blocks.
    """
    names = []
    with torch.random.fork_rng(devices=[]):
        for stage_idx, (name, stage) in enumerate(zip(resnet.stage_names, resnet.stages)):
            indices = placement.get(name, [])
            if not indices:
                continue
            children = OrderedDict()
            for child_name, block in stage.named_children():
                children[child_name] = block
                if child_name.isdigit() and int(child_name) in indices:
                    kwargs = nonlocal_block_kwargs(nl_cfg, block.out_channels, key_name)
                    nl = NonLocalBlock(**kwargs)
                    if freeze_at >= stage_idx + 2:  # res2 is stage 2, as in ResNet.freeze
                        nl.freeze()
                    children[f"nonlocal{child_name}"] = nl
                    names.append(f"{name}.nonlocal{child_name}")
            new_stage = nn.Sequential(children)
            setattr(resnet, name, new_stage)
            resnet.stages[stage_idx] = new_stage
    return names


def nonlocal_block_names(model: nn.Module) -> List[str]:
    """Names of every :class:`NonLocalBlock` inside ``model`` (in forward order for a backbone)."""
    return [n for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]


def _stage_lengths(depth: int) -> Dict[str, int]:
    lengths = {
        18: [2, 2, 2, 2],
        34: [3, 4, 6, 3],
        50: [3, 4, 6, 3],
        101: [3, 4, 23, 3],
        152: [3, 8, 36, 3],
    }
    if depth not in lengths:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={depth!r} is not supported; allowed: {sorted(lengths)}"
        )
    return dict(zip(_STAGES, lengths[depth]))


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet (``MODEL.RESNETS.*``) with non-local blocks (``MODEL.NONLOCAL.*``).

    Args:
        cfg: a Detectron2 config with :func:`nonlocal_det.add_nonlocal_config` applied.
        input_shape: the image input shape.

    Returns:
        ResNet: the backbone, with blocks inserted as described in :func:`insert_nonlocal_blocks`.
    """
    if "NONLOCAL" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) on the "
            "config before merge_from_file (MODEL.BACKBONE.NAME="
            f"{cfg.MODEL.BACKBONE.NAME!r} needs it)"
        )
    nl_cfg = cfg.MODEL.NONLOCAL
    lengths = _stage_lengths(cfg.MODEL.RESNETS.DEPTH)
    resnet = build_resnet_backbone(cfg, input_shape)
    placement = resolve_placement(nl_cfg, lengths, list(resnet.stage_names))
    names = insert_nonlocal_blocks(resnet, placement, nl_cfg, cfg.MODEL.BACKBONE.FREEZE_AT)
    _log_blocks(names, nl_cfg)
    return resnet


def _log_blocks(names: List[str], nl_cfg) -> None:
    if names:
        logger.info(
            "Non-local blocks (%s, C_inner = %s x C, subsample=%s, scale=%s, norm=%r): %s",
            nl_cfg.PAIRWISE,
            nl_cfg.INNER_RATIO,
            nl_cfg.SUBSAMPLE,
            nl_cfg.USE_SCALE,
            nl_cfg.NORM,
            ", ".join(names),
        )
    else:
        logger.info(
            "Non-local blocks in the backbone: none (ENABLED=%s, PLACEMENT=%r)",
            nl_cfg.ENABLED,
            nl_cfg.PLACEMENT,
        )


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN with non-local blocks in the ResNet (``MODEL.NONLOCAL.*``).

    Identical to ``build_resnet_fpn_backbone`` (same ``MODEL.FPN.*`` keys, same parameter names)
    except for the inserted ``resK.nonlocal{i}`` blocks.

    Args:
        cfg: a Detectron2 config with :func:`nonlocal_det.add_nonlocal_config` applied.
        input_shape: the image input shape.

    Returns:
        FPN: the backbone.
    """
    return FPN(
        bottom_up=build_resnet_nonlocal_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def _lazy_key_name(key: str) -> str:
    """Names of :class:`NonLocalResNet`'s arguments in its errors."""
    if key.endswith("_BLOCKS"):
        return f"NonLocalResNet nonlocal_blocks[{key[:4].lower()!r}]"
    return f"NonLocalResNet nonlocal_{key.lower()}"


class NonLocalResNet(ResNet):
    """Detectron2's ``ResNet`` with non-local blocks, for LazyConfig files.

    Takes ``ResNet``'s arguments unchanged (so ``stages=L(ResNet.make_default_stages)(depth=50)``,
    ``freeze_at`` and the rest of a Detectron2 LazyConfig keep working) plus the ``nonlocal_*``
    arguments, which mirror the ``MODEL.NONLOCAL`` keys of the YAML configs. The blocks are
    inserted exactly as by the registered ``build_resnet_nonlocal_backbone`` (same names
    ``resK.nonlocal{i}``, same initialisation, blocks in frozen stages frozen), so a LazyConfig
    model and its YAML twin have the same parameters and load the same checkpoints. To add the
    blocks to a Detectron2 LazyConfig, swap the target of its ResNet::

        model.backbone.bottom_up._target_ = NonLocalResNet
        model.backbone.bottom_up.nonlocal_placement = "paper_1"

    Args:
        stem, stages, num_classes, out_features, freeze_at: as :class:`detectron2.modeling.ResNet`.
        nonlocal_placement (str): ``MODEL.NONLOCAL.PLACEMENT``: ``"none"``, ``"paper_1"``
            (default: one block right before the last residual block of res4), ``"paper_5"``,
            ``"paper_10"`` or ``"custom"``.
        nonlocal_blocks (dict): with ``"custom"``: stage name (``"res2"`` .. ``"res5"``) -> indices
            of the residual blocks after which a block goes (negative from the end), like
            ``MODEL.NONLOCAL.RES{2..5}_BLOCKS``.
        nonlocal_pairwise, nonlocal_inner_ratio, nonlocal_subsample, nonlocal_use_scale,
            nonlocal_norm: ``MODEL.NONLOCAL.{PAIRWISE, INNER_RATIO, SUBSAMPLE, USE_SCALE, NORM}``.
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
        nonlocal_pairwise: str = "embedded_gaussian",
        nonlocal_inner_ratio: float = 0.5,
        nonlocal_subsample: bool = True,
        nonlocal_use_scale: bool = True,
        nonlocal_norm: str = "",
    ):
        super().__init__(stem, stages, num_classes, out_features, freeze_at)
        blocks = dict(nonlocal_blocks or {})
        unknown = sorted(set(blocks) - set(_STAGES))
        if unknown:
            raise ValueError(
                f"NonLocalResNet nonlocal_blocks={blocks}: unknown stage(s) {unknown}; allowed "
                f"keys: {list(_STAGES)}"
            )
        nl_cfg = CfgNode(
            {
                "ENABLED": True,
                "PLACEMENT": nonlocal_placement,
                "PAIRWISE": nonlocal_pairwise,
                "INNER_RATIO": nonlocal_inner_ratio,
                "SUBSAMPLE": nonlocal_subsample,
                "USE_SCALE": nonlocal_use_scale,
                "NORM": nonlocal_norm,
                **{f"{s.upper()}_BLOCKS": list(blocks.get(s, [])) for s in _STAGES},
            }
        )
        lengths = {s: 0 for s in _STAGES}
        lengths.update({n: len(stage) for n, stage in zip(self.stage_names, self.stages)})
        placement = resolve_placement(nl_cfg, lengths, list(self.stage_names), _lazy_key_name)
        names = insert_nonlocal_blocks(self, placement, nl_cfg, freeze_at, _lazy_key_name)
        _log_blocks(names, nl_cfg)
