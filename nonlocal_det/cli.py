"""Pieces shared by the project's command-line tools (``predict``, ``visualize``)."""

import argparse
import os
from typing import List, Sequence

from .config import get_nonlocal_cfg
from .data.builtin import register_datasets_for_config

__all__ = ["tool_parser", "tool_cfg", "existing_files"]


def tool_parser(doc: str, input_help: str) -> argparse.ArgumentParser:
    """A parser with ``--config-file`` and either ``--input`` files or a registered ``--dataset``.

    Add the tool's own options, then ``opts`` last (see :func:`tool_cfg`).
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help=input_help)
    src.add_argument("--dataset", help="a registered dataset, e.g. nl_synthetic_val")
    return p


def tool_cfg(args: argparse.Namespace):
    """The frozen config of ``--config-file`` + ``opts``; with ``--dataset``, that dataset is
    ``DATASETS.TEST`` and is registered (the project's generated data is made if needed)."""
    cfg = get_nonlocal_cfg(args.config_file, args.opts)
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
