"""COCO-file checks: every malformed file or image is named with the entry, field, bad value and
what is allowed (nonlocal_det/data/coco_check.py)."""

import copy
import json
import os

import pytest
from coco_files import CATEGORIES, KEYPOINT_NAMES, write_split

from nonlocal_det.data.coco import keypoint_flip_map
from nonlocal_det.data.coco_check import (
    DatasetError,
    check_coco_images,
    check_coco_json,
    read_checked_coco_json,
)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    paths = write_split(str(root), "train")
    with open(paths["json"]) as f:
        return paths, json.load(f)


def test_valid_file_summary(split):
    paths, _ = split
    s = check_coco_json(paths["json"])
    assert s.thing_classes == ["disc", "block", "walker"]
    assert s.keypoint_names == KEYPOINT_NAMES
    assert (s.num_images, s.num_empty_images) == (7, 1)
    assert s.has_rle and s.has_polygons and s.missing_segmentation == 0
    assert s.missing_keypoints > 0  # keypoints only on "walker"
    check_coco_images(s.images, paths["images"], paths["json"])  # no error


def _first_ann(data, name):
    cat = [c["id"] for c in CATEGORIES if c["name"] == name][0]
    return next(a for a in data["annotations"] if a["category_id"] == cat)


def _edit(fn):
    def apply(data):
        data = copy.deepcopy(data)
        fn(data)
        return data

    return apply


# (case, edit of the valid JSON object, substrings of the error)
JSON_CASES = [
    ("top level is a list", lambda d: [d], ["top level is a JSON list", "allowed: an object"]),
    (
        "no 'annotations'",
        _edit(lambda d: d.pop("annotations")),
        ["missing ['annotations']", "COCO instances format"],
    ),
    ("'images' not a list", _edit(lambda d: d.update(images={})), ["'images' is a JSON dict"]),
    ("no categories", _edit(lambda d: d.update(categories=[])), ["'categories' is empty"]),
    (
        "annotation of an unknown image",
        _edit(lambda d: d["annotations"][0].update(image_id=999)),
        ["annotations[0] (id 1)", "'image_id' 999 is not the id of any image"],
    ),
    (
        "category id not in categories",
        _edit(lambda d: d["annotations"][1].update(category_id=7)),
        ["annotations[1] (id 2)", "'category_id' 7 is not in 'categories'", "allowed: [1, 2, 3]"],
    ),
    (
        "bbox of 3 numbers",
        _edit(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
        ["'bbox' is [1, 2, 3]", "allowed: [x, y, width, height]"],
    ),
    (
        "bbox with a string",
        _edit(lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4])),
        ["'bbox' is [1, 2, '3', 4]"],
    ),
    (
        "negative box width",
        _edit(lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4])),
        ["negative width or height", "allowed: >= 0"],
    ),
    (
        "duplicate annotation id",
        _edit(lambda d: d["annotations"][1].update(id=1)),
        ["annotations[1] (id 1): id 1 is used by another annotation"],
    ),
    (
        "duplicate image id",
        _edit(lambda d: d["images"][1].update(id=1)),
        ["images[1] (id 1): id 1 is used by another image"],
    ),
    (
        "image without width",
        _edit(lambda d: d["images"][0].pop("width")),
        ["images[0] (id 1): 'width' is None", "allowed: an integer > 0"],
    ),
    (
        "polygon of 2 points",
        _edit(lambda d: _first_ann(d, "disc").update(segmentation=[[1, 2, 3, 4]])),
        ["polygon 0 of 'segmentation' is [1, 2, 3, 4]", "even count >= 6"],
    ),
    (
        "RLE of another size",
        _edit(lambda d: _first_ann(d, "block")["segmentation"].update(size=[5, 5])),
        ["RLE 'size' [5, 5] differs from its image's [height, width] [96, 128]"],
    ),
    (
        "keypoints of the wrong length",
        _edit(lambda d: _first_ann(d, "walker").update(keypoints=[1, 2, 2])),
        ["'keypoints' has 3 values", "allowed: 3 x 3 = 9"],
    ),
    (
        "keypoint visibility 5",
        _edit(lambda d: _first_ann(d, "walker").update(keypoints=[1, 2, 5] * 3)),
        ["visibility v in 0, 1, 2"],
    ),
    (
        "'ignore' flag",
        _edit(lambda d: d["annotations"][0].update(ignore=1)),
        ["'ignore' is 1; not supported by Detectron2"],
    ),
    (
        "two keypoint lists",
        _edit(lambda d: d["categories"][0].update(keypoints=["a"])),
        ["different keypoint lists", "one list shared by every keypoint category"],
    ),
]


@pytest.mark.parametrize("case,edit,substrings", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_content(split, tmp_path, case, edit, substrings):
    _, data = split
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(data)))
    with pytest.raises(DatasetError) as e:
        check_coco_json(str(path), "DATASETS.TRAIN_JSON")
    msg = str(e.value)
    assert msg.startswith(f"DATASETS.TRAIN_JSON: {path}"), msg
    for s in substrings:
        assert s in msg, (s, msg)


def test_many_problems_are_listed_and_counted(split, tmp_path):
    _, data = split
    data = copy.deepcopy(data)
    for a in data["annotations"]:
        a["category_id"] = 42
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"\(13 problems\)") as e:
        check_coco_json(str(path))
    assert str(e.value).count("'category_id' 42") == 10 and "and 3 more" in str(e.value)


@pytest.mark.parametrize(
    "content,substrings",
    [
        (None, [FileNotFoundError, "DATASETS.TRAIN_JSON: annotation file", "does not exist"]),
        (b"", [DatasetError, "is not JSON (Expecting value at line 1 column 1)"]),
        (b'{"images": [', [DatasetError, "is not JSON"]),
        (b"\x89PNG\r\n\x1a\n", [DatasetError, "is not JSON (not UTF-8 text: byte 0 is b'\\x89')"]),
    ],
    ids=["missing", "empty", "truncated", "binary"],
)
def test_unreadable_json(tmp_path, content, substrings):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(substrings[0]) as e:
        read_checked_coco_json(str(path), "DATASETS.TRAIN_JSON")
    for s in substrings[1:]:
        assert s in str(e.value)
    assert str(path) in str(e.value)


def test_json_path_is_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="is not a file"):
        check_coco_json(str(tmp_path))


def test_bad_images(split, tmp_path):
    paths, _ = split
    s = check_coco_json(paths["json"])
    images = tmp_path / "images"
    images.mkdir()
    for im in s.images:
        src = os.path.join(paths["images"], im["file_name"])
        (images / im["file_name"]).write_bytes(open(src, "rb").read())
    (images / s.images[0]["file_name"]).unlink()  # missing
    (images / s.images[1]["file_name"]).write_bytes(b"not an image at all")  # unreadable
    wrong = dict(s.images[2], height=s.images[2]["height"] + 1)  # size differs from the file
    with pytest.raises(DatasetError) as e:
        check_coco_images([s.images[0], s.images[1], wrong] + s.images[3:], str(images), "x.json")
    msg = str(e.value)
    assert "3 of 7 images of x.json cannot be used" in msg
    assert f"image id 1 ({images / s.images[0]['file_name']}): file not found" in msg
    assert f"image id 2 ({images / s.images[1]['file_name']}): unreadable image" in msg
    assert "cannot identify image file" in msg
    h, w = s.images[2]["height"], s.images[2]["width"]
    assert f"the file is {w}x{h} (width x height), the JSON says {w}x{h + 1}" in msg

    with pytest.raises(FileNotFoundError, match="DATASETS.TRAIN_IMAGES: image folder .* does not"):
        check_coco_images(s.images, str(tmp_path / "nope"), label="DATASETS.TRAIN_IMAGES")


def test_keypoint_flip_map():
    names = ["nose", "left_eye", "right_eye", "l_hand", "r_hand", "foot_left", "foot_right"]
    assert keypoint_flip_map(names) == [
        ("left_eye", "right_eye"),
        ("l_hand", "r_hand"),
        ("foot_left", "foot_right"),
    ]
    assert keypoint_flip_map(KEYPOINT_NAMES) == [("left_foot", "right_foot")]
