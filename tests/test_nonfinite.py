"""A non-finite loss stops training with a message naming the iteration, each loss's value and the
last good checkpoint (kept, still named by ``last_checkpoint``); the diverged model is neither
saved nor evaluated. With a YAML config and with a LazyConfig."""

import os

import pytest
import torch
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.utils.events import get_event_storage
from test_preemption import _checkpoints, _yaml_trainer
from utils import lazy_demo_cfg

from nonlocal_det.engine import NonFiniteLossError
from nonlocal_det.engine import train as train_net


def _nan_mask_loss_at(monkeypatch, iteration):
    """The model's ``loss_mask`` is NaN at ``iteration`` (the others as computed)."""
    forward = GeneralizedRCNN.forward

    def forward_with_nan(self, batched_inputs):
        out = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == iteration:
            out["loss_mask"] = out["loss_mask"] + float("nan")  # (finite gradients: quick)
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_nan)


def _check_stop(error, out, last_good):
    message = str(error.value)
    assert "Loss became infinite or NaN at iteration 4" in message
    for loss in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_keypoint"):
        assert f"{loss}=" in message  # each loss with its value
    assert "loss_mask=nan" in message
    path = os.path.join(str(out), last_good)
    kept = f"last_checkpoint names {path} (nothing was saved after it): its weights are finite; "
    assert kept + "--resume restarts from it" in message
    assert "SOLVER.BASE_LR" in message and "SOLVER.CLIP_GRADIENTS" in message
    assert isinstance(error.value.__cause__, FloatingPointError)  # Detectron2's own detection
    # the good checkpoint is kept and named; nothing written after it (no model_final)
    assert (out / "last_checkpoint").read_text() == last_good
    assert _checkpoints(out) == ["model_0000001.pth", "model_0000003.pth"]
    ckpt = torch.load(out / last_good, weights_only=False)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
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


@pytest.mark.slow
def test_nan_loss_stops_lazy_trainer(tmp_path, monkeypatch):
    cfg = lazy_demo_cfg(tmp_path, "train.max_iter=5", "train.checkpointer.period=2")
    _nan_mask_loss_at(monkeypatch, 4)
    monkeypatch.setattr(train_net, "do_test", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(NonFiniteLossError) as error:
        train_net.do_train(cfg)
    _check_stop(error, tmp_path, "model_0000003.pth")


# ---- two processes: the main process finds the NaN, the other one stops after the same step ----
def _two_process_worker(rank, folder, port):
    import torch.distributed as dist
    from detectron2.engine import SimpleTrainer
    from detectron2.utils import comm

    from nonlocal_det.engine import AtomicCheckpointer, SafeStop

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    comm.create_local_process_group(2)
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            y = self.linear(x).mean()
            bad = rank == 1 and get_event_storage().iter == 3  # only this process's loss is NaN
            return {"loss_a": y**2 * (float("nan") if bad else 1.0), "loss_b": y.abs()}

    model = Toy()
    data = iter(lambda: torch.ones(2, 4), None)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    checkpointer = AtomicCheckpointer(model, folder, trainer=trainer)
    checkpointer.save("model_0000001", iteration=1)  # the last good checkpoint
    trainer.register_hooks([SafeStop(checkpointer)])
    try:
        trainer.train(2, 10)
    except NonFiniteLossError as e:
        with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
            f.write(f"{trainer.iter}\n{e}")


@pytest.mark.slow
def test_nan_loss_two_processes_both_stop(tmp_path):
    """The main process's NaN check (Detectron2's, on the mean over the processes) stops the other
    process after the same iteration too, instead of leaving it waiting in a collective."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _two_process_worker, args=(str(tmp_path), port), nprocs=2, start_method="fork"
    )
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    assert rank0[0] == rank1[0] == "3"
    assert "Loss became infinite or NaN at iteration 3: loss_a=nan, loss_b=" in rank0[1]
    assert "(each the mean over the processes)" in rank0[1]
    assert "model_0000001.pth (nothing was saved after it): its weights are finite" in rank0[1]
    assert "the main process logs each loss" in rank1[1]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _checkpoints(tmp_path) == ["model_0000001.pth"]


def test_last_good_checkpoint_skips_one_with_nan_weights(tmp_path):
    """A checkpoint saved right before the loss turned NaN may hold NaN weights already: the
    message names the newest one whose weights are finite."""
    from nonlocal_det.engine import AtomicCheckpointer
    from nonlocal_det.engine.preemption import _last_good_checkpoint

    model = torch.nn.Linear(2, 1)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    os.utime(tmp_path / "model_0000001.pth", (1, 1))  # older
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    checkpointer.save("model_0000003", iteration=3)
    message = _last_good_checkpoint(checkpointer)
    assert f"last_checkpoint names {tmp_path / 'model_0000003.pth'}" in message
    assert "its weights hold NaN / inf (1 tensors, e.g. weight)" in message
    good = tmp_path / "model_0000001.pth"
    assert (
        f"The newest checkpoint with finite weights is {good}: write model_0000001.pth" in message
    )
    os.remove(good)
    assert "none of the 1 newest checkpoints has finite weights" in _last_good_checkpoint(
        checkpointer
    )
