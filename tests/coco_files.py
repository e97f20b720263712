"""Writes small COCO-format datasets for the tests: polygons, RLE (compressed and uncompressed),
keypoints on one category only, images without annotations, a tiny and a very elongated image."""

import json
import os
from typing import Dict, List

import cv2
import numpy as np
import pycocotools.mask as mask_util

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "block", "supercategory": "shape"},
    {
        "id": 3,
        "name": "walker",
        "supercategory": "shape",
        "keypoints": ["head", "left_foot", "right_foot"],
        "skeleton": [[1, 2], [1, 3]],
    },
]
KEYPOINT_NAMES = CATEGORIES[2]["keypoints"]

# (height, width, objects): objects are (kind, x, y, size) in pixels; kind "disc" is a polygon,
# "block" an RLE mask, "walker" a polygon triangle with 3 keypoints.
TRAIN_IMAGES = [
    (96, 128, [("disc", 20, 20, 30), ("block", 70, 40, 36), ("walker", 30, 55, 34)]),
    (96, 128, [("walker", 60, 10, 40), ("disc", 10, 60, 24)]),
    (128, 96, [("block", 10, 10, 40), ("walker", 40, 70, 40)]),
    (96, 128, [("disc", 80, 30, 34), ("walker", 10, 20, 36)]),
    (12, 12, [("block", 2, 2, 8)]),  # smaller than the network stride
    (24, 400, [("disc", 20, 2, 20), ("walker", 300, 1, 22)]),  # 1:17, 12 px high once resized
    (96, 128, []),  # no annotations
]
VAL_IMAGES = [
    (96, 128, [("disc", 20, 20, 30), ("walker", 60, 30, 40)]),
    (128, 96, [("block", 20, 50, 40), ("walker", 10, 5, 36)]),
    (24, 400, [("block", 100, 2, 20)]),
    (96, 128, []),
]


def _shape(kind: str, x: int, y: int, s: int, h: int, w: int):
    """(mask, polygon, keypoints) of one object, clipped to the image."""
    canvas = np.zeros((h, w), np.uint8)
    if kind == "disc":
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        poly = np.stack([x + s / 2 + s / 2 * np.cos(t), y + s / 2 + s / 2 * np.sin(t)], 1)
    elif kind == "block":
        poly = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], float)
    else:
        poly = np.array([[x + s / 2, y], [x + s, y + s], [x, y + s]], float)
    poly[:, 0] = poly[:, 0].clip(0, w - 1)
    poly[:, 1] = poly[:, 1].clip(0, h - 1)
    cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], 1)
    kps = None
    if kind == "walker":
        kps = []
        for px, py in poly:  # head, left foot (image right, bottom), right foot
            kps += [round(float(px), 1), round(float(py), 1), 2]
    return canvas, poly, kps


def write_split(root: str, split: str, specs=None, seed: int = 0) -> Dict[str, str]:
    """Write ``root/<split>/*.png`` and ``root/<split>.json``; returns their paths."""
    specs = TRAIN_IMAGES if specs is None else specs
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    colours = {"disc": (220, 60, 60), "block": (60, 200, 60), "walker": (60, 60, 230)}
    images: List[dict] = []
    annotations: List[dict] = []
    for i, (h, w, objects) in enumerate(specs):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for kind, x, y, s in objects:
            mask, poly, kps = _shape(kind, x, y, s, h, w)
            img[mask > 0] = colours[kind]
            ys, xs = np.nonzero(mask)
            bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
            ann = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": [c["name"] for c in CATEGORIES].index(kind) + 1,
                "bbox": bbox,
                "area": float(mask.sum()),
                "iscrowd": 0,
            }
            if kind == "block":  # compressed RLE
                rle = mask_util.encode(np.asfortranarray(mask))
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                ann["segmentation"] = [[round(float(v), 1) for v in poly.reshape(-1)]]
            if kps is not None:
                ann["keypoints"], ann["num_keypoints"] = kps, 3
            annotations.append(ann)
        name = f"{i:03d}.png"
        cv2.imwrite(os.path.join(image_dir, name), img[:, :, ::-1])
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    if split == "train":  # a crowd region with an uncompressed RLE (ignored by training)
        h, w = specs[0][:2]
        crowd = np.zeros((h, w), np.uint8)
        crowd[70:90, 100:120] = 1
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [100.0, 70.0, 20.0, 20.0],
                "area": 400.0,
                "iscrowd": 1,
                "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)},
            }
        )
    json_file = os.path.join(root, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return {"json": json_file, "images": image_dir}


def _rle_counts(mask: np.ndarray) -> List[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = mask.reshape(-1, order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


def write_dataset(root: str) -> Dict[str, str]:
    """Train and val splits under ``root``; returns the four config values."""
    train = write_split(root, "train", TRAIN_IMAGES, seed=0)
    val = write_split(root, "val", VAL_IMAGES, seed=1)
    return {
        "DATASETS.TRAIN_JSON": train["json"],
        "DATASETS.TRAIN_IMAGES": train["images"],
        "DATASETS.TEST_JSON": val["json"],
        "DATASETS.TEST_IMAGES": val["images"],
    }
