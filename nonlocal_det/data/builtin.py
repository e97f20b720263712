"""Datasets a config may name without any registration code of its own."""

from detectron2.utils import comm

from .coco_json import register_coco_json_datasets

__all__ = ["SYNTHETIC_PREFIX", "register_datasets_for_config", "synthetic_dataset"]

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
    _register_synthetic(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))


def _register_synthetic(names) -> None:
    """Generate (once per machine) and register the synthetic data if ``names`` use it."""
    if not any(n.startswith(SYNTHETIC_PREFIX) for n in names):
        return
    from .synthetic import default_dataset_root, generate_synthetic_coco, register_synthetic_coco

    root = default_dataset_root()
    if comm.get_local_rank() == 0:  # one process per machine (machines may not share a disk)
        generate_synthetic_coco(root)
    comm.synchronize()
    register_synthetic_coco(root, name_prefix=SYNTHETIC_PREFIX)


def synthetic_dataset(split: str) -> str:
    """Name of a split of the generated demo dataset, generated and registered on first use.

    For LazyConfig files, which have no training script to register their datasets: the dataset
    is made when the config is instantiated, not when it is loaded, e.g.
    ``L(get_detection_dataset_dicts)(names=L(synthetic_dataset)(split="train"))``.

    Args:
        split: ``"train"`` or ``"val"``.

    Returns:
        str: ``"nl_synthetic_train"`` or ``"nl_synthetic_val"``.
    """
    if split not in ("train", "val"):
        raise ValueError(
            f"synthetic_dataset: split={split!r} is not supported; allowed: train, val"
        )
    name = f"{SYNTHETIC_PREFIX}_{split}"
    _register_synthetic([name])
    return name
