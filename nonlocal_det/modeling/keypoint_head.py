"""Keypoint R-CNN head with non-local blocks between its convs (paper §6, Table 6)."""

from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_KEYPOINT_HEAD_REGISTRY, KRCNNConvDeconvUpsampleHead

from ..config import inner_channels_for, nonlocal_block_kwargs
from ..layers import NonLocalBlock

__all__ = ["NonLocalKRCNNHead"]


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class NonLocalKRCNNHead(KRCNNConvDeconvUpsampleHead):
    """Detectron2's ``KRCNNConvDeconvUpsampleHead`` with a non-local block after chosen convs.

    The block after conv ``k`` (1-based) is registered as ``nonlocal{k}``, right after
    ``conv_fcn_relu{k}``, so it runs there (the head is an ``nn.Sequential``) and every name of the
    parent head stays unchanged: a baseline keypoint checkpoint loads with only ``nonlocal`` keys
    missing. The blocks are built after the parent's (re-)initialisation of its children, so they
    start as the identity and the head initially computes exactly what the parent computes.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        num_keypoints,
        conv_dims: Sequence[int],
        nonlocal_after: Sequence[int] = (2, 4, 6, 8),
        nonlocal_inner_ratio: float = 0.5,
        nonlocal_kwargs: dict = None,
        **kwargs,
    ):
        """
        Args:
            input_shape, num_keypoints, conv_dims, kwargs: as ``KRCNNConvDeconvUpsampleHead``.
            nonlocal_after: 1-based indices of the convs followed by a non-local block.
            nonlocal_inner_ratio: C_inner / C of each block (C: channels of the conv before it).
            nonlocal_kwargs: other ``NonLocalBlock`` arguments (pairwise, subsample, ...).
        """
        super().__init__(input_shape, num_keypoints=num_keypoints, conv_dims=conv_dims, **kwargs)
        n = len(conv_dims)
        after = list(nonlocal_after)
        bad = [k for k in after if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
        if bad or len(set(after)) != len(after):
            raise ValueError(
                f"MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS={after}: the keypoint head has {n} convs "
                f"(MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS); allowed: distinct integers in 1..{n}"
            )
        nonlocal_kwargs = dict(nonlocal_kwargs or {})
        children = list(self._modules.items())
        for name, _ in children:
            del self._modules[name]
        with torch.random.fork_rng(devices=[]):  # keep the parent's init independent of blocks
            for name, module in children:
                self.add_module(name, module)
                if name.startswith("conv_fcn_relu") and int(name[len("conv_fcn_relu") :]) in after:
                    k = int(name[len("conv_fcn_relu") :])
                    c = conv_dims[k - 1]
                    inner = inner_channels_for(c, nonlocal_inner_ratio)
                    block = NonLocalBlock(c, inner_channels=inner, **nonlocal_kwargs)
                    self.add_module(f"nonlocal{k}", block)
        self.nonlocal_after = sorted(after)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        if "NONLOCAL" not in cfg.MODEL:
            raise KeyError(
                "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) before "
                "merge_from_file (MODEL.ROI_KEYPOINT_HEAD.NAME='NonLocalKRCNNHead' needs it)"
            )
        enabled = cfg.MODEL.NONLOCAL.ENABLED
        ret["nonlocal_after"] = list(cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS) if enabled else []
        kwargs = nonlocal_block_kwargs(cfg.MODEL.NONLOCAL, 1)  # validates the keys
        del kwargs["in_channels"], kwargs["inner_channels"]
        ret["nonlocal_inner_ratio"] = cfg.MODEL.NONLOCAL.INNER_RATIO
        ret["nonlocal_kwargs"] = kwargs
        return ret

    def nonlocal_blocks(self) -> List[NonLocalBlock]:
        """The inserted blocks, in forward order."""
        return [m for m in self.children() if isinstance(m, NonLocalBlock)]
