"""The YAML backbones with blocks: Detectron2's own builder, then :func:`.insert_blocks`.

``MODEL.BACKBONE.NAME: build_nonlocal_backbone`` calls the registered builder named by
``MODEL.NONLOCAL.BASE_BACKBONE`` (default Detectron2's ``build_resnet_fpn_backbone``; RetinaNet's
is ``build_retinanet_resnet_fpn_backbone``, a C4/DC5 model's ``build_resnet_backbone``) and
inserts the blocks of ``MODEL.NONLOCAL`` into the ResNet or RegNet it returns. Detectron2's
builder does everything else (P6/P7, C4, DC5, deformable stages), with the same parameter names.
``build_resnet_nonlocal_backbone`` and ``build_resnet_nonlocal_fpn_backbone`` are the same with
a fixed base. :class:`NonLocalResNet` is Detectron2's ``ResNet`` with the blocks as arguments.

Detectron2's builders make ResNet-18/34 only at ``MODEL.RESNETS.RES2_OUT_CHANNELS`` 64 (an
``assert``); with another width, these builders make the same network from Detectron2's stem, basic
blocks and FPN at that width (:func:`basic_resnet_stages`; the CPU demo's ResNet-18 is 32 wide).
"""

import inspect
import math
from functools import partial
from typing import Dict, List, Optional, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from torch import nn

from .blocks import block_builder, config_block_spec, config_wording, legacy_spec
from .insertion import STAGES, insert_blocks, residual_network

__all__ = [
    "NonLocalResNet",
    "basic_resnet_stages",
    "build_nonlocal_backbone",
    "build_resnet_nonlocal_backbone",
    "build_resnet_nonlocal_fpn_backbone",
    "config_insert_args",
    "last_level_max_pool",
]

OURS = ("build_nonlocal_backbone", "build_resnet_nonlocal_backbone")
OURS += ("build_resnet_nonlocal_fpn_backbone",)
_RESNET_BUILDERS = ("build_resnet_backbone", "build_resnet_fpn_backbone")
_RESNET_BUILDERS += ("build_retinanet_resnet_fpn_backbone",)
_DEPTHS = (18, 34, 50, 101, 152)  # what Detectron2's ResNet builds
_BASIC_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # residual blocks per stage, res2-res5
_FEATURES = ("stem",) + STAGES
# The features each meta-architecture's heads read: MODEL.<node>.IN_FEATURES.
_HEADS = {
    "GeneralizedRCNN": ("RPN", "ROI_HEADS"),
    "ProposalNetwork": ("RPN",),
    "RetinaNet": ("RETINANET",),
    "PanopticFPN": ("RPN", "ROI_HEADS", "SEM_SEG_HEAD"),
    "SemanticSegmentor": ("SEM_SEG_HEAD",),
}


def _check_resnet_keys(cfg, base: str) -> None:
    """The ``MODEL.RESNETS`` / ``MODEL.FPN`` values Detectron2 rejects with bare asserts."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _DEPTHS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={r.DEPTH!r} is not supported; allowed: {list(_DEPTHS)}"
        )
    if r.DEPTH in _BASIC_BLOCKS:
        width = r.RES2_OUT_CHANNELS
        if not isinstance(width, int) or not 8 <= width <= 64 or width % 8:
            raise ValueError(
                f"MODEL.RESNETS.RES2_OUT_CHANNELS={width!r} is not supported with MODEL.RESNETS."
                f"DEPTH={r.DEPTH} (basic blocks); allowed: 64 (Detectron2's ResNet-18/34) or a "
                "narrower multiple of 8 (8-56)"
            )
        if r.RES5_DILATION != 1:
            raise ValueError(
                f"MODEL.RESNETS.RES5_DILATION={r.RES5_DILATION!r} is not supported with MODEL."
                f"RESNETS.DEPTH={r.DEPTH} (basic blocks); allowed: 1"
            )
    outs = list(r.OUT_FEATURES)
    if not outs or any(f not in _FEATURES for f in outs):
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={outs} is not supported; allowed: a non-empty list of "
            f"{list(_FEATURES)}"
        )
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in outs]
    if base != "build_resnet_backbone" and missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} uses {missing}, which the "
            f"ResNet does not output (MODEL.RESNETS.OUT_FEATURES={outs}); allowed: features of "
            f"{outs}"
        )


def _check_head_features(cfg, backbone: Backbone, base: str) -> None:
    """The features the heads read are outputs of the backbone (else a KeyError at the first
    forward, e.g. RetinaNet's ``p7`` from an FPN without P6/P7)."""
    outs = list(backbone.output_shape())
    for node in _HEADS.get(cfg.MODEL.META_ARCHITECTURE, ()):
        if node == "RPN" and cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN":
            continue
        wanted = list(cfg.MODEL[node].IN_FEATURES)
        missing = [f for f in wanted if f not in outs]
        if missing:
            raise ValueError(
                f"MODEL.{node}.IN_FEATURES={wanted} reads {missing}, which the backbone built by "
                f"{base!r} (MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r}) does not output; "
                f"allowed: features of {outs}, or a base builder that outputs them (RetinaNet: "
                "MODEL.NONLOCAL.BASE_BACKBONE 'build_retinanet_resnet_fpn_backbone')"
            )


def basic_resnet_stages(
    depth: int = 18, width: int = 64, norm: str = "BN", in_channels: int = 64
) -> List[List[nn.Module]]:
    """The four stages (res2-res5) of a ResNet-18 or -34 whose res2 is ``width`` channels wide
    (then 2x, 4x, 8x), of Detectron2's ``BasicBlock`` (its parameter names), for its ``ResNet``.
    ``width`` 64 is Detectron2's own (``ResNet.make_default_stages``); ``in_channels``: the
    stem's output channels. For a LazyConfig::

        model.backbone.bottom_up.stem.out_channels = 32
        model.backbone.bottom_up.stages = L(basic_resnet_stages)(depth=18, width=32, in_channels=32)
    """
    if depth not in _BASIC_BLOCKS:
        raise ValueError(f"depth={depth!r} is not supported; allowed: {sorted(_BASIC_BLOCKS)}")
    stages = []
    for i, n in enumerate(_BASIC_BLOCKS[depth]):
        out = width * 2**i
        stride = [1 if i == 0 else 2] + [1] * (n - 1)
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                n,
                stride_per_block=stride,
                in_channels=in_channels,
                out_channels=out,
                norm=norm,
            )
        )
        in_channels = out
    return stages


def _narrow_basic(cfg) -> bool:
    """A ResNet-18/34 at a width Detectron2's builder refuses."""
    r = cfg.MODEL.RESNETS
    return r.DEPTH in _BASIC_BLOCKS and r.RES2_OUT_CHANNELS != 64


def _basic_backbone(cfg, input_shape: ShapeSpec, base: str) -> Backbone:
    """What Detectron2's builder ``base`` makes, with a ResNet-18/34 of any width."""
    r = cfg.MODEL.RESNETS
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = basic_resnet_stages(r.DEPTH, r.RES2_OUT_CHANNELS, r.NORM, r.STEM_OUT_CHANNELS)
    bottom_up = ResNet(
        stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )
    if base == "build_resnet_backbone":
        return bottom_up
    f = cfg.MODEL.FPN
    top_block = LastLevelMaxPool()
    if base == "build_retinanet_resnet_fpn_backbone":  # P6/P7 from res5, as Detectron2's
        top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, f.OUT_CHANNELS)
    return FPN(
        bottom_up=bottom_up,
        in_features=f.IN_FEATURES,
        out_channels=f.OUT_CHANNELS,
        norm=f.NORM,
        top_block=top_block,
        fuse_type=f.FUSE_TYPE,
    )


def config_insert_args(cfg) -> Dict:
    """The arguments of :func:`insert_blocks` given by ``cfg.MODEL.NONLOCAL``."""
    spec = config_block_spec(cfg)
    nl = cfg.MODEL.NONLOCAL
    if not nl.ENABLED:
        return dict(nonlocal_spec=spec, nonlocal_placement="none")
    return dict(
        nonlocal_spec=spec,
        nonlocal_placement=nl.PLACEMENT,
        nonlocal_blocks={s: list(nl.get(f"{s.upper()}_BLOCKS")) for s in STAGES},
        nonlocal_position=nl.POSITION,
    )


def _build(cfg, input_shape: ShapeSpec, base: str) -> Backbone:
    """Detectron2's builder ``base``, then the blocks of ``MODEL.NONLOCAL``; errors name keys."""
    owner = cfg.MODEL.BACKBONE.NAME
    args = config_insert_args(cfg)
    with config_wording():
        block_builder(owner, args["nonlocal_spec"])  # the spec's errors before any work
        allowed = sorted(set(BACKBONE_REGISTRY._obj_map) - set(OURS))
        if base not in allowed:
            raise ValueError(
                f"{owner}: nonlocal_base={base!r} is not a registered backbone builder (this "
                f"project's names excluded); allowed: {allowed}"
            )
        build = BACKBONE_REGISTRY.get(base)
        if base in _RESNET_BUILDERS:
            _check_resnet_keys(cfg, base)
            if _narrow_basic(cfg):  # a width Detectron2's builder asserts against
                build = partial(_basic_backbone, base=base)
        backbone = build(cfg, input_shape)
        residual_network(backbone, f"MODEL.NONLOCAL.BASE_BACKBONE={base!r}")
        insert_blocks(backbone, owner=owner, **args)
        _check_head_features(cfg, backbone, base)
    return backbone


@BACKBONE_REGISTRY.register()
def build_nonlocal_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """The backbone of the registered builder ``MODEL.NONLOCAL.BASE_BACKBONE`` with the blocks of
    ``MODEL.NONLOCAL`` in its ResNet or RegNet."""
    if "NONLOCAL" not in cfg.MODEL:
        config_block_spec(cfg)  # the KeyError that names add_nonlocal_config
    return _build(cfg, input_shape, cfg.MODEL.NONLOCAL.BASE_BACKBONE)


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ``build_resnet_backbone`` (C4, DC5: every ``MODEL.RESNETS`` key) with the
    blocks of ``MODEL.NONLOCAL``."""
    return _build(cfg, input_shape, "build_resnet_backbone")


@BACKBONE_REGISTRY.register()
def build_resnet_nonlocal_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN with the blocks of ``MODEL.NONLOCAL``: its RetinaNet builder (P6/P7
    from res5) for ``MODEL.META_ARCHITECTURE`` RetinaNet, else ``build_resnet_fpn_backbone``
    (P6 max-pooled from the last FPN level: ``p5`` with Detectron2's ``res2``-``res5`` inputs,
    ``p4`` when ``MODEL.FPN.IN_FEATURES`` ends at ``res4``, where Detectron2's own fails)."""
    retina = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    backbone = _build(cfg, input_shape, f"build_{'retinanet_' * retina}resnet_fpn_backbone")
    if isinstance(backbone.top_block, LastLevelMaxPool):
        stride = backbone.bottom_up.output_shape()[cfg.MODEL.FPN.IN_FEATURES[-1]].stride
        backbone.top_block.in_feature = f"p{int(math.log2(stride))}"
    return backbone


def last_level_max_pool(in_feature: str = "p5") -> LastLevelMaxPool:
    """Detectron2's ``LastLevelMaxPool`` (one more FPN level: a stride-2 max-pool) of
    ``in_feature``. Detectron2's pools ``p5``, which an FPN whose inputs end at ``res4`` lacks; for
    such a LazyConfig: ``model.backbone.top_block = L(last_level_max_pool)(in_feature="p4")``."""
    block = LastLevelMaxPool()
    block.in_feature = in_feature
    return block


_INSERT_ARGS = [p for p in inspect.signature(insert_blocks).parameters if p.startswith("nonlocal")]


class NonLocalResNet(ResNet):
    """Detectron2's ``ResNet`` (same arguments) with blocks: :func:`insert_blocks` applied to it,
    its ``nonlocal_*`` arguments passed on. For a LazyConfig, swap the target of its ResNet::

        model.backbone.bottom_up._target_ = NonLocalResNet
        model.backbone.bottom_up.nonlocal_placement = "paper_1"

    (:func:`nonlocal_det.modeling.add_blocks` does this for any backbone node, RegNet included.)
    The arguments of the non-local block given one by one (``nonlocal_pairwise``,
    ``nonlocal_inner_ratio``, ...), ``nonlocal_type`` and ``nonlocal_options`` are still read:
    they make the ``nonlocal_spec``.

    Args:
        stem, stages, num_classes, out_features, freeze_at: as :class:`detectron2.modeling.ResNet`.
        nonlocal_args: ``nonlocal_spec``, ``nonlocal_placement``, ``nonlocal_blocks``,
            ``nonlocal_position`` of :func:`insert_blocks`.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[Sequence[nn.Module]],
        num_classes: Optional[int] = None,
        out_features: Optional[Sequence[str]] = None,
        freeze_at: int = 0,
        **nonlocal_args,
    ):
        super().__init__(stem, stages, num_classes, out_features, freeze_at)
        args = {k: nonlocal_args.pop(k) for k in _INSERT_ARGS if k in nonlocal_args}
        args["nonlocal_spec"] = legacy_spec(
            "NonLocalResNet", args.get("nonlocal_spec"), nonlocal_args, _INSERT_ARGS
        )
        insert_blocks(self, owner="NonLocalResNet", **args)
