"""Keypoint R-CNN head with blocks between its convs (paper §6, Table 6: non-local blocks), and
the decoding of heatmaps that Detectron2's keypoint decoding asserts on."""

from typing import List, Mapping, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_KEYPOINT_HEAD_REGISTRY, KRCNNConvDeconvUpsampleHead
from detectron2.modeling.roi_heads.keypoint_head import keypoint_rcnn_inference
from detectron2.structures import Instances, heatmaps_to_keypoints
from torch import nn

from ..layers._common import check_value, is_int, key_name
from .blocks import block_builder, config_block_spec, config_keys

__all__ = ["NonLocalKRCNNHead", "decode_heatmaps", "decodable_heatmaps", "DECODABLE_SPREAD"]

# Largest logit range (max - min) of one keypoint's heatmap that Detectron2's decoding always
# takes: its bicubic upsampling overshoots the heatmap's maximum by at most 0.445 of the range, so
# the normaliser of the scores stays above exp(-44.5) (it asserts where that underflows to 0).
DECODABLE_SPREAD = 100.0


def decodable_heatmaps(maps: torch.Tensor, spread: float = DECODABLE_SPREAD) -> torch.Tensor:
    """Keypoint heatmaps that Detectron2's ``heatmaps_to_keypoints`` decodes without asserting.

    Each (instance, keypoint) map whose logits span more than ``spread`` (or that holds NaN or
    infinity) is shifted to a maximum of 0 and scaled to span exactly ``spread``: its maximum stays
    where it is, its score becomes that of a softmax at a higher temperature (finite instead of
    overflowing). Every other map is returned unchanged, bit for bit.

    Args:
        maps (Tensor): (R, K, H, W) heatmap logits.
        spread (float): the largest range of logits left as it is.

    Returns:
        Tensor of the shape and dtype of ``maps``.
    """
    flat = maps.flatten(2)
    bad = ~(flat.amax(2) - flat.amin(2) <= spread)  # NaN and infinity included
    if not bool(bad.any()):
        return maps
    big = torch.finfo(maps.dtype).max
    m = torch.nan_to_num(maps[bad].double(), nan=-big, posinf=big, neginf=-big)
    top = m.flatten(1).amax(1)[:, None, None]
    low = m.flatten(1).amin(1)[:, None, None]
    out = maps.clone()
    out[bad] = ((m - top) * (spread / (top - low).clamp(min=spread))).to(maps.dtype)
    return out


def decode_heatmaps(maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Detectron2's ``heatmaps_to_keypoints`` that does not assert: where it asserts on a batch,
    each box is decoded on its own, and where it asserts on a box, each keypoint; a keypoint map
    it asserts on alone is decoded from :func:`decodable_heatmaps`. So every keypoint Detectron2
    decodes gets Detectron2's result.

    Args, Returns: as ``detectron2.structures.heatmaps_to_keypoints``: (R, K, H, W) logits and
        (R, 4) boxes in; (R, K, 4) of (x, y, logit, score) out.
    """
    try:
        return heatmaps_to_keypoints(maps, rois)
    except AssertionError:
        pass
    out = maps.new_zeros(maps.shape[0], maps.shape[1], 4)
    for i in range(maps.shape[0]):
        try:
            out[i] = heatmaps_to_keypoints(maps[i : i + 1], rois[i : i + 1])[0]
            continue
        except AssertionError:
            pass
        for k in range(maps.shape[1]):
            one = maps[i : i + 1, k : k + 1]
            try:
                out[i, k] = heatmaps_to_keypoints(one, rois[i : i + 1])[0, 0]
            except AssertionError:
                out[i, k] = heatmaps_to_keypoints(decodable_heatmaps(one), rois[i : i + 1])[0, 0]
    return out


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
            (:mod:`nonlocal_det.modeling.blocks`); default the paper's non-local block.
        keys (dict): argument -> the name errors give it instead (from a config: its
            ``MODEL.NONLOCAL`` key, :func:`.config_keys`).
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
        keys: Optional[Mapping[str, str]] = None,
        **kwargs,
    ):
        owner = "" if keys else "NonLocalKRCNNHead"
        make_block = block_builder(owner, nonlocal_spec, keys)
        n, after = len(conv_dims), list(nonlocal_after)
        ok = all(is_int(k) and 1 <= k <= n for k in after)
        allowed = f"distinct integers in 1..{n} (the head's convs, {key_name(keys, 'conv_dims')})"
        after_key = key_name(keys, "nonlocal_after")
        check_value(owner, after_key, after, ok and len(set(after)) == len(after), allowed)
        super().__init__(input_shape, num_keypoints=num_keypoints, conv_dims=conv_dims, **kwargs)
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
        nl = cfg.MODEL.NONLOCAL
        keys = dict(config_keys(cfg), conv_dims="MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS")
        ret.update(nonlocal_spec=config_block_spec(cfg), keys=keys)
        ret["nonlocal_after"] = list(nl.KEYPOINT_HEAD_BLOCKS) if nl.ENABLED else []
        return ret

    def forward(self, x, instances: List[Instances]):
        """As ``KRCNNConvDeconvUpsampleHead.forward``; in inference, where Detectron2's keypoint
        decoding asserts (heatmaps whose logits span hundreds, as a diverging head or one with
        large output weights gives), the keypoints come from :func:`decode_heatmaps`. Scripted,
        it is Detectron2's inference (TorchScript has no ``try``)."""
        if torch.jit.is_scripting():
            keypoint_rcnn_inference(self.layers(x), instances)
        else:
            instances = self._forward_eager(x, instances)
        return instances

    @torch.jit.unused
    def _forward_eager(self, x, instances: List[Instances]) -> List[Instances]:
        if self.training or torch.jit.is_tracing():
            return super().forward(x, instances)
        x = self.layers(x)
        try:
            keypoint_rcnn_inference(x, instances)
        except AssertionError:  # the fields keypoint_rcnn_inference sets, from decode_heatmaps
            maps = x.detach()
            boxes = torch.cat([i.pred_boxes.tensor for i in instances]).detach()
            n = [len(i) for i in instances]
            keypoints = decode_heatmaps(maps, boxes)[:, :, [0, 1, 3]]
            for inst, kps, m in zip(instances, keypoints.split(n), maps.split(n)):
                inst.pred_keypoints, inst.pred_keypoint_heatmaps = kps, m
        return instances

    def nonlocal_blocks(self) -> List[nn.Module]:
        """The inserted blocks, in forward order."""
        return [m for n, m in self.named_children() if n.startswith("nonlocal")]
