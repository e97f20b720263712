"""Run Detectron2's own tools on the project's YAML configs: ``python -m nonlocal_det.tools.d2_tool``.

    python -m nonlocal_det.tools.d2_tool TOOL [TOOL ARGUMENTS ...]

TOOL is a Detectron2 script, as a file (``~/detectron2/tools/analyze_model.py``,
``~/detectron2/demo/demo.py``, ...) or as an importable module (``tools.visualize_data`` where
the ``tools`` folder is importable). Examples, with a Detectron2 source checkout in ~/detectron2:

    python -m nonlocal_det.tools.d2_tool ~/detectron2/tools/analyze_model.py --tasks parameter \\
        --config-file configs/mask_rcnn_R50_NL.yaml
    python -m nonlocal_det.tools.d2_tool ~/detectron2/tools/visualize_data.py --source annotation \\
        --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml --output-dir vis
    python -m nonlocal_det.tools.d2_tool ~/detectron2/demo/demo.py \\
        --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml --input image.png \\
        --output pred.png --opts MODEL.WEIGHTS output/demo/model_final.pth MODEL.DEVICE cpu

Detectron2's tools read a YAML config with a bare ``get_cfg()``, which knows neither
``MODEL.NONLOCAL`` nor the project's datasets. While TOOL runs, in this process only,
``detectron2.config.get_cfg`` returns Detectron2's defaults plus :func:`add_nonlocal_config`'s
and :func:`add_config_keys`'s keys
(``MODEL.DEVICE cpu`` without CUDA), and the datasets of its ``--config-file`` are registered; the
tool itself runs unmodified. LazyConfig ``.py`` files (configs/lazy/) import the package themselves
and need none of this.
"""

import argparse
import contextlib
import os
import runpy
import sys
from typing import Iterator, List, Optional
from unittest import mock

import detectron2.config
import detectron2.config.config

from ..config import get_nonlocal_cfg
from ..data import register_datasets_for_config
from ..engine import fall_back_to_cpu
from ._common import load_config

__all__ = ["nonlocal_get_cfg", "run_tool", "main", "parser"]


@contextlib.contextmanager
def nonlocal_get_cfg() -> Iterator[None]:
    """Inside, ``detectron2.config.get_cfg()`` includes ``MODEL.NONLOCAL`` (and ``MODEL.DEVICE cpu``
    without CUDA).

    A patch, not an override: the tools call the module function ``get_cfg`` (imported from
    ``detectron2.config``, defined in ``detectron2.config.config``), which has no hook. Both names
    are patched, and restored afterwards; ``tests/test_d2_tools.py`` fails if Detectron2 moves it.
    """
    def get_cfg():
        cfg = get_nonlocal_cfg()  # Detectron2's defaults, the keys of add_nonlocal_config and of
        fall_back_to_cpu(cfg)  # add_config_keys (a project's, e.g. the demo's)
        return cfg

    with mock.patch.object(detectron2.config, "get_cfg", get_cfg):
        with mock.patch.object(detectron2.config.config, "get_cfg", get_cfg):
            yield


def _register_config_datasets(tool_args: List[str]) -> None:
    """Register the datasets named by the tool's ``--config-file`` (YAML), as train_net.py does."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config-file", default="")
    known, _ = parser.parse_known_args(tool_args)
    if known.config_file.endswith((".yaml", ".yml")):
        register_datasets_for_config(load_config(known.config_file))


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tool", help="a Detectron2 script (path) or module (e.g. tools.analyze_model)")
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point: ``TOOL [ARGS ...]``."""
    args = parser().parse_args(argv)
    run_tool(args.tool, args.tool_args)


if __name__ == "__main__":
    main()
