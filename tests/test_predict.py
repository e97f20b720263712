"""``python -m nonlocal_det.tools.predict``: detections drawn on images (and on dataset samples,
ground truth beside), keypoints only on the classes that have keypoints."""

import numpy as np
import pytest
import torch
from detectron2.data import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from subproc import DEMO

from nonlocal_det.tools.predict import draw_predictions, main


@pytest.mark.slow
def test_predict_writes_a_png_per_image(tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(image)
    out = tmp_path / "prediction.png"
    # untrained (MODEL.WEIGHTS ""): every box scores above 0, keypoints included
    opts = ["MODEL.WEIGHTS", ""]
    written = main(
        ["--config-file", DEMO, "--input", str(image), "--output", str(out)]
        + ["--confidence-threshold", "0", *opts]
    )
    assert written == [str(out)]
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (192, 256, 3)  # drawn at scale 2
    assert not np.array_equal(drawn[::2, ::2], np.asarray(Image.open(image)))  # boxes drawn


def test_keypoints_only_on_classes_that_have_them(monkeypatch):
    names = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]
    meta = Metadata(thing_classes=["circle", "star_person"], keypoint_names=names)
    meta.set(keypoint_flip_map=[], keypoint_classes=["star_person"])
    instances = Instances((64, 64))
    instances.pred_boxes = Boxes(torch.tensor([[4.0, 4, 30, 30], [30, 30, 60, 60]]))
    instances.scores = torch.tensor([0.9, 0.8])
    instances.pred_classes = torch.tensor([0, 1])
    instances.pred_keypoints = torch.cat(
        [torch.rand(2, 5, 2) * 30 + 16, torch.ones(2, 5, 1)], dim=2
    )
    drawn = []
    original = Visualizer.draw_and_connect_keypoints

    def record(self, keypoints):
        drawn.append(list(keypoints[:, 2]))
        return original(self, keypoints)

    monkeypatch.setattr(Visualizer, "draw_and_connect_keypoints", record)
    image = np.zeros((64, 64, 3), np.uint8)
    draw_predictions(lambda img: {"instances": instances}, image, meta)
    assert sorted(drawn) == [[0.0] * 5, [1.0] * 5]  # the circle's keypoints hidden
    # Without keypoint_classes in the metadata (e.g. COCO persons), every box keeps its keypoints.
    drawn.clear()
    instances.pred_keypoints[:, :, 2] = 1
    draw_predictions(
        lambda img: {"instances": instances}, image, Metadata(thing_classes=["a", "b"])
    )
    assert drawn == [[1.0] * 5, [1.0] * 5]
