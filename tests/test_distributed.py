"""``train_net.py --num-gpus 2`` on CPU: two processes (gloo backend) train on the generated data,
one set of checkpoints and metrics is written, and evaluation gathers both ranks' results."""

import json
import math
import os

import pytest
from subproc import DEMO, TINY, env_for, run_train_net
from utils import SMALL_DEMO_DATA, shared_datasets_dir

from nonlocal_demo.synthetic import SYNTHETIC_DATASET_VERSION


@pytest.mark.slow
def test_two_cpu_processes_train_and_evaluate(tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    args = ["--config-file", DEMO, "--num-gpus", "2", "--dist-url", "auto", *TINY]
    args += ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    args += ["OUTPUT_DIR", out]
    datasets = shared_datasets_dir(tmp_path_factory)
    log = run_train_net(args, env_for(datasets))

    # both ranks ran and trained (rank 1 logs to its own file)
    assert "Rank of current process: 0. World size: 2" in log
    rank1 = (out / "log.txt.rank1").read_text()
    assert "Rank of current process: 1. World size: 2" in rank1
    for text in (log, rank1):
        assert "Starting training from iteration 0" in text
    # one set of checkpoints and metrics, written by rank 0
    files = sorted(os.listdir(out))
    assert [f for f in files if f.endswith(".pth")] == [
        "model_0000001.pth",
        "model_0000003.pth",
        "model_final.pth",
    ]
    assert [f for f in files if f.startswith("metrics")] == ["metrics.json"]
    records = [json.loads(line) for line in open(out / "metrics.json")]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    # evaluation: each rank ran inference on its half, rank 0 evaluated the gathered results
    num_val = SMALL_DEMO_DATA["num_val"]
    assert f"Start inference on {num_val // 2} batches" in log
    with open(out / "inference" / "nl_synthetic_val" / "coco_instances_results.json") as f:
        ids = {r["image_id"] for r in json.load(f)}
    dirname = f"synthetic_coco_v{SYNTHETIC_DATASET_VERSION}"
    with open(os.path.join(datasets, dirname, "annotations", "instances_val.json")) as f:
        all_ids = sorted(im["id"] for im in json.load(f)["images"])
    half = num_val // 2
    assert ids & set(all_ids[:half]) and ids & set(all_ids[half:])  # both ranks' images
    assert len(ids) == num_val
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log

