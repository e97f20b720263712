"""Datasets: your own COCO files (``DATASETS.*_JSON``) and the checks of a config's datasets."""

from .coco import TEST_NAME, TRAIN_NAME, configure_coco_json_datasets, register_coco_dataset
from .coco_check import DatasetError, check_coco_images, check_coco_json
from .datasets import (
    EVAL_ONLY_KEYS,
    add_dataset_registrar,
    check_datasets,
    register_datasets_for_config,
)

__all__ = [
    "EVAL_ONLY_KEYS",
    "DatasetError",
    "TEST_NAME",
    "TRAIN_NAME",
    "add_dataset_registrar",
    "check_coco_images",
    "check_coco_json",
    "check_datasets",
    "configure_coco_json_datasets",
    "register_coco_dataset",
    "register_datasets_for_config",
]
