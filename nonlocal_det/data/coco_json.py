"""Your own COCO-format dataset from config keys, without Python.

``DATASETS.TRAIN_JSON`` + ``DATASETS.TRAIN_IMAGES`` (and ``DATASETS.TEST_JSON`` +
``DATASETS.TEST_IMAGES``) name a COCO instances file and its image folder. Then:

* :func:`configure_coco_json_datasets` (on the unfrozen config) checks the files
  (:mod:`.coco_check`), points ``DATASETS.TRAIN`` / ``DATASETS.TEST`` at the names
  :data:`TRAIN_NAME` / :data:`TEST_NAME` and takes from the file the class count
  (``MODEL.ROI_HEADS.NUM_CLASSES``), the keypoint count (``MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS``)
  and the mask format (``INPUT.MASK_FORMAT`` "bitmask" when there are RLE masks);
* :func:`register_coco_json_datasets` registers those names with Detectron2 (dataset dicts from
  Detectron2's ``load_coco_json``; metadata with the classes, keypoint names and a left/right flip
  map derived from the names) and checks the image files.
"""

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

from detectron2.utils import comm

from ..utils.atomic import atomic_write_bytes
from .coco_check import CocoSummary, DatasetError, check_coco_images, check_coco_json

__all__ = [
    "TRAIN_NAME",
    "TEST_NAME",
    "configure_coco_json_datasets",
    "register_coco_json_datasets",
    "load_coco_json_dataset",
    "keypoint_flip_map",
]

logger = logging.getLogger(__name__)

# The names DATASETS.TRAIN / DATASETS.TEST get when DATASETS.TRAIN_JSON / TEST_JSON are set.
TRAIN_NAME = "nl_coco_train"
TEST_NAME = "nl_coco_test"
_SPLITS = (("TRAIN", TRAIN_NAME), ("TEST", TEST_NAME))
_summaries: Dict[Tuple[str, float, int], CocoSummary] = {}


def _summary(json_file: str, label: str) -> CocoSummary:
    """:func:`check_coco_json`, once per file version in a process."""
    st = os.stat(json_file) if os.path.isfile(json_file) else None
    key = (os.path.realpath(json_file), st.st_mtime if st else 0.0, st.st_size if st else -1)
    if key not in _summaries:
        _summaries[key] = check_coco_json(json_file, label)
    return _summaries[key]


def _splits(cfg) -> List[Tuple[str, str, str, str]]:
    """(split, registered name, json, image folder) of every split whose JSON key is set."""
    out = []
    for split, name in _SPLITS:
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


def keypoint_flip_map(names: List[str]) -> List[Tuple[str, str]]:
    """Pairs of keypoints swapped by a horizontal flip: names that differ only by left/right.

    ``left_hand``/``right_hand``, ``l_eye``/``r_eye`` and ``hand_left``/``hand_right`` pair up;
    a name without a partner maps to itself (e.g. ``nose``).
    """
    pairs = []
    present = set(names)
    for name in names:
        for left, right in (("left", "right"), ("Left", "Right"), ("l_", "r_"), ("L_", "R_")):
            if left in name:
                partner = name.replace(left, right, 1)
                if partner in present and partner != name:
                    pairs.append((name, partner))
                    break
    return pairs


def configure_coco_json_datasets(cfg) -> None:
    """Check the files named by ``DATASETS.*_JSON`` and adapt the (unfrozen) config to them.

    Does nothing when no ``DATASETS.*_JSON`` key is set.

    Args:
        cfg: the config (unfrozen), with :func:`nonlocal_det.add_nonlocal_config` applied.

    Raises:
        FileNotFoundError: a JSON file does not exist.
        DatasetError: a file is not JSON or not COCO-shaped (naming the entry and field).
        ValueError: a key is set without its partner, the train and test files have different
            categories, or the model needs something the file lacks (masks, keypoints).
    """
    splits = _splits(cfg)
    if not splits:
        return
    summaries = {s: _summary(j, f"DATASETS.{s}_JSON") for s, _, j, _ in splits}
    first = next(iter(summaries.values()))
    for split, summary in summaries.items():
        if summary.categories != first.categories:
            raise ValueError(
                f"DATASETS.TRAIN_JSON and DATASETS.TEST_JSON have different categories: "
                f"{summaries['TRAIN'].categories} vs {summaries['TEST'].categories}; allowed: "
                "the same ids and names in both files"
            )
    for split, name, _, _ in splits:
        setattr(cfg.DATASETS, split, (name,))
    if "TEST" not in summaries:
        logger.info("DATASETS.TEST_JSON is not set: no evaluation (DATASETS.TEST is empty)")
        cfg.DATASETS.TEST = ()
    num_classes = len(first.categories)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != num_classes:
        logger.info(
            f"MODEL.ROI_HEADS.NUM_CLASSES: {cfg.MODEL.ROI_HEADS.NUM_CLASSES} -> {num_classes} "
            f"(the categories of {first.json_file}: {first.thing_classes})"
        )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes

    for split, summary in summaries.items():
        if cfg.MODEL.MASK_ON and summary.missing_segmentation:
            raise ValueError(
                f"MODEL.MASK_ON=True, but {summary.missing_segmentation} non-crowd annotations of "
                f"DATASETS.{split}_JSON={summary.json_file} have no usable 'segmentation'; "
                "allowed: polygons or RLE on every non-crowd annotation, or MODEL.MASK_ON False"
            )
        if cfg.MODEL.MASK_ON and summary.has_rle and cfg.INPUT.MASK_FORMAT == "polygon":
            logger.info(f"{summary.json_file} has RLE masks: INPUT.MASK_FORMAT polygon -> bitmask")
            cfg.INPUT.MASK_FORMAT = "bitmask"
        if cfg.MODEL.KEYPOINT_ON and not summary.keypoint_names:
            raise ValueError(
                f"MODEL.KEYPOINT_ON=True, but no category of DATASETS.{split}_JSON="
                f"{summary.json_file} lists 'keypoints' names; allowed: a category with "
                "'keypoints': [names] and annotations with 'keypoints', or MODEL.KEYPOINT_ON False"
            )
    if cfg.MODEL.KEYPOINT_ON:
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(first.keypoint_names)


def load_coco_json_dataset(
    json_file: str, image_root: str, dataset_name: str, num_keypoints: int
) -> List[dict]:
    """Detectron2's ``load_coco_json``, with all-zero keypoints (v=0, ignored by the loss) on
    annotations without keypoints when the file has keypoint names: Detectron2 needs every
    annotation of an image to have keypoints or none to."""
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(json_file, image_root, dataset_name)
    if num_keypoints:
        for record in dicts:
            for ann in record["annotations"]:
                if not ann.get("keypoints"):
                    ann["keypoints"] = [0.0] * (3 * num_keypoints)
    return dicts


def _cache_dir() -> str:
    base = os.environ.get("NONLOCAL_DET_DATASETS") or os.path.join(
        "~", ".cache", "nonlocal_det", "datasets"
    )
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "coco_json")


def _evaluation_json(summary: CocoSummary) -> str:
    """The JSON the COCO evaluator reads: the file itself, or (when some annotations lack the
    keypoints the others have) a copy with all-zero keypoints on those, cached by content hash.
    pycocotools' keypoint OKS reads ``keypoints`` of every ground truth."""
    if not (summary.keypoint_names and summary.missing_keypoints):
        return summary.json_file
    with open(summary.json_file, "rb") as f:
        raw = f.read()
    path = os.path.join(_cache_dir(), hashlib.sha256(raw).hexdigest()[:16] + ".json")
    if comm.get_local_rank() == 0 and not os.path.isfile(path):
        data = json.loads(raw)
        zeros = [0] * (3 * len(summary.keypoint_names))
        for ann in data["annotations"]:
            if not ann.get("keypoints"):
                ann["keypoints"], ann["num_keypoints"] = list(zeros), 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, json.dumps(data).encode("utf-8"))
        logger.info(f"{summary.json_file}: copy with keypoints on every annotation at {path}")
    comm.synchronize()
    return path


def register_coco_json_datasets(cfg) -> Optional[List[str]]:
    """Register :data:`TRAIN_NAME` / :data:`TEST_NAME` for the config's ``DATASETS.*_JSON`` files
    and check their images (on the first process of each machine).

    Registering the same files again does nothing; other files replace the registration.

    Args:
        cfg: the config, after :func:`configure_coco_json_datasets`.

    Returns:
        list[str]: the registered names (empty when no key is set).

    Raises:
        FileNotFoundError: an image folder does not exist.
        DatasetError: an image is missing, unreadable or not of the size the JSON says.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []
    for split, name, json_file, image_root in _splits(cfg):
        summary = _summary(json_file, f"DATASETS.{split}_JSON")
        error = None
        if comm.get_local_rank() == 0:
            try:
                check_coco_images(summary.images, image_root, json_file, f"DATASETS.{split}_IMAGES")
            except (DatasetError, FileNotFoundError) as e:
                error = e
        if comm.get_world_size() > 1:  # every process stops, not only the one that checked
            errors = [e for e in comm.all_gather(str(error) if error else "") if e]
            if errors and error is None:
                raise DatasetError(errors[0])
        if error is not None:
            raise error
        names.append(name)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("source_json"), meta.get("image_root")) == (json_file, image_root):
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        k = len(summary.keypoint_names)
        DatasetCatalog.register(
            name, lambda j=json_file, r=image_root, n=name, k=k: load_coco_json_dataset(j, r, n, k)
        )
        MetadataCatalog.get(name).set(
            thing_classes=summary.thing_classes,
            thing_dataset_id_to_contiguous_id={
                c["id"]: i for i, c in enumerate(summary.categories)
            },
            json_file=_evaluation_json(summary),
            source_json=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
        if k:
            MetadataCatalog.get(name).set(
                keypoint_names=list(summary.keypoint_names),
                keypoint_flip_map=keypoint_flip_map(summary.keypoint_names),
            )
        logger.info(
            f"Registered {name}: {json_file} ({summary.num_images} images, "
            f"{summary.num_annotations} annotations, {summary.num_empty_images} images without "
            f"annotations, classes {summary.thing_classes}"
            + (f", keypoints {summary.keypoint_names}" if k else "")
            + f"), images in {image_root}"
        )
    return names
