#!/usr/bin/env python
"""Detect on one image with Detectron2's ``DefaultPredictor`` and a nonlocal_det config; save a PNG.

    python examples/predict_image.py --config-file configs/demo/mask_rcnn_R18_NL_demo.yaml \\
        --input image.png --output prediction.png MODEL.WEIGHTS output/demo/model_final.pth

The whole recipe is the usual Detectron2 one plus two lines: ``import nonlocal_det`` (registers the
non-local backbone and keypoint head) and ``add_nonlocal_config(cfg)`` before reading the YAML.
"""

import argparse

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

import nonlocal_det
from nonlocal_det.data.builtin import register_datasets_for_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = get_cfg()
    nonlocal_det.add_nonlocal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    register_datasets_for_config(cfg)  # class and keypoint names of the demo data, if it is used

    predictor = DefaultPredictor(cfg)  # builds the model, loads MODEL.WEIGHTS, resizes the input
    image = read_image(args.input, format="BGR")
    instances = predictor(image)["instances"].to("cpu")
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    drawing = Visualizer(image[:, :, ::-1], metadata, scale=2.0).draw_instance_predictions(
        instances
    )
    drawing.save(args.output)
    print(f"{len(instances)} detections; wrote {args.output}")


if __name__ == "__main__":
    main()
