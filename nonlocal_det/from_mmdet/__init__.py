"""mmdetection checkpoints as this project's Detectron2 models: the key map
(:func:`convert_state_dict`), the architecture in the weights (:func:`read_layout`) and the
Detectron2 config values that compute what mmdetection computed (:func:`mmdet_settings`).
The command is ``python -m nonlocal_det.tools.convert_mmdet``."""

from .keys import (
    PLUGIN_TYPES,
    Layout,
    UnsupportedCheckpoint,
    convert_state_dict,
    model_mismatches,
    read_layout,
)
from .settings import CHECKED_BY_KEYS, config_mismatches, mmdet_settings
from .convert import convert_checkpoint  # noqa: E402  (after what it uses)

__all__ = [
    "CHECKED_BY_KEYS",
    "Layout",
    "PLUGIN_TYPES",
    "UnsupportedCheckpoint",
    "config_mismatches",
    "convert_checkpoint",
    "convert_state_dict",
    "mmdet_settings",
    "model_mismatches",
    "read_layout",
]
