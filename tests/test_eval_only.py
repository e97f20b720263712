"""``--eval-only`` needs only what evaluation reads, the test datasets and the weights: a user who
downloaded COCO's validation set only (``coco/val2017/``, ``coco/annotations/instances_val2017
.json``) evaluates with ``train_net.py`` (every "evaluate" command of the docs), from a YAML
config or a LazyConfig; the training annotations are absent."""

import glob
import json
import math
import os
import re
import shlex

import pytest
from coco_files import VAL_IMAGES, write_split
from subproc import DEMO, TINY, env_for, run_train_net
from utils import DEMO_LAZY, REPO, shared_datasets_dir

from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.data import (
    EVAL_ONLY_KEYS,
    check_datasets,
    configure_coco_json_datasets,
    register_datasets_for_config,
)
from nonlocal_det.engine import train as train_net

# The demo model on Detectron2's COCO splits: 80 classes, no keypoints (instances_*.json).
ON_COCO = [
    "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)",
    "MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.KEYPOINT_ON", "False",
]  # fmt: skip
TRAIN_JSON = os.path.join("coco", "annotations", "instances_train2017.json")


def write_val_only_coco(root) -> str:
    """COCO's validation set only, where Detectron2's ``coco_2017_val`` looks for it under
    ``root`` (``$DETECTRON2_DATASETS``): a few small images in ``coco/val2017/`` and their
    annotations, with COCO's 80 categories, in ``coco/annotations/instances_val2017.json``.
    Returns the JSON file."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco = os.path.join(root, "coco")
    split = write_split(coco, "val2017", VAL_IMAGES, seed=1)  # category ids 1-3
    with open(split["json"]) as f:
        data = json.load(f)
    os.remove(split["json"])
    data["categories"] = [
        {"id": c["id"], "name": c["name"], "supercategory": "thing"}
        for c in COCO_CATEGORIES
        if c["isthing"]
    ]
    for ann in data["annotations"]:
        ann.pop("keypoints", None), ann.pop("num_keypoints", None)
    json_file = os.path.join(coco, "annotations", "instances_val2017.json")
    os.makedirs(os.path.dirname(json_file))
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file


def _copypaste(log: str, task: str):
    """The metric names and values Detectron2 prints for ``task`` (``copypaste:`` lines)."""
    m = re.search(rf"copypaste: Task: {task}\n.*copypaste: (\S+)\n.*copypaste: (\S+)\n", log)
    assert m, f"no copypaste lines for {task}"
    return dict(zip(m[1].split(","), (float(v) for v in m[2].split(","))))


@pytest.mark.slow
def test_eval_only_with_the_validation_set_only(tmp_path):
    """``train_net.py --eval-only`` of weights (an untrained model's saved state) on a COCO
    download with ``val2017`` only: evaluation runs and prints AP for boxes and masks."""
    import torch
    from detectron2.modeling import build_model

    d2 = tmp_path / "d2"
    val_json = write_val_only_coco(str(d2))
    opts = [*TINY, *ON_COCO]
    cfg = get_nonlocal_cfg(DEMO, opts)
    cfg.MODEL.DEVICE = "cpu"
    weights = tmp_path / "untrained.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)

    out = tmp_path / "out"
    args = ["--config-file", DEMO, "--eval-only", *opts, "MODEL.WEIGHTS", weights]
    env = dict(env_for(tmp_path / "nl_cache"), DETECTRON2_DATASETS=str(d2))
    log = run_train_net([*args, "OUTPUT_DIR", out], env)

    assert not (d2 / TRAIN_JSON).exists() and not (d2 / "coco" / "train2017").exists()
    assert f"Loading from {weights}" in log
    assert "Starting training" not in log
    assert f"Start inference on {len(VAL_IMAGES)} batches" in log
    for task in ("bbox", "segm"):
        metrics = _copypaste(log, task)
        assert list(metrics)[:3] == ["AP", "AP50", "AP75"]
        assert math.isfinite(metrics["AP"]) and 0 <= metrics["AP"] <= 100, metrics
    with open(out / "inference" / "coco_2017_val" / "coco_instances_results.json") as f:
        found = {r["image_id"] for r in json.load(f)}
    with open(val_json) as f:
        assert found <= {im["id"] for im in json.load(f)["images"]} and found


def _evaluate_commands():
    """Every ``train_net.py ... --eval-only`` command of README.md and docs/*.md on a project YAML
    config (bash blocks and table cells), and the brief's Faster R-CNN one (LazyConfig files:
    ``test_lazy_eval_only_never_builds_the_training_data``)."""
    found = {
        "train_net.py --config-file configs/faster_rcnn_R50_NL.yaml --eval-only MODEL.WEIGHTS W"
    }
    for page in ["README.md"] + glob.glob(os.path.join(REPO, "docs", "*.md")):
        text = open(os.path.join(REPO, page)).read().replace("\\\n", " ")
        for line in re.findall(r"(train_net\.py [^`\n]*--eval-only[^`\n]*)", text):
            if re.search(r"--config-file configs/\S+\.yaml", line):
                found.add(line.split(" #", 1)[0].strip())
    return sorted(found)


EVALUATE_COMMANDS = _evaluate_commands()


def _builtin_root() -> str:
    """Where Detectron2 looks for its COCO splits: the root it took from ``$DETECTRON2_DATASETS``
    (else ``datasets``) when it was imported."""
    from detectron2.data import MetadataCatalog

    json_file = MetadataCatalog.get("coco_2017_val").json_file
    return json_file[: -len(os.path.join("coco", "annotations", "instances_val2017.json"))]


def test_every_evaluate_command_of_the_docs_needs_only_the_validation_set(tmp_path, monkeypatch):
    """Each command parses with ``--eval-only``; ``setup`` then checks the test datasets only (for
    the brief's command in full, for the others the datasets of their configs), and the same
    config set up for training stops, naming the missing training annotations."""
    root = _builtin_root()
    if os.path.isabs(root):
        pytest.skip(f"Detectron2 was imported with DETECTRON2_DATASETS={root}: not writable here")
    monkeypatch.chdir(tmp_path)  # Detectron2's relative root: ./datasets
    write_val_only_coco(os.path.join(tmp_path, root))
    assert sum("configs/mmdet/" in c for c in EVALUATE_COMMANDS) >= 18  # published_models.md
    parser = train_net.default_argument_parser()
    for command in EVALUATE_COMMANDS:
        words = shlex.split(command)[1:]
        args = parser.parse_args([w.replace("configs/", f"{REPO}/configs/", 1) for w in words])
        assert args.eval_only, command
        cfg = get_nonlocal_cfg(args.config_file, args.opts)
        configure_coco_json_datasets(cfg, EVAL_ONLY_KEYS)
        cfg.freeze()
        register_datasets_for_config(cfg, EVAL_ONLY_KEYS)
        check_datasets(cfg, EVAL_ONLY_KEYS)
        assert cfg.DATASETS.TEST and all(n.startswith("coco_2017_") for n in cfg.DATASETS.TEST)

    config = os.path.join(REPO, "configs", "faster_rcnn_R50_NL.yaml")
    args = ["--config-file", config, "MODEL.WEIGHTS", "W", "OUTPUT_DIR"]
    cfg = train_net.setup(parser.parse_args(["--eval-only", *args, str(tmp_path / "eval")]))
    assert cfg.DATASETS.TEST == ("coco_2017_val",)
    with pytest.raises(FileNotFoundError, match=re.escape(f"its json_file {root}{TRAIN_JSON}")):
        train_net.setup(parser.parse_args([*args, str(tmp_path / "train")]))


def test_eval_only_with_own_files_reads_no_training_files(tmp_path):
    """``DATASETS.TRAIN_JSON`` / ``TRAIN_IMAGES`` of a training command left on an evaluation:
    their files need not exist; the classes come from the test file; without a test file the
    evaluation has nothing to evaluate and says so."""
    val = write_split(str(tmp_path), "val", VAL_IMAGES, seed=1)
    missing = ["MODEL.KEYPOINT_ON", "False", "DATASETS.TRAIN_JSON", str(tmp_path / "gone.json")]
    missing += ["DATASETS.TRAIN_IMAGES", str(tmp_path / "gone")]
    test = ["DATASETS.TEST_JSON", val["json"], "DATASETS.TEST_IMAGES", val["images"]]
    cfg = get_nonlocal_cfg(DEMO, [*missing, *test])
    configure_coco_json_datasets(cfg, EVAL_ONLY_KEYS)
    cfg.freeze()
    register_datasets_for_config(cfg, EVAL_ONLY_KEYS)
    check_datasets(cfg, EVAL_ONLY_KEYS)
    assert cfg.DATASETS.TEST == ("nl_coco_test",) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    with pytest.raises(FileNotFoundError, match="gone.json"):  # training needs them
        configure_coco_json_datasets(get_nonlocal_cfg(DEMO, [*missing, *test]))

    cfg = get_nonlocal_cfg(DEMO, missing)
    configure_coco_json_datasets(cfg, EVAL_ONLY_KEYS)
    assert cfg.DATASETS.TEST == ()
    with pytest.raises(ValueError, match=r"DATASETS.TEST is empty \(DATASETS.TRAIN_JSON is set"):
        check_datasets(cfg, EVAL_ONLY_KEYS)


@pytest.mark.slow
def test_lazy_eval_only_never_builds_the_training_data(tmp_path, tmp_path_factory):
    """``--eval-only`` of a LazyConfig instantiates the model and the test loader only: a
    training dataset that does not exist is never looked at."""
    shared_datasets_dir(tmp_path_factory)  # the demo's val split (conftest points here)
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file",
            DEMO_LAZY,
            "--eval-only",
            "dataloader.train.dataset.names=no_such_dataset",
            f"train.output_dir={tmp_path}",
            "model.roi_heads.box_predictor.test_topk_per_image=5",
        ]
    )
    results = train_net.main(args)
    assert set(results) == {"bbox", "segm", "keypoints"}
    assert all(math.isfinite(r["AP"]) for r in results.values())
