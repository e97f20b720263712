"""train_net.py end to end on the generated dataset: train, checkpoints, metrics, --eval-only,
--resume (real subprocesses, as a user runs them)."""

import json
import os
import re

import pytest
from subproc import DEMO, run_train_net
from utils import shared_datasets_dir

FAST = ["DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "10"]
FAST += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # a barely trained model: keep all its boxes


def run(args, env):
    return run_train_net(args, env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_net")
    datasets = shared_datasets_dir(tmp_path_factory)  # the demo's data, fewer images
    env = dict(os.environ, NONLOCAL_DET_DATASETS=datasets)
    out = root / "out"
    log = run(
        [
            "--config-file",
            DEMO,
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.CHECKPOINT_PERIOD",
            "3",
            "OUTPUT_DIR",
            str(out),
            *FAST,
        ],
        env,
    )
    return env, out, log


def test_training_writes_checkpoints_metrics_and_events(trained):
    _, out, log = trained
    assert "Running on the CPU" in log
    assert "eta:" in log and "iter: 5" in log  # Detectron2's progress lines
    for name in (
        "model_0000002.pth",
        "model_0000005.pth",
        "model_final.pth",
        "last_checkpoint",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    records = [json.loads(line) for line in open(out / "metrics.json")]
    iters = [r["iteration"] for r in records if "total_loss" in r]
    assert iters and iters[-1] == 5
    assert all(r["total_loss"] == r["total_loss"] for r in records if "total_loss" in r)  # no NaN
    assert {"loss_keypoint", "loss_mask", "loss_cls"} <= set(records[0])


def test_training_ends_with_coco_evaluation(trained):
    _, out, log = trained
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log, task
    assert "copypaste: Task: keypoints" in log
    assert (out / "inference" / "nl_synthetic_val" / "coco_instances_results.json").is_file()


def test_eval_only_prints_ap_tables(trained):
    env, out, _ = trained
    log = run(
        [
            "--config-file",
            DEMO,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "OUTPUT_DIR",
            str(out / "eval"),
            *FAST,
        ],
        env,
    )
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log
    assert re.search(r"\|\s+AP\s+\|\s+AP50\s+\|\s+AP75\s+\|", log)


def test_resume_continues_from_last_checkpoint(trained):
    env, out, _ = trained
    log = run(
        [
            "--config-file",
            DEMO,
            "--resume",
            "SOLVER.MAX_ITER",
            "8",
            "OUTPUT_DIR",
            str(out),
            "TEST.EVAL_PERIOD",
            "0",
            *FAST,
        ],
        env,
    )
    assert "model_final.pth" in log and "Starting training from iteration 6" in log
    iters = [json.loads(line).get("iteration") for line in open(out / "metrics.json")]
    assert 7 in iters


def test_the_demo_pictures_from_the_trained_model(trained, tmp_path, monkeypatch):
    """``make demo``'s last command: ``tools.visualize`` with ``--predictions-output`` draws both
    pictures in one process."""
    from nonlocal_det.tools import visualize

    env, out, _ = trained
    monkeypatch.setenv("NONLOCAL_DET_DATASETS", env["NONLOCAL_DET_DATASETS"])
    att, pred = tmp_path / "attention.png", tmp_path / "predictions.png"
    opts = ["MODEL.WEIGHTS", str(out / "model_final.pth")]  # keypoints drawn, as in `make demo`
    visualize.main(
        ["--config-file", DEMO, "--dataset", "nl_synthetic_val", "--index", "0"]
        + ["--output", str(att), "--predictions-output", str(pred), *opts]
    )
    from PIL import Image

    assert Image.open(pred).size == (2 * 2 * 192 + 8, 2 * 192)  # ground truth | predictions, x2
    assert Image.open(att).size[0] == 512  # visualize's --min-size, legend below
    with pytest.raises(ValueError, match="--predictions-output needs --dataset"):
        visualize.main(
            ["--config-file", DEMO, "--input", str(att), "--output", str(tmp_path / "a.png")]
            + ["--predictions-output", str(pred), *opts]
        )
