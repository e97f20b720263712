"""Check a warm start before spending GPU hours: ``python -m nonlocal_det.tools.warm_start``.

    python -m nonlocal_det.tools.warm_start --config-file configs/mask_rcnn_R50_NL_warmstart.yaml
    python -m nonlocal_det.tools.warm_start --config-file configs/mask_rcnn_R50_NL.yaml \\
        --image photo.jpg MODEL.WEIGHTS path/to/baseline_model_final.pth

Loads ``MODEL.WEIGHTS`` (a Detectron2 checkpoint without non-local blocks: a model-zoo ``.pkl``
or a ``.pth`` written by Detectron2) into the config's model and into the same model without its
non-local blocks, exactly as training does (``DetectionCheckpointer``), then checks the two
promises of a warm start: the only parameters the checkpoint lacks are those of the non-local
blocks, and, since every block starts as the identity, both models predict exactly the same thing
on an image (``--image``, else a random one). Prints what it found; exits with status 1 if a
promise does not hold. Fine-tuning is then ordinary training from that checkpoint:

    python train_net.py --config-file configs/mask_rcnn_R50_NL_warmstart.yaml --num-gpus 8
"""

import argparse
import sys
from typing import List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from ..modeling import baseline_config
from ._common import load_config

__all__ = ["load_and_report", "check_warm_start", "main", "parser"]


class _ReportingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps what its model load reported (missing keys...)."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_and_report(model: torch.nn.Module, weights: str) -> dict:
    """Load ``weights`` into ``model`` as training does; return what did not match.

    Returns:
        dict: ``missing`` (model keys absent from the checkpoint), ``unexpected`` (checkpoint keys
        the model does not use), ``wrong_shape`` (keys whose shapes differ), each a sorted list.
    """
    checkpointer = _ReportingCheckpointer(model)
    checkpointer.load(weights)
    inc = checkpointer.incompatible
    return {
        "missing": sorted(inc.missing_keys),
        "unexpected": sorted(inc.unexpected_keys),
        "wrong_shape": sorted(k for k, *_ in inc.incorrect_shapes),
    }


def check_warm_start(cfg, image: Optional[np.ndarray] = None) -> dict:
    """Load ``cfg.MODEL.WEIGHTS`` into the model of ``cfg`` and into its baseline (no non-local
    block) and compare.

    Args:
        cfg: a config with ``MODEL.NONLOCAL`` and ``MODEL.WEIGHTS`` set.
        image: HxWx3 uint8 image in ``cfg.INPUT.FORMAT``; default a random 320x320 image.

    Returns:
        dict: the :func:`load_and_report` dict of the model, plus ``nonlocal_keys`` (the model's
        non-local parameter and buffer names), ``only_nonlocal_missing`` (bool), ``detections``
        (how many the baseline made) and ``identical`` (bool: same backbone features and same
        boxes, scores, classes, masks and keypoints, bit for bit).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    models = []
    report = None
    for c in (cfg, baseline_config(cfg)):
        model = build_model(c).eval()
        r = load_and_report(model, cfg.MODEL.WEIGHTS)
        report = report or r
        models.append(model)
    nl_keys = sorted(k for k in models[0].state_dict() if ".nonlocal" in k)
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()}]
    with torch.no_grad():
        nl_out, base_out = (m(inputs)[0]["instances"] for m in models)
        tensor = models[0].preprocess_image(inputs).tensor
        nl_feat, base_feat = (m.backbone(tensor) for m in models)
    identical = nl_out.get_fields().keys() == base_out.get_fields().keys() and all(
        torch.equal(getattr(v, "tensor", v), getattr(base_out.get(k), "tensor", base_out.get(k)))
        for k, v in nl_out.get_fields().items()
    )
    same_features = all(torch.equal(nl_feat[k], base_feat[k]) for k in base_feat)
    report.update(
        nonlocal_keys=nl_keys,
        only_nonlocal_missing=report["missing"] == nl_keys and not report["wrong_shape"],
        detections=len(base_out),
        identical=bool(identical and same_features),
    )
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--image", help="an image to compare predictions on (default: random)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0: both promises hold)."""
    args = parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to start from")
    image = read_image(args.image, format=cfg.INPUT.FORMAT) if args.image else None
    r = check_warm_start(cfg, image)
    print(f"checkpoint: {cfg.MODEL.WEIGHTS}")
    print(f"non-local parameters/buffers in the model: {len(r['nonlocal_keys'])}")
    print(f"missing from the checkpoint: {len(r['missing'])}")
    for k in r["missing"]:
        print(f"  {k}{'' if k in r['nonlocal_keys'] else '   <-- not a non-local key'}")
    print(f"in the checkpoint but unused by the model: {len(r['unexpected'])}")
    for k in r["unexpected"] + r["wrong_shape"]:
        print(f"  {k}")
    print(f"only non-local keys missing: {'yes' if r['only_nonlocal_missing'] else 'NO'}")
    print(
        "identical features and predictions with and without the non-local blocks "
        f"({r['detections']} detections): {'yes' if r['identical'] else 'NO'}"
    )
    return 0 if r["only_nonlocal_missing"] and r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
