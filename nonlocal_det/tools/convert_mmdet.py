"""Convert an mmdetection checkpoint into this project's Detectron2 model:
``python -m nonlocal_det.tools.convert_mmdet IN.pth OUT.pth``.

    python -m nonlocal_det.tools.convert_mmdet mask_rcnn_r50_fpn_r16_gcb_c3-c5_1x_coco.pth \\
        output/mmdet/mask_rcnn_R50_GC_r16.pth --config-file configs/mmdet/mask_rcnn_R50_GC_r16.yaml
    python train_net.py --config-file configs/mmdet/mask_rcnn_R50_GC_r16.yaml --eval-only \\
        MODEL.WEIGHTS output/mmdet/mask_rcnn_R50_GC_r16.pth

Reads an mmdetection 2 / 3 checkpoint (``state_dict`` + ``meta``, as its runners and publish
scripts write them) of a Faster / Mask R-CNN with a ResNet(-Xt)-FPN, with or without mmcv's GC
(``ContextBlock``) or ``GeneralizedAttention`` plugins; renames every tensor to the Detectron2
model of this project; reads the training config embedded in ``meta`` to check what the weights
do not say (block settings and position, ResNet style, norm, RoIAlign, input normalisation,
test thresholds); refuses what it cannot map (deformable convs, cascade heads, other plugins,
norms or heads, another number of classes than the config's) with the reason. With
``--config-file`` the config must hold those settings (each difference is listed) and its model
must take every converted tensor, shape for shape, and need no other; without it, the model of
the settings themselves is checked (``--write-config`` writes them as a YAML config). The output
is written only when everything holds, atomically.
"""

import argparse
import os
import pickle
import re
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from ..from_mmdet import UnsupportedCheckpoint, convert_checkpoint
from ..utils import atomic_open
from ._common import check_outputs

__all__ = ["convert_checkpoint", "load_mmdet_checkpoint", "main", "parser", "settings_yaml"]


def load_mmdet_checkpoint(path: str, unsafe: bool = False) -> Tuple[Dict[str, Any], dict]:
    """(state_dict, meta) of an mmdetection checkpoint (``module.`` prefixes removed, as
    mmdetection's own loader does).

    Args:
        unsafe: unpickle any Python object (``weights_only=False``): only for trusted files.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError("no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" ({found[1]})" if found else ""
        raise UnsupportedCheckpoint(
            f"it holds Python objects{what} that torch.load(weights_only=True) refuses; rerun "
            "with --unsafe-load if you trust the file"
        ) from None
    if not isinstance(ckpt, dict):
        raise UnsupportedCheckpoint(f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "model" in ckpt and "state_dict" not in ckpt:
        raise UnsupportedCheckpoint(
            "it has a 'model' entry and no 'state_dict': a Detectron2 checkpoint already?"
        )
    state = ckpt.get("state_dict", ckpt)
    if not all(torch.is_tensor(v) for v in state.values()):
        raise UnsupportedCheckpoint("it has no 'state_dict' of tensors")
    state = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state.items())
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    return state, meta


def settings_yaml(settings: Dict[str, Any], source: str) -> str:
    """The settings as a standalone Detectron2 YAML config (over Detectron2's defaults)."""
    tree: Dict[str, Any] = {}
    for key, value in settings.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    tree.setdefault("MODEL", {})["WEIGHTS"] = ""
    tree["VERSION"] = 2
    head = f"# Detectron2 settings of {os.path.basename(source)} (tools.convert_mmdet)\n"
    return head + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", metavar="IN.pth", help="an mmdetection checkpoint")
    p.add_argument("output", metavar="OUT.pth", help="the Detectron2 checkpoint to write")
    p.add_argument(
        "--config-file", default="", metavar="FILE", help="the Detectron2 config to check"
    )
    p.add_argument("--write-config", default="", metavar="FILE.yaml", help="write the settings")
    p.add_argument(
        "--assume-defaults",
        action="store_true",
        help="where the checkpoint has no config, take mmdetection's R-CNN defaults",
    )
    p.add_argument(
        "--unsafe-load", action="store_true", help="unpickle any object (trusted files only)"
    )
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides of the config, last")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1: not converted, nothing written)."""
    args = parser().parse_intermixed_args(argv)
    outputs = {"OUT.pth": [args.output], "--write-config": [args.write_config]}
    check_outputs(outputs, {"IN.pth": [args.input], "--config-file": [args.config_file]})
    try:
        state, meta = load_mmdet_checkpoint(args.input, args.unsafe_load)
        state, settings, notes = convert_checkpoint(
            state, meta, args.config_file, args.opts, args.assume_defaults
        )
    except (UnsupportedCheckpoint, FileNotFoundError) as e:
        print(f"convert_mmdet: {args.input} not converted: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}")
    if args.write_config:
        with atomic_open(args.write_config, "w") as f:
            f.write(settings_yaml(settings, args.input))
        print(f"wrote {args.write_config}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output, "wb") as f:
        torch.save({"model": state, "__author__": "mmdetection, via nonlocal_det"}, f)
    print(f"wrote {args.output}: {len(state)} tensors")
    config = args.config_file or args.write_config or "<config with the settings above>"
    print(
        f"evaluate: python train_net.py --config-file {config} --eval-only MODEL.WEIGHTS "
        f"{args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
