"""The generated COCO-format dataset of the CPU demo: small, deterministic, made on first use.

Each 192x192 image shows a smooth random background and 2-4 objects of 48-100 px, later ones
occluding earlier ones: ``circle``, ``square`` and ``triangle`` (rotated), and ``star_person``, an
upright (+-30 deg) five-pointed star whose tips end in contrasting blobs, its K=5 keypoints
``head, left_hand, right_hand, left_foot, right_foot`` ("left" = image-left when upright, so a
horizontal flip swaps them, as for COCO persons). Every image has a star_person.

Annotations are plain COCO: ``bbox`` and ``area`` of the visible mask, polygons that decode back to
exactly that mask, keypoints ``[x, y, v] * K`` (v=2 visible, v=1 covered by a later object, v=0
outside the image). The plain shapes carry all-zero keypoints: pycocotools' OKS and Detectron2 read
``keypoints`` on every annotation of a keypoint dataset. One ``numpy`` generator per image, seeded
from ``(seed, split, index)``: the same parameters give byte-identical files.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from nonlocal_det.data.coco import cache_root, register_coco_dataset
from nonlocal_det.data.coco_check import check_coco_json
from .shapes import PAD, background, has_hole, mask_to_polygons, pick_colour, rasterize, shape_parts

__all__ = [
    "SYNTHETIC_DATASET_VERSION",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_THING_CLASSES",
    "SYNTHETIC_KEYPOINT_CATEGORY",
    "SYNTHETIC_KEYPOINT_NAMES",
    "SYNTHETIC_KEYPOINT_FLIP_MAP",
    "SYNTHETIC_KEYPOINT_CONNECTION_RULES",
    "SYNTHETIC_KEYPOINT_OKS_SIGMAS",
    "SPLITS",
    "default_dataset_root",
    "check_generator_args",
    "generate_synthetic_coco",
    "register_generated_coco",
    "register_synthetic_coco",
    "write_generated_coco",
]

# Part of the cache folder's name: bump it when the generated content changes.
SYNTHETIC_DATASET_VERSION = 2
SPLITS = ("train", "val")

SYNTHETIC_KEYPOINT_CATEGORY = "star_person"
SYNTHETIC_KEYPOINT_NAMES = ("head", "left_hand", "right_hand", "left_foot", "right_foot")
SYNTHETIC_KEYPOINT_FLIP_MAP = (("left_hand", "right_hand"), ("left_foot", "right_foot"))
# OKS sigma per keypoint (COCO: 0.025 for eyes .. 0.107 for hips): blobs a few px wide on 48-100
# px objects. Give them as cfg.TEST.KEYPOINT_OKS_SIGMAS.
SYNTHETIC_KEYPOINT_OKS_SIGMAS = [0.08, 0.08, 0.08, 0.08, 0.08]
# The star's outline, for Detectron2's Visualizer.
SYNTHETIC_KEYPOINT_CONNECTION_RULES = (
    ("head", "left_hand", (102, 204, 255)),
    ("head", "right_hand", (51, 153, 255)),
    ("left_hand", "left_foot", (102, 0, 204)),
    ("right_hand", "right_foot", (255, 128, 0)),
    ("left_foot", "right_foot", (0, 255, 0)),
)
_NUM_KEYPOINTS = len(SYNTHETIC_KEYPOINT_NAMES)
_KEYPOINT_CATEGORY_ID = 4
SYNTHETIC_CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {
        "id": _KEYPOINT_CATEGORY_ID,
        "name": SYNTHETIC_KEYPOINT_CATEGORY,
        "supercategory": "shape",
        "keypoints": list(SYNTHETIC_KEYPOINT_NAMES),
        "skeleton": [
            [SYNTHETIC_KEYPOINT_NAMES.index(a) + 1, SYNTHETIC_KEYPOINT_NAMES.index(b) + 1]
            for a, b, _ in SYNTHETIC_KEYPOINT_CONNECTION_RULES
        ],
    },
)
SYNTHETIC_THING_CLASSES = tuple(c["name"] for c in SYNTHETIC_CATEGORIES)

# ---- generator settings (part of the content: changing them needs a version bump) -------------
_CATEGORY_PROBS = (0.25, 0.25, 0.25, 0.25)  # of the objects besides the one star_person
_MIN_OBJECTS, _MAX_OBJECTS = 2, 4
_MIN_SIZE, _MAX_SIZE = 48.0, 100.0  # extent of an object, in pixels
_MAX_TRUNCATION = 0.15  # an object may extend this fraction of its size out of the image
_MIN_INSIDE_FRACTION = 0.75  # ... but at least this fraction of its area must be inside
_MIN_VISIBLE_FRACTION = 0.6  # less visible than this (after occlusion): dropped
_MIN_VISIBLE_AREA = 40  # pixels; smaller visible area: dropped
_HIDDEN_FRACTION = 0.05  # placements leaving an object between hidden and kept are rejected
_NEAR_PROBABILITY = 0.15  # chance to place an object next to an earlier one (overlaps)
_PLACEMENT_TRIES = 30
_NOISE_STD = 4.0


def default_dataset_root() -> str:
    """``<cache>/synthetic_coco_v<N>``, the cache being ``$NONLOCAL_DET_DATASETS`` or
    ``~/.cache/nonlocal_det/datasets``: a new dataset version never reuses a stale folder."""
    return os.path.join(cache_root(), f"synthetic_coco_v{SYNTHETIC_DATASET_VERSION}")


class _Object:
    """One placed object: in-image uint8 masks (``body``, ``accent`` or None, ``full``, and
    ``visible`` after occlusion by later objects), keypoints (Kx2) or None."""

    def __init__(self, category_id, body, accent, keypoints):
        self.category_id, self.body, self.accent, self.keypoints = (
            category_id,
            body,
            accent,
            keypoints,
        )
        self.full = body if accent is None else (body | accent)
        self.inside_area = int(self.full.sum())
        self.visible = self.full.copy()
        self.kept = True


def _visibility_after(obj: _Object, occluder: np.ndarray) -> Tuple[np.ndarray, str]:
    """The visible mask of ``obj`` after ``occluder`` is drawn, and its status."""
    visible = obj.visible & (1 - occluder)
    area = int(visible.sum())
    fraction = area / max(obj.inside_area, 1)
    if fraction >= _MIN_VISIBLE_FRACTION and area >= _MIN_VISIBLE_AREA:
        return visible, "kept"
    if fraction <= _HIDDEN_FRACTION or area < _MIN_VISIBLE_AREA:
        return visible, "hidden"
    return visible, "ambiguous"


def _keypoint_annotation(obj: _Object, size: int, occluded: np.ndarray) -> Tuple[List[int], int]:
    values: List[int] = []
    for x, y in obj.keypoints.astype(int):
        if 0 <= x < size and 0 <= y < size:
            values += [int(x), int(y), 1 if occluded[y, x] else 2]
        else:
            values += [0, 0, 0]
    return values, sum(1 for v in values[2::3] if v > 0)


def _keypoints_in_box(obj: _Object, visible: np.ndarray, size: int) -> bool:
    """Whether every in-image keypoint of ``obj`` lies in the box of its ``visible`` mask."""
    ys, xs = np.nonzero(visible)
    for x, y in obj.keypoints.astype(int):
        if 0 <= x < size and 0 <= y < size:
            if not (xs.min() <= x <= xs.max() and ys.min() <= y <= ys.max()):
                return False
    return True


def _generate_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """One RGB uint8 image and its (not yet numbered) annotations."""
    image = background(rng, size)
    padded = size + 2 * PAD
    crop = (slice(PAD, PAD + size), slice(PAD, PAD + size))
    objects: List[_Object] = []
    colours: List[np.ndarray] = []
    num_objects = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    star_slot = int(rng.integers(num_objects))

    for slot in range(num_objects):
        if slot == star_slot:
            category_id = _KEYPOINT_CATEGORY_ID
        else:
            category_id = int(rng.choice(4, p=_CATEGORY_PROBS)) + 1
        placed = None
        for _try in range(_PLACEMENT_TRIES):
            obj_size = rng.uniform(_MIN_SIZE, _MAX_SIZE)
            anchors = [o for o in objects if o.kept]
            if anchors and rng.random() < _NEAR_PROBABILITY:
                ys, xs = np.nonzero(anchors[int(rng.integers(len(anchors)))].visible)
                direction = rng.uniform(0.0, 2.0 * np.pi)
                distance = obj_size * rng.uniform(0.45, 0.8)
                center = np.array([xs.mean(), ys.mean()]) + distance * np.array(
                    [np.cos(direction), np.sin(direction)]
                )
            else:
                margin = obj_size * (0.5 - _MAX_TRUNCATION)
                center = rng.uniform(margin, size - 1 - margin, size=2)
            body_parts, accent_parts, keypoints = shape_parts(rng, category_id, center, obj_size)
            body_pad = rasterize(body_parts, padded)
            accent_pad = rasterize(accent_parts, padded) if accent_parts else None
            full_pad = body_pad if accent_pad is None else body_pad | accent_pad
            total_area = int(full_pad.sum())
            body = np.ascontiguousarray(body_pad[crop])
            accent = None if accent_pad is None else np.ascontiguousarray(accent_pad[crop])
            candidate = _Object(category_id, body, accent, keypoints)
            if candidate.inside_area < _MIN_INSIDE_FRACTION * total_area:
                continue
            # Check what the candidate does to the objects below it.
            updates = []
            for obj in objects:
                if not obj.kept:
                    continue
                visible, status = _visibility_after(obj, candidate.full)
                if status == "ambiguous":
                    break
                if status == "kept" and visible.sum() < obj.visible.sum():
                    if has_hole(visible):
                        break
                    if obj.keypoints is not None and not _keypoints_in_box(obj, visible, size):
                        break
                updates.append((obj, visible, status))
            else:
                placed = (candidate, updates)
                break
        if placed is None:
            continue
        candidate, updates = placed
        for obj, visible, status in updates:
            obj.visible = visible
            obj.kept = status == "kept"

        # Colours contrasting with what lies underneath (background and overlapped objects).
        region = candidate.full.astype(bool)
        references = [image[region].mean(axis=0)]
        references += [c for o, c in zip(objects, colours) if (o.full & candidate.full).any()]
        colour = pick_colour(rng, references)
        image[candidate.body.astype(bool)] = colour
        if candidate.accent is not None:
            accent_colour = pick_colour(rng, references + [colour])
            image[candidate.accent.astype(bool)] = accent_colour
        objects.append(candidate)
        colours.append(colour)

    image = image + rng.normal(0.0, _NOISE_STD, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    annotations = []
    for i, obj in enumerate(objects):
        if not obj.kept:
            continue
        visible = obj.visible
        polygons = mask_to_polygons(visible)
        if not polygons:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        ann = {
            "category_id": obj.category_id,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": int(visible.sum()),
            "iscrowd": 0,
            "segmentation": polygons,
        }
        if obj.keypoints is not None:
            occluded = np.zeros((size, size), dtype=np.uint8)
            for later in objects[i + 1 :]:
                occluded |= later.full
            ann["keypoints"], ann["num_keypoints"] = _keypoint_annotation(obj, size, occluded)
        else:
            ann["keypoints"], ann["num_keypoints"] = [0] * (3 * _NUM_KEYPOINTS), 0
        annotations.append(ann)
    return image, annotations


# (rng, image size) -> (RGB uint8 image, its annotations without ids[, extra keys of its image entry])
ImageMaker = Callable[[np.random.Generator, int], Tuple[Any, ...]]


def _split_json(
    folder: str, split: str, count: int, size: int, seed: int, make_image: ImageMaker
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Write the images of one split into ``folder/split``; return its COCO images and
    annotations (numbered)."""
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, anns, *extra = make_image(rng, size)
        file_name = f"{index:06d}.png"
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(os.path.join(folder, split, file_name), bgr):
            raise OSError(f"could not write {os.path.join(folder, split, file_name)}")
        entry = {"id": index + 1, "file_name": file_name, "height": size, "width": size}
        images.append({**entry, **extra[0]} if extra else entry)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    return images, annotations


def check_generator_args(caller: str, **values: int) -> None:
    """ValueError naming ``caller`` unless each of ``num_train``, ``num_val``, ``image_size``,
    ``seed`` given is an int of at least 1, 1, 96, 0."""
    lows = {"num_train": 1, "num_val": 1, "image_size": 96, "seed": 0}
    for name, value in values.items():
        low = lows[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"{caller}: {name}={value!r} is not supported; allowed: an int >= {low}"
            )


def write_generated_coco(
    root: str,
    counts: Dict[str, int],
    image_size: int,
    seed: int,
    make_image: ImageMaker,
    info: Dict[str, Any],
    categories: Sequence[Dict[str, Any]],
    caller: str,
) -> bool:
    """Write a generated dataset as ``root/{split}/NNNNNN.png`` and
    ``root/annotations/instances_{split}.json`` (splits of :data:`SPLITS`), unless ``root``
    already holds it. Image ``index`` of ``split`` is ``make_image(rng, image_size)``, ``rng`` a
    numpy generator seeded from ``(seed, split, index)``, which returns the RGB uint8 image, its
    annotations (without ids) and optionally a dict of extra keys for its ``images`` entry.

    Everything is written into a hidden temporary folder beside ``root``, renamed to ``root`` (new
    or empty) at the end: an interrupted run leaves no dataset (the next run starts over), and of
    two processes generating at once one keeps its folder and the other discards its own.

    Returns:
        True if generated now, False if ``root`` was already there.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if os.path.isfile(os.path.join(root, "annotations", "instances_val.json")):
        return False
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(
            f"{caller}: {root} exists and is not a generated dataset; allowed: a new or empty "
            "folder"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.")
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split in SPLITS:
            images, annotations = _split_json(
                tmp, split, counts[split], image_size, seed, make_image
            )
            data = {
                "info": dict(info),
                "images": images,
                "annotations": annotations,
                "categories": [dict(c) for c in categories],
            }
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                # dumps, not dump: the same bytes from the C encoder (dump streams through the
                # pure-Python one, a quarter of the generation time)
                f.write(json.dumps(data, separators=(",", ":")))
        os.chmod(tmp, 0o755)  # mkdtemp makes a 0700 folder
        try:
            os.rename(tmp, root)  # replaces an empty folder, fails on a non-empty one
        except OSError:
            if not os.path.isfile(os.path.join(root, "annotations", "instances_val.json")):
                raise
            return False  # another process finished first
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_synthetic_coco(
    root: str, num_train: int = 400, num_val: int = 50, image_size: int = 192, seed: int = 0
) -> bool:
    """Generate the dataset as ``root/{train,val}/NNNNNN.png`` and
    ``root/annotations/instances_{train,val}.json``, unless ``root`` already holds it
    (:func:`write_generated_coco`: atomic, deterministic).

    Returns:
        True if generated now, False if ``root`` was already there.
    """
    check_generator_args(
        "generate_synthetic_coco",
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
    )
    return write_generated_coco(
        root,
        {"train": num_train, "val": num_val},
        image_size,
        seed,
        _generate_image,
        {"description": f"nonlocal_det synthetic shapes v{SYNTHETIC_DATASET_VERSION}"},
        SYNTHETIC_CATEGORIES,
        "generate_synthetic_coco",
    )


def register_generated_coco(root: str, name_prefix: str, maker: str, **metadata) -> Tuple[str, str]:
    """Register ``{name_prefix}_train`` and ``{name_prefix}_val`` for the dataset a generator
    wrote to ``root`` (:func:`write_generated_coco`), with extra ``metadata``; ``maker`` names
    the generator in the error.

    Raises:
        FileNotFoundError: ``root`` holds no generated dataset.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    names = []
    for split in SPLITS:
        json_file = os.path.join(root, "annotations", f"instances_{split}.json")
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"{json_file} not found: {root} holds no generated dataset (make it with {maker})"
            )
        name = f"{name_prefix}_{split}"
        register_coco_dataset(
            name, check_coco_json(json_file), os.path.join(root, split), **metadata
        )
        names.append(name)
    return names[0], names[1]


def register_synthetic_coco(root: str, name_prefix: str = "nl_synthetic") -> Tuple[str, str]:
    """Register ``{name_prefix}_train`` and ``{name_prefix}_val`` for a generated ``root``
    (:func:`nonlocal_det.data.register_coco_dataset`, plus the keypoint connection rules and
    OKS sigmas in the metadata).

    Raises:
        FileNotFoundError: ``root`` holds no generated dataset.
    """
    return register_generated_coco(
        root,
        name_prefix,
        "nonlocal_demo.synthetic.generate_synthetic_coco",
        keypoint_connection_rules=list(SYNTHETIC_KEYPOINT_CONNECTION_RULES),
        keypoint_oks_sigmas=list(SYNTHETIC_KEYPOINT_OKS_SIGMAS),
    )
