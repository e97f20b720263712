"""examples/predict_image.py: Detectron2's DefaultPredictor with a project config writes a PNG of
its detections (run as a user runs it)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from utils import CONFIGS, REPO, shared_datasets_dir


@pytest.mark.slow
def test_predict_image_example_writes_a_png(tmp_path, tmp_path_factory):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(image)
    out = tmp_path / "prediction.png"
    env = dict(
        os.environ,
        NONLOCAL_DET_DATASETS=shared_datasets_dir(tmp_path_factory),
        OMP_NUM_THREADS="1",
        PYTHONPATH=REPO,  # this checkout's package
        # Detectron2's keypoint decoding asserts on the near-flat heatmaps of an untrained head
        # now and then; `-O` drops Python asserts.
        PYTHONOPTIMIZE="1",
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "predict_image.py")]
        + ["--config-file", os.path.join(CONFIGS, "demo", "mask_rcnn_R18_NL_demo.yaml")]
        + ["--input", str(image), "--output", str(out), "--confidence-threshold", "0"]
        + ["MODEL.WEIGHTS", ""],  # untrained: every box scores above 0
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"wrote {out}" in proc.stdout and not proc.stdout.startswith("0 detections")
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (192, 256, 3)  # drawn at scale 2
    assert not np.array_equal(drawn[::2, ::2], np.asarray(Image.open(image)))  # boxes drawn
