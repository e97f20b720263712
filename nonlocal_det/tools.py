"""Run Detectron2's own tools on the project's YAML configs: ``python -m nonlocal_det.tools``.

    python -m nonlocal_det.tools TOOL [TOOL ARGUMENTS ...]

TOOL is a Detectron2 script, as a file (``~/detectron2/tools/analyze_model.py``,
``~/detectron2/demo/demo.py``, ...) or as an importable module (``tools.visualize_data`` where
the ``tools`` folder is importable). Examples, with a Detectron2 source checkout in ~/detectron2:

    python -m nonlocal_det.tools ~/detectron2/tools/analyze_model.py --tasks parameter \\
        --config-file configs/mask_rcnn_R50_NL.yaml
    python -m nonlocal_det.tools ~/detectron2/tools/visualize_data.py --source annotation \\
        --config-file configs/demo/mask_rcnn_R18_NL_demo.yaml --output-dir vis
    python -m nonlocal_det.tools ~/detectron2/demo/demo.py \\
        --config-file configs/demo/mask_rcnn_R18_NL_demo.yaml --input image.png \\
        --output pred.png --opts MODEL.WEIGHTS output/demo/model_final.pth MODEL.DEVICE cpu

Detectron2's tools read a YAML config with a bare ``get_cfg()``, which knows neither the
``MODEL.NONLOCAL`` keys nor the project's datasets. For the run of TOOL only, in this process
only, this entry point makes ``detectron2.config.get_cfg`` return Detectron2's defaults plus
``MODEL.NONLOCAL`` (:func:`nonlocal_det.add_nonlocal_config`; ``MODEL.DEVICE cpu`` without
CUDA), and registers the datasets the ``--config-file`` names (the generated demo data). Nothing
else is changed; the tool runs unmodified. LazyConfig ``.py`` files (configs/lazy/) need none of this: they import the package
themselves, so the tools that accept them can be run directly.
"""

import argparse
import contextlib
import os
import runpy
import sys
from typing import Iterator, List, Optional

import detectron2.config
import detectron2.config.config
import torch

from .config import add_nonlocal_config, get_nonlocal_cfg
from .data.builtin import register_datasets_for_config

__all__ = ["nonlocal_get_cfg", "run_tool", "main"]


@contextlib.contextmanager
def nonlocal_get_cfg() -> Iterator[None]:
    """Within the block, ``detectron2.config.get_cfg()`` includes ``MODEL.NONLOCAL`` (and, when
    CUDA is not available, defaults to ``MODEL.DEVICE cpu``, as the project's own scripts do)."""
    original = detectron2.config.get_cfg

    def get_cfg():
        cfg = add_nonlocal_config(original())
        if not torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cpu"
        return cfg

    get_cfg.__doc__ = original.__doc__
    modules = (detectron2.config, detectron2.config.config)
    for module in modules:
        module.get_cfg = get_cfg
    try:
        yield
    finally:
        for module in modules:
            module.get_cfg = original


def _register_config_datasets(tool_args: List[str]) -> None:
    """Register the datasets named by the tool's ``--config-file`` (YAML), as train_net.py does."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config-file", default="")
    known, _ = parser.parse_known_args(tool_args)
    if known.config_file.endswith((".yaml", ".yml")):
        register_datasets_for_config(get_nonlocal_cfg(known.config_file))


def run_tool(tool: str, tool_args: List[str]) -> None:
    """Run a Detectron2 script or module as ``__main__`` with the project's config keys.

    Args:
        tool: a path to a ``.py`` script, or a module name.
        tool_args: its command-line arguments.
    """
    _register_config_datasets(tool_args)
    is_file = tool.endswith(".py") or os.path.sep in tool
    if is_file and not os.path.isfile(tool):
        raise FileNotFoundError(f"TOOL {tool!r}: no such file")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [tool] + list(tool_args)
    try:
        with nonlocal_get_cfg():
            if is_file:
                # As `python script.py` does: the script's folder first on sys.path (demo.py
                # imports its sibling predictor.py).
                sys.path.insert(0, os.path.dirname(os.path.abspath(tool)))
                runpy.run_path(tool, run_name="__main__")
            else:
                runpy.run_module(tool, run_name="__main__", alter_sys=True)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point: ``TOOL [ARGS ...]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if not argv:
            raise SystemExit(2)
        return
    run_tool(argv[0], argv[1:])


if __name__ == "__main__":
    main()
