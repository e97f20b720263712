"""A small, deterministic, COCO-format synthetic dataset for the project's CPU demo.

Every image (192x192 RGB by default) shows a smooth random background and 2-4 objects of four
categories (at least one ``star_person``), 48-100 px across, later objects occluding
earlier ones:

* three plain categories: ``circle``, ``square`` (rotated) and ``triangle`` (rotated);
* one keypoint category, ``star_person``: an upright (+-30 deg) five-pointed star whose tips end
  in round "head", "hand" and "foot" blobs of a contrasting colour. Its K=5 keypoints are the blob
  centres: ``head, left_hand, right_hand, left_foot, right_foot`` ("left" = image-left when
  upright, so a horizontal flip swaps left and right, as for COCO persons).

Annotations are standard COCO: ``bbox`` [x, y, w, h] and ``area`` of the visible (occluded and
clipped) mask, ``segmentation`` polygons traced from that mask (they decode back to exactly the
mask with pycocotools), ``iscrowd`` 0, category ids 1..4. Keypoints are ``[x, y, v] * K`` in pixel
indices (Detectron2's ``load_coco_json`` adds 0.5): v=2 visible, v=1 inside the image but covered
by a later object, v=0 (x=y=0) outside the image.

Keypoints of the plain categories: Detectron2 needs every annotation of an image to carry keypoints
or none to (``annotations_to_instances``), and both its ``COCOEvaluator`` (which reads the length of
the *first* ground-truth annotation's ``keypoints``) and pycocotools' OKS (which reads
``gt["keypoints"]`` of every ground truth in an (image, category) pair that has detections, and the
keypoint head predicts keypoints for every detected class) need the field on *every* annotation.
So plain-category annotations carry all-zero keypoints (``[0, 0, 0] * K``, ``num_keypoints`` 0):
COCOeval ignores them in keypoint evaluation, Detectron2's keypoint loss ignores v=0, and the
keypoint AP is that of ``star_person`` alone (the only category with non-ignored ground truth).
:func:`load_synthetic_coco_json` additionally normalises the dataset dicts so that every
annotation has exactly ``3K`` keypoint values (zeros for the plain categories).

Generation is deterministic (one ``numpy.random.Generator`` per image, seeded from
``(seed, split, index)``), every file is written atomically, and a ``_COMPLETE`` marker holding a
hash of the generator version and parameters is written last: an interrupted generation is
detected and redone, a complete one with the same parameters is left untouched.

Command line::

    python -m nonlocal_det.data.synthetic --root DIR [--num-train N --num-val N]
"""

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "SYNTHETIC_DATASET_VERSION",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_THING_CLASSES",
    "SYNTHETIC_KEYPOINT_CATEGORY",
    "SYNTHETIC_KEYPOINT_NAMES",
    "SYNTHETIC_KEYPOINT_FLIP_MAP",
    "SYNTHETIC_KEYPOINT_CONNECTION_RULES",
    "SYNTHETIC_KEYPOINT_OKS_SIGMAS",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_NAME_PREFIX",
    "default_dataset_root",
    "generate_synthetic_coco",
    "is_synthetic_coco_complete",
    "load_synthetic_coco_json",
    "register_synthetic_coco",
    "prepare_synthetic_coco",
    "main",
]

# Bump when the generated content changes: it is part of the cache directory name and of the
# parameter hash in the ``_COMPLETE`` marker (so a stale cache is regenerated).
SYNTHETIC_DATASET_VERSION = 2
# Bump for content changes within a version (changes the parameter hash only).
_GENERATOR_REVISION = 0
_DATASET_DIRNAME = f"synthetic_coco_v{SYNTHETIC_DATASET_VERSION}"
_COMPLETE_MARKER = "_COMPLETE"
_SPLITS = ("train", "val")

DEFAULT_NUM_TRAIN = 400
DEFAULT_NUM_VAL = 50
DEFAULT_IMAGE_SIZE = 192
DEFAULT_NAME_PREFIX = "nl_synthetic"

SYNTHETIC_KEYPOINT_CATEGORY = "star_person"
SYNTHETIC_KEYPOINT_NAMES = ("head", "left_hand", "right_hand", "left_foot", "right_foot")
SYNTHETIC_KEYPOINT_FLIP_MAP = (("left_hand", "right_hand"), ("left_foot", "right_foot"))
# COCO OKS per-keypoint sigmas (COCO uses 0.025 for eyes .. 0.107 for hips): the blobs are
# a few pixels wide on 48-100 px objects. Pass as cfg.TEST.KEYPOINT_OKS_SIGMAS.
SYNTHETIC_KEYPOINT_OKS_SIGMAS = [0.08, 0.08, 0.08, 0.08, 0.08]
# The star's outline: head - right hand - right foot - left foot - left hand - head.
SYNTHETIC_KEYPOINT_CONNECTION_RULES = (
    ("head", "left_hand", (102, 204, 255)),
    ("head", "right_hand", (51, 153, 255)),
    ("left_hand", "left_foot", (102, 0, 204)),
    ("right_hand", "right_foot", (255, 128, 0)),
    ("left_foot", "right_foot", (0, 255, 0)),
)
_SKELETON = [
    [SYNTHETIC_KEYPOINT_NAMES.index(a) + 1, SYNTHETIC_KEYPOINT_NAMES.index(b) + 1]
    for a, b, _ in SYNTHETIC_KEYPOINT_CONNECTION_RULES
]
_NUM_KEYPOINTS = len(SYNTHETIC_KEYPOINT_NAMES)

# COCO categories (ids 1..4); only the keypoint category has "keypoints" and "skeleton".
SYNTHETIC_CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {
        "id": 4,
        "name": SYNTHETIC_KEYPOINT_CATEGORY,
        "supercategory": "shape",
        "keypoints": list(SYNTHETIC_KEYPOINT_NAMES),
        "skeleton": _SKELETON,
    },
)
SYNTHETIC_THING_CLASSES = tuple(c["name"] for c in SYNTHETIC_CATEGORIES)
_KEYPOINT_CATEGORY_ID = 4

# ---- generator settings (part of the content: changing them requires a version bump) ----------
# One object of every image is a star_person (so that no image is dropped by Detectron2's
# MIN_KEYPOINTS_PER_IMAGE filter); the others are drawn from all four categories.
_CATEGORY_PROBS = (0.25, 0.25, 0.25, 0.25)  # circle, square, triangle, star_person
_MIN_OBJECTS, _MAX_OBJECTS = 2, 4
# v2: larger objects and less occlusion than v1 (24-70 px, 2-5 objects, 30% visible, 35% near):
# the from-scratch CPU demo learns them within its 10-minute budget.
_MIN_SIZE, _MAX_SIZE = 48.0, 100.0  # extent of an object, in pixels
_MAX_TRUNCATION = 0.15  # an object may extend this fraction of its size out of the image
_MIN_INSIDE_FRACTION = 0.75  # ... but at least this fraction of its area must be inside
_MIN_VISIBLE_FRACTION = 0.6  # less visible than this (after occlusion): dropped
_MIN_VISIBLE_AREA = 40  # pixels; smaller visible area: dropped
_HIDDEN_FRACTION = 0.05  # placements leaving an object between hidden and kept are rejected
_NEAR_PROBABILITY = 0.15  # chance to place an object next to an earlier one (overlaps)
_PLACEMENT_TRIES = 30
_STAR_MAX_TILT = 30.0  # degrees
_PAD = 64  # margin of the canvas on which masks are drawn (to measure truncation)
_SHIFT = 4  # cv2 fixed-point bits (sub-pixel drawing)
_NOISE_STD = 4.0


# ------------------------------------------------------------------------------------------------
# Paths and caching
# ------------------------------------------------------------------------------------------------


def default_dataset_root() -> str:
    """The cache directory of the synthetic dataset.

    ``$NONLOCAL_DET_DATASETS/synthetic_coco_v<N>`` when the environment variable
    ``NONLOCAL_DET_DATASETS`` is set (a directory holding the project's datasets, like
    ``DETECTRON2_DATASETS``), else ``~/.cache/nonlocal_det/datasets/synthetic_coco_v<N>``. The
    dataset version is part of the name so that a new generator never reuses a stale cache.

    Returns:
        str: an absolute path (it may not exist yet).
    """
    base = os.environ.get("NONLOCAL_DET_DATASETS") or os.path.join(
        "~", ".cache", "nonlocal_det", "datasets"
    )
    return os.path.abspath(os.path.join(os.path.expanduser(base), _DATASET_DIRNAME))


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> Dict[str, Any]:
    for name, value, low in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("image_size", image_size, 96),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"generate_synthetic_coco: {name} must be an int >= {low}, got {value!r}"
            )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"generate_synthetic_coco: seed must be an int >= 0, got {seed!r}")
    return {
        "version": SYNTHETIC_DATASET_VERSION,
        "revision": _GENERATOR_REVISION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _params_hash(params: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _file_name(index: int) -> str:
    return f"{index:06d}.png"


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _read_marker(root: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(root, _COMPLETE_MARKER), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_synthetic_coco_complete(
    root: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> bool:
    """Whether ``root`` holds a complete dataset generated with exactly these parameters.

    Checks the ``_COMPLETE`` marker's parameter hash and that both annotation files and all image
    files exist (it does not read them).

    Args:
        root: dataset directory.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images, in pixels.
        seed: generator seed.

    Returns:
        bool: True if nothing needs to be generated.
    """
    params = _params(num_train, num_val, image_size, seed)
    marker = _read_marker(root)
    if marker is None or marker.get("params_hash") != _params_hash(params):
        return False
    for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
        if not os.path.isfile(_json_path(root, split)):
            return False
        try:
            present = set(os.listdir(os.path.join(root, split)))
        except OSError:
            return False
        if any(_file_name(i) not in present for i in range(count)):
            return False
    return True


def _atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _generation_lock(root: str) -> Iterator[None]:
    """An exclusive inter-process lock on ``root`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(os.path.join(root, ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates on the padded canvas -> cv2 fixed-point int32."""
    return np.round((np.asarray(points, dtype=np.float64) + _PAD) * (1 << _SHIFT)).astype(np.int32)


def _draw_polygon(canvas: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(canvas, [_fixed(points).reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SHIFT)


def _draw_disc(canvas: np.ndarray, center: Sequence[float], radius: float) -> None:
    c = _fixed(np.asarray(center, dtype=np.float64))
    r = int(round(radius * (1 << _SHIFT)))
    cv2.circle(
        canvas, (int(c[0]), int(c[1])), r, 1, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT
    )


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _shape_parts(
    rng: np.random.Generator, category_id: int, center: np.ndarray, size: float
) -> Tuple[List[Tuple[str, Any]], List[Tuple[str, Any]], Optional[np.ndarray]]:
    """Geometry of one object: (body parts, accent parts, keypoints or None).

    A part is ``("poly", Nx2 array)`` or ``("disc", (center, radius))`` in image coordinates;
    keypoints are integer pixel indices (the accent discs are centred on them).
    """
    if category_id == 1:  # circle
        return [("disc", (center, size / 2.0))], [], None
    if category_id == 2:  # square, any rotation
        half = size / 2.0 / np.sqrt(2.0) * rng.uniform(1.0, 1.25)  # diagonal ~ size
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        return [("poly", corners @ _rotation(rng.uniform(0.0, 90.0)).T + center)], [], None
    if category_id == 3:  # (roughly equilateral) triangle, any rotation
        angles = np.deg2rad(np.array([0.0, 120.0, 240.0]) + rng.uniform(-12.0, 12.0, size=3))
        radius = size / 2.0 * rng.uniform(0.95, 1.1, size=3)
        pts = np.stack([np.sin(angles) * radius, -np.cos(angles) * radius], axis=1)
        return [("poly", pts @ _rotation(rng.uniform(0.0, 120.0)).T + center)], [], None

    # star_person: five tips (head, hands, feet) at angles from "up", clockwise on screen;
    # negative angles are on the image-left when upright.
    radius = size / 2.0
    tip_angles = np.array(
        [
            rng.uniform(-8.0, 8.0),  # head
            -rng.uniform(62.0, 95.0),  # left_hand
            rng.uniform(62.0, 95.0),  # right_hand
            -rng.uniform(138.0, 160.0),  # left_foot
            rng.uniform(138.0, 160.0),  # right_foot
        ]
    )
    tip_radii = radius * np.array(
        [rng.uniform(0.82, 0.9), *rng.uniform(0.88, 1.0, size=2), *rng.uniform(0.9, 1.0, size=2)]
    )
    head_r = max(3.0, 0.2 * radius)
    blob_r = max(2.5, 0.14 * radius)
    tilt = _rotation(rng.uniform(-_STAR_MAX_TILT, _STAR_MAX_TILT))

    def _point(angle_deg: float, r: float) -> np.ndarray:
        a = np.deg2rad(angle_deg)
        return np.array([np.sin(a) * r, -np.cos(a) * r]) @ tilt.T + center

    # Outline clockwise on screen: head, right_hand, right_foot, left_foot, left_hand.
    order = [0, 2, 4, 3, 1]
    ordered = [(tip_angles[i] % 360.0, i) for i in order]
    inner_ratio = rng.uniform(0.42, 0.52)
    outline = []
    for j, (angle, i) in enumerate(ordered):
        outline.append(_point(tip_angles[i], tip_radii[i]))
        next_angle = ordered[(j + 1) % 5][0]
        gap = (next_angle - angle) % 360.0
        outline.append(_point(angle + gap / 2.0, radius * inner_ratio))
    keypoints = np.round(np.stack([_point(a, r) for a, r in zip(tip_angles, tip_radii)]))
    accents = [("disc", (keypoints[0], head_r))] + [("disc", (kp, blob_r)) for kp in keypoints[1:]]
    return [("poly", np.stack(outline))], accents, keypoints


def _rasterize(parts: List[Tuple[str, Any]], padded: int) -> np.ndarray:
    canvas = np.zeros((padded, padded), dtype=np.uint8)
    for kind, geometry in parts:
        if kind == "poly":
            _draw_polygon(canvas, geometry)
        else:
            _draw_disc(canvas, *geometry)
    return canvas


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB background (float32, 0..255): gradient + low-frequency blobs."""
    c0 = rng.uniform(0.0, 255.0, size=3)
    c1 = np.clip(c0 + rng.uniform(-110.0, 110.0, size=3), 0.0, 255.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / (abs(np.cos(angle)) + abs(np.sin(angle)))
    t = t - t.min()
    t = t / max(t.max(), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    blobs = rng.normal(0.0, 18.0, size=(4, 4, 3)).astype(np.float32)
    image = image + cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0.0, 255.0).astype(np.float32)


def _pick_colour(rng: np.random.Generator, references: List[np.ndarray]) -> np.ndarray:
    """The random colour (of 12 candidates) farthest from all ``references``."""
    candidates = rng.uniform(0.0, 255.0, size=(12, 3))
    refs = np.stack(references)
    score = np.linalg.norm(candidates[:, None, :] - refs[None, :, :], axis=2).min(axis=1)
    return np.round(candidates[int(np.argmax(score))])


def _has_hole(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Polygons (COCO flat lists) that pycocotools rasterizes back to exactly ``mask``.

    The contour is traced on the 2x nearest-upsampled mask and mapped back to pixel-edge
    coordinates (0.25 px inside the pixel boundary), so that the polygon follows the pixel edges
    instead of the pixel centres (tracing the mask itself would lose half a pixel all around).
    """
    up = cv2.resize(mask, (mask.shape[1] * 2, mask.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        contour = cv2.approxPolyDP(contour, 0.5, True).reshape(-1, 2)
        if len(contour) < 3:
            continue
        coords = (contour.astype(np.float64) + 0.5) / 2.0
        polygons.append([float(v) for v in coords.reshape(-1)])
    return polygons


class _Object:
    """One placed object (full masks are in-image, before occlusion by later objects)."""

    def __init__(self, category_id, body, accent, keypoints, inside_area):
        self.category_id = category_id
        self.body = body  # uint8 HxW
        self.accent = accent  # uint8 HxW or None
        self.full = body if accent is None else (body | accent)
        self.keypoints = keypoints  # Kx2 ints or None
        self.inside_area = inside_area
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
    image = _background(rng, size)
    padded = size + 2 * _PAD
    crop = (slice(_PAD, _PAD + size), slice(_PAD, _PAD + size))
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
            body_parts, accent_parts, keypoints = _shape_parts(rng, category_id, center, obj_size)
            body_pad = _rasterize(body_parts, padded)
            accent_pad = _rasterize(accent_parts, padded) if accent_parts else None
            full_pad = body_pad if accent_pad is None else body_pad | accent_pad
            total_area = int(full_pad.sum())
            body = np.ascontiguousarray(body_pad[crop])
            accent = None if accent_pad is None else np.ascontiguousarray(accent_pad[crop])
            candidate = _Object(category_id, body, accent, keypoints, 0)
            candidate.inside_area = int(candidate.full.sum())
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
                    if _has_hole(visible):
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
        colour = _pick_colour(rng, references)
        image[candidate.body.astype(bool)] = colour
        if candidate.accent is not None:
            accent_colour = _pick_colour(rng, references + [colour])
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
        polygons = _mask_to_polygons(visible)
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


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def _generate_split(root: str, split: str, count: int, params: Dict[str, Any]) -> Dict[str, Any]:
    size = params["image_size"]
    split_id = _SPLITS.index(split)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([params["seed"], split_id, index])
        image, anns = _generate_image(rng, size)
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:  # pragma: no cover
            raise RuntimeError(f"could not encode image {index} of split {split}")
        file_name = _file_name(index)
        _atomic_write_bytes(os.path.join(image_dir, file_name), png.tobytes())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {
        "info": {
            "description": f"nonlocal_det synthetic shapes ({split})",
            "version": str(SYNTHETIC_DATASET_VERSION),
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SYNTHETIC_CATEGORIES],
    }


def _remove_stale_files(root: str) -> None:
    """Remove what an earlier (partial or differently parametrised) generation left."""
    with contextlib.suppress(OSError):
        os.remove(os.path.join(root, _COMPLETE_MARKER))
    for split in _SPLITS:
        with contextlib.suppress(OSError):
            os.remove(_json_path(root, split))
    for directory in (root, os.path.join(root, "annotations")) + tuple(
        os.path.join(root, split) for split in _SPLITS
    ):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            stem, ext = os.path.splitext(name)
            is_image = directory != root and ext == ".png" and stem.isdigit()
            if is_image or (name.startswith(".") and name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))


def generate_synthetic_coco(
    root: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> Dict[str, Any]:
    """Generate the synthetic COCO dataset under ``root`` unless it is already there.

    Writes ``root/{train,val}/NNNNNN.png``, ``root/annotations/instances_{train,val}.json`` and
    last ``root/_COMPLETE`` (version + parameter hash). If ``root`` already holds a complete
    dataset with the same parameters nothing is written; otherwise (nothing there, an interrupted
    generation, other parameters) the dataset files are (re)generated. The output depends only on
    the parameters: the same seed gives byte-identical files.

    Args:
        root: output directory (created if needed).
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square RGB images, in pixels.
        seed: generator seed.

    Returns:
        dict: ``root``, ``generated`` (False if the dataset was already complete), ``params``,
        ``params_hash``, ``seconds``, and per split ``{split}_json`` and ``{split}_image_root``.
    """
    params = _params(num_train, num_val, image_size, seed)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    start = time.perf_counter()
    result: Dict[str, Any] = {
        "root": root,
        "params": params,
        "params_hash": _params_hash(params),
        "generated": False,
    }
    for split in _SPLITS:
        result[f"{split}_json"] = _json_path(root, split)
        result[f"{split}_image_root"] = os.path.join(root, split)

    check = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    if not is_synthetic_coco_complete(root, **check):
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with _generation_lock(root):
            if not is_synthetic_coco_complete(root, **check):  # another process may have done it
                _remove_stale_files(root)
                for split in _SPLITS:
                    data = _generate_split(root, split, params[f"num_{split}"], params)
                    payload = json.dumps(data, separators=(",", ":")).encode("utf-8")
                    _atomic_write_bytes(_json_path(root, split), payload)
                marker = {
                    "dataset": _DATASET_DIRNAME,
                    "params": params,
                    "params_hash": result["params_hash"],
                }
                _atomic_write_bytes(
                    os.path.join(root, _COMPLETE_MARKER),
                    (json.dumps(marker, sort_keys=True, indent=1) + "\n").encode("utf-8"),
                )
                result["generated"] = True
    result["seconds"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------
# Detectron2 registration
# ------------------------------------------------------------------------------------------------


def load_synthetic_coco_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[Dict[str, Any]]:
    """Detectron2 dataset dicts of one split: ``load_coco_json`` + uniform keypoints.

    Every annotation gets exactly ``3K`` keypoint values: the keypoint category keeps its own
    (v=0 points zeroed), the plain categories get all zeros (ignored by the keypoint loss).
    Detectron2's ``annotations_to_instances`` requires that all annotations of an image have
    keypoints or none do.

    Args:
        json_file: COCO json of the split.
        image_root: directory of its images.
        dataset_name: registered name (sets ``thing_classes`` and the id mapping in its metadata).

    Returns:
        list[dict]: the dataset dicts.
    """
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(json_file, image_root, dataset_name)
    # With a dataset name the category ids are contiguous (0..3), without they are the json's.
    keypoint_category = (
        SYNTHETIC_THING_CLASSES.index(SYNTHETIC_KEYPOINT_CATEGORY)
        if dataset_name is not None
        else _KEYPOINT_CATEGORY_ID
    )
    zeros = [0.0] * (3 * _NUM_KEYPOINTS)
    for record in dicts:
        for ann in record["annotations"]:
            keypoints = ann.get("keypoints")
            if ann["category_id"] != keypoint_category or not keypoints:
                ann["keypoints"] = list(zeros)
                continue
            if len(keypoints) != 3 * _NUM_KEYPOINTS:
                raise ValueError(
                    f"{json_file}: annotation of image {record['image_id']} has "
                    f"{len(keypoints) // 3} keypoints, expected {_NUM_KEYPOINTS}"
                )
            ann["keypoints"] = [
                0.0 if keypoints[3 * (i // 3) + 2] == 0 else float(v)
                for i, v in enumerate(keypoints)
            ]
    return dicts


def register_synthetic_coco(root: str, name_prefix: str = DEFAULT_NAME_PREFIX) -> Tuple[str, str]:
    """Register ``{name_prefix}_train`` and ``{name_prefix}_val`` with Detectron2.

    The dataset dicts are loaded lazily (:func:`load_synthetic_coco_json`). The metadata holds
    ``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``,
    ``evaluator_type="coco"``, ``keypoint_names``, ``keypoint_flip_map``,
    ``keypoint_connection_rules``, ``keypoint_oks_sigmas`` and ``dataset_root``. For keypoint
    evaluation set ``cfg.TEST.KEYPOINT_OKS_SIGMAS = SYNTHETIC_KEYPOINT_OKS_SIGMAS``.

    Registering again with the same root does nothing.

    Args:
        root: a directory produced by :func:`generate_synthetic_coco`.
        name_prefix: prefix of the two dataset names.

    Returns:
        tuple[str, str]: the train and val dataset names.

    Raises:
        FileNotFoundError: if an annotation file or image directory is missing.
        ValueError: if a dataset of that name is registered with another root.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    names = []
    for split in _SPLITS:
        name = f"{name_prefix}_{split}"
        json_file = _json_path(root, split)
        image_root = os.path.join(root, split)
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Cannot register dataset '{name}': annotation file {json_file} not found "
                "(generate it with nonlocal_det.data.generate_synthetic_coco)"
            )
        if not os.path.isdir(image_root):
            raise FileNotFoundError(
                f"Cannot register dataset '{name}': image directory {image_root} not found"
            )
        names.append(name)
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file")
            if registered is not None and os.path.realpath(registered) == os.path.realpath(
                json_file
            ):
                continue
            raise ValueError(
                f"Dataset '{name}' is already registered with json_file={registered!r}; "
                f"cannot register it again for {json_file}. Use another name_prefix."
            )
        DatasetCatalog.register(
            name,
            lambda j=json_file, r=image_root, n=name: load_synthetic_coco_json(j, r, n),
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(SYNTHETIC_THING_CLASSES),
            thing_dataset_id_to_contiguous_id={
                c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)
            },
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            keypoint_names=list(SYNTHETIC_KEYPOINT_NAMES),
            keypoint_flip_map=[tuple(p) for p in SYNTHETIC_KEYPOINT_FLIP_MAP],
            keypoint_connection_rules=[tuple(r) for r in SYNTHETIC_KEYPOINT_CONNECTION_RULES],
            keypoint_oks_sigmas=list(SYNTHETIC_KEYPOINT_OKS_SIGMAS),
            dataset_root=root,
        )
    return names[0], names[1]


def prepare_synthetic_coco(
    root: Optional[str] = None, name_prefix: str = DEFAULT_NAME_PREFIX, **params: Any
) -> Tuple[str, str]:
    """Generate the dataset if needed, then register it.

    Args:
        root: dataset directory; :func:`default_dataset_root` if None.
        name_prefix: prefix of the registered dataset names.
        **params: ``num_train``, ``num_val``, ``image_size``, ``seed`` of
            :func:`generate_synthetic_coco`.

    Returns:
        tuple[str, str]: the train and val dataset names.
    """
    root = default_dataset_root() if root is None else root
    generate_synthetic_coco(root, **params)
    return register_synthetic_coco(root, name_prefix=name_prefix)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _summary(json_file: str) -> str:
    with open(json_file, "r", encoding="utf-8") as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_category = Counter(names[a["category_id"]] for a in data["annotations"])
    visibility = Counter(
        v
        for a in data["annotations"]
        if a["category_id"] == _KEYPOINT_CATEGORY_ID
        for v in a["keypoints"][2::3]
    )
    counts = ", ".join(f"{names[i]}={per_category.get(names[i], 0)}" for i in sorted(names))
    return (
        f"{len(data['images'])} images, {len(data['annotations'])} instances ({counts}); "
        f"{per_category.get(SYNTHETIC_KEYPOINT_CATEGORY, 0)} keypoint instances, keypoints "
        f"v=2: {visibility.get(2, 0)}, v=1: {visibility.get(1, 0)}, v=0: {visibility.get(0, 0)}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: generate the dataset and print a summary.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m nonlocal_det.data.synthetic",
        description="Generate the synthetic COCO-format shapes dataset (with keypoints).",
    )
    parser.add_argument("--root", default=None, help="output directory (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_dataset_root()
    info = generate_synthetic_coco(
        root,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
    )
    state = "generated" if info["generated"] else "already complete"
    print(f"{info['root']}: {state} in {info['seconds']:.1f} s (params {info['params']})")
    for split in _SPLITS:
        print(f"  {split}: {_summary(info[f'{split}_json'])}")
    print(f"  keypoints ({len(SYNTHETIC_KEYPOINT_NAMES)}): {', '.join(SYNTHETIC_KEYPOINT_NAMES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
