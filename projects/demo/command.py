#!/usr/bin/env python
"""nonlocal_det's commands with the demo's datasets and config keys (``nonlocal_demo``), and the
demo's data generator:

    python projects/demo/command.py visualize --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml \\
        --dataset nl_synthetic_val --index 0 --output att.png MODEL.WEIGHTS output/demo/model_final.pth
    python projects/demo/command.py generate_data --root datasets/shapes

COMMAND: generate_data, or one of nonlocal_det.tools (analyze, d2_tool, export, predict, visualize,
warm_start); the rest of the line is that command's.
"""

import importlib
import sys

import nonlocal_demo

COMMANDS = ("analyze", "d2_tool", "export", "predict", "visualize", "warm_start")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    allowed = ("generate_data",) + COMMANDS
    if not argv or argv[0] not in allowed:
        sys.exit(f"{__doc__}\nCOMMAND={argv[0] if argv else ''!r} is not one of {list(allowed)}")
    nonlocal_demo.setup()
    name = "nonlocal_demo.generate_data" if argv[0] == "generate_data" else f"nonlocal_det.tools.{argv[0]}"
    return importlib.import_module(name).main(argv[1:])


if __name__ == "__main__":
    main()
