"""Draw what a non-local block attends to (the paper's Figure 3): ``python -m nonlocal_det.tools.visualize``.

    # one image; queries: the centres of the 3 most confident detections
    python -m nonlocal_det.tools.visualize --config-file configs/demo/mask_rcnn_R18_NL_demo.yaml \\
        --input image.png --output attention.png MODEL.WEIGHTS output/demo/model_final.pth
    # chosen block and query pixels (x,y), top 10 keys
    python -m nonlocal_det.tools.visualize ... --block backbone.bottom_up.res4.nonlocal4 \\
        --query 120,80 --query 40,150 --topk 10
    # an image of a registered dataset (the demo's validation split)
    python -m nonlocal_det.tools.visualize ... --dataset nl_synthetic_val --index 0 --output att.png
    # space-time: the block's embeddings applied to a clip (T frames); arrows cross frames
    python -m nonlocal_det.tools.visualize ... --input f0.png f1.png f2.png --output clip.png

For every query an arrow goes to each of its ``--topk`` (default 20) most attended key positions,
mapped back to image pixels; thicker and more opaque arrows carry more weight. The weights come
from ``NonLocalBlock.attention_for_queries``: only the Q chosen rows of the attention are built,
never the full N x M matrix, so full-resolution inputs stay cheap. For a clip, each frame goes
through the backbone, the block's inputs are stacked along time and a space-time (dim=3) block
sharing the trained 2-D block's 1x1 embeddings (as 1x1x1 convs) computes the attention of queries
in ``--query-frame`` over every position of every frame.
"""

import argparse
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from PIL import Image

from ..layers import NonLocalBlock
from ._common import existing_files, tool_cfg, tool_parser

__all__ = [
    "AttentionArrows",
    "backbone_blocks",
    "space_time_view",
    "compute_arrows",
    "draw",
    "main",
    "parser",
]


@dataclass
class AttentionArrows:
    """Arrows of one picture, in original-image pixels.

    Attributes:
        queries: (Q, 3) float array of (frame, x, y) of each query.
        keys: (Q, K, 3) float array of (frame, x, y) of the top-k key positions of each query.
        weights: (Q, K) normalised attention weights f/C of those keys (descending).
    """

    queries: np.ndarray
    keys: np.ndarray
    weights: np.ndarray


def backbone_blocks(model: torch.nn.Module) -> List[str]:
    """Names of the non-local blocks in ``model.backbone`` (those that see a whole image)."""
    return [
        f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, NonLocalBlock)
    ]


def space_time_view(block: NonLocalBlock) -> NonLocalBlock:
    """A dim=3 block with the same pairwise embeddings (1x1 convs as 1x1x1), for clips."""
    view = NonLocalBlock(
        block.in_channels,
        block.inner_channels,
        pairwise=block.pairwise,
        dim=3,
        subsample=block.subsample,
        use_scale=block.use_scale,
    )
    for name in ("theta", "phi", "g"):
        src, dst = getattr(block, name), getattr(view, name)
        if src is not None:
            dst.weight.data.copy_(src.weight.data.unsqueeze(2))
            dst.bias.data.copy_(src.bias.data)
    if block.concat_project is not None:
        view.concat_project.weight.data.copy_(block.concat_project.weight.data)
    return view.to(block.g.weight.device).eval()


class _InputCatcher:
    """Forward pre-hook keeping the input of a module."""

    def __init__(self, module: torch.nn.Module):
        self.value = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.value = inputs[0].detach()


def _run(model, image_bgr: np.ndarray, cfg, block: torch.nn.Module):
    """Inference on one image; returns (instances, block input, resize scale (sy, sx))."""
    h, w = image_bgr.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image_bgr).apply_image(image_bgr)
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    catcher = _InputCatcher(block)
    try:
        with torch.no_grad():
            out = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
    finally:
        catcher.handle.remove()
    return out, catcher.value, (image.shape[0] / h, image.shape[1] / w)


def _stride_of(model, block_name: str) -> int:
    """Feature stride at the block: the stride of the ResNet stage that holds it."""
    stage = block_name.split(".")[-2]
    strides = (
        model.backbone.bottom_up.output_shape() if hasattr(model.backbone, "bottom_up") else {}
    )
    if stage not in strides:
        strides = model.backbone.output_shape()
    return strides[stage].stride


def compute_arrows(
    block: NonLocalBlock,
    x: torch.Tensor,
    query_pixels: Sequence[Tuple[float, float]],
    stride: int,
    scale: Tuple[float, float],
    topk: int = 20,
    query_frame: int = 0,
) -> AttentionArrows:
    """Top-k attended positions of queries given in original-image pixels.

    Args:
        block: a 2-D block (``x`` of shape (1, C, h, w)) or a space-time one (``x`` (1, C, T, h, w)).
        x: the block's input.
        query_pixels: (x, y) pixels of the original image (of frame ``query_frame`` for clips).
        stride: image pixels per feature position at the block.
        scale: (sy, sx) resize factors from the original image to the network input.
        topk: number of keys per query.
        query_frame: frame of the queries (clips only).

    Returns:
        AttentionArrows in original-image pixels.
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
    key_grid = att.shape[1:]
    flat = att.reshape(att.shape[0], -1)
    k = min(topk, flat.shape[1])
    weights, index = flat.topk(k, dim=1)
    # key position -> feature position: the centre of its pooling window
    pool = 2 if block.subsample else 1
    kh, kw = key_grid[-2], key_grid[-1]
    frame = (index // (kh * kw)).float() if x.dim() == 5 else torch.zeros_like(index).float()
    ki = (index // kw) % kh
    kj = index % kw
    key_y = ((ki.float() * pool + pool / 2) * stride) / sy
    key_x = ((kj.float() * pool + pool / 2) * stride) / sx
    queries = np.array(
        [[query_frame, (c[-1] + 0.5) * stride / sx, (c[-2] + 0.5) * stride / sy] for c in coords]
    )
    keys = torch.stack([frame, key_x, key_y], dim=2).numpy()
    return AttentionArrows(queries, keys, weights.numpy())


def draw(frames_rgb: List[np.ndarray], arrows: AttentionArrows, gap: int = 8) -> np.ndarray:
    """Frames side by side (one frame: the image itself) with the arrows; returns RGB uint8."""
    h, w = frames_rgb[0].shape[:2]
    canvas = np.full((h, len(frames_rgb) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for t, frame in enumerate(frames_rgb):
        canvas[:, t * (w + gap) : t * (w + gap) + w] = frame
    overlay = canvas.copy()
    colors = [(255, 60, 60), (60, 200, 255), (255, 210, 0), (120, 255, 120), (255, 80, 255)]
    thickness = max(1, round(min(h, w) / 200))
    for q, (query, keys, weights) in enumerate(zip(arrows.queries, arrows.keys, arrows.weights)):
        color = colors[q % len(colors)]
        start = (int(query[0] * (w + gap) + query[1]), int(query[2]))
        top = float(weights[0]) if len(weights) else 1.0
        for key, weight in zip(keys, weights):
            end = (int(key[0] * (w + gap) + key[1]), int(key[2]))
            width = thickness + int(2 * thickness * weight / max(top, 1e-12))
            cv2.arrowedLine(overlay, start, end, color, width, cv2.LINE_AA, tipLength=0.05)
        cv2.circle(overlay, start, 3 * thickness + 2, color, -1, cv2.LINE_AA)
        cv2.circle(overlay, start, 3 * thickness + 2, (0, 0, 0), 1, cv2.LINE_AA)
    return cv2.addWeighted(overlay, 0.8, canvas, 0.2, 0)


def parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__, "an image, or the frames of a clip (or a folder)")
    p.add_argument("--index", type=int, default=0, help="with --dataset: which image")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.add_argument(
        "--block", default="", help="name of a backbone non-local block (default: first)"
    )
    p.add_argument("--query", action="append", default=[], help="a query pixel x,y (repeatable)")
    p.add_argument("--num-queries", type=int, default=3, help="automatic queries (detections)")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--query-frame", type=int, default=None, help="clips: frame of the queries")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def _frames(inputs: List[str]) -> List[str]:
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        folder, exts = inputs[0], (".png", ".jpg", ".jpeg", ".bmp")
        inputs = sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(exts)
        )
        if not inputs:
            raise FileNotFoundError(f"--input {folder}: the folder holds no {'/'.join(exts)} image")
    return existing_files(inputs)


def main(argv: Optional[List[str]] = None) -> AttentionArrows:
    """Command-line entry point; writes the PNG and returns the drawn arrows."""
    args = parser().parse_args(argv)
    setup_logger(name="nonlocal_det")
    cfg = tool_cfg(args)
    if args.dataset:
        records = DatasetCatalog.get(args.dataset)
        if not 0 <= args.index < len(records):
            raise ValueError(f"--index {args.index}: allowed 0..{len(records) - 1}")
        args.input = [records[args.index]["file_name"]]
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    names = backbone_blocks(model)
    if not names:
        raise ValueError(
            f"{args.config_file}: the backbone has no non-local block (MODEL.NONLOCAL.PLACEMENT="
            f"{cfg.MODEL.NONLOCAL.PLACEMENT!r}); nothing to visualise"
        )
    name = args.block or names[0]
    if name not in names:
        raise ValueError(f"--block {name!r} is not a backbone non-local block; allowed: {names}")
    block = model.get_submodule(name)
    stride = _stride_of(model, name)

    paths = _frames(args.input)
    images = [read_image(p, format="BGR") for p in paths]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"--input: the frames differ in size: {[im.shape for im in images]}")
    runs = [_run(model, im, cfg, block) for im in images]
    t_query = args.query_frame if args.query_frame is not None else len(images) // 2
    if not 0 <= t_query < len(images):
        raise ValueError(f"--query-frame {t_query}: allowed 0..{len(images) - 1}")
    if args.query:
        try:
            pixels = [tuple(float(v) for v in q.split(",")) for q in args.query]
            assert all(len(p) == 2 for p in pixels)
        except (ValueError, AssertionError):
            raise ValueError(f"--query {args.query}: each must be 'x,y' in image pixels")
    else:
        det = runs[t_query][0]
        boxes = det.pred_boxes.tensor[det.scores.argsort(descending=True)][: args.num_queries]
        pixels = [((b[0] + b[2]).item() / 2, (b[1] + b[3]).item() / 2) for b in boxes]
        if not pixels:  # nothing detected: the image centre
            pixels = [(images[0].shape[1] / 2, images[0].shape[0] / 2)]
    scale = runs[0][2]
    if len(images) == 1:
        arrows = compute_arrows(block, runs[0][1], pixels, stride, scale, args.topk)
    else:
        x = torch.stack([r[1] for r in runs], dim=2)  # (1, C, T, h, w)
        arrows = compute_arrows(
            space_time_view(block), x, pixels, stride, scale, args.topk, query_frame=t_query
        )
    picture = draw([im[:, :, ::-1] for im in images], arrows)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(picture).save(args.output)
    print(f"wrote {args.output}: {name}, {len(pixels)} queries, top-{args.topk} keys")
    return arrows


if __name__ == "__main__":
    main()
