"""Tests of the synthetic COCO-format dataset (nonlocal_demo.synthetic)."""

import json
import math
import os
from itertools import combinations

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from nonlocal_demo.synthetic import (
    SYNTHETIC_DATASET_VERSION,
    SYNTHETIC_KEYPOINT_CATEGORY,
    SYNTHETIC_KEYPOINT_CONNECTION_RULES,
    SYNTHETIC_KEYPOINT_FLIP_MAP,
    SYNTHETIC_KEYPOINT_NAMES,
    SYNTHETIC_KEYPOINT_OKS_SIGMAS,
    SYNTHETIC_THING_CLASSES,
    default_dataset_root,
    generate_synthetic_coco,
    register_synthetic_coco,
)
from nonlocal_demo.generate_data import main as generate_data_main

K = len(SYNTHETIC_KEYPOINT_NAMES)
SMALL = dict(num_train=8, num_val=4)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate_synthetic_coco(root, **SMALL)
    return root


def _load(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "rb") as f:
        return f.read()


def _images(root, split):
    names = sorted(os.listdir(os.path.join(root, split)))
    return names, [cv2.imread(os.path.join(root, split, n), cv2.IMREAD_UNCHANGED) for n in names]


def _unique_prefix(request):
    return "test_syn_" + request.node.name.replace("[", "_").replace("]", "_")


def test_deterministic(tmp_path, dataset_root):
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    generate_synthetic_coco(again, **SMALL)
    generate_synthetic_coco(other, seed=1, **SMALL)
    for split in ("train", "val"):
        assert _load(again, split) == _load(dataset_root, split)
        names_a, images_a = _images(again, split)
        names_b, images_b = _images(dataset_root, split)
        assert names_a == names_b and len(names_a) == SMALL[f"num_{split}"]
        for a, b in zip(images_a, images_b):
            assert a.shape == (192, 192, 3) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)
    assert _load(other, "train") != _load(dataset_root, "train")
    assert not np.array_equal(_images(other, "train")[1][0], _images(dataset_root, "train")[1][0])


def test_first_images_do_not_depend_on_the_number_of_images(tmp_path, dataset_root):
    more = str(tmp_path / "more")
    generate_synthetic_coco(more, num_train=10, num_val=4)
    a = json.loads(_load(more, "train"))
    b = json.loads(_load(dataset_root, "train"))
    assert a["images"][:8] == b["images"]
    assert a["annotations"][: len(b["annotations"])] == b["annotations"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_validity(dataset_root, split):
    coco = COCO(os.path.join(dataset_root, "annotations", f"instances_{split}.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert sorted(c["id"] for c in cats) == [1, 2, 3, 4]
    assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(SYNTHETIC_THING_CLASSES)
    kp_cats = [c for c in cats if "keypoints" in c]
    assert len(kp_cats) == 1 and kp_cats[0]["name"] == SYNTHETIC_KEYPOINT_CATEGORY
    assert kp_cats[0]["keypoints"] == list(SYNTHETIC_KEYPOINT_NAMES)
    for a, b in kp_cats[0]["skeleton"]:
        assert 1 <= a <= K and 1 <= b <= K
    for left, right in SYNTHETIC_KEYPOINT_FLIP_MAP:
        assert left in SYNTHETIC_KEYPOINT_NAMES and right in SYNTHETIC_KEYPOINT_NAMES
    for a, b, colour in SYNTHETIC_KEYPOINT_CONNECTION_RULES:
        assert a in SYNTHETIC_KEYPOINT_NAMES and b in SYNTHETIC_KEYPOINT_NAMES and len(colour) == 3
    assert len(SYNTHETIC_KEYPOINT_OKS_SIGMAS) == K

    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    for img in coco.loadImgs(coco.getImgIds()):
        assert os.path.isfile(os.path.join(dataset_root, split, img["file_name"]))
        assert (img["height"], img["width"]) == (192, 192)
    present = set()
    for ann in coco.loadAnns(coco.getAnnIds()):
        present.add(ann["category_id"])
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        assert ann["segmentation"] and all(
            len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"]
        )
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert np.abs(np.array(ann["bbox"]) - np.array(tight)).max() <= 1, (ann["bbox"], tight)
        assert abs(int(mask.sum()) - ann["area"]) <= 0.05 * ann["area"] + 2
        kps = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        assert kps.shape == (K, 3)
        if ann["category_id"] == 4:
            assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum())
            x, y, w, h = ann["bbox"]
            for kx, ky, v in kps:
                assert v in (0, 1, 2)
                if v > 0:
                    assert x <= kx <= x + w and y <= ky <= y + h
                else:
                    assert kx == 0 and ky == 0
        else:  # plain categories: all-zero keypoints, ignored by COCOeval (num_keypoints == 0)
            assert ann["num_keypoints"] == 0 and not kps.any()
    if split == "train":
        assert present == {1, 2, 3, 4}


def test_objects_overlap_and_keypoints_are_labelled(dataset_root):
    coco = COCO(os.path.join(dataset_root, "annotations", "instances_train.json"))
    overlapping = 0
    visibilities = set()
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        for a, b in combinations(anns, 2):
            ax, ay, aw, ah = a["bbox"]
            bx, by, bw, bh = b["bbox"]
            if min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by):
                overlapping += 1
        for ann in anns:
            if ann["category_id"] == 4:
                visibilities.update(ann["keypoints"][2::3])
    assert overlapping >= 1
    assert 2 in visibilities
    # Masks are the visible parts: two annotations of one image never share a pixel.
    for img_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))]
        if masks:
            assert np.stack(masks).sum(axis=0).max() <= 1


def test_polygons_decode_to_the_visible_mask(tmp_path):
    # The polygons follow pixel edges: they decode to masks that do not overlap and whose areas
    # are exactly the stored pixel areas.
    root = str(tmp_path / "d")
    generate_synthetic_coco(root, num_train=4, num_val=1, seed=3)
    coco = COCO(os.path.join(root, "annotations", "instances_train.json"))
    for ann in coco.loadAnns(coco.getAnnIds()):
        rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 192, 192))
        assert int(mask_util.area(rle)) == ann["area"]


def _files(root):
    return {
        os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
        for d, _, names in os.walk(root)
        for n in names
    }


def test_a_folder_that_exists_is_complete(tmp_path, monkeypatch):
    root = str(tmp_path / "d")
    assert generate_synthetic_coco(root, **SMALL) is True
    files = _files(root)
    assert len(files) == 2 + SMALL["num_train"] + SMALL["num_val"]  # 2 JSON files + images
    assert generate_synthetic_coco(root, **SMALL) is False  # nothing written
    assert _files(root) == files
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folder left

    # Interrupted (here: an error while writing the validation split): no dataset folder, no
    # temporary folder; the next run generates the same files.
    import nonlocal_demo.synthetic as synthetic

    reference = _load(root, "train")
    original = synthetic._generate_image
    calls = []

    def failing(rng, size):
        calls.append(1)
        if len(calls) > SMALL["num_train"]:
            raise KeyboardInterrupt
        return original(rng, size)

    again = str(tmp_path / "again")
    monkeypatch.setattr(synthetic, "_generate_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_coco(again, **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["d"]
    monkeypatch.setattr(synthetic, "_generate_image", original)
    assert generate_synthetic_coco(again, **SMALL) is True
    assert _load(again, "train") == reference


def test_two_processes_generating_at_once(tmp_path):
    import multiprocessing

    root = str(tmp_path / "d")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.starmap(generate_synthetic_coco, [(root, 6, 2)] * 2)
    assert sorted(results) in ([False, True], [True, True])
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert len(os.listdir(os.path.join(root, "train"))) == 6


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("NONLOCAL_DET_DATASETS", str(tmp_path))
    dirname = f"synthetic_coco_v{SYNTHETIC_DATASET_VERSION}"
    assert default_dataset_root() == os.path.join(str(tmp_path), dirname)
    monkeypatch.delenv("NONLOCAL_DET_DATASETS")
    expected = os.path.expanduser(f"~/.cache/nonlocal_det/datasets/{dirname}")
    assert default_dataset_root() == os.path.abspath(expected)


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_train=0 is not supported; allowed: an int >= 1"):
        generate_synthetic_coco(str(tmp_path / "x"), num_train=0)
    with pytest.raises(ValueError, match="seed=-1"):
        generate_synthetic_coco(str(tmp_path / "x"), seed=-1)


def test_registration(dataset_root, tmp_path, request):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    prefix = _unique_prefix(request)
    train, val = register_synthetic_coco(dataset_root, name_prefix=prefix)
    assert (train, val) == (f"{prefix}_train", f"{prefix}_val")
    assert register_synthetic_coco(dataset_root, name_prefix=prefix) == (train, val)  # no-op

    for name, split in ((train, "train"), (val, "val")):
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == SMALL[f"num_{split}"]
        n_kp = 0
        for record in dicts:
            assert os.path.isfile(record["file_name"])
            for ann in record["annotations"]:
                assert len(ann["keypoints"]) == 3 * K
                assert 0 <= ann["category_id"] < 4
                if ann["category_id"] != SYNTHETIC_THING_CLASSES.index(SYNTHETIC_KEYPOINT_CATEGORY):
                    assert not any(ann["keypoints"][2::3])  # v=0: Detectron2 zeroes x, y
                else:
                    n_kp += 1
        if split == "train":
            assert n_kp > 0
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SYNTHETIC_THING_CLASSES)
        assert meta.evaluator_type == "coco"
        assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)
        assert meta.keypoint_names == list(SYNTHETIC_KEYPOINT_NAMES)
        assert [tuple(p) for p in meta.keypoint_flip_map] == list(SYNTHETIC_KEYPOINT_FLIP_MAP)
        assert len(meta.keypoint_connection_rules) == len(SYNTHETIC_KEYPOINT_CONNECTION_RULES)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
        assert meta.keypoint_oks_sigmas == list(SYNTHETIC_KEYPOINT_OKS_SIGMAS)

    # Registered again for other files: replaced (as for a user's COCO files).
    other = str(tmp_path / "other")
    generate_synthetic_coco(other, num_train=2, num_val=1)
    register_synthetic_coco(other, name_prefix=prefix)
    assert len(DatasetCatalog.get(train)) == 2
    assert MetadataCatalog.get(train).image_root == os.path.join(other, "train")


def test_register_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        register_synthetic_coco(str(tmp_path / "nothing"), name_prefix="test_syn_missing")


def test_generate_data_command(tmp_path, capsys):
    root = str(tmp_path / "p")
    assert generate_data_main(["--root", root, "--num-train", "3", "--num-val", "2"]) == 0
    assert "generated" in capsys.readouterr().out
    assert generate_data_main(["--root", root, "--num-train", "3", "--num-val", "2"]) == 0
    out = capsys.readouterr().out
    assert "already there" in out and "train: 3 images" in out and "star_person=" in out


def _tiny_cfg(train_name, val_name):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 128
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = K
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (64, 64)
    cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = 1
    cfg.INPUT.MIN_SIZE_TRAIN = (192,)
    cfg.INPUT.MAX_SIZE_TRAIN = 192
    cfg.INPUT.MIN_SIZE_TEST = 192
    cfg.INPUT.MAX_SIZE_TEST = 192
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.TEST.KEYPOINT_OKS_SIGMAS = list(SYNTHETIC_KEYPOINT_OKS_SIGMAS)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model still predicts something
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


@pytest.mark.slow
def test_detectron2_trains_and_evaluates(dataset_root, tmp_path, request):
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    train, val = register_synthetic_coco(dataset_root, name_prefix=_unique_prefix(request))
    cfg = _tiny_cfg(train, val)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9)
    data = iter(build_detection_train_loader(cfg))  # horizontal flip needs the flip map
    with EventStorage(0):
        for _ in range(2):
            batch = next(data)
            assert all(b["instances"].has("gt_keypoints") for b in batch)
            losses = model(batch)
            assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_keypoint"} <= set(losses)
            for name, value in losses.items():
                assert math.isfinite(float(value)), name
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()

    model.eval()
    evaluator = COCOEvaluator(
        val,
        tasks=("bbox", "segm", "keypoints"),
        output_dir=str(tmp_path / "eval"),
        use_fast_impl=False,
        kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
    )
    results = inference_on_dataset(model, build_detection_test_loader(cfg, val), evaluator)
    assert {"bbox", "segm", "keypoints"} <= set(results), results
    assert "AP" in results["keypoints"]
