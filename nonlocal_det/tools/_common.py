"""What the commands share: loading a config as ``train_net.py`` does, and the input options."""

import argparse
import os
from typing import List, Sequence

from ..config import get_nonlocal_cfg
from ..data import configure_coco_json_datasets, register_datasets_for_config
from ..engine import fall_back_to_cpu

__all__ = ["load_config", "tool_parser", "tool_cfg", "existing_files"]


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
    src.add_argument("--dataset", help="a registered dataset, e.g. nl_synthetic_val")
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
