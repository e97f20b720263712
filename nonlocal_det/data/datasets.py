"""The datasets a config names, registered and checked: Detectron2's own (COCO), the generated
demo data (``nl_synthetic_train`` / ``nl_synthetic_val``) and the context probe's (``nl_twin_*``,
``nl_match_*``), made on first use, and your own COCO files (``DATASETS.*_JSON``)."""

import logging
import os

from detectron2.utils import comm

from .coco import register_coco_json_datasets
from .relational import (
    RELATION_TASKS,
    generate_relation_coco,
    register_relation_coco,
    relation_dataset_root,
)
from .synthetic import (
    SPLITS,
    default_dataset_root,
    generate_synthetic_coco,
    register_synthetic_coco,
)

__all__ = [
    "EVAL_ONLY_KEYS",
    "SYNTHETIC_PREFIX",
    "RELATION_PREFIXES",
    "check_datasets",
    "register_datasets_for_config",
    "synthetic_dataset",
]

logger = logging.getLogger(__name__)

# The dataset keys an evaluation (``--eval-only``) needs: no training data.
EVAL_ONLY_KEYS = ("TEST",)
# Dataset names starting with this prefix are the generated demo data.
SYNTHETIC_PREFIX = "nl_synthetic"
# ... and these the context probe's data (nonlocal_det.data.relational, its defaults), by task.
RELATION_PREFIXES = {f"nl_{task}": task for task in RELATION_TASKS}


def _register_synthetic(names) -> None:
    """Generate (once per machine: machines may not share a disk) and register the demo data
    if ``names`` use it."""
    if not any(n.startswith(SYNTHETIC_PREFIX) for n in names):
        return
    root = default_dataset_root()
    if comm.get_local_rank() == 0 and generate_synthetic_coco(root):
        logger.info(f"Generated the demo dataset in {root}")
    comm.synchronize()
    register_synthetic_coco(root, name_prefix=SYNTHETIC_PREFIX)


def _register_relational(names) -> None:
    """Generate (once per machine) and register the context-probe data that ``names`` use."""
    for prefix, task in RELATION_PREFIXES.items():
        if not any(n in (f"{prefix}_train", f"{prefix}_val") for n in names):
            continue
        root = relation_dataset_root(task)
        if comm.get_local_rank() == 0 and generate_relation_coco(root, task):
            logger.info(f"Generated the {task} dataset in {root}")
        comm.synchronize()
        register_relation_coco(root, name_prefix=prefix)


def register_datasets_for_config(cfg, keys=("TRAIN", "TEST")) -> None:
    """Register the datasets ``cfg`` needs beyond Detectron2's own: generated data when
    ``DATASETS.TRAIN`` / ``TEST`` name it, and the ``DATASETS.*_JSON`` files (images checked).
    ``keys``: the splits needed (:data:`EVAL_ONLY_KEYS` for an evaluation)."""
    register_coco_json_datasets(cfg, keys)
    names = [name for key in keys for name in cfg.DATASETS.get(key)]
    _register_synthetic(names)
    _register_relational(names)


def synthetic_dataset(split: str) -> str:
    """The name of a split of the demo data, generated and registered now; for LazyConfig files,
    which have no training script to register their datasets:
    ``L(get_detection_dataset_dicts)(names=L(synthetic_dataset)(split="train"))``."""
    if split not in SPLITS:
        raise ValueError(
            f"synthetic_dataset: split={split!r} is not supported; allowed: {list(SPLITS)}"
        )
    name = f"{SYNTHETIC_PREFIX}_{split}"
    _register_synthetic([name])
    return name


def _where_builtin() -> str:
    root = os.environ.get("DETECTRON2_DATASETS")
    return f"$DETECTRON2_DATASETS={root}" if root else "$DETECTRON2_DATASETS is unset: ./datasets"


def check_datasets(cfg, keys=("TRAIN", "TEST")) -> None:
    """Check the datasets of ``DATASETS.TRAIN`` / ``TEST`` (those of ``keys``) against the config,
    without loading them: registered; their ``json_file`` / ``image_root`` exist; at most
    ``MODEL.ROI_HEADS.NUM_CLASSES`` classes; with ``MODEL.KEYPOINT_ON``, ``keypoint_names`` as many
    as ``MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS``, a flip map for training and matching
    ``TEST.KEYPOINT_OKS_SIGMAS`` for testing. With :data:`EVAL_ONLY_KEYS` (an evaluation, which
    reads no training data) ``DATASETS.TEST`` must name at least one dataset.

    Raises:
        ValueError / FileNotFoundError: naming the key, the dataset, the value and what is allowed.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if "TRAIN" not in keys and not cfg.DATASETS.TEST:
        why = ""
        if cfg.DATASETS.get("TRAIN_JSON", ""):
            why = " (DATASETS.TRAIN_JSON is set and DATASETS.TEST_JSON is not)"
        raise ValueError(
            f"DATASETS.TEST is empty{why}: an evaluation (--eval-only) has nothing to evaluate; "
            "allowed: registered dataset names (e.g. DATASETS.TEST \"('coco_2017_val',)\"), or "
            "your own COCO file via DATASETS.TEST_JSON and DATASETS.TEST_IMAGES"
        )
    registered = DatasetCatalog.list()
    for key in keys:
        for name in cfg.DATASETS.get(key):
            where = f"DATASETS.{key}: dataset {name!r}"
            if name not in registered:
                examples = [n for n in ("coco_2017_train", "nl_synthetic_train") if n in registered]
                raise ValueError(
                    f"{where} is not registered; allowed: a registered name (e.g. {examples}; "
                    f"{len(registered)} are registered), or your own COCO file via "
                    f"DATASETS.{key}_JSON and DATASETS.{key}_IMAGES"
                )
            meta = MetadataCatalog.get(name)
            for attr, exists in (("json_file", os.path.isfile), ("image_root", os.path.isdir)):
                path = meta.get(attr)
                if path and "://" not in str(path) and not exists(path):
                    builtin = name.startswith(("coco_", "keypoints_"))
                    hint = f" ({_where_builtin()})" if builtin else ""
                    raise FileNotFoundError(f"{where}: its {attr} {path} does not exist{hint}")
            classes = meta.get("thing_classes")
            num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
            if classes is not None and len(classes) > num_classes:
                raise ValueError(
                    f"{where} has {len(classes)} categories {list(classes)[:10]}, so category ids "
                    f"up to {len(classes) - 1} (contiguous), but MODEL.ROI_HEADS.NUM_CLASSES="
                    f"{num_classes}; allowed: NUM_CLASSES >= {len(classes)}"
                )
            if classes is not None and len(classes) < num_classes:
                logger.warning(
                    f"{where} has {len(classes)} categories, MODEL.ROI_HEADS.NUM_CLASSES="
                    f"{num_classes}: the extra classes are never trained"
                )
            if cfg.MODEL.KEYPOINT_ON:
                _check_keypoints(cfg, key, where, meta)


def _check_keypoints(cfg, key: str, where: str, meta) -> None:
    names = meta.get("keypoint_names")
    k = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    if not names:
        raise ValueError(
            f"MODEL.KEYPOINT_ON=True, but {where} has no keypoint_names in its metadata (not a "
            "keypoint dataset); allowed: a keypoint dataset, or MODEL.KEYPOINT_ON False"
        )
    if len(names) != k:
        raise ValueError(
            f"{where} has {len(names)} keypoints {list(names)}, but "
            f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS={k}; allowed: {len(names)}"
        )
    if key == "TRAIN" and meta.get("keypoint_flip_map") is None:
        raise ValueError(
            f"{where} has no keypoint_flip_map in its metadata (needed to flip keypoints in "
            "training); allowed: a list of (left, right) name pairs, possibly empty"
        )
    sigmas = list(cfg.TEST.KEYPOINT_OKS_SIGMAS)
    if key == "TEST" and (len(sigmas) != len(names) if sigmas else len(names) != 17):
        raise ValueError(
            f"TEST.KEYPOINT_OKS_SIGMAS={sigmas} for {where}, which has {len(names)} keypoints "
            f"{list(names)}; allowed: {len(names)} values (the OKS sigma of each keypoint, e.g. "
            f"{[0.08] * len(names)}), or empty for COCO's 17 person keypoints"
        )
