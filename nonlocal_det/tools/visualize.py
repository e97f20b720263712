"""Draw what a block attends to (the paper's Figure 3): ``python -m nonlocal_det.tools.visualize``.

    # an image of the demo's validation split; queries: the 3 most confident detections
    python -m nonlocal_det.tools.visualize --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml \\
        --dataset nl_synthetic_val --index 0 --output att.png MODEL.WEIGHTS model_final.pth
    # a chosen block and query pixels (x,y), top 10 keys each
    python -m nonlocal_det.tools.visualize ... --input image.png --output att.png \\
        --block backbone.bottom_up.res4.nonlocal0 --query 120,80 --query 40,150 --topk 10
    # a clip (non-local blocks): the block's embeddings over all frames; arrows cross frames
    python -m nonlocal_det.tools.visualize ... --input f0.png f1.png f2.png --output clip.png

Pairwise blocks (non-local, the pairwise term of DNL, criss-cross, generalized attention) get
arrows from each query to its ``--topk`` most attended key positions, thicker for more weight
(criss-cross: along the query's row and column, its first pass). Query-independent blocks (SNL,
GC, DNL's unary term) get a heat map of their one attention map over the image. Only the chosen
queries' rows of the attention are computed, never the N x M matrix. The picture is enlarged to at
least ``--min-size`` pixels on its short side, with a legend naming the block and the queries.
"""

import argparse
import os
from typing import List, Optional, Sequence, Tuple

import cv2  # OpenCV: the pictures (the `demo` extra)
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from PIL import Image

from ..layers import NonLocalBlock
from ..modeling.attention import (
    AttentionArrows,
    backbone_blocks,
    compute_arrows,
    context_map,
    run_with_block_input,
)
from ._common import check_outputs, draw_predictions, existing_files, tool_cfg, tool_parser

__all__ = ["draw", "main", "parser", "space_time_view"]

_COLOURS = [(255, 60, 60), (40, 160, 255), (255, 200, 0), (60, 220, 90), (230, 70, 230)]

def _legend(width: int, lines: List[Tuple[Tuple[int, int, int], str]], scale: float) -> np.ndarray:
    """A white band with one coloured dot and text per line."""
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


def space_time_view(block: NonLocalBlock) -> NonLocalBlock:
    """A dim=3 block with the same pairwise embeddings (1x1 convs as 1x1x1), for clips."""
    view = NonLocalBlock(
        block.in_channels,
        block.inner_channels,
        block.pairwise,
        3,
        block.subsample,
        block.use_scale,
        whiten=block.whiten,
    )
    for name in ("theta", "phi", "g"):
        src, dst = getattr(block, name), getattr(view, name)
        if src is not None:
            dst.weight.data.copy_(src.weight.data.unsqueeze(2))
            dst.bias.data.copy_(src.bias.data)
    if block.concat_project is not None:
        view.concat_project.weight.data.copy_(block.concat_project.weight.data)
    return view.to(block.g.weight.device).eval()


def parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__, "an image, or the frames of a clip (or a folder)")
    p.add_argument("--index", type=int, default=0, help="with --dataset: which image")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.add_argument("--block", default="", help="name of a backbone block (default: the first)")
    p.add_argument("--query", action="append", default=[], help="a query pixel x,y (repeatable)")
    p.add_argument("--num-queries", type=int, default=3, help="automatic queries (detections)")
    p.add_argument("--topk", type=int, default=8, help="arrows per query")
    p.add_argument("--min-size", type=int, default=512, help="short side of the picture")
    p.add_argument("--query-frame", type=int, default=None, help="clips: frame of the queries")
    p.add_argument(
        "--predictions-output",
        default=None,
        help="with --dataset: also write the image's ground truth | predictions picture here (as "
        "tools.predict draws it; make demo: both pictures with one start-up)",
    )
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


def _queries(args, det, metadata, image_shape):
    """(pixels, labels) of the ``--query`` pixels, or of the most confident detections."""
    if args.query:
        try:
            pixels = [tuple(float(v) for v in q.split(",")) for q in args.query]
        except ValueError:
            pixels = [()]
        if not all(len(p) == 2 for p in pixels):
            raise ValueError(f"--query {args.query}: each must be 'x,y' in image pixels")
        return pixels, [f"query ({x:.0f}, {y:.0f})" for x, y in pixels]
    order = det.scores.argsort(descending=True)[: args.num_queries]
    names = metadata.get("thing_classes", None)
    pixels, labels = [], []
    for b, c, score in zip(
        det.pred_boxes.tensor[order], det.pred_classes[order], det.scores[order]
    ):
        pixels.append(((b[0] + b[2]).item() / 2, (b[1] + b[3]).item() / 2))
        name = names[int(c)] if names else f"class {int(c)}"
        labels.append(f"{name} {score:.2f}")
    if not pixels:  # nothing detected: the image centre
        return [(image_shape[1] / 2, image_shape[0] / 2)], ["image centre"]
    return pixels, labels


def main(argv: Optional[List[str]] = None) -> Optional[AttentionArrows]:
    """Command-line entry point; writes the PNG and returns the drawn arrows (None for a block
    without pairwise attention)."""
    args = parser().parse_args(argv)
    setup_logger(name="nonlocal_det")
    cfg = tool_cfg(args)
    if args.predictions_output and not args.dataset:
        raise ValueError("--predictions-output needs --dataset (its ground truth is drawn)")
    if args.dataset:
        records = DatasetCatalog.get(args.dataset)
        if not 0 <= args.index < len(records):
            raise ValueError(f"--index {args.index}: allowed 0..{len(records) - 1}")
        args.input = [records[args.index]["file_name"]]
    outputs = {"--output": [args.output], "--predictions-output": [args.predictions_output or ""]}
    inputs = {"--input": args.input, "--config-file": [args.config_file]}
    check_outputs(outputs, {**inputs, "MODEL.WEIGHTS": [cfg.MODEL.WEIGHTS]})
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    names = backbone_blocks(model)
    if not names:
        raise ValueError(
            f"{args.config_file}: the backbone has no block (MODEL.NONLOCAL.PLACEMENT="
            f"{cfg.MODEL.NONLOCAL.PLACEMENT!r}); nothing to visualise"
        )
    name = args.block or names[0]
    if name not in names:
        raise ValueError(f"--block {name!r} is not a backbone block; allowed: {names}")
    block = model.get_submodule(name)
    images = [read_image(p, format="BGR") for p in _frames(args.input)]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"--input: the frames differ in size: {[im.shape for im in images]}")
    if len(images) > 1 and not isinstance(block, NonLocalBlock):
        raise ValueError(f"--input: a clip needs a non-local block; {name} is {type(block)}")
    runs = [run_with_block_input(model, im, cfg, block) for im in images]
    t_query = args.query_frame if args.query_frame is not None else len(images) // 2
    if not 0 <= t_query < len(images):
        raise ValueError(f"--query-frame {t_query}: allowed 0..{len(images) - 1}")
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    pixels, labels = _queries(args, runs[t_query][0], metadata, images[0].shape)
    _, x, scale, stride = runs[0]
    arrows = heat = None
    if len(images) > 1:
        x = torch.stack([r[1] for r in runs], dim=2)  # (1, C, T, h, w)
        view = space_time_view(block)
        arrows = compute_arrows(view, x, pixels, stride, scale, args.topk, query_frame=t_query)
    elif hasattr(block, "attention_for_queries"):
        arrows = compute_arrows(block, x, pixels, stride, scale, args.topk)
    if hasattr(block, "context_weights") and len(images) == 1:
        heat = context_map(block, x)
    title = [f"{name.replace('backbone.bottom_up.', '')}: {type(block).__name__}, stride {stride}"]
    picture = draw(
        [im[:, :, ::-1] for im in images], arrows, heat, title, labels, min_size=args.min_size
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(picture).save(args.output)
    print(f"wrote {args.output}: {name}, {len(pixels)} queries")
    if args.predictions_output:
        from detectron2.engine import DefaultPredictor

        drawn = draw_predictions(
            DefaultPredictor(cfg), images[0], MetadataCatalog.get(args.dataset), 0.5,
            records[args.index], scale=2.0,
        )  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.predictions_output)), exist_ok=True)
        Image.fromarray(drawn).save(args.predictions_output)
        print(f"wrote {args.predictions_output}")
    return arrows


if __name__ == "__main__":
    main()
