"""Checks run before any training work: a wrong config value or a dataset that does not match
the config is reported with the key, the bad value and what is allowed, instead of a traceback
from inside Detectron2 or torch minutes later.

:func:`check_config` needs no data (``MODEL.NONLOCAL``, the backbone's stages, the keypoint
head); :func:`check_datasets` compares the registered datasets with the config (registered,
files present, class and keypoint counts). ``train_net.py`` calls both in ``setup``.
"""

import logging
import os
from typing import List

from .config import nonlocal_block_kwargs
from .modeling.backbone import _stage_lengths, resolve_placement

__all__ = ["check_config", "check_datasets", "NONLOCAL_BACKBONES"]

logger = logging.getLogger(__name__)

NONLOCAL_BACKBONES = ("build_resnet_nonlocal_backbone", "build_resnet_nonlocal_fpn_backbone")
_STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}


def _built_stages(cfg) -> List[str]:
    """The ResNet stages Detectron2 builds: up to the deepest of ``MODEL.RESNETS.OUT_FEATURES``."""
    out = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    allowed = ["stem"] + list(_STAGE_INDEX)
    bad = [f for f in out if f not in allowed]
    if bad or not out:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={out} is not supported; allowed: a non-empty list of "
            f"{allowed}"
        )
    deepest = max([_STAGE_INDEX[f] for f in out if f != "stem"] or [1])
    return [s for s, i in _STAGE_INDEX.items() if i <= deepest]


def _check_resnet(cfg) -> List[str]:
    """Detectron2's own ResNet constraints (asserts there), as errors; returns the built stages."""
    depth = cfg.MODEL.RESNETS.DEPTH
    _stage_lengths(depth)  # raises for an unsupported depth
    if depth in (18, 34):
        for key, need in (("RES2_OUT_CHANNELS", 64), ("RES5_DILATION", 1)):
            if cfg.MODEL.RESNETS.get(key) != need:
                raise ValueError(
                    f"MODEL.RESNETS.{key}={cfg.MODEL.RESNETS.get(key)!r} is not supported with "
                    f"MODEL.RESNETS.DEPTH={depth} (basic blocks); allowed: {need}"
                )
    built = _built_stages(cfg)
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_nonlocal_fpn_backbone":
        outs = list(cfg.MODEL.RESNETS.OUT_FEATURES)
        missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in outs]
        if missing:
            raise ValueError(
                f"MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} uses {missing}, which "
                f"the ResNet does not output (MODEL.RESNETS.OUT_FEATURES={outs}); allowed: "
                f"features of {outs}"
            )
    return built


def check_config(cfg) -> None:
    """Check the config's non-local keys against the model they configure.

    Checked: every ``MODEL.NONLOCAL`` value; with a non-local backbone (``MODEL.BACKBONE.NAME``
    in :data:`NONLOCAL_BACKBONES`) the ResNet depth, the placement (index inside its stage, a
    stage the backbone builds given ``MODEL.RESNETS.OUT_FEATURES``) and ``MODEL.FPN.IN_FEATURES``;
    with ``NonLocalKRCNNHead`` the ``KEYPOINT_HEAD_BLOCKS`` indices.

    Args:
        cfg: a config with :func:`nonlocal_det.add_nonlocal_config` applied.

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    if "NONLOCAL" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) before "
            "merge_from_file"
        )
    nl = cfg.MODEL.NONLOCAL
    nonlocal_block_kwargs(nl, 1)
    if cfg.MODEL.BACKBONE.NAME in NONLOCAL_BACKBONES:
        built = _check_resnet(cfg)
        resolve_placement(nl, _stage_lengths(cfg.MODEL.RESNETS.DEPTH), built)
    head = cfg.MODEL.ROI_KEYPOINT_HEAD
    if cfg.MODEL.KEYPOINT_ON and head.NAME == "NonLocalKRCNNHead" and nl.ENABLED:
        n = len(head.CONV_DIMS)
        after = list(nl.KEYPOINT_HEAD_BLOCKS)
        bad = [k for k in after if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
        if bad or len(set(after)) != len(after):
            raise ValueError(
                f"MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS={after}: the keypoint head has {n} convs "
                f"(MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS); allowed: distinct integers in 1..{n}"
            )


def _where_builtin() -> str:
    root = os.environ.get("DETECTRON2_DATASETS")
    return f"$DETECTRON2_DATASETS={root}" if root else "$DETECTRON2_DATASETS is unset: ./datasets"


def check_datasets(cfg, keys=("TRAIN", "TEST")) -> None:
    """Check the datasets of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` against the config.

    Checked without loading the data: each name is registered; a local ``json_file`` /
    ``image_root`` in its metadata exists; its class count (``thing_classes``) is at most
    ``MODEL.ROI_HEADS.NUM_CLASSES``; with ``MODEL.KEYPOINT_ON`` it has ``keypoint_names``, as
    many as ``MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS``, and test sets have matching
    ``TEST.KEYPOINT_OKS_SIGMAS`` (or 17 keypoints, COCO's defaults).

    Args:
        cfg: the config; its datasets registered (``register_datasets_for_config``).
        keys: which of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` to check.

    Raises:
        ValueError / FileNotFoundError: naming the key, the dataset, the value and what is
            allowed.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

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
                    hint = (
                        f" ({_where_builtin()})" if name.startswith(("coco_", "keypoints_")) else ""
                    )
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
