"""Checks of a COCO-format dataset before training: the instances file (:func:`check_coco_json`)
and the image files' headers (:func:`check_coco_images`). Every problem names the file, the entry
and the field, the bad value and what is allowed."""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "DatasetError",
    "CocoSummary",
    "check_coco_json",
    "check_coco_images",
    "read_checked_coco_json",
]

# At most this many problems are listed in one error (the count says how many there are).
MAX_LISTED = 10


class DatasetError(ValueError):
    """A dataset file (JSON or image) that cannot be used as it is."""


@dataclass
class CocoSummary:
    """What a checked COCO file holds: ``categories`` (``{"id", "name"}`` sorted by id:
    Detectron2's contiguous class ``i`` is ``categories[i]``), the keypoint names shared by the
    ``keypoint_classes``, counts (``missing_segmentation``: non-crowd annotations without a usable
    mask; ``missing_keypoints``: annotations without keypoints in a file with keypoint names) and
    the ``images`` entries."""

    json_file: str
    categories: List[Dict[str, Any]]
    keypoint_names: List[str]
    keypoint_classes: List[str]
    num_images: int
    num_annotations: int
    num_empty_images: int
    has_rle: bool
    has_polygons: bool
    missing_segmentation: int
    missing_keypoints: int
    images: List[Dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def thing_classes(self) -> List[str]:
        """Category names in Detectron2's contiguous order (sorted by id)."""
        return [c["name"] for c in self.categories]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _where(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident!r})" if ident is not None else "")


def _listed(head: str, items: List[str]) -> DatasetError:
    """One error listing the first ``MAX_LISTED`` problems, with their count."""
    listed = "\n  - ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return DatasetError(f"{head}:\n  - {listed}{more}")


class _Problems:
    """Collects the problems of one file."""

    def __init__(self, json_file: str, label: str):
        self.head = f"{label + ': ' if label else ''}{json_file} is not a usable COCO-format file"
        self.items: List[str] = []
        self.add = self.items.append

    def fatal(self, msg: str) -> DatasetError:
        return DatasetError(f"{self.head}: {msg}")

    def raise_if_any(self) -> None:
        n = len(self.items)
        if n:
            raise _listed(f"{self.head} ({n} problem{'s' if n > 1 else ''})", self.items)


def read_checked_coco_json(json_file: str, label: str = "") -> Dict[str, Any]:
    """The JSON object of ``json_file`` (``label``, e.g. ``"DATASETS.TRAIN_JSON"``, starts the
    messages): a missing file, a folder, non-UTF-8 or non-JSON text is an error."""
    prefix = f"{label}: " if label else ""
    if not os.path.exists(json_file):
        raise FileNotFoundError(f"{prefix}annotation file {json_file} does not exist")
    if not os.path.isfile(json_file):
        raise DatasetError(f"{prefix}{json_file} is not a file; allowed: a COCO-format JSON file")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{prefix}{json_file} is not JSON (not UTF-8 text: byte {e.start} is "
            f"{e.object[e.start:e.start + 1]!r}); allowed: a COCO-format JSON file"
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{prefix}{json_file} is not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "allowed: a COCO-format JSON file"
        ) from None


def _entries(items: List[Any], kind: str, noun: str, p: _Problems, allowed: str, any_id=False):
    """(where, entry) of the objects of ``items`` with an integer id (``any_id``: with any id);
    the others, and reused ids, are problems."""
    seen = set()
    for i, e in enumerate(items):
        where = _where(kind, i, e)
        if not isinstance(e, dict):
            p.add(f"{where} is a {type(e).__name__}; allowed: {allowed}")
            continue
        ok = _is_int(e.get("id"))
        if not ok:
            p.add(f"{where}: 'id' is {e.get('id')!r}; allowed: an integer")
        elif e["id"] in seen:
            p.add(f"{where}: id {e['id']} is used by another {noun}; allowed: unique ids")
        seen.add(e["id"] if ok else None)
        if ok or any_id:
            yield where, e


def _check_categories(cats: List[Any], p: _Problems) -> Dict[int, List[str]]:
    """Returns category id -> its keypoint names ([] when none)."""
    out: Dict[int, List[str]] = {}
    for where, c in _entries(cats, "categories", "category", p, "an object with 'id' and 'name'"):
        if not isinstance(c.get("name"), str) or not c["name"]:
            p.add(f"{where}: 'name' is {c.get('name')!r}; allowed: a non-empty string")
        kps = c.get("keypoints", [])
        if not isinstance(kps, list) or not all(isinstance(k, str) for k in kps):
            p.add(f"{where}: 'keypoints' is {kps!r}; allowed: a list of keypoint names")
            kps = []
        out[c["id"]] = list(kps)
    if not cats:
        p.add("'categories' is empty; allowed: at least one category")
    return out


def _check_images(imgs: List[Any], p: _Problems) -> Dict[int, Dict[str, Any]]:
    out: Dict[int, Dict[str, Any]] = {}
    for where, im in _entries(imgs, "images", "image", p, "an object"):
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            p.add(f"{where}: 'file_name' is {im.get('file_name')!r}; allowed: a relative path")
        for key in ("height", "width"):
            if not _is_int(im.get(key)) or im[key] <= 0:
                p.add(f"{where}: '{key}' is {im.get(key)!r}; allowed: an integer > 0")
        out[im["id"]] = im
    return out


def _check_segmentation(segm: Any, image: Optional[Dict[str, Any]], where: str, p: _Problems):
    """Returns 'rle', 'polygons' or None (no usable mask)."""
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) for s in size)):
            p.add(f"{where}: RLE 'segmentation' has 'size' {size!r}; allowed: [height, width]")
            return None
        if not isinstance(counts, (str, list)):
            p.add(f"{where}: RLE 'counts' is a {type(counts).__name__}; allowed: string or list")
            return None
        if image is not None and size != [image.get("height"), image.get("width")]:
            p.add(
                f"{where}: RLE 'size' {size} differs from its image's [height, width] "
                f"[{image.get('height')}, {image.get('width')}]"
            )
        return "rle"
    if isinstance(segm, list):
        if not segm:
            return None
        for k, poly in enumerate(segm):
            ok = isinstance(poly, list) and all(_is_number(v) for v in poly)
            if not ok or len(poly) < 6 or len(poly) % 2:
                shown = poly if not isinstance(poly, list) or len(poly) <= 8 else poly[:8] + ["..."]
                p.add(
                    f"{where}: polygon {k} of 'segmentation' is {shown!r}; allowed: a list of "
                    "x, y numbers, an even count >= 6 (3 points)"
                )
                return None
        return "polygons"
    p.add(f"{where}: 'segmentation' is a {type(segm).__name__}; allowed: polygons or RLE")
    return None


def check_coco_json(json_file: str, label: str = "", data: Optional[Dict] = None) -> CocoSummary:
    """Check that ``json_file`` is a usable COCO instances file (the structure, unique integer
    ids, images' sizes, each annotation's image, category, box, crowd flag, mask and keypoints;
    one keypoint list shared by the categories), and summarise it.

    Args:
        json_file: the annotation file.
        label: what named the file (e.g. ``"DATASETS.TRAIN_JSON"``), put in front of messages.
        data: the already-loaded JSON object (``json_file`` is then only used in messages).

    Returns:
        CocoSummary: classes, keypoint names and counts.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: anything else, listing up to ``MAX_LISTED`` problems.
    """
    if data is None:
        data = read_checked_coco_json(json_file, label)
    p = _Problems(json_file, label)
    if not isinstance(data, dict):
        raise p.fatal(
            f"the top level is a JSON {type(data).__name__}; allowed: an object with "
            "'images', 'annotations' and 'categories'"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise p.fatal(
            f"missing {missing} (top-level keys: {sorted(data)[:10]}); allowed: an object with "
            "'images', 'annotations' and 'categories' (COCO instances format)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise p.fatal(f"'{key}' is a JSON {type(data[key]).__name__}; allowed: a list")

    cat_keypoints = _check_categories(data["categories"], p)
    images = _check_images(data["images"], p)
    p.raise_if_any()  # annotations can only be checked against valid images / categories

    kp_lists = {tuple(v) for v in cat_keypoints.values() if v}
    if len(kp_lists) > 1:
        raise p.fatal(
            f"categories have different keypoint lists {sorted(kp_lists)}; allowed: one list "
            "shared by every keypoint category (Detectron2 predicts one keypoint set)"
        )
    keypoint_names = list(next(iter(kp_lists))) if kp_lists else []
    num_kp = len(keypoint_names)

    annotated = set()
    has_rle = has_polygons = False
    missing_segm = missing_kp = 0
    anns = _entries(data["annotations"], "annotations", "annotation", p, "an object", any_id=True)
    for where, a in anns:
        image = images.get(a.get("image_id")) if _is_int(a.get("image_id")) else None
        if image is None:
            p.add(f"{where}: 'image_id' {a.get('image_id')!r} is not the id of any image")
        else:
            annotated.add(a["image_id"])
        cat = a.get("category_id")
        if not _is_int(cat) or cat not in cat_keypoints:
            p.add(
                f"{where}: 'category_id' {cat!r} is not in 'categories'; allowed: "
                f"{sorted(cat_keypoints)}"
            )
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            p.add(f"{where}: 'bbox' is {box!r}; allowed: [x, y, width, height], 4 numbers")
        elif box[2] < 0 or box[3] < 0:
            p.add(f"{where}: 'bbox' {box} has a negative width or height; allowed: >= 0")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, bool):
            p.add(f"{where}: 'iscrowd' is {crowd!r}; allowed: 0 or 1")
        if a.get("ignore", 0):
            p.add(
                f"{where}: 'ignore' is {a['ignore']!r}; not supported by Detectron2; allowed: 0 "
                "or absent (mark regions to ignore with iscrowd 1)"
            )
        kind = None
        if "segmentation" in a:
            kind = _check_segmentation(a["segmentation"], image, where, p)
            has_rle |= kind == "rle"
            has_polygons |= kind == "polygons"
        if kind is None and not crowd:
            missing_segm += 1
        kps = a.get("keypoints")
        if kps is None or kps == []:
            missing_kp += bool(num_kp)
        elif not num_kp:
            p.add(f"{where}: has 'keypoints' but no category lists keypoint names")
        elif not isinstance(kps, list) or len(kps) != 3 * num_kp:
            n = len(kps) if isinstance(kps, list) else type(kps).__name__
            p.add(
                f"{where}: 'keypoints' has {n} values; allowed: 3 x {num_kp} = {3 * num_kp} "
                f"(x, y, v for {keypoint_names})"
            )
        elif not all(_is_number(v) for v in kps) or any(v not in (0, 1, 2) for v in kps[2::3]):
            p.add(f"{where}: 'keypoints' {kps}: allowed: numbers, visibility v in 0, 1, 2")
    p.raise_if_any()

    categories = [
        {"id": c["id"], "name": c["name"]}
        for c in sorted(data["categories"], key=lambda c: c["id"])
    ]
    return CocoSummary(
        json_file=json_file,
        categories=categories,
        keypoint_names=keypoint_names,
        keypoint_classes=[c["name"] for c in categories if cat_keypoints[c["id"]]],
        num_images=len(images),
        num_annotations=len(data["annotations"]),
        num_empty_images=len(set(images) - annotated),
        has_rle=has_rle,
        has_polygons=has_polygons,
        missing_segmentation=missing_segm,
        missing_keypoints=missing_kp,
        images=list(images.values()),
    )


def _oriented_size(img) -> tuple:
    """(width, height) after the EXIF rotation Detectron2's ``read_image`` applies."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: Detectron2 ignores it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_coco_images(
    images: Sequence[Dict[str, Any]], image_root: str, json_file: str = "", label: str = ""
) -> None:
    """Check that every image file exists, its header is readable and its size (after EXIF
    rotation) is the JSON's. Only headers are read: truncated pixel data is found by the loader.

    Args:
        images: ``images`` entries (``id``, ``file_name``, ``height``, ``width``).
        image_root: the folder ``file_name`` is relative to.
        json_file: the JSON the entries come from (for messages).
        label: what named the folder (e.g. ``"DATASETS.TRAIN_IMAGES"``).

    Raises:
        FileNotFoundError: ``image_root`` is not a folder.
        DatasetError: listing missing, unreadable or mis-sized images.
    """
    from PIL import Image, UnidentifiedImageError

    prefix = f"{label}: " if label else ""
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{prefix}image folder {image_root} does not exist")
    problems: List[str] = []
    for im in images:
        path = os.path.join(image_root, im["file_name"])
        where = f"image id {im['id']} ({path})"
        if not os.path.isfile(path):
            problems.append(f"{where}: file not found")
            continue
        try:
            with Image.open(path) as img:
                wh = _oriented_size(img)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            problems.append(f"{where}: unreadable image ({type(e).__name__}: {e})")
            continue
        if wh != (im["width"], im["height"]):
            problems.append(
                f"{where}: the file is {wh[0]}x{wh[1]} (width x height), the JSON says "
                f"{im['width']}x{im['height']}"
            )
    if problems:
        src = f" of {json_file}" if json_file else ""
        raise _listed(
            f"{prefix}{len(problems)} of {len(images)} images{src} cannot be used", problems
        )
