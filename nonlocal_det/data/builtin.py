"""Datasets a config may name without any registration code of its own."""

from detectron2.utils import comm

from .coco_json import register_coco_json_datasets

__all__ = ["SYNTHETIC_PREFIX", "register_datasets_for_config"]

# Dataset names starting with this prefix are the project's generated demo data
# (``nl_synthetic_train`` / ``nl_synthetic_val``), made on first use in a cache directory.
SYNTHETIC_PREFIX = "nl_synthetic"


def register_datasets_for_config(cfg) -> None:
    """Generate (once, on the main process) and register the datasets ``cfg`` needs.

    COCO itself is registered by Detectron2 (``coco_2017_train`` etc., under
    ``$DETECTRON2_DATASETS``, default ``./datasets``). This adds the project's synthetic demo
    dataset when ``DATASETS.TRAIN`` / ``DATASETS.TEST`` name it, and your own COCO files given
    by ``DATASETS.TRAIN_JSON`` / ``DATASETS.TEST_JSON`` (their images are checked).

    Args:
        cfg: the training config.
    """
    register_coco_json_datasets(cfg)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not any(n.startswith(SYNTHETIC_PREFIX) for n in names):
        return
    from .synthetic import default_dataset_root, generate_synthetic_coco, register_synthetic_coco

    root = default_dataset_root()
    if comm.get_local_rank() == 0:  # one process per machine (machines may not share a disk)
        generate_synthetic_coco(root)
    comm.synchronize()
    register_synthetic_coco(root, name_prefix=SYNTHETIC_PREFIX)
