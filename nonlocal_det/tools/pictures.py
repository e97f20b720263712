"""The demo's two pictures in one process: ``python -m nonlocal_det.tools.pictures``.

    python -m nonlocal_det.tools.pictures --config-file configs/demo/mask_rcnn_R18_NL_demo.yaml \\
        --dataset nl_synthetic_val --output-dir output/demo MODEL.WEIGHTS output/demo/model_final.pth

writes ``OUTPUT_DIR/predictions.png`` (``tools.predict``: ground truth | predictions of the
dataset's first image) and ``OUTPUT_DIR/attention.png`` (``tools.visualize``: what the first
backbone block attends to on that image, 3 queries). The same pictures as the two commands, with
one start-up (importing torch, torchvision and Detectron2 takes about 5 s on a 2 GHz CPU) instead
of two: ``make demo`` calls it.
"""

import argparse
import os
from typing import List, Optional

from . import predict, visualize


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, help="a YAML config (as train_net.py's)")
    p.add_argument("--dataset", required=True, help="a registered dataset: its first image")
    p.add_argument("--output-dir", required=True, help="where the two PNGs go")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Command-line entry point; returns the two written PNG paths."""
    args = parser().parse_args(argv)
    common = ["--config-file", args.config_file, "--dataset", args.dataset]
    predictions = os.path.join(args.output_dir, "predictions.png")
    attention = os.path.join(args.output_dir, "attention.png")
    predict.main(common + ["--num-images", "1", "--output", predictions, *args.opts])
    visualize.main(common + ["--index", "0", "--output", attention, *args.opts])
    return [predictions, attention]


if __name__ == "__main__":
    main()
