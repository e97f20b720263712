"""What a block attends to, in image pixels: the block's input caught during inference, the
top-k attended key positions of chosen query pixels (pairwise blocks) and the one attention map
of a query-independent block (the paper's Figure 3; drawn by the ``visualize`` command)."""

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T

from ..layers import BLOCK_TYPES

__all__ = [
    "AttentionArrows",
    "backbone_blocks",
    "compute_arrows",
    "context_map",
    "run_with_block_input",
]

@dataclass
class AttentionArrows:
    """Arrows of one picture, in original-image pixels.

    Attributes:
        queries: (Q, 3) float array of (frame, x, y) of each query.
        keys: (Q, K, 3) float array of (frame, x, y) of the top-k key positions of each query.
        weights: (Q, K) attention weights of those keys (descending).
    """

    queries: np.ndarray
    keys: np.ndarray
    weights: np.ndarray


def backbone_blocks(model: torch.nn.Module) -> List[str]:
    """Names of the blocks (any type of ``nonlocal_det.layers.BLOCK_TYPES``) in the backbone."""
    types = tuple(BLOCK_TYPES.values())
    return [f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, types)]


def run_with_block_input(model, image_bgr: np.ndarray, cfg, block: torch.nn.Module):
    """Inference of a YAML config's model on one BGR image, resized as ``cfg.INPUT`` says for
    testing, with the input of ``block`` (a module of the model) caught.

    Returns:
        (instances, block input, resize scale (sy, sx), stride of the block's positions in image
        pixels)."""
    h, w = image_bgr.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image_bgr).apply_image(image_bgr)
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    caught = []
    handle = block.register_forward_pre_hook(lambda m, inputs: caught.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            out = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
    finally:
        handle.remove()
    x = caught[0]
    stride = 2 ** round(math.log2(image.shape[0] / x.shape[-2]))  # image pixels per position
    return out, x, (image.shape[0] / h, image.shape[1] / w), stride


def compute_arrows(
    block: torch.nn.Module,
    x: torch.Tensor,
    query_pixels: Sequence[Tuple[float, float]],
    stride: int,
    scale: Tuple[float, float],
    topk: int = 8,
    query_frame: int = 0,
) -> AttentionArrows:
    """Top-k attended positions of queries given in original-image pixels.

    Args:
        block: a block with ``attention_for_queries``; ``x`` of shape (1, C, h, w), or
            (1, C, T, h, w) for a space-time non-local block.
        x: the block's input.
        query_pixels: (x, y) pixels of the original image (of frame ``query_frame`` for clips).
        stride: image pixels per feature position at the block.
        scale: (sy, sx) resize factors from the original image to the network input.
        topk: number of keys per query.
        query_frame: frame of the queries (clips only).
    """
    sy, sx = scale
    h, w = x.shape[-2:]
    coords = []
    for px, py in query_pixels:
        i = min(max(int(py * sy // stride), 0), h - 1)
        j = min(max(int(px * sx // stride), 0), w - 1)
        coords.append([query_frame, i, j] if x.dim() == 5 else [i, j])
    with torch.no_grad():
        att = block.attention_for_queries(x, torch.tensor(coords, dtype=torch.long))[0]
    kh, kw = att.shape[-2:]
    flat = att.reshape(att.shape[0], -1).float()
    weights, index = flat.topk(min(topk, flat.shape[1]), dim=1)
    # a key position -> the centre of the feature positions it pools (floor pooling)
    cell_y, cell_x = h // kh, w // kw
    frame = (index // (kh * kw)).float() if x.dim() == 5 else torch.zeros_like(index).float()
    key_y = (((index // kw) % kh).float() * cell_y + cell_y / 2) * stride / sy
    key_x = ((index % kw).float() * cell_x + cell_x / 2) * stride / sx
    queries = np.array(
        [[query_frame, (c[-1] + 0.5) * stride / sx, (c[-2] + 0.5) * stride / sy] for c in coords]
    )
    keys = torch.stack([frame, key_x, key_y], dim=2).numpy()
    return AttentionArrows(queries, keys, weights.numpy())


def context_map(block: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The query-independent attention map (summing to 1) of a block with ``context_weights``."""
    with torch.no_grad():
        return block.context_weights(x)[0].float().numpy()
