"""Datasets: the generated demo data, the context probe's relational data, your own COCO files,
and their checks."""

from .coco import TEST_NAME, TRAIN_NAME, configure_coco_json_datasets, register_coco_dataset
from .coco_check import DatasetError, check_coco_images, check_coco_json
from .datasets import (
    EVAL_ONLY_KEYS,
    check_datasets,
    register_datasets_for_config,
    synthetic_dataset,
)
from .relational import (
    RelationSpec,
    generate_relation_coco,
    register_relation_coco,
    relation_dataset_root,
)
from .synthetic import default_dataset_root, generate_synthetic_coco, register_synthetic_coco

__all__ = [
    "EVAL_ONLY_KEYS",
    "DatasetError",
    "RelationSpec",
    "TEST_NAME",
    "TRAIN_NAME",
    "check_coco_images",
    "check_coco_json",
    "check_datasets",
    "configure_coco_json_datasets",
    "default_dataset_root",
    "generate_relation_coco",
    "generate_synthetic_coco",
    "register_coco_dataset",
    "register_datasets_for_config",
    "register_relation_coco",
    "register_synthetic_coco",
    "relation_dataset_root",
    "synthetic_dataset",
]
