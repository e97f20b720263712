"""What a block attends to, in image pixels: the block's input caught during inference, the
top-k attended key positions of chosen query pixels (pairwise blocks) and the one attention map
of a query-independent block, and a picture of them (the paper's Figure 3; it needs OpenCV)."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T

from ..layers import BLOCK_TYPES

__all__ = [
    "AttentionArrows",
    "backbone_blocks",
    "compute_arrows",
    "context_map",
    "draw",
    "run_with_block_input",
]

_COLOURS = [(255, 60, 60), (40, 160, 255), (255, 200, 0), (60, 220, 90), (230, 70, 230)]


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


def _legend(width: int, lines: List[Tuple[Tuple[int, int, int], str]], scale: float) -> np.ndarray:
    """A white band with one coloured dot and text per line."""
    import cv2

    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(scale * 1.5))
    step = int(26 * scale)
    band = np.full((step * len(lines) + step // 2, width, 3), 255, dtype=np.uint8)
    for k, (colour, text) in enumerate(lines):
        y = step * (k + 1)
        cv2.circle(band, (step // 2, y - step // 4), step // 4, colour, -1, cv2.LINE_AA)
        cv2.putText(band, text, (step, y), font, 0.55 * scale, (0, 0, 0), thick, cv2.LINE_AA)
    return band


def draw(
    frames_rgb: List[np.ndarray],
    arrows: Optional[AttentionArrows] = None,
    heat: Optional[np.ndarray] = None,
    legend: Sequence[str] = (),
    query_labels: Sequence[str] = (),
    min_size: int = 512,
    gap: int = 8,
) -> np.ndarray:
    """Frames side by side, enlarged to ``min_size`` pixels on the short side, with the arrows
    and/or the heat map (over the first frame), and a legend: ``legend`` lines in black, then one
    line per query in its arrows' colour. Returns RGB uint8."""
    import cv2  # OpenCV: the pictures' dependency, not the rest of the library's

    h0, w0 = frames_rgb[0].shape[:2]
    s = max(1.0, min_size / min(h0, w0))
    h, w = round(h0 * s), round(w0 * s)
    frames = [cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in frames_rgb]
    if heat is not None:
        m = cv2.resize(heat / max(float(heat.max()), 1e-12), (w, h), interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap(np.uint8(255 * m), cv2.COLORMAP_JET)[:, :, ::-1]
        frames[0] = cv2.addWeighted(frames[0], 0.45, colour, 0.55, 0)
    canvas = np.full((h, len(frames) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for t, frame in enumerate(frames):
        canvas[:, t * (w + gap) : t * (w + gap) + w] = frame
    lines = [((255, 255, 255), text) for text in legend]
    if arrows is not None:
        overlay = canvas.copy()
        thickness = max(1, round(min(h, w) / 250))
        for q, (query, keys, weights) in enumerate(zip(*vars(arrows).values())):
            colour = _COLOURS[q % len(_COLOURS)]
            start = (int((query[0] * (w0 + gap / s) + query[1]) * s), int(query[2] * s))
            top = max(float(weights[0]), 1e-12) if len(weights) else 1.0
            for key, weight in zip(keys, weights):
                end = (int((key[0] * (w0 + gap / s) + key[1]) * s), int(key[2] * s))
                width = thickness + int(2 * thickness * weight / top)
                cv2.arrowedLine(overlay, start, end, colour, width, cv2.LINE_AA, tipLength=0.04)
            cv2.circle(overlay, start, 4 * thickness + 2, colour, -1, cv2.LINE_AA)
            cv2.circle(overlay, start, 4 * thickness + 2, (0, 0, 0), 1, cv2.LINE_AA)
            label = query_labels[q] if q < len(query_labels) else f"query {q + 1}"
            share = f"top-{len(weights)} keys hold {weights.sum():.0%} of its attention"
            lines.append((colour, f"{label}: {share}"))
        canvas = cv2.addWeighted(overlay, 0.85, canvas, 0.15, 0)
    if heat is not None:
        lines.append(((0, 0, 160), "heat map: the attention shared by every query (red = high)"))
    return np.concatenate([canvas, _legend(canvas.shape[1], lines, s / 2.5)], axis=0)
