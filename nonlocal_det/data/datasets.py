"""The datasets a config names, registered and checked: Detectron2's own (COCO), your own COCO
files (``DATASETS.*_JSON``) and those of the registrars a project adds (:func:`add_dataset_registrar`)."""

import logging
import os
from typing import Callable, List, Sequence

from .coco import register_coco_json_datasets

__all__ = ["EVAL_ONLY_KEYS", "add_dataset_registrar", "check_datasets", "register_datasets_for_config"]

logger = logging.getLogger(__name__)

# The dataset keys an evaluation (``--eval-only``) needs: no training data.
EVAL_ONLY_KEYS = ("TEST",)
_REGISTRARS: List[Callable[[Sequence[str]], None]] = []


def add_dataset_registrar(registrar: Callable[[Sequence[str]], None]) -> None:
    """Make :func:`register_datasets_for_config` (the trainer and the commands) call
    ``registrar(names)`` with the dataset names of a config, for a project whose datasets are
    made or registered on demand (e.g. generated on first use). Added once."""
    if registrar not in _REGISTRARS:
        _REGISTRARS.append(registrar)


def register_datasets_for_config(cfg, keys=("TRAIN", "TEST")) -> None:
    """Register the datasets ``cfg`` needs beyond Detectron2's own: the ``DATASETS.*_JSON`` files
    (images checked), then those of the added registrars. ``keys``: the splits needed
    (:data:`EVAL_ONLY_KEYS` for an evaluation)."""
    register_coco_json_datasets(cfg, keys)
    names = [name for key in keys for name in cfg.DATASETS.get(key)]
    for registrar in _REGISTRARS:
        registrar(names)


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
                examples = [n for n in ("coco_2017_train", "coco_2017_val") if n in registered]
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
