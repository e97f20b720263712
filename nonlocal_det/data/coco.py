"""COCO-format files as Detectron2 datasets (:func:`register_coco_dataset`), and your own files
named by ``DATASETS.{TRAIN,TEST}_{JSON,IMAGES}`` taken into the config and registered."""

import functools
import hashlib
import json
import logging
import os
from typing import List, Tuple

from detectron2.utils import comm

from ..utils.atomic import atomic_write_bytes
from .coco_check import CocoSummary, DatasetError, check_coco_images, check_coco_json

__all__ = [
    "TRAIN_NAME",
    "TEST_NAME",
    "cache_root",
    "configure_coco_json_datasets",
    "keypoint_flip_map",
    "load_coco_dicts",
    "register_coco_dataset",
    "register_coco_json_datasets",
]

logger = logging.getLogger(__name__)

# The names DATASETS.TRAIN / DATASETS.TEST get when DATASETS.TRAIN_JSON / TEST_JSON are set.
TRAIN_NAME = "nl_coco_train"
TEST_NAME = "nl_coco_test"


def cache_root() -> str:
    """Where the package keeps files it makes: ``$NONLOCAL_DET_DATASETS``, else
    ``~/.cache/nonlocal_det/datasets``."""
    base = os.environ.get("NONLOCAL_DET_DATASETS") or "~/.cache/nonlocal_det/datasets"
    return os.path.abspath(os.path.expanduser(base))


def keypoint_flip_map(names: List[str]) -> List[Tuple[str, str]]:
    """Pairs of keypoints a horizontal flip swaps: names that differ only by left/right
    (``left_hand``/``right_hand``, ``l_eye``/``r_eye``); a name without a partner maps to itself."""
    pairs = []
    for name in names:
        for left, right in (("left", "right"), ("Left", "Right"), ("l_", "r_"), ("L_", "R_")):
            partner = name.replace(left, right, 1)
            if left in name and partner != name and partner in names:
                pairs.append((name, partner))
                break
    return pairs


def load_coco_dicts(json_file: str, image_root: str, name: str, num_keypoints: int) -> List[dict]:
    """Detectron2's ``load_coco_json``, with all-zero keypoints (v=0: ignored by the loss) on the
    annotations without any: Detectron2 needs all annotations of an image to have them or none."""
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(json_file, image_root, name)
    for record in dicts if num_keypoints else ():
        for ann in record["annotations"]:
            if not ann.get("keypoints"):
                ann["keypoints"] = [0.0] * (3 * num_keypoints)
    return dicts


def _evaluation_json(summary: CocoSummary) -> str:
    """The JSON the COCO evaluator reads: the file itself or, when some annotations lack the
    keypoints others have (pycocotools' OKS reads them on every ground truth), a copy with zeros
    there, cached by content hash."""
    if not (summary.keypoint_names and summary.missing_keypoints):
        return summary.json_file
    with open(summary.json_file, "rb") as f:
        raw = f.read()
    path = os.path.join(cache_root(), "coco_json", hashlib.sha256(raw).hexdigest()[:16] + ".json")
    if comm.get_local_rank() == 0 and not os.path.isfile(path):
        data = json.loads(raw)
        for ann in data["annotations"]:
            if not ann.get("keypoints"):
                ann["keypoints"], ann["num_keypoints"] = [0] * (3 * len(summary.keypoint_names)), 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, json.dumps(data).encode("utf-8"))
        logger.info(f"{summary.json_file}: copy with keypoints on every annotation at {path}")
    comm.synchronize()
    return path


def register_coco_dataset(name: str, summary: CocoSummary, image_root: str, **metadata) -> None:
    """Register ``name`` with Detectron2 for a checked COCO file (:func:`check_coco_json`), with
    its classes, keypoints (names, flip map, classes), files and ``metadata``. The same files
    again: nothing happens; other files replace the registration."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    json_file = summary.json_file
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("source_json"), meta.get("image_root")) == (json_file, image_root):
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    k = len(summary.keypoint_names)
    DatasetCatalog.register(name, lambda: load_coco_dicts(json_file, image_root, name, k))
    meta = MetadataCatalog.get(name)
    meta.set(
        thing_classes=summary.thing_classes,
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(summary.categories)},
        json_file=_evaluation_json(summary),
        source_json=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )
    if k:
        names, classes = list(summary.keypoint_names), list(summary.keypoint_classes)
        meta.set(keypoint_names=names, keypoint_flip_map=keypoint_flip_map(names))
        meta.set(keypoint_classes=classes)
    meta.set(**metadata)
    logger.info(
        f"Registered {name}: {json_file} ({summary.num_images} images, "
        f"{summary.num_annotations} annotations, {summary.num_empty_images} images without "
        f"annotations, classes {summary.thing_classes}"
        + (f", keypoints {summary.keypoint_names}" if k else "")
        + f"), images in {image_root}"
    )


def _json_splits(cfg, keys=("TRAIN", "TEST")) -> List[Tuple[str, str, str, str]]:
    """(split, registered name, json, image folder) of every split of ``keys`` whose JSON key is
    set."""
    out = []
    for split, name in (("TRAIN", TRAIN_NAME), ("TEST", TEST_NAME)):
        if split not in keys:
            continue
        json_file = cfg.DATASETS.get(f"{split}_JSON", "")
        images = cfg.DATASETS.get(f"{split}_IMAGES", "")
        if bool(json_file) != bool(images):
            given, empty = ("JSON", "IMAGES") if json_file else ("IMAGES", "JSON")
            raise ValueError(
                f"DATASETS.{split}_{given}={json_file or images!r} is set but "
                f"DATASETS.{split}_{empty} is empty; allowed: both (the COCO JSON file and the "
                "folder of its images) or neither"
            )
        if json_file:
            out.append((split, name, os.path.abspath(json_file), os.path.abspath(images)))
    return out


@functools.lru_cache(maxsize=None)
def _check_version(json_file: str, label: str, version: tuple) -> CocoSummary:
    return check_coco_json(json_file, label)


def _check_json(json_file: str, label: str) -> CocoSummary:
    """:func:`check_coco_json`, once per file version in a process."""
    st = os.stat(json_file) if os.path.isfile(json_file) else None
    return _check_version(json_file, label, (st.st_mtime, st.st_size) if st else ())


def configure_coco_json_datasets(cfg, keys=("TRAIN", "TEST")) -> None:
    """Check the files of ``DATASETS.*_JSON`` and adapt the unfrozen ``cfg`` to them: ``DATASETS.
    TRAIN`` / ``TEST``, ``MODEL.ROI_HEADS.NUM_CLASSES``, ``MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS``
    and ``INPUT.MASK_FORMAT`` (``bitmask`` for RLE masks). Nothing when no key is set.

    Args:
        keys: the splits whose files are read; ``("TEST",)`` for an evaluation, which needs no
            training files (``DATASETS.TRAIN_JSON`` / ``TRAIN_IMAGES`` are then not read).

    Raises:
        FileNotFoundError, DatasetError: a file is missing or not usable COCO (naming the entry).
        ValueError: a key without its partner, train and test categories differ, or the model
            needs what the file lacks (masks, keypoints).
    """
    splits = _json_splits(cfg, keys)
    if cfg.DATASETS.get("TRAIN_JSON", "") and not cfg.DATASETS.get("TEST_JSON", ""):
        logger.info("DATASETS.TEST_JSON is not set: no evaluation (DATASETS.TEST is empty)")
        cfg.DATASETS.TEST = ()
    if not splits:
        return
    summaries = {s: _check_json(j, f"DATASETS.{s}_JSON") for s, _, j, _ in splits}
    first = next(iter(summaries.values()))
    if any(s.categories != first.categories for s in summaries.values()):
        raise ValueError(
            f"DATASETS.TRAIN_JSON and DATASETS.TEST_JSON have different categories: "
            f"{summaries['TRAIN'].categories} vs {summaries['TEST'].categories}; allowed: "
            "the same ids and names in both files"
        )
    for split, name, _, _ in splits:
        setattr(cfg.DATASETS, split, (name,))
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(first.categories):
        logger.info(
            f"MODEL.ROI_HEADS.NUM_CLASSES: {cfg.MODEL.ROI_HEADS.NUM_CLASSES} -> "
            f"{len(first.categories)} (the categories of {first.json_file}: {first.thing_classes})"
        )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(first.categories)
    for split, summary in summaries.items():
        where = f"DATASETS.{split}_JSON={summary.json_file}"
        if cfg.MODEL.MASK_ON and summary.missing_segmentation:
            raise ValueError(
                f"MODEL.MASK_ON=True, but {summary.missing_segmentation} non-crowd annotations of "
                f"{where} have no usable 'segmentation'; allowed: polygons or RLE on every "
                "non-crowd annotation, or MODEL.MASK_ON False"
            )
        if cfg.MODEL.MASK_ON and summary.has_rle and cfg.INPUT.MASK_FORMAT == "polygon":
            logger.info(f"{summary.json_file} has RLE masks: INPUT.MASK_FORMAT polygon -> bitmask")
            cfg.INPUT.MASK_FORMAT = "bitmask"
        if cfg.MODEL.KEYPOINT_ON and not summary.keypoint_names:
            raise ValueError(
                f"MODEL.KEYPOINT_ON=True, but no category of {where} lists 'keypoints' names; "
                "allowed: a category with 'keypoints': [names] and annotations with 'keypoints', "
                "or MODEL.KEYPOINT_ON False"
            )
    if cfg.MODEL.KEYPOINT_ON:
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(first.keypoint_names)


def register_coco_json_datasets(cfg, keys=("TRAIN", "TEST")) -> List[str]:
    """Check the images of the ``DATASETS.*_JSON`` files of the splits ``keys`` (first process of
    each machine; every process stops on a problem) and register them.

    Returns:
        The registered names (empty when no key is set).

    Raises:
        FileNotFoundError: an image folder does not exist.
        DatasetError: an image is missing, unreadable or not of the size the JSON says.
    """
    names = []
    for split, name, json_file, image_root in _json_splits(cfg, keys):
        summary = _check_json(json_file, f"DATASETS.{split}_JSON")
        error = None
        if comm.get_local_rank() == 0:
            try:
                check_coco_images(summary.images, image_root, json_file, f"DATASETS.{split}_IMAGES")
            except (DatasetError, FileNotFoundError) as e:
                error = e
        if comm.get_world_size() > 1:
            errors = [e for e in comm.all_gather(str(error) if error else "") if e]
            if errors and error is None:
                raise DatasetError(errors[0])
        if error is not None:
            raise error
        register_coco_dataset(name, summary, image_root)
        names.append(name)
    return names
