"""What each block type costs in every model of Detectron2's installed model zoo (docs/your_models.md):
the blocks' parameters and FLOPs at 800x1333, counted by fvcore with the handles of
``nonlocal_det.modeling.flops.count_flops`` (one multiply-add = one flop), and their share of the
model's FLOPs.

    python benchmarks/blocks_in_models.py --markdown              # every model, 800x1333
    python benchmarks/blocks_in_models.py --models RetinaNet,FCOS --height 256 --width 256

Each model is built once from the zoo (random weights, inference mode, one random image); each
block type is inserted into a copy of it where its authors put it (``insert_blocks``, what the
YAML builder and ``add_blocks`` call). The blocks start as the identity, so the model with blocks
sees the same proposals and detections as the one without, and the difference of the two totals
is exactly the blocks' own count (checked for every cell).
"""

import argparse
import copy
import platform
import time
from typing import Dict, List, Optional

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg, instantiate
from detectron2.modeling import build_model

from nonlocal_det.layers import BLOCK_TYPES
from nonlocal_det.modeling import insert_blocks
from nonlocal_det.modeling.flops import count_flops

MODELS = {
    "RetinaNet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "FCOS": "COCO-Detection/fcos_R_50_FPN_1x.py",
    "Faster R-CNN C4": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
    "Faster R-CNN DC5": "COCO-Detection/faster_rcnn_R_50_DC5_1x.yaml",
    "Faster R-CNN FPN": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "Mask R-CNN FPN": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "Cascade Mask R-CNN": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "Keypoint R-CNN": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
    "Panoptic FPN": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
    "Mask R-CNN LSJ": "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
    "Mask R-CNN RegNetY-4GF LSJ": "new_baselines/mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py",
}
# Column -> the insert_blocks arguments: each type where its authors (or this project's configs)
# put it, options making it start as the identity.
TYPES = {
    "NL": ("nonlocal", {}, "paper_1", "after_block"),
    "GC r16": ("global_context", {"ratio": 1 / 16}, "all_res3_res5", "after_conv3"),
    "SNL": ("simplified", {"zero_init": True}, "paper_1", "after_add"),
    "DNL": ("disentangled", {"zero_init": True}, "paper_1", "after_add"),
    "CC": ("criss_cross", {}, "paper_1", "after_block"),
    "GA 0010": (
        "generalized_attention",
        {"attention_type": "0010"},
        "all_res4_res5",
        "after_conv2",
    ),
}


def build(zoo_file: str) -> torch.nn.Module:
    """The zoo model on the CPU, no weights, inference mode."""
    if zoo_file.endswith(".py"):
        return instantiate(model_zoo.get_config(zoo_file).model).eval()
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_file))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def measure(name: str, height: int, width: int) -> Dict[str, dict]:
    """Column -> {blocks, params, gflops, share} for one model (or {error} where the blocks
    cannot go)."""
    torch.manual_seed(0)
    base = build(MODELS[name])
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image, "height": height, "width": width}]
    with torch.no_grad():
        total = count_flops(base, inputs).total()
    out = {"model": {"gflops": total / 1e9, "params": sum(p.numel() for p in base.parameters())}}
    for column, (kind, options, placement, position) in TYPES.items():
        model = copy.deepcopy(base)
        spec = {"type": kind, "options": options}
        try:
            names = insert_blocks(
                model.backbone,
                nonlocal_spec=spec,
                nonlocal_placement=placement,
                nonlocal_position=position,
            )
        except ValueError as e:
            out[column] = {"error": str(e)}
            continue
        with torch.no_grad():
            analysis = count_flops(model, inputs)
            by_module = analysis.by_module()
        flops = sum(by_module[f"model.backbone.{n}"] for n in names)
        assert analysis.total() - total == flops, (name, column, analysis.total() - total, flops)
        blocks = [m for m in model.modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
        out[column] = {
            "blocks": len(names),
            "params": sum(p.numel() for b in blocks for p in b.parameters()),
            "gflops": flops / 1e9,
            "share": 100.0 * flops / total,
        }
        del model
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS)
    )
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; allowed: {list(MODELS)}")
    return args


def _cell(c: dict) -> str:
    if "error" in c:
        return "—"
    return f"{c['blocks']} · {c['params'] / 1e6:.2f} M · {c['gflops']:.2f} ({c['share']:.1f} %)"


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, dict]]:
    args = parse_args(argv)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l), "")
    print(
        f"CPU: {cpu or platform.processor()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.height}x{args.width}, {time.strftime('%Y-%m-%d')}"
    )
    results = {}
    for name in args.models.split(","):
        start = time.time()
        results[name] = measure(name, args.height, args.width)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    sep = "|" if args.markdown else " "
    header = ["model", "GFLOPs"] + list(TYPES)
    print(sep.join([""] + header + [""]) if args.markdown else sep.join(header))
    if args.markdown:
        print("|" + "---|" * len(header))
    for name, r in results.items():
        cells = [name, f"{r['model']['gflops']:.1f}"] + [_cell(r[c]) for c in TYPES]
        print(sep.join([""] + cells + [""]) if args.markdown else sep.join(cells))
    errors = {
        f"{n} / {c}": r[c]["error"] for n, r in results.items() for c in TYPES if "error" in r[c]
    }
    for where, message in errors.items():
        print(f"{where}: {message}")
    return results


if __name__ == "__main__":
    main()
