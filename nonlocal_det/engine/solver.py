"""Detectron2's ``SOLVER.CLIP_GRADIENTS`` for LazyConfig files, and its per-parameter norm
clipping in a few batched ops."""

from typing import List, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

__all__ = ["clip_each_parameter_norm", "optimizer_with_gradient_clipping"]


def _clip_grads_each(grads: List[torch.Tensor], max_norm: float, norm_type: float) -> None:
    """``clip_grad_norm_(g, max_norm, norm_type)`` for each ``g`` on its own, batched: the same
    operations, so the same numbers."""
    norms = torch.stack(torch._foreach_norm(grads, norm_type))[:, None]
    norms = torch.linalg.vector_norm(norms, norm_type, dim=1)  # clip_grad_norm_'s total norm
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def clip_each_parameter_norm(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first clip each parameter's gradient to norm ``max_norm``, as
    Detectron2's ``CLIP_TYPE: "norm"`` does with one ``clip_grad_norm_`` per parameter, in a few
    batched ops per device and dtype (same numbers). The optimizer's class becomes a subclass of
    its own, as in Detectron2; its state dict is unchanged.

    Returns:
        The same ``optimizer``, for chaining.
    """
    base = type(optimizer)

    def step(self, closure=None):
        by_device_dtype = {}
        for g in (p.grad for group in self.param_groups for p in group["params"]):
            if g is not None:
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
    """An optimizer whose ``step()`` first clips gradients as the YAML keys
    ``SOLVER.CLIP_GRADIENTS.{CLIP_TYPE, CLIP_VALUE, NORM_TYPE}`` do. A function of a dotted
    optimizer name, so that a LazyConfig using it still saves to loadable YAML.

    Args:
        optimizer: a ``torch.optim.Optimizer`` class or its dotted name.
        clip_type: ``"value"`` or ``"norm"``.
        clip_value: the maximum absolute value or norm.
        norm_type: p of the p-norm with ``"norm"``.
        **kwargs: the optimizer's arguments (``params``, ``lr``, ...).
    """
    cls = locate(optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"optimizer={optimizer!r} is not supported; allowed: a torch.optim.Optimizer class or "
            "its dotted name, e.g. 'torch.optim.SGD'"
        )
    if clip_type == "norm":
        return clip_each_parameter_norm(cls(**kwargs), clip_value, norm_type)
    clip = dict(ENABLED=True, CLIP_TYPE=clip_type, CLIP_VALUE=clip_value, NORM_TYPE=norm_type)
    return maybe_add_gradient_clipping(CfgNode({"SOLVER": {"CLIP_GRADIENTS": clip}}), cls)(**kwargs)
