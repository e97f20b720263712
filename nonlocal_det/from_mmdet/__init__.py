"""mmdetection checkpoints as this project's Detectron2 models: the key map, the architecture in
the weights (:func:`read_layout`) and the config values that compute what mmdetection computed
(:func:`mmdet_settings`). The command is ``python -m nonlocal_det.tools.convert_mmdet``."""

from .convert import convert_checkpoint
from .keys import UnsupportedCheckpoint, read_layout
from .settings import config_mismatches, mmdet_settings

__all__ = [
    "UnsupportedCheckpoint",
    "config_mismatches",
    "convert_checkpoint",
    "mmdet_settings",
    "read_layout",
]
