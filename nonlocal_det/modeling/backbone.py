"""The YAML backbones with blocks: Detectron2's own builder, then :func:`.insert_blocks`.

``MODEL.BACKBONE.NAME: build_nonlocal_backbone`` calls the registered builder named by
``MODEL.NONLOCAL.BASE_BACKBONE`` (default Detectron2's ``build_resnet_fpn_backbone``; RetinaNet's
is ``build_retinanet_resnet_fpn_backbone``, a C4/DC5 model's ``build_resnet_backbone``) and
inserts the blocks of ``MODEL.NONLOCAL`` into the ResNet or RegNet it returns. Detectron2's
builder does everything else (P6/P7, C4, DC5, deformable stages), with the same parameter names.
``build_resnet_nonlocal_backbone`` and ``build_resnet_nonlocal_fpn_backbone`` are the same with
a fixed base.
"""

import math
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..layers._common import check_choice, check_value
from .blocks import block_builder, config_block_spec, config_keys
from .insertion import STAGES, insert_blocks, residual_network

__all__ = [
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
    check_choice("", "MODEL.RESNETS.DEPTH", r.DEPTH, _DEPTHS)
    if r.DEPTH in (18, 34):
        basic = f"with MODEL.RESNETS.DEPTH={r.DEPTH} (Detectron2's ResNet-18/34)"
        width, dilation = r.RES2_OUT_CHANNELS, r.RES5_DILATION
        check_value("", "MODEL.RESNETS.RES2_OUT_CHANNELS", width, width == 64, f"64 {basic}")
        check_value("", "MODEL.RESNETS.RES5_DILATION", dilation, dilation == 1, f"1 {basic}")
    outs = list(r.OUT_FEATURES)
    ok = bool(outs) and all(f in _FEATURES for f in outs)
    allowed = f"a non-empty list of {list(_FEATURES)}"
    check_value("", "MODEL.RESNETS.OUT_FEATURES", outs, ok, allowed)
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


def config_insert_args(cfg) -> Dict:
    """The arguments of :func:`insert_blocks` given by ``cfg.MODEL.NONLOCAL``, errors naming its
    keys."""
    args = dict(nonlocal_spec=config_block_spec(cfg), owner="", keys=config_keys(cfg))
    nl = cfg.MODEL.NONLOCAL
    if not nl.ENABLED:
        return dict(args, nonlocal_placement="none")
    return dict(
        args,
        nonlocal_placement=nl.PLACEMENT,
        nonlocal_blocks={s: list(nl.get(f"{s.upper()}_BLOCKS")) for s in STAGES},
        nonlocal_position=nl.POSITION,
    )


def _build(cfg, input_shape: ShapeSpec, base: str) -> Backbone:
    """Detectron2's builder ``base``, then the blocks of ``MODEL.NONLOCAL``."""
    args = config_insert_args(cfg)
    block_builder("", args["nonlocal_spec"], args["keys"])  # the spec's errors before any work
    allowed = sorted(set(BACKBONE_REGISTRY._obj_map) - set(OURS))
    if base not in allowed:
        raise ValueError(
            f"MODEL.NONLOCAL.BASE_BACKBONE={base!r} is not a registered backbone builder (this "
            f"project's names excluded); allowed: {allowed}"
        )
    if base in _RESNET_BUILDERS:
        _check_resnet_keys(cfg, base)
    backbone = BACKBONE_REGISTRY.get(base)(cfg, input_shape)
    residual_network(backbone, f"MODEL.NONLOCAL.BASE_BACKBONE={base!r}")
    insert_blocks(backbone, **args)
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
