"""Warm start from a Detectron2 checkpoint without non-local blocks (a model-zoo ``.pkl`` or a
``.pth``): only the blocks' keys are missing, predictions are identical at step 0, the check
command says so, and train_net.py fine-tunes from it."""

import json
import os
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from subproc import run_train_net
from utils import CONFIGS, DEMO_YAML, load_cfg, shared_datasets_dir

from nonlocal_det.tools.warm_start import check_warm_start, main

DEMO = DEMO_YAML


@pytest.fixture(scope="module")
def baseline_checkpoints(tmp_path_factory):
    """A trained-looking baseline (no non-local block anywhere) saved as Detectron2 saves model-zoo
    files (``{"model": numpy arrays, "__author__": ...}`` .pkl) and as a training ``.pth``."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(7)
    base = build_model(load_cfg(DEMO, ["MODEL.NONLOCAL.ENABLED", False]))
    assert not any(".nonlocal" in k for k in base.state_dict())
    pkl = root / "model_final_zoo.pkl"
    state = {k: v.numpy() for k, v in base.state_dict().items()}
    with open(pkl, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    DetectionCheckpointer(base, save_dir=str(root)).save("model_final")
    return {"pkl": str(pkl), "pth": str(root / "model_final.pth")}


@pytest.mark.parametrize("kind", ["pkl", "pth"])
def test_only_nonlocal_keys_missing_and_identical_predictions(baseline_checkpoints, kind):
    cfg = load_cfg(DEMO, ["MODEL.WEIGHTS", baseline_checkpoints[kind]])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model: keep its detections,
    cfg.TEST.DETECTIONS_PER_IMAGE = 20  # the 20 best
    r = check_warm_start(cfg)
    assert r["nonlocal_keys"] and all(".nonlocal" in k for k in r["nonlocal_keys"])
    assert r["missing"] == r["nonlocal_keys"]  # every block's parameters, nothing else
    assert r["only_nonlocal_missing"] and not r["unexpected"] and not r["wrong_shape"]
    assert r["detections"] > 0 and r["identical"]


@pytest.mark.slow
def test_warm_start_command(baseline_checkpoints, capsys):
    status = main(
        ["--config-file", os.path.join(CONFIGS, DEMO), "MODEL.WEIGHTS", baseline_checkpoints["pkl"]]
        + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "only non-local keys missing: yes" in out
    assert "with and without the non-local blocks" in out and out.rstrip().endswith("yes")
    # A checkpoint that lacks more than the blocks is caught.
    cfg = load_cfg(DEMO, ["MODEL.WEIGHTS", baseline_checkpoints["pkl"]])
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5  # the class-specific layers no longer fit
    r = check_warm_start(cfg)
    assert not r["only_nonlocal_missing"] and r["wrong_shape"]


@pytest.mark.slow
def test_fine_tune_from_a_zoo_checkpoint_with_train_net(baseline_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    env = dict(
        os.environ,
        NONLOCAL_DET_DATASETS=shared_datasets_dir(tmp_path_factory),
        OMP_NUM_THREADS="1",
    )
    args = ["--config-file", os.path.join(CONFIGS, DEMO), "MODEL.WEIGHTS"]
    args += [baseline_checkpoints["pkl"], "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "0"]
    args += ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    log = run_train_net(args, env, timeout=600)
    # Detectron2 lists the parameters the checkpoint did not have: the blocks', and only those.
    missing = log.split("Some model parameters or buffers are not found in the checkpoint:")[1]
    missing = missing.split("\n[")[0].split("\nWARNING")[0]
    names = [l.strip() for l in missing.strip().splitlines() if l.strip()]
    assert names and all(".nonlocal" in n for n in names), names
    assert "not used by the model" not in log
    records = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 2
    # The blocks learn from their zero start (W_z of the res4 block), the rest moves on too.
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    with open(baseline_checkpoints["pkl"], "rb") as f:
        start = pickle.load(f)["model"]
    w_z = final["backbone.bottom_up.res4.nonlocal0.out.weight"]
    assert w_z.abs().max() > 0
    key = "backbone.bottom_up.res4.0.conv1.weight"
    assert not torch.equal(final[key], torch.as_tensor(start[key]))
