"""Bad inputs, each a clear error naming the key or file, the bad value and what is allowed, raised
before any training work starts (by ``train_net.py``'s setup sequence: config, checks, dataset
registration, dataset checks); and the inputs that are not errors but must run: images without
annotations, images smaller than the network stride, very elongated images.

CASES are the rows of the error table in docs/reliability.md: each row's input is built and its
message compared, word for word, with the row's.
"""

import json
import os
import re
import shutil

import pytest
import torch
from coco_files import write_dataset
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from detectron2.utils.events import EventStorage
from subproc import DEMO, TINY, env_for, run_train_net
from utils import REPO, train_cfg

from nonlocal_det.config import ConfigKeyError, check_config_values
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
    check_config_values(cfg)
    cfg.freeze()
    register_datasets_for_config(cfg)
    check_datasets(cfg)
    return cfg


NO_TEST = ["DATASETS.TEST", "()"]
NL_BACKBONE = ["MODEL.BACKBONE.NAME", "build_nonlocal_backbone"]
# The demo's ResNet-18 is the demo project's builder (half width); these rows are about
# Detectron2's own builder (64 wide), as a user's config has it.
D2_R18 = ["MODEL.NONLOCAL.BASE_BACKBONE", "build_resnet_fpn_backbone"]
D2_R18 += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "64"]
# (the row's input in docs/reliability.md, opts(root, files), error); the row's result is the
# message expected, word for word (paths shortened; "..." stands for any text).
CASES = [
    # ---- MODEL.NONLOCAL and the backbone it goes into ----------------------------------------
    (
        "unknown key `MODEL.NONLOCAL.PAIRWISE_FN dot_product`",
        lambda r, f: ["MODEL.NONLOCAL.PAIRWISE_FN", "dot_product"],
        ConfigKeyError,
    ),
    (
        "`MODEL.NONLOCAL.PAIRWISE softmax`",
        lambda r, f: ["MODEL.NONLOCAL.PAIRWISE", "softmax"],
        ValueError,
    ),
    (
        "`MODEL.NONLOCAL.INNER_RATIO 0.0`",
        lambda r, f: ["MODEL.NONLOCAL.INNER_RATIO", "0.0"],
        ValueError,
    ),
    (
        "`MODEL.NONLOCAL.NORM FrozenBN`",
        lambda r, f: ["MODEL.NONLOCAL.NORM", "FrozenBN"],
        ValueError,
    ),
    (
        "`MODEL.NONLOCAL.PLACEMENT paper_3`",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "paper_3"],
        ValueError,
    ),
    (
        "`MODEL.NONLOCAL.SUBSAMPLE yes`",
        lambda r, f: ["MODEL.NONLOCAL.SUBSAMPLE", "yes"],
        ValueError,
    ),
    (
        "`MODEL.NONLOCAL.TYPE gcnet`",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "gcnet"],
        ValueError,
    ),
    (
        "`TYPE global_context`, `POSITION after_conv3` on R18",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "global_context"]
        + ["MODEL.NONLOCAL.POSITION", "after_conv3"],
        ValueError,
    ),
    (
        "`TYPE global_context`, `GC.RATIO 0.0`",
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "global_context", "MODEL.NONLOCAL.GC.RATIO", "0.0"],
        ValueError,
    ),
    (
        '`TYPE generalized_attention`, `GA.ATTENTION_TYPE "[0, 0, 0, 0]"`',
        lambda r, f: ["MODEL.NONLOCAL.TYPE", "generalized_attention"]
        + ["MODEL.NONLOCAL.GA.ATTENTION_TYPE", "[0, 0, 0, 0]"],
        ValueError,
    ),
    (
        "`PLACEMENT custom`, `RES4_BLOCKS [2]` on R18",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES4_BLOCKS", "[2]"],
        ValueError,
    ),
    (
        "`RES3_BLOCKS [0]` with `PLACEMENT paper_1`",
        lambda r, f: ["MODEL.NONLOCAL.RES3_BLOCKS", "[0]"],
        ValueError,
    ),
    (
        "`PLACEMENT paper_5` on R18",
        lambda r, f: ["MODEL.NONLOCAL.PLACEMENT", "paper_5"],
        ValueError,
    ),
    (
        "`RES5_BLOCKS [0]`, backbone built up to res4",
        lambda r, f: [
            "MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES5_BLOCKS", "[0]",
            "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4']",
            "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4']",
        ],  # fmt: skip
        ValueError,
    ),
    (
        "`KEYPOINT_HEAD_BLOCKS [2, 6]`, 4-conv head",
        lambda r, f: ["MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS", "[2, 6]"],
        ValueError,
    ),
    (
        "`BACKBONE.NAME build_nonlocal_backbone`, `BASE_BACKBONE build_resnet_fnp_backbone`",
        lambda r, f: NL_BACKBONE + ["MODEL.NONLOCAL.BASE_BACKBONE", "build_resnet_fnp_backbone"],
        ValueError,
    ),
    (
        "`BASE_BACKBONE build_vgg_backbone` (a builder of yours returning a VGG)",
        lambda r, f: NL_BACKBONE + ["MODEL.NONLOCAL.BASE_BACKBONE", "build_vgg_backbone"],
        ValueError,
    ),
    (
        "RetinaNet with `BASE_BACKBONE build_resnet_fpn_backbone` (no P7)",
        lambda r, f: NL_BACKBONE + D2_R18 + ["MODEL.META_ARCHITECTURE", "RetinaNet"],
        ValueError,
    ),
    (
        "`MODEL.RESNETS.DEPTH 42`",
        lambda r, f: D2_R18 + ["MODEL.RESNETS.DEPTH", "42"],
        ValueError,
    ),
    (
        "`RESNETS.OUT_FEATURES` without res4, FPN unchanged",
        lambda r, f: D2_R18 + ["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3']"],
        ValueError,
    ),
    (
        "R18 with `RES2_OUT_CHANNELS 256` (a Detectron2 `assert`; 256 is the key's default)",
        lambda r, f: D2_R18 + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"],
        ValueError,
    ),
    # ---- solver, input sizes, test, data loader (check_config_values) -------------------------
    (
        "`SOLVER.CHECKPOINT_PERIOD 0`",
        lambda r, f: ["SOLVER.CHECKPOINT_PERIOD", "0"],
        ValueError,
    ),
    (
        "`SOLVER.MAX_ITER 0`",
        lambda r, f: ["SOLVER.MAX_ITER", "0"],
        ValueError,
    ),
    (
        "`SOLVER.IMS_PER_BATCH 0`",
        lambda r, f: ["SOLVER.IMS_PER_BATCH", "0"],
        ValueError,
    ),
    (
        "`SOLVER.BASE_LR -0.02`",
        lambda r, f: ["SOLVER.BASE_LR", "-0.02"],
        ValueError,
    ),
    (
        "`SOLVER.STEPS (700, 565)`",
        lambda r, f: ["SOLVER.STEPS", "(700, 565)"],
        ValueError,
    ),
    (
        "`INPUT.MIN_SIZE_TRAIN (-100,)`",
        lambda r, f: ["INPUT.MIN_SIZE_TRAIN", "(-100,)"],
        ValueError,
    ),
    (
        "`INPUT.MAX_SIZE_TRAIN 0`",
        lambda r, f: ["INPUT.MAX_SIZE_TRAIN", "0"],
        ValueError,
    ),
    (
        "`TEST.EVAL_PERIOD -1`",
        lambda r, f: ["TEST.EVAL_PERIOD", "-1"],
        ValueError,
    ),
    (
        "`DATALOADER.NUM_WORKERS -1`",
        lambda r, f: ["DATALOADER.NUM_WORKERS", "-1"],
        ValueError,
    ),
    # ---- dataset files --------------------------------------------------------------------------
    (
        "`DATASETS.TRAIN_JSON` missing",
        lambda r, f: _json(f, r / "nope.json"),
        FileNotFoundError,
    ),
    (
        "JSON file that is not JSON",
        lambda r, f: _json(f, r / "garbage.json"),
        DatasetError,
    ),
    (
        "JSON whose top level is a list",
        lambda r, f: _json(f, r / "list.json"),
        DatasetError,
    ),
    (
        "JSON without `categories`",
        lambda r, f: _json(f, r / "nocats.json"),
        DatasetError,
    ),
    (
        "annotation with an unknown category id",
        lambda r, f: _json(f, r / "badcat.json"),
        DatasetError,
    ),
    (
        "`TRAIN_JSON` without `TRAIN_IMAGES`",
        lambda r, f: ["DATASETS.TRAIN_JSON", f["DATASETS.TRAIN_JSON"]],
        ValueError,
    ),
    (
        "image folder missing",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "no_images"),
        FileNotFoundError,
    ),
    (
        "an image file missing",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "missing_image"),
        DatasetError,
    ),
    (
        "an image file unreadable",
        lambda r, f: _json(f, f["DATASETS.TRAIN_JSON"], r / "unreadable_image"),
        DatasetError,
    ),
    # ---- datasets vs the config -------------------------------------------------------------------
    (
        "dataset with more categories than `NUM_CLASSES`",
        lambda r, f: ["DATASETS.TRAIN", "('user_coco_known',)", *NO_TEST]
        + ["MODEL.ROI_HEADS.NUM_CLASSES", "2"],
        ValueError,
    ),
    (
        "keypoint count != `NUM_KEYPOINTS`",
        lambda r, f: ["DATASETS.TRAIN", "('user_coco_known',)", *NO_TEST],
        ValueError,
    ),
    (
        "OKS sigmas of the wrong length",
        lambda r, f: [x for kv in f.items() for x in kv],  # the demo config has 5 sigmas
        ValueError,
    ),
    (
        "unregistered dataset name",
        lambda r, f: ["DATASETS.TRAIN", "('my_train',)", *NO_TEST],
        ValueError,
    ),
    (
        "Detectron2's COCO without its files",
        lambda r, f: ["DATASETS.TRAIN", "()", "DATASETS.TEST", "('coco_2017_val',)"],
        FileNotFoundError,
    ),
]
# Rows whose message another test below produces.
ELSEWHERE = ["an image truncated after its header (found only when read)"]
# ... in tests/test_output_dir.py (the output folder, --resume, the commands' outputs).
ELSEWHERE += [
    "a second run into the same `OUTPUT_DIR`",
    "`--resume` with another `MODEL.NONLOCAL.TYPE` and `PLACEMENT`",
    "`--resume` with `SOLVER.MAX_ITER` below the checkpoint's",
    "`tools.predict --input a.png --output a.png`",
]


def documented_errors():
    """Input -> the message of each row of the error table in docs/reliability.md that shows
    one (its first `...` span in the result column)."""
    text = open(os.path.join(REPO, "docs", "reliability.md")).read()
    table = text.split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        message = re.match(r"`(\w+(Error|Exception): [^`]*)`", cells[-1])
        if line.startswith("| ") and message:
            rows[cells[0]] = message[1]
    return rows


def assert_documented(row: str, error: BaseException, root) -> None:
    """The row's message equals the error's, its paths shortened (``root/good/``, ``root/``: none)
    and its line breaks and indents one space; ``...`` in the row stands for any text."""
    message = f"{type(error).__name__}: {error}"
    for prefix in (root / "good", root):
        message = message.replace(f"{prefix}{os.sep}", "")
    message = re.sub(r"\s*\n\s*", " ", message)
    documented = documented_errors()[row]
    pattern = ".*".join(re.escape(part) for part in documented.split("..."))
    assert re.fullmatch(
        pattern, message, re.S
    ), f"docs/reliability.md row {row!r}:\n{documented}\nactual:\n{message}"


def test_every_documented_error_has_its_case():
    assert sorted(documented_errors()) == sorted([c[0] for c in CASES] + ELSEWHERE)


class VGG(Backbone):
    """A user's backbone without residual stages: two plain convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, x):
        return {"c2": self.conv2(self.conv1(x).relu())}

    def output_shape(self):
        return {"c2": ShapeSpec(channels=32, stride=4)}


@pytest.fixture
def vgg_builder():
    """``build_vgg_backbone`` registered while the test runs."""

    def build_vgg_backbone(cfg, input_shape):
        return VGG()

    BACKBONE_REGISTRY.register(build_vgg_backbone)
    yield
    BACKBONE_REGISTRY._obj_map.pop("build_vgg_backbone")


@pytest.mark.parametrize("case,opts,error", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(data, case, opts, error, monkeypatch, request):
    root, files = data
    if "build_vgg_backbone" in opts(root, files):
        request.getfixturevalue("vgg_builder")
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.setenv("NONLOCAL_DET_DATASETS", str(root / "cache"))  # never generate elsewhere
    monkeypatch.chdir(root)  # Detectron2's builtin datasets are then looked for in ./datasets
    with pytest.raises(error) as e:
        prepare(opts(root, files))
    assert_documented(case, e.value, root)


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
    assert_documented(ELSEWHERE[0], e.value, root)


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
    assert sorted(seen) == [(1, 1), (1, 13)]  # res4 (stride 16) of 12x12 and 12x200, padded to 16
