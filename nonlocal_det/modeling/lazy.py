"""Blocks in a LazyConfig model: :func:`add_blocks` wraps any backbone node in place.

    from nonlocal_det.modeling import add_blocks

    add_blocks(model.backbone, nonlocal_placement="paper_1")  # the paper's block in res4
    add_blocks(
        model.backbone,
        nonlocal_spec=dict(type="global_context", options=dict(ratio=1 / 16)),
        nonlocal_placement="all_res3_res5",
        nonlocal_position="after_conv3",
    )

The node keeps its keys (``model.backbone.bottom_up...``, and interpolations into it, still work);
its target becomes :func:`build_with_blocks`, which calls the original target (kept as
``nonlocal_base``) and then :func:`.insert_blocks` with the node's ``nonlocal_*`` keys. Any node
whose object is a ResNet, a RegNet, or has one as ``bottom_up`` (the FPN of R-CNN, Panoptic FPN,
RetinaNet and FCOS configs) can be wrapped.
"""

import copy
import inspect
from typing import Any, Callable, Union

from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig

from .blocks import block_builder
from .insertion import insert_blocks
from .keypoint_head import NonLocalKRCNNHead

__all__ = ["add_blocks", "build_with_blocks", "remove_blocks"]

_ARGS = [p for p in inspect.signature(insert_blocks).parameters if p.startswith("nonlocal_")]


def _name(target: Union[str, Callable]) -> str:
    return target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"


def _target(node: Any) -> Any:
    """The object a node's ``_target_`` names (None for anything else)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._target_
    return locate(target) if isinstance(target, str) else target


def build_with_blocks(*, nonlocal_base: Union[str, Callable], **kwargs) -> Any:
    """``nonlocal_base(**kwargs)`` with the ``nonlocal_*`` arguments of :func:`.insert_blocks`
    taken out of ``kwargs`` and applied to the result: what an :func:`add_blocks` node builds."""
    base = locate(nonlocal_base) if isinstance(nonlocal_base, str) else nonlocal_base
    args = {k: kwargs.pop(k) for k in _ARGS if k in kwargs}
    owner = f"add_blocks({_name(nonlocal_base).rsplit('.', 1)[-1]})"
    block_builder(owner, args.get("nonlocal_spec"))  # the spec's errors before any work
    backbone = base(**kwargs)
    insert_blocks(backbone, owner=owner, **args)
    return backbone


def add_blocks(node: DictConfig, **nonlocal_args) -> DictConfig:
    """Make a LazyConfig backbone node build its object with blocks (in place; also returned).

    Args:
        node: a ``LazyCall`` node: ``model.backbone`` (an FPN over a ResNet or RegNet, RetinaNet's
            and FCOS's included), or a ``ResNet``/``RegNet`` node itself.
        nonlocal_args: ``nonlocal_spec``, ``nonlocal_placement``, ``nonlocal_blocks``,
            ``nonlocal_position`` of :func:`.insert_blocks` (their defaults: the paper's block,
            ``"paper_1"``, after the residual block). Overridable later as keys of the node
            (``model.backbone.nonlocal_placement=paper_5`` on a command line).

    Raises:
        ValueError: ``node`` is not a LazyCall node or has blocks already, an unknown argument, or
            a bad spec.
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ValueError(
            f"add_blocks: node={type(node).__name__} is not supported; allowed: a LazyCall node "
            "(e.g. model.backbone of a Detectron2 LazyConfig)"
        )
    if _target(node) is build_with_blocks:
        raise ValueError("add_blocks: this node has blocks already; allowed: once per node")
    unknown = sorted(set(nonlocal_args) - set(_ARGS))
    if unknown:
        raise ValueError(f"add_blocks: unknown arguments {unknown}; allowed: {_ARGS}")
    block_builder("add_blocks", nonlocal_args.get("nonlocal_spec"))
    node.nonlocal_base = _name(node._target_)
    node._target_ = build_with_blocks
    node.update(nonlocal_args)
    return node


def remove_blocks(cfg: Any) -> Any:
    """A copy of a LazyConfig (or any part of one) without blocks: each :func:`add_blocks` node
    back to its original target, each ``NonLocalKRCNNHead`` node with ``nonlocal_after=[]`` (the
    same parameter names, minus the blocks')."""
    cfg = copy.deepcopy(cfg)
    nodes = [cfg]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ListConfig):
            nodes.extend(node)
            continue
        if not isinstance(node, DictConfig):
            continue
        target = _target(node)
        if target is build_with_blocks:
            base = node.pop("nonlocal_base")
            node._target_ = locate(base) if isinstance(base, str) else base
            for k in _ARGS:
                node.pop(k, None)
        elif target is NonLocalKRCNNHead:
            node.nonlocal_after = []
        nodes.extend(v for k, v in node.items_ex(resolve=False) if k != "_target_")
    return cfg
