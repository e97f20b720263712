"""Keypoint R-CNN head with blocks between its convs (paper §6, Table 6: non-local blocks)."""

from typing import List, Mapping, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_KEYPOINT_HEAD_REGISTRY, KRCNNConvDeconvUpsampleHead
from torch import nn

from .blocks import block_builder, config_block_spec, config_wording, legacy_spec

__all__ = ["NonLocalKRCNNHead"]


def _checked_after(after: Sequence[int], conv_dims: Sequence[int]) -> List[int]:
    n, after = len(conv_dims), list(after)
    bad = [k for k in after if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad or len(set(after)) != len(after):
        raise ValueError(
            f"NonLocalKRCNNHead: nonlocal_after={after}: the keypoint head has {n} convs "
            f"(conv_dims, MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS); allowed: distinct integers in 1..{n}"
        )
    return after


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class NonLocalKRCNNHead(KRCNNConvDeconvUpsampleHead):
    """Detectron2's ``KRCNNConvDeconvUpsampleHead`` with a non-local block after chosen convs.

    The block after conv ``k`` (1-based) is registered as ``nonlocal{k}`` right after
    ``conv_fcn_relu{k}`` (the head is an ``nn.Sequential``), so every name of the parent head stays
    unchanged. The blocks are built after the parent's re-initialisation of its children (which
    would un-zero W_z), with the RNG state forked: the head starts computing what the parent does.

    Args:
        input_shape, num_keypoints, conv_dims, kwargs: as ``KRCNNConvDeconvUpsampleHead``.
        nonlocal_after: 1-based indices of the convs followed by a block
            (``MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS``).
        nonlocal_spec: the blocks, ``{"type": ..., "options": {...}}`` as for the backbone
            (:mod:`nonlocal_det.modeling.blocks`); default the paper's non-local block. The old
            ``nonlocal_type``, ``nonlocal_options`` and ``nonlocal_<option>`` arguments are still
            read into it.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        num_keypoints,
        conv_dims: Sequence[int],
        nonlocal_after: Sequence[int] = (2, 4, 6, 8),
        nonlocal_spec: Optional[Mapping] = None,
        **kwargs,
    ):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("nonlocal_")}
        others = ["nonlocal_after", "nonlocal_spec"]
        nonlocal_spec = legacy_spec("NonLocalKRCNNHead", nonlocal_spec, legacy, others)
        super().__init__(input_shape, num_keypoints=num_keypoints, conv_dims=conv_dims, **kwargs)
        make_block = block_builder("NonLocalKRCNNHead", nonlocal_spec)
        after = _checked_after(nonlocal_after, conv_dims)
        children = list(self._modules.items())
        for name, _ in children:
            del self._modules[name]
        with torch.random.fork_rng(devices=[]):
            for name, module in children:
                self.add_module(name, module)
                k = int(name[len("conv_fcn_relu") :]) if name.startswith("conv_fcn_relu") else 0
                if k in after:
                    self.add_module(f"nonlocal{k}", make_block(conv_dims[k - 1]))
        self.nonlocal_after = sorted(after)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["nonlocal_spec"] = config_block_spec(cfg)
        nl = cfg.MODEL.NONLOCAL
        ret["nonlocal_after"] = list(nl.KEYPOINT_HEAD_BLOCKS) if nl.ENABLED else []
        with config_wording():
            block_builder("NonLocalKRCNNHead", ret["nonlocal_spec"])
            _checked_after(ret["nonlocal_after"], ret["conv_dims"])
        return ret

    def nonlocal_blocks(self) -> List[nn.Module]:
        """The inserted blocks, in forward order."""
        return [m for n, m in self.named_children() if n.startswith("nonlocal")]
