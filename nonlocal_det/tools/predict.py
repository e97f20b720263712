"""Draw a model's predictions on images: ``python -m nonlocal_det.tools.predict``.

    python -m nonlocal_det.tools.predict --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml \\
        --dataset nl_synthetic_val --num-images 2 --output output/demo/predictions \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python -m nonlocal_det.tools.predict --config-file configs/mask_rcnn_R50_NL.yaml \\
        --input photo.jpg --output photo_pred.png MODEL.WEIGHTS model_final.pth

Uses Detectron2's ``DefaultPredictor`` and ``Visualizer``. With ``--dataset`` each PNG shows the
ground truth (left) beside the predictions (right).
"""

import argparse
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from PIL import Image

from ._common import check_outputs, draw_predictions, existing_files, tool_cfg, tool_parser

__all__ = ["draw_predictions", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__, "image files")
    p.add_argument("--num-images", type=int, default=1, help="with --dataset: how many images")
    p.add_argument("--output", required=True, help="a .png file (one image) or a directory")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--scale", type=float, default=2.0, help="resize factor of the drawing")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Command-line entry point; returns the written PNG paths."""
    args = parser().parse_args(argv)
    setup_logger(name="nonlocal_det")
    cfg = tool_cfg(args)
    if cfg.MODEL.WEIGHTS and not cfg.MODEL.WEIGHTS.startswith(("detectron2://", "http")):
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise FileNotFoundError(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r}: no such file")
    name = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    metadata = MetadataCatalog.get(name)

    if args.dataset:
        records = DatasetCatalog.get(args.dataset)[: args.num_images]
        items = [(r["file_name"], r) for r in records]
    else:
        items = [(f, None) for f in existing_files(args.input)]

    single = len(items) == 1 and args.output.lower().endswith(".png")
    outs = [
        (
            args.output
            if single
            else os.path.join(
                args.output, os.path.splitext(os.path.basename(path))[0] + "_pred.png"
            )
        )
        for path, _ in items
    ]
    inputs = {"--input": [p for p, _ in items], "--config-file": [args.config_file]}
    check_outputs({"--output": outs}, {**inputs, "MODEL.WEIGHTS": [cfg.MODEL.WEIGHTS]})
    predictor = DefaultPredictor(cfg)
    if not single:
        os.makedirs(args.output, exist_ok=True)
    written = []
    for (path, record), out in zip(items, outs):
        image = read_image(path, format="BGR")
        picture = draw_predictions(
            predictor, image, metadata, args.confidence_threshold, record, args.scale
        )
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Image.fromarray(picture).save(out)
        written.append(out)
        print(f"wrote {out}")
    return written


if __name__ == "__main__":
    main()
