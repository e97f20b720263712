"""Bad inputs, each a clear error naming the key or file, the bad value and what is allowed, raised
before any training work starts (by ``train_net.py``'s setup sequence: config, checks, dataset
registration, dataset checks); and the inputs that are not errors but must run: images without
annotations, images smaller than the network stride, very elongated images.

CASES is the table of the README's "Reliability" section.
"""

import json
import os
import shutil

import pytest
import torch
from coco_files import write_dataset
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from subproc import DEMO, TINY, env_for, run_train_net
from utils import train_cfg

from nonlocal_det.config import ConfigKeyError
from nonlocal_det.data import check_datasets, register_datasets_for_config
from nonlocal_det.data.coco import TRAIN_NAME
from nonlocal_det.data.coco_check import DatasetError
from nonlocal_det.engine import ImageLoadError, NamedErrorsMapper, NonLocalTrainer
from nonlocal_det.modeling import check_model_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A valid dataset (``files``) and broken variants of it (``root``)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    files = write_dataset(str(root / "good"))
    train_json, images = files["DATASETS.TRAIN_JSON"], files["DATASETS.TRAIN_IMAGES"]
    with open(train_json) as f:
        coco = json.load(f)
    (root / "garbage.json").write_bytes(b"\x00\x01 not json")
    (root / "list.json").write_text(json.dumps([coco]))
    (root / "nocats.json").write_text(json.dumps({k: coco[k] for k in ("images", "annotations")}))
    bad_cat = json.loads(json.dumps(coco))
    bad_cat["annotations"][2]["category_id"] = 9
    (root / "badcat.json").write_text(json.dumps(bad_cat))
    for name in ("missing_image", "unreadable_image", "truncated_image"):
        shutil.copytree(images, root / name)
    os.remove(root / "missing_image" / "001.png")
    (root / "unreadable_image" / "001.png").write_bytes(b"\x00" * 64)
    png = (root / "truncated_image" / "001.png").read_bytes()
    (root / "truncated_image" / "001.png").write_bytes(png[: len(png) // 2])
    # registered from Python, as Detectron2 users do: with its classes known, and lazily
    for name, meta in (("user_coco_known", {"thing_classes": ["a", "b", "c"]}), ("user_coco", {})):
        if name not in DatasetCatalog.list():
            register_coco_instances(name, meta, train_json, images)
    MetadataCatalog.get("user_coco_known").set(keypoint_names=["a", "b", "c"], keypoint_flip_map=[])
    return root, files


def _json(files, path, images=None):
    return [
        "DATASETS.TRAIN_JSON",
        str(path),
        "DATASETS.TRAIN_IMAGES",
        str(images or files["DATASETS.TRAIN_IMAGES"]),
    ]


def prepare(opts):
    """What train_net.py's setup() does before training, minus logging set-up."""
    cfg = train_cfg(DEMO, opts)
    check_model_config(cfg)
    cfg.freeze()
    register_datasets_for_config(cfg)
    check_datasets(cfg)
    return cfg


NO_TEST = ["DATASETS.TEST", "()"]
# (case, opts(root, files), error, substrings of the message)
CASES = [
    # ---- MODEL.NONLOCAL and the backbone it goes into ----------------------------------------
    (
        "unknown MODEL.NONLOCAL key",
        lambda r, f: ["MODEL.NONLOCAL.PAIRWISE_FN", "dot_product"],
        ConfigKeyError,
        ["MODEL.NONLOCAL.PAIRWISE_FN (in the command line) is not a config key", "'PAIRWISE'"],
    ),
    (
        "unknown pairwise function",
        lambda r, f: ["MODEL.NONLOCAL.PAIRWISE", "softmax"],
        ValueError,
        ["MODEL.NONLOCAL.PAIRWISE='softmax' is not supported", "'embedded_gaussian'"],
    ),
    (
        "inner ratio 0",
        lambda r, f: ["MODEL.NONLOCAL.INNER_RATIO", "0.0"],
        ValueError,
        ["MODEL.NONLOCAL.INNER_RATIO=0.0 is not supported; allowed: a number in (0, 1]"],
    ),
    (
        "frozen BN after W_z",
        lambda r, f: ["MODEL.NONLOCAL.NORM", "FrozenBN"],
        ValueError,
        ["MODEL.NONLOCAL.NORM='FrozenBN' is not supported; allowed: ['', 'GN', 'BN', 'SyncBN']"],
    ),
    (
        "unknown placement",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "paper_3"],
        ValueError,
        ["MODEL.NONLOCAL.PLACEMENT='paper_3' is not supported", "'paper_5'"],
    ),
    (
        "not a boolean",
        lambda r, f: ["MODEL.NONLOCAL.SUBSAMPLE", "yes"],
        ValueError,
        ["Type mismatch", "MODEL.NONLOCAL.SUBSAMPLE"],
    ),
    (
        "block index outside its stage (R18 res4: 2 blocks)",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES4_BLOCKS", "[2]"],
        ValueError,
        ["RES4_BLOCKS=[2]: index 2 is outside res4, which has 2", "allowed indices: -2..1"],
    ),
    (
        "block list without PLACEMENT custom",
        lambda r, f: ["MODEL.NONLOCAL.RES3_BLOCKS", "[0]"],
        ValueError,
        ["RES3_BLOCKS=[0] is only used with MODEL.NONLOCAL.PLACEMENT='custom'"],
    ),
    (
        "paper_5 on a too shallow ResNet",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "paper_5"],
        ValueError,
        ["'paper_5' needs at least 3 residual blocks in res4", "allowed for this depth"],
    ),
    (
        "unknown block type",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "gcnet"],
        ValueError,
        ["MODEL.NONLOCAL.TYPE='gcnet' is not supported", "'global_context'", "'criss_cross'"],
    ),
    (
        "a position the residual block does not have (R18: 2 convs)",
        lambda r, f: [
            "MODEL.NONLOCAL.TYPE",
            "global_context",
            "MODEL.NONLOCAL.POSITION",
            "after_conv3",
        ],
        ValueError,
        ["MODEL.NONLOCAL.POSITION='after_conv3': the residual blocks of this ResNet (BasicBlock"],
    ),
    (
        "a block type's option out of range",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "global_context", "MODEL.NONLOCAL.GC.RATIO", "0.0"],
        ValueError,
        ["MODEL.NONLOCAL.GC.RATIO=0.0 is not supported"],
    ),
    (
        "generalized attention without any energy term",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "generalized_attention"]
        + ["MODEL.NONLOCAL.GA.ATTENTION_TYPE", "[0, 0, 0, 0]"],
        ValueError,
        ["MODEL.NONLOCAL.GA.ATTENTION_TYPE='0000' is not supported", "'1111'"],
    ),
    (
        "block in a stage the backbone does not build",
        lambda r, f: [
            "MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES5_BLOCKS", "[0]",
            "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4']",
            "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4']",
        ],  # fmt: skip
        ValueError,
        ["asks for a non-local block in res5, but the backbone builds only ['res2', 'res3', "],
    ),
    (
        "keypoint-head block after a conv that does not exist",
        lambda r, f: ["MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS", "[2, 6]"],
        ValueError,
        ["KEYPOINT_HEAD_BLOCKS=[2, 6]: the keypoint head has 4 convs", "integers in 1..4"],
    ),
    (
        "unsupported depth",
        lambda r, f: ["MODEL.RESNETS.DEPTH", "42"],
        ValueError,
        ["MODEL.RESNETS.DEPTH=42 is not supported; allowed: [18, 34, 50, 101, 152]"],
    ),
    (
        "FPN input the ResNet does not output",
        lambda r, f: ["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4']"],
        ValueError,
        ["MODEL.FPN.IN_FEATURES=['res2', 'res3', 'res4', 'res5'] uses ['res5']"],
    ),
    (
        "R18 with a bottleneck width (Detectron2 asserts)",
        lambda r, f: ["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"],
        ValueError,
        ["MODEL.RESNETS.RES2_OUT_CHANNELS=256 is not supported with MODEL.RESNETS.DEPTH=18"],
    ),
    # ---- dataset files --------------------------------------------------------------------------
    (
        "JSON file missing",
        lambda r, f: _json(f, r / "nope.json"),
        FileNotFoundError,
        ["DATASETS.TRAIN_JSON: annotation file", "nope.json does not exist"],
    ),
    (
        "JSON file not JSON",
        lambda r, f: _json(f, r / "garbage.json"),
        DatasetError,
        ["garbage.json is not JSON (Expecting value at line 1 column 1)"],
    ),
    (
        "JSON not COCO-shaped (a list)",
        lambda r, f: _json(f, r / "list.json"),
        DatasetError,
        ["list.json is not a usable COCO-format file: the top level is a JSON list"],
    ),
    (
        "JSON without categories",
        lambda r, f: _json(f, r / "nocats.json"),
        DatasetError,
        ["missing ['categories']", "'images', 'annotations' and 'categories'"],
    ),
    (
        "annotation category id not in categories",
        lambda r, f: _json(f, r / "badcat.json"),
        DatasetError,
        ["annotations[2] (id 3): 'category_id' 9 is not in 'categories'; allowed: [1, 2, 3]"],
    ),
    (
        "JSON without its image folder",
        lambda r, f: ["DATASETS.TRAIN_JSON", f["DATASETS.TRAIN_JSON"]],
        ValueError,
        ["is set but DATASETS.TRAIN_IMAGES is empty; allowed: both"],
    ),
    (
        "image folder missing",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "no_images"),
        FileNotFoundError,
        ["DATASETS.TRAIN_IMAGES: image folder", "no_images does not exist"],
    ),
    (
        "image file missing",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "missing_image"),
        DatasetError,
        ["1 of 7 images of", "image id 2 (", "missing_image/001.png): file not found"],
    ),
    (
        "image file unreadable",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "unreadable_image"),
        DatasetError,
        ["unreadable_image/001.png): unreadable image (UnidentifiedImageError"],
    ),
    # ---- datasets vs the config -------------------------------------------------------------------
    (
        "more categories than NUM_CLASSES",
        lambda r, f: ["DATASETS.TRAIN", "('user_coco_known',)", *NO_TEST]
        + ["MODEL.ROI_HEADS.NUM_CLASSES", "2"],
        ValueError,
        ["'user_coco_known' has 3 categories", "NUM_CLASSES=2; allowed: NUM_CLASSES >= 3"],
    ),
    (
        "keypoint count differs from the head's",
        lambda r, f: ["DATASETS.TRAIN", "('user_coco_known',)", *NO_TEST],
        ValueError,
        ["has 3 keypoints ['a', 'b', 'c'], but MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS=5"],
    ),
    (
        "OKS sigmas of the wrong length",
        lambda r, f: [x for kv in f.items() for x in kv],  # the demo config has 5 sigmas
        ValueError,
        ["TEST.KEYPOINT_OKS_SIGMAS=[0.08, 0.08, 0.08, 0.08, 0.08]", "allowed: 3 values"],
    ),
    (
        "dataset not registered",
        lambda r, f: ["DATASETS.TRAIN", "('my_train',)", *NO_TEST],
        ValueError,
        ["DATASETS.TRAIN: dataset 'my_train' is not registered", "DATASETS.TRAIN_JSON"],
    ),
    (
        "Detectron2's COCO without its files",
        lambda r, f: ["DATASETS.TRAIN", "()", "DATASETS.TEST", "('coco_2017_val',)"],
        FileNotFoundError,
        ["DATASETS.TEST: dataset 'coco_2017_val': its json_file", "$DETECTRON2_DATASETS"],
    ),
]


@pytest.mark.parametrize("case,opts,error,substrings", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(data, case, opts, error, substrings, monkeypatch):
    root, files = data
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.setenv("NONLOCAL_DET_DATASETS", str(root / "cache"))  # never generate elsewhere
    monkeypatch.chdir(root)  # Detectron2's builtin datasets are then looked for in ./datasets
    with pytest.raises(error) as e:
        prepare(opts(root, files))
    for s in substrings:
        assert s in str(e.value), f"{s!r} not in:\n{e.value}"


def test_lazily_registered_dataset_is_checked_before_the_first_iteration(data, tmp_path):
    """A dataset registered from Python knows its classes only once loaded: the trainer checks
    it right after building its data loader, before any iteration."""
    cfg = prepare(["DATASETS.TRAIN", "('user_coco',)", *NO_TEST, "MODEL.KEYPOINT_ON", "False"])
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(ValueError, match="'user_coco' has 3 categories .*NUM_CLASSES=2"):
        NonLocalTrainer(cfg)


def test_truncated_image_is_named_when_loaded(data):
    """A file whose header is fine but whose data is cut passes the pre-check (headers only);
    the data loader's error then names it."""
    root, files = data
    cfg = prepare(_json(files, files["DATASETS.TRAIN_JSON"], root / "truncated_image"))
    record = next(d for d in DatasetCatalog.get(TRAIN_NAME) if d["file_name"].endswith("001.png"))
    mapper = NamedErrorsMapper(DatasetMapper(cfg, True), TRAIN_NAME)
    with pytest.raises(ImageLoadError) as e:
        mapper(record)
    assert f"cannot load dataset '{TRAIN_NAME}', image id 2, file {record['file_name']}" in str(
        e.value
    )


@pytest.mark.slow
def test_train_net_stops_before_training(data, tmp_path):
    root, files = data
    out = tmp_path / "out"
    args = ["--config-file", DEMO, *_json(files, root / "badcat.json"), "OUTPUT_DIR", out]
    log = run_train_net(args, env_for(tmp_path), ok=False)
    assert "DatasetError: DATASETS.TRAIN_JSON: " in log and "'category_id' 9 is not in" in log
    assert "Starting training" not in log
    assert not out.exists()  # the files are checked before OUTPUT_DIR is even created


def test_tiny_and_elongated_images_run(data):
    """Images smaller than the network stride (12x12; stride 32 at res5, 64 at p6) and a 1:17
    image 12 px high: training losses and inference outputs (one image per batch, as in
    evaluation) are finite; the res4 non-local block sees 2x2 and 2x14 positions (inputs padded
    to a multiple of 32). The empty image is skipped in training."""
    from detectron2.data import get_detection_dataset_dicts

    _, files = data
    sizes = ["INPUT.MIN_SIZE_TRAIN", "(12,)", "INPUT.MAX_SIZE_TRAIN", "400"]
    sizes += ["INPUT.MIN_SIZE_TEST", "12", "INPUT.MAX_SIZE_TEST", "400"]
    sizes += ["TEST.KEYPOINT_OKS_SIGMAS", "[0.08, 0.08, 0.08]"]
    # the demo's FPN width: GroupNorm(32 groups) of 1x1 maps needs 2 channels per group
    sizes += ["MODEL.FPN.OUT_CHANNELS", "64"]
    cfg = prepare([x for kv in files.items() for x in kv] + TINY + sizes)
    assert len(get_detection_dataset_dicts([TRAIN_NAME])) == 6  # of 7: the empty one is dropped
    records = [d for d in DatasetCatalog.get(TRAIN_NAME) if d["height"] in (12, 24)]
    cfg.defrost()
    cfg.INPUT.RANDOM_FLIP = "none"
    torch.manual_seed(0)
    model = build_model(cfg)
    block = model.backbone.bottom_up.res4.nonlocal0
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    batch = [DatasetMapper(cfg, True)(r) for r in records]
    assert sorted(tuple(b["image"].shape[1:]) for b in batch) == [(12, 12), (12, 200)]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    seen.clear()
    for r in records:
        with torch.no_grad():
            (out,) = model([DatasetMapper(cfg, False)(r)])
        inst = out["instances"]
        assert inst.image_size == (r["height"], r["width"])
        assert torch.isfinite(inst.pred_boxes.tensor).all()
    assert sorted(seen) == [(2, 2), (2, 14)]
