"""Parameters and FLOPs of a config (YAML or LazyConfig), with and without its blocks.

    python -m nonlocal_det.tools.analyze --config-file configs/mask_rcnn_R50_NL.yaml
    python -m nonlocal_det.tools.analyze --config-file configs/keypoint_rcnn_R50_NL.yaml --height 800 \\
        --width 1216
    python -m nonlocal_det.tools.analyze \\
        --config-file configs/lazy/mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py

FLOPs are counted by fvcore through Detectron2's ``FlopCountAnalysis`` (one multiply-add = one
flop; element-wise ops are not counted), on one image of the given size, in inference mode.
Handles are registered for the blocks' ops that fvcore would skip, count as zero or estimate:
``scaled_dot_product_attention`` (L*M*(E + E_v) per head), ``cumsum`` (the concatenation form's
prefix sums) and two-operand ``einsum`` (exactly). Both models are built from the same seed and
the blocks start as the identity (configs with ZERO_INIT where their authors' do not), so both
detect the same boxes and the difference of the totals is the cost of the blocks. The model
without blocks: ``MODEL.NONLOCAL.ENABLED False`` (YAML), ``remove_blocks`` (LazyConfig).
"""

import argparse
from typing import List, Optional, Tuple

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import build_model
from tabulate import tabulate

from ..layers import BLOCK_TYPES
from ..modeling import baseline_config, remove_blocks
from ..modeling.flops import count_flops
from ._common import load_config

__all__ = ["analyze", "main", "parser"]


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build(cfg) -> torch.nn.Module:
    """The model of a YAML config (on the CPU, no weights) or of a LazyConfig's ``model``."""
    if not isinstance(cfg, CfgNode):
        return instantiate(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg)


def analyze(cfg, height: int = 800, width: int = 1333, seed: int = 0) -> Tuple[list, list]:
    """Rows of the model table and of the per-block table (see :func:`main`).

    Args:
        cfg: a YAML config with ``MODEL.NONLOCAL``, or a LazyConfig (its ``model``).
        height, width: the input image size (after Detectron2's resizing).
        seed: seed of the random image and of both models' initialisation.

    Returns:
        (model_rows, block_rows): lists of dicts.
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=generator) * 255
    inputs = [{"image": image, "height": height, "width": width}]
    results = {}
    yaml = isinstance(cfg, CfgNode)
    pair = (cfg, baseline_config(cfg)) if yaml else (cfg.model, remove_blocks(cfg.model))
    for label, c in zip(("with blocks", "without"), pair):
        torch.manual_seed(seed)
        model = _build(c).eval()
        with torch.no_grad():
            flops = count_flops(model, inputs)
            by_module = flops.by_module()
        results[label] = (model, flops.total(), by_module)

    model, total, by_module = results["with blocks"]
    _, base_total, base_by_module = results["without"]
    model_rows = []
    for label, (m, tot, mods) in results.items():
        model_rows.append(
            {
                "model": label,
                "params (M)": _params(m) / 1e6,
                "GFLOPs": tot / 1e9,
                "backbone GFLOPs": mods.get("model.backbone", 0) / 1e9,
            }
        )
    block_rows = []
    for name, module in model.named_modules():
        if isinstance(module, tuple(BLOCK_TYPES.values())):
            f = by_module.get(f"model.{name}", 0)
            block_rows.append(
                {
                    "block": name,
                    "type": type(module).__name__,
                    "C": module.in_channels,
                    "params (M)": _params(module) / 1e6,
                    "GFLOPs": f / 1e9,
                    "% of baseline": 100.0 * f / base_total,
                }
            )
    return model_rows, block_rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--height", type=int, default=800, help="input height (default 800)")
    p.add_argument("--width", type=int, default=1333, help="input width (default 1333)")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (LazyConfig: key=value)"
    )
    return p


def main(argv: Optional[List[str]] = None) -> Tuple[list, list]:
    """Command-line entry point: prints the two tables; returns their rows."""
    args = parser().parse_args(argv)
    if args.config_file.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    else:
        cfg = load_config(args.config_file, args.opts)
    model_rows, block_rows = analyze(cfg, args.height, args.width)
    with_nl, without = model_rows
    model_rows.append(
        {
            "model": "increase",
            "params (M)": with_nl["params (M)"] - without["params (M)"],
            "GFLOPs": with_nl["GFLOPs"] - without["GFLOPs"],
            "backbone GFLOPs": with_nl["backbone GFLOPs"] - without["backbone GFLOPs"],
        }
    )
    pct = 100.0 * (with_nl["GFLOPs"] / without["GFLOPs"] - 1)
    print(f"\n{args.config_file} at {args.height}x{args.width} (fvcore; 1 multiply-add = 1 flop)")
    print(tabulate(model_rows, headers="keys", floatfmt=".2f", tablefmt="pipe"))
    print(f"\nThe blocks add {pct:.2f}% FLOPs to the model without them.\n")
    if block_rows:
        print(tabulate(block_rows, headers="keys", floatfmt=".3f", tablefmt="pipe"))
    return model_rows, block_rows


if __name__ == "__main__":
    main()
