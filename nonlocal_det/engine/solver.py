"""Detectron2's ``SOLVER.CLIP_GRADIENTS`` for LazyConfig files (configs/lazy/*_demo.py), and its
per-parameter norm clipping in a few batched ops (:func:`clip_each_parameter_norm`)."""

from typing import List, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

__all__ = ["clip_each_parameter_norm", "optimizer_with_gradient_clipping"]


def _clip_grads_each(grads: List[torch.Tensor], max_norm: float, norm_type: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(g, max_norm, norm_type)`` for each ``g`` on its own, as
    one batch: the same operations (a tensor's norm, the norm of that one-element vector, the
    clamped coefficient, the product), so the same numbers."""
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, norm_type))[:, None]
    norms = torch.linalg.vector_norm(norms, norm_type, dim=1)  # clip_grad_norm_'s total norm
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def clip_each_parameter_norm(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first clip each parameter's gradient to norm ``max_norm``: what
    Detectron2's ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE: "norm"`` does, one
    ``clip_grad_norm_`` call per parameter, here in a few batched ops per device and dtype
    (``torch._foreach_norm``, ``torch._foreach_mul_``) with the same numbers. The optimizer's
    class becomes a subclass of its own (as Detectron2 does it); its state dict is unchanged.

    Returns:
        The same ``optimizer``, for chaining.
    """
    base = type(optimizer)

    def step(self, closure=None):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            by_device_dtype = {}
            for g in grads:
                by_device_dtype.setdefault((g.device, g.dtype), []).append(g)
            for same in by_device_dtype.values():
                _clip_grads_each(same, max_norm, norm_type)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithEachNormClip", (base,), {"step": step})
    return optimizer


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
    if clip_type == "norm":
        return clip_each_parameter_norm(cls(**kwargs), clip_value, norm_type)
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
