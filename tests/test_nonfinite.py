"""A non-finite loss stops training with a message naming the iteration, each loss's value and the
last good checkpoint (kept, still named by ``last_checkpoint``); the diverged model is neither
saved nor evaluated. Both trainers: ``train_net.py``'s and ``lazy_train``'s."""

import os

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.utils.events import get_event_storage
from test_preemption import _checkpoints, _yaml_trainer
from utils import CONFIGS

from nonlocal_det.engine import NonFiniteLossError


def _nan_mask_loss_at(monkeypatch, iteration):
    """The model's ``loss_mask`` is NaN at ``iteration`` (the others as computed)."""
    forward = GeneralizedRCNN.forward

    def forward_with_nan(self, batched_inputs):
        out = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == iteration:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_nan)


def _check_stop(error, out, last_good):
    message = str(error.value)
    assert "Loss became infinite or NaN at iteration 4" in message
    for loss in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_keypoint"):
        assert f"{loss}=" in message  # each loss with its value
    assert "loss_mask=nan" in message
    path = os.path.join(str(out), last_good)
    assert f"The last checkpoint is {path}" in message and "--resume restarts from it" in message
    assert "SOLVER.BASE_LR" in message and "SOLVER.CLIP_GRADIENTS" in message
    assert isinstance(error.value.__cause__, FloatingPointError)  # Detectron2's own detection
    # the good checkpoint is kept and named; nothing written after it (no model_final)
    assert (out / "last_checkpoint").read_text() == last_good
    assert _checkpoints(out) == ["model_0000001.pth", "model_0000003.pth"]
    ckpt = torch.load(out / last_good, weights_only=False)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_stops_train_net_trainer(tmp_path, monkeypatch):
    """NaN at the last iteration (4 of 0..4): Detectron2 would save it as model_final and
    evaluate it."""
    trainer, out = _yaml_trainer(tmp_path, 5, "SOLVER.CHECKPOINT_PERIOD", 2)
    evaluations = []
    monkeypatch.setattr(type(trainer), "test", classmethod(lambda *a, **k: evaluations.append(1)))
    _nan_mask_loss_at(monkeypatch, 4)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    _check_stop(error, out, "model_0000003.pth")
    assert evaluations == []


def test_nan_loss_stops_lazy_trainer(tmp_path, monkeypatch):
    from nonlocal_det.tools import lazy_train

    cfg = LazyConfig.load(os.path.join(CONFIGS, "lazy", "mask_rcnn_R18_NL_demo.py"))
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            f"train.output_dir={tmp_path}",
            "train.max_iter=5",
            "train.checkpointer.period=2",
            "train.device=cpu",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
        ],
    )
    _nan_mask_loss_at(monkeypatch, 4)
    monkeypatch.setattr(lazy_train, "evaluate", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(NonFiniteLossError) as error:
        lazy_train.train(cfg)
    _check_stop(error, tmp_path, "model_0000003.pth")
