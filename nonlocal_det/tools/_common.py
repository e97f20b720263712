"""What the commands share: loading a config as ``train_net.py`` does, and the input options."""

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import get_nonlocal_cfg
from ..data import configure_coco_json_datasets, register_datasets_for_config
from ..engine import fall_back_to_cpu

__all__ = [
    "check_outputs",
    "draw_predictions",
    "existing_files",
    "load_config",
    "tool_cfg",
    "tool_parser",
]


def load_config(config_file: str, opts: Sequence[str] = ()):
    """The (unfrozen) config of a file + ``KEY VALUE`` overrides, on the CPU without CUDA, adapted
    to its ``DATASETS.*_JSON`` files, as ``train_net.py`` sets it up."""
    cfg = get_nonlocal_cfg(config_file, opts)
    fall_back_to_cpu(cfg)
    configure_coco_json_datasets(cfg)
    return cfg


def tool_parser(doc: str, input_help: str) -> argparse.ArgumentParser:
    """A parser with ``--config-file`` and either ``--input`` files or a registered ``--dataset``;
    add the command's own options, then ``opts`` last."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help=input_help)
    src.add_argument("--dataset", help="a registered dataset, e.g. coco_2017_val")
    return p


def tool_cfg(args: argparse.Namespace):
    """The frozen config of ``--config-file`` + ``opts``; with ``--dataset``, that dataset is
    ``DATASETS.TEST`` and is registered (the demo data is generated if needed)."""
    cfg = load_config(args.config_file, args.opts)
    if args.dataset:
        cfg.DATASETS.TEST = (args.dataset,)
    cfg.freeze()
    if args.dataset:
        register_datasets_for_config(cfg)
    return cfg


def existing_files(paths: Sequence[str], flag: str = "--input") -> List[str]:
    """``paths`` unchanged, or FileNotFoundError naming the flag and every missing file."""
    missing = [f for f in paths if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{flag}: no such file(s): {missing}")
    return list(paths)


def _same_file(a: str, b: str) -> bool:
    """The same path once links are resolved, or the same file (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outputs(outputs: Dict[str, Sequence[str]], inputs: Dict[str, Sequence[str]]) -> None:
    """Before a command writes anything: no output is one of its inputs, and no two outputs are
    the same file.

    Args:
        outputs: option -> the files it will write (e.g. ``{"--output": ["a_pred.png"]}``).
        inputs: option or config key -> the files it reads (``--input``, ``--config-file``,
            ``MODEL.WEIGHTS``; empty and ``scheme://`` paths are skipped).

    Raises:
        ValueError: naming the output, the input and both options.
    """
    read = [(k, p) for k, paths in inputs.items() for p in paths if p and "://" not in p]
    written: List[Tuple[str, str]] = []
    for flag, paths in outputs.items():
        for path in filter(None, paths):
            for key, other in read:
                if _same_file(path, other):
                    raise ValueError(
                        f"{flag} {path} is the same file as {key} {other}: the command would "
                        f"write over its own input; allowed: an output path that is none of the "
                        "inputs"
                    )
            for key, other in written:
                if _same_file(path, other):
                    raise ValueError(
                        f"{flag} {path} is the same file as {key} {other}: the command would "
                        "write one over the other; allowed: a separate path for each output"
                    )
            written.append((flag, path))


def draw_predictions(
    predictor,
    image_bgr: np.ndarray,
    metadata,
    threshold: float = 0.5,
    gt_record: Optional[dict] = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Run ``predictor`` on one image; return an RGB picture of its detections (and ground truth)
    (``tools.predict``'s pictures; ``tools.visualize --predictions-output`` draws one too).

    Args:
        predictor: a Detectron2 ``DefaultPredictor``.
        image_bgr: HxWx3 uint8 image in BGR order (``read_image(path, "BGR")``).
        metadata: the dataset's ``MetadataCatalog`` entry (class names, keypoint rules; keypoints
            are drawn only on its ``keypoint_classes`` when it lists them).
        threshold: detections scoring below it are not drawn.
        gt_record: a Detectron2 dataset dict; when given its annotations are drawn on the left.
        scale: resize factor of the drawing.

    Returns:
        np.ndarray: HxWx3 (or Hx2Wx3 with ``gt_record``) uint8 RGB image.
    """
    import torch
    from detectron2.utils.visualizer import Visualizer  # matplotlib: only the commands that draw

    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    keypoint_classes = metadata.get("keypoint_classes")
    if instances.has("pred_keypoints") and keypoint_classes is not None:
        # The head predicts keypoints for every box: hide them (score 0 is below the Visualizer's
        # threshold) on the classes that have none in the dataset.
        names = metadata.get("thing_classes", [])
        has = [names[c] in keypoint_classes for c in instances.pred_classes.tolist()]
        instances.pred_keypoints[~torch.tensor(has, dtype=torch.bool), :, 2] = 0
    rgb = image_bgr[:, :, ::-1]
    pred = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
    if gt_record is None:
        return pred
    gt = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(gt_record).get_image()
    gap = np.full((pred.shape[0], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([gt, gap, pred], axis=1)
