"""Detectron2's ``SOLVER.CLIP_GRADIENTS`` for LazyConfig files (configs/lazy/*_demo.py)."""

from typing import Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

__all__ = ["optimizer_with_gradient_clipping"]


def optimizer_with_gradient_clipping(
    optimizer: Union[str, type] = "torch.optim.SGD",
    clip_type: str = "value",
    clip_value: float = 1.0,
    norm_type: float = 2.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer whose ``step()`` first clips gradients, exactly as the YAML keys
    ``SOLVER.CLIP_GRADIENTS.{CLIP_TYPE, CLIP_VALUE, NORM_TYPE}`` do (Detectron2's
    ``maybe_add_gradient_clipping``; "norm" clips each parameter's gradient norm).

    A plain function with a dotted optimizer name, so that a LazyConfig using it still saves to a
    loadable YAML file (the class Detectron2 generates cannot be named in one).

    Args:
        optimizer: a ``torch.optim.Optimizer`` class or its dotted name.
        clip_type: ``"value"`` or ``"norm"``.
        clip_value: the maximum absolute value or norm.
        norm_type: p of the p-norm with ``"norm"``.
        **kwargs: the optimizer's arguments (``params``, ``lr``, ...).

    Returns:
        torch.optim.Optimizer: the optimizer.
    """
    cls = locate(optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"optimizer={optimizer!r} is not supported; allowed: a torch.optim.Optimizer class or "
            "its dotted name, e.g. 'torch.optim.SGD'"
        )
    clip = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": True,
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": clip_value,
                    "NORM_TYPE": norm_type,
                }
            }
        }
    )
    return maybe_add_gradient_clipping(clip, cls)(**kwargs)
