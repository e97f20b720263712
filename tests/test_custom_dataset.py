"""Your own COCO-format dataset through config keys: the config adapts to the file (classes,
keypoints, mask format), registration, and train + evaluate end to end with train_net.py on a
dataset this test writes (polygons, RLE, keypoints on one category, an image without annotations,
a 12x12 and a 24x400 image)."""

import json

import pytest
import yaml
from coco_files import KEYPOINT_NAMES, write_dataset, write_split
from subproc import DEMO, TINY, env_for, run_train_net
from utils import train_cfg

from nonlocal_det.data import register_datasets_for_config
from nonlocal_det.data.coco import TEST_NAME, TRAIN_NAME
from nonlocal_det.data.coco_check import DatasetError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("mydata")))


def _opts(values):
    return [x for kv in values.items() for x in kv]


def test_config_takes_classes_keypoints_and_mask_format_from_the_file(dataset):
    cfg = train_cfg(DEMO, _opts(dataset) + ["MODEL.ROI_HEADS.NUM_CLASSES", "80"])
    assert cfg.DATASETS.TRAIN == (TRAIN_NAME,) and cfg.DATASETS.TEST == (TEST_NAME,)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3  # the file wins over the config
    assert cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 3
    assert cfg.INPUT.MASK_FORMAT == "bitmask"  # the file has RLE masks


def test_train_file_only_means_no_evaluation(dataset):
    opts = ["DATASETS.TRAIN_JSON", dataset["DATASETS.TRAIN_JSON"]]
    opts += ["DATASETS.TRAIN_IMAGES", dataset["DATASETS.TRAIN_IMAGES"]]
    cfg = train_cfg(DEMO, opts)
    assert cfg.DATASETS.TRAIN == (TRAIN_NAME,) and cfg.DATASETS.TEST == ()


def test_register_pads_keypoints_and_keeps_empty_images(dataset, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    monkeypatch.setenv("NONLOCAL_DET_DATASETS", str(tmp_path))
    cfg = train_cfg(DEMO, _opts(dataset))
    register_datasets_for_config(cfg)
    meta = MetadataCatalog.get(TRAIN_NAME)
    assert meta.thing_classes == ["disc", "block", "walker"]
    assert meta.keypoint_names == KEYPOINT_NAMES
    assert meta.keypoint_flip_map == [("left_foot", "right_foot")]
    assert meta.source_json == dataset["DATASETS.TRAIN_JSON"]
    # the evaluator's ground truth: a cached copy in which every annotation has keypoints
    assert meta.json_file.startswith(str(tmp_path))
    with open(meta.json_file) as f:
        assert all(len(a["keypoints"]) == 9 for a in json.load(f)["annotations"])
    dicts = DatasetCatalog.get(TRAIN_NAME)
    assert len(dicts) == 7 and sum(not d["annotations"] for d in dicts) == 1
    assert all(len(a["keypoints"]) == 9 for d in dicts for a in d["annotations"])
    register_datasets_for_config(cfg)  # the same files again: nothing to do


@pytest.mark.parametrize(
    "extra,error,substrings",
    [
        (
            ["DATASETS.TEST_JSON", ""],  # TEST_IMAGES stays set
            ValueError,
            ["DATASETS.TEST_IMAGES=", "is set but DATASETS.TEST_JSON is empty", "both"],
        ),
        (
            ["DATASETS.TRAIN_JSON", "/nonexistent/train.json"],
            FileNotFoundError,
            ["DATASETS.TRAIN_JSON: annotation file /nonexistent/train.json does not exist"],
        ),
    ],
    ids=["json key without its partner", "missing json"],
)
def test_key_errors(dataset, extra, error, substrings):
    with pytest.raises(error) as e:
        train_cfg(DEMO, _opts(dataset) + extra)
    for s in substrings:
        assert s in str(e.value)


def test_model_needs_what_the_file_lacks(dataset, tmp_path):
    with open(dataset["DATASETS.TRAIN_JSON"]) as f:
        data = json.load(f)
    for c in data["categories"]:
        c.pop("keypoints", None)
    for a in data["annotations"]:
        a.pop("keypoints", None)
    data["annotations"][0].pop("segmentation")
    path = tmp_path / "nokp.json"
    path.write_text(json.dumps(data))
    opts = ["DATASETS.TRAIN_JSON", str(path), "DATASETS.TRAIN_IMAGES", str(tmp_path)]
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON=True, but 1 non-crowd annotations"):
        train_cfg(DEMO, opts)
    with pytest.raises(ValueError, match=r"MODEL.KEYPOINT_ON=True, but no category .* lists"):
        train_cfg(DEMO, opts + ["MODEL.MASK_ON", "False"])
    cfg = train_cfg(DEMO, opts + ["MODEL.MASK_ON", "False", "MODEL.KEYPOINT_ON", "False"])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3


def test_train_and_test_files_must_share_categories(dataset, tmp_path):
    other = write_split(str(tmp_path), "val", [(32, 32, [("disc", 2, 2, 20)])])
    with open(other["json"]) as f:
        data = json.load(f)
    data["categories"][0]["name"] = "ring"
    with open(other["json"], "w") as f:
        json.dump(data, f)
    opts = _opts(dataset) + ["DATASETS.TEST_JSON", other["json"]]
    with pytest.raises(ValueError, match="have different categories"):
        train_cfg(DEMO, opts + ["DATASETS.TEST_IMAGES", other["images"]])


def test_register_checks_images(dataset, tmp_path):
    opts = _opts(dataset) + ["DATASETS.TRAIN_IMAGES", str(tmp_path)]  # an empty folder
    cfg = train_cfg(DEMO, opts)
    with pytest.raises(DatasetError, match=r"DATASETS.TRAIN_IMAGES: 7 of 7 images of .* cannot"):
        register_datasets_for_config(cfg)


@pytest.mark.slow
def test_train_and_evaluate_on_your_own_coco_files(dataset, tmp_path):
    out = tmp_path / "out"
    args = ["--config-file", DEMO, *_opts(dataset), *TINY, "SOLVER.MAX_ITER", "4"]
    args += ["DATALOADER.ASPECT_RATIO_GROUPING", "False", "INPUT.MIN_SIZE_TRAIN", "(64,)"]
    args += ["TEST.KEYPOINT_OKS_SIGMAS", "[0.08, 0.08, 0.08]", "OUTPUT_DIR", out]
    log = run_train_net(args, env_for(tmp_path / "cache"))
    assert f"Registered {TRAIN_NAME}: {dataset['DATASETS.TRAIN_JSON']} (7 images" in log
    # the image without annotations is skipped in training...
    assert "Removed 1 images with no usable annotations. 6 images left." in log
    # ... and every task is evaluated on the val file (which has one too)
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log, task
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 3
    assert saved["MODEL"]["ROI_KEYPOINT_HEAD"]["NUM_KEYPOINTS"] == 3
    assert saved["DATASETS"]["TRAIN"] == [TRAIN_NAME]
    with open(out / "inference" / TEST_NAME / "coco_instances_results.json") as f:
        results = json.load(f)
    # predictions on the normal images and on the 24x400 one (8 px high at the 128 px test size)
    assert {1, 2, 3} <= {r["image_id"] for r in results}
    assert all(len(r["keypoints"]) == 9 for r in results)
    records = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 3
