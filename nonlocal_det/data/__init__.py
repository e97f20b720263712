"""Datasets of the project: the deterministic synthetic COCO-format demo dataset.

The names below live in :mod:`nonlocal_det.data.synthetic`; they are imported lazily (PEP 562) so
that ``python -m nonlocal_det.data.synthetic`` does not import its own module twice and importing
this package stays cheap.
"""

import importlib
from typing import Any

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_NAME_PREFIX",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DATASET_VERSION",
    "SYNTHETIC_KEYPOINT_CATEGORY",
    "SYNTHETIC_KEYPOINT_CONNECTION_RULES",
    "SYNTHETIC_KEYPOINT_FLIP_MAP",
    "SYNTHETIC_KEYPOINT_NAMES",
    "SYNTHETIC_KEYPOINT_OKS_SIGMAS",
    "SYNTHETIC_THING_CLASSES",
    "default_dataset_root",
    "generate_synthetic_coco",
    "is_synthetic_coco_complete",
    "load_synthetic_coco_json",
    "prepare_synthetic_coco",
    "register_synthetic_coco",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(".synthetic", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
