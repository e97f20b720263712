"""``--resume`` continues as if training had not stopped: on CPU with a fixed SEED and
DATALOADER.NUM_WORKERS 0, the losses after resuming from a checkpoint equal, bit for bit, those
of the same iterations of an uninterrupted run (the checkpoint stores the random states and the
position in the training data, images waiting in an aspect-ratio bucket included): from a
periodic checkpoint, after a stop signal, with a YAML config and with a LazyConfig."""

import json
import logging
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch
from coco_files import write_split
from detectron2.engine import HookBase
from subproc import DEMO, TINY
from utils import DEMO_LAZY

from nonlocal_det.engine import train as train_net
from nonlocal_det.engine.resume_state import (
    TrainingResumeState,
    get_rng_state,
    preserved_rng,
    set_rng_state,
)

MAX_ITER, PERIOD = 8, 4  # the checkpoint of iteration 3 (model_0000003.pth), then 4..7


class _RecordLosses(HookBase):
    """Each iteration's losses, as the trainer logged them in its storage."""

    def __init__(self):
        self.losses = {}

    def after_step(self):
        storage = self.trainer.storage
        self.losses[self.trainer.iter] = {
            k: h.latest() for k, h in storage.histories().items() if "loss" in k
        }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("exact_resume")), "train")


def _trainer(data, out, extra=()):
    opts = ["DATASETS.TRAIN_JSON", data["json"], "DATASETS.TRAIN_IMAGES", data["images"], *TINY]
    opts += ["DATASETS.TEST", "()", "SEED", "2", "SOLVER.MAX_ITER", str(MAX_ITER)]
    opts += ["SOLVER.CHECKPOINT_PERIOD", str(PERIOD), "OUTPUT_DIR", str(out), *extra]
    args = train_net.default_argument_parser().parse_args(["--config-file", DEMO, *opts])
    trainer = train_net.Trainer(train_net.setup(args))  # setup seeds every RNG from SEED
    recorder = _RecordLosses()
    trainer.register_hooks([recorder])
    return trainer, recorder


def _resume_from(checkpoint, data, out, *, drop_state=False):
    """Train iterations PERIOD..MAX_ITER-1 resuming from a copy of ``checkpoint`` in ``out``
    (as after a stop right after it was saved); ``drop_state``: as an older checkpoint."""
    os.makedirs(out)
    name = os.path.basename(checkpoint)
    if drop_state:
        ckpt = torch.load(checkpoint, weights_only=True)
        del ckpt["resume_state"]
        torch.save(ckpt, out / name)
    else:
        shutil.copy(checkpoint, out / name)
    (out / "last_checkpoint").write_text(name)
    trainer, recorder = _trainer(data, out)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == PERIOD
    trainer.train()
    return recorder.losses


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer, recorder = _trainer(data, out)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert sorted(recorder.losses) == list(range(MAX_ITER))
    return out / f"model_{PERIOD - 1:07d}.pth", recorder.losses


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_losses(data, uninterrupted, tmp_path, caplog):
    checkpoint, expected = uninterrupted
    state = torch.load(checkpoint, weights_only=True)["resume_state"]
    # the checkpoint was taken with images waiting in a bucket (the path that loads them again)
    assert state["data"]["waiting"] and state["data"]["position"] > PERIOD * 2
    with caplog.at_level(logging.INFO, logger="nonlocal_det"):
        resumed = _resume_from(checkpoint, data, tmp_path / "resumed")
    assert "the data order continues at position" in caplog.text
    assert sorted(resumed) == list(range(PERIOD, MAX_ITER))
    assert set(resumed[PERIOD]) >= {"total_loss", "loss_cls", "loss_mask", "loss_keypoint"}
    for it in range(PERIOD, MAX_ITER):
        assert resumed[it] == expected[it], it  # bit for bit, every loss


@pytest.mark.slow
def test_checkpoint_without_state_resumes_with_data_order_restarted(
    data, uninterrupted, tmp_path, caplog
):
    checkpoint, expected = uninterrupted
    with caplog.at_level(logging.INFO, logger="nonlocal_det"):
        resumed = _resume_from(checkpoint, data, tmp_path / "old", drop_state=True)
    assert "holds no data position or random state" in caplog.text
    assert "the data order restarts" in caplog.text
    assert sorted(resumed) == list(range(PERIOD, MAX_ITER))
    # as Detectron2 alone resumes: other images and random choices, other losses
    assert all(resumed[it]["total_loss"] != expected[it]["total_loss"] for it in resumed)


class _SignalAfter(HookBase):
    """Sends SIGUSR1 to this process after iteration ``iteration`` (before the stop hook looks)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_resume_after_a_stop_signal_gives_the_uninterrupted_losses(data, uninterrupted, tmp_path):
    """SIGUSR1 after iteration 5 (between periodic checkpoints): the run saves and exits with
    status 75; --resume in the same folder, with SEED -1 (a random seed), trains iterations 6
    and 7 with the uninterrupted run's losses (sampler seed and random states come from the
    checkpoint)."""
    _, expected = uninterrupted
    trainer, _ = _trainer(data, tmp_path)
    assert any(type(h).__name__ == "SafeStop" for h in trainer._hooks)  # else SIGUSR1 kills
    trainer.register_hooks([_SignalAfter(5)])
    trainer._hooks.insert(0, trainer._hooks.pop())  # before the stop hook, same iteration
    trainer.resume_or_load(resume=False)
    with pytest.raises(SystemExit) as stop:
        trainer.train()
    assert stop.value.code == 75
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
    del trainer
    trainer, recorder = _trainer(data, tmp_path, ["SEED", "-1"])
    trainer.resume_or_load(resume=True)
    trainer.train()
    assert sorted(recorder.losses) == [6, 7]
    assert all(recorder.losses[it] == expected[it] for it in (6, 7))


def _lazy_losses(out, resume, monkeypatch):
    """Train the LazyConfig demo (batch 2, no evaluation) for MAX_ITER iterations, checkpoints
    every PERIOD; returns each iteration's losses as the trainer put them in its storage."""
    from detectron2.engine import SimpleTrainer

    losses, run_step = {}, SimpleTrainer.run_step

    def recorded_run_step(self):
        run_step(self)
        histories = self.storage.histories().items()
        losses[self.iter] = {k: h.latest() for k, h in histories if "loss" in k}

    demo = DEMO_LAZY
    argv = ["--config-file", demo, *(["--resume"] if resume else [])]
    argv += [f"train.max_iter={MAX_ITER}", f"train.checkpointer.period={PERIOD}"]
    argv += ["train.eval_period=0", "train.seed=2", "dataloader.train.total_batch_size=2"]
    argv += [f"train.output_dir={out}"]
    cfg = train_net.setup(train_net.default_argument_parser().parse_args(argv))
    del cfg.dataloader["evaluator"]  # no evaluation after training
    with monkeypatch.context() as patch:
        patch.setattr(SimpleTrainer, "run_step", recorded_run_step)
        train_net.do_train(cfg, resume=resume)
    return losses


@pytest.mark.slow
def test_lazy_trainer_resume_gives_the_uninterrupted_losses(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    expected = _lazy_losses(tmp_path / "a", False, monkeypatch)
    name = f"model_{PERIOD - 1:07d}.pth"
    os.makedirs(tmp_path / "b")
    for f in (name, "metrics.json"):  # metrics.json: the record of the last iteration, 7
        shutil.copy(tmp_path / "a" / f, tmp_path / "b" / f)
    (tmp_path / "b" / "last_checkpoint").write_text(name)
    resumed = _lazy_losses(tmp_path / "b", True, monkeypatch)
    assert sorted(resumed) == list(range(PERIOD, MAX_ITER))
    # trimmed back to the checkpoint before the resumed run wrote its own: no record twice
    records = (tmp_path / "b" / "metrics.json").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in records] == [MAX_ITER - 1]
    assert "loss_keypoint" in resumed[PERIOD]
    assert all(resumed[it] == expected[it] for it in resumed), (resumed, expected)


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    np.random.randn(), random.gauss(0, 1)  # cached Gaussians are part of the states
    torch.save(get_rng_state(), tmp_path / "rng.pth")
    first = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert _draws() == first
    with preserved_rng():
        inside = _draws()
    assert _draws() == inside  # as if nothing had drawn inside


def _toy_loader(seed):
    """Detectron2's train loader over 7 images of two aspect ratios (batches group them), the
    "mapper" drawing from numpy's and torch's generators as augmentations do."""
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler

    sizes = [(10, 20), (20, 10), (10, 20), (10, 20), (20, 10), (10, 20), (10, 20)]
    dicts = [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(sizes)]

    def mapper(d):
        return dict(d, flip=float(np.random.rand()), noise=float(torch.rand(())))

    return build_detection_train_loader(
        dicts, mapper=mapper, sampler=TrainingSampler(len(dicts), seed=seed), total_batch_size=2
    )


def test_loader_continues_after_any_number_of_batches():
    """The batches after restoring a state saved after k batches are those of the uninterrupted
    loader, for every k (images waiting in a bucket or not); without the state they are not."""
    torch.manual_seed(0), np.random.seed(0)
    uninterrupted = _toy_loader(seed=5)
    TrainingResumeState(uninterrupted)
    it = iter(uninterrupted)
    expected = [next(it) for _ in range(12)]
    waited = 0
    for k in range(1, 8):
        torch.manual_seed(0), np.random.seed(0)
        first = _toy_loader(seed=5)
        state = TrainingResumeState(first)
        it = iter(first)
        assert [next(it) for _ in range(k)] == expected[:k]
        saved = state.state_dict()
        waited += bool(saved["data"]["waiting"])
        torch.manual_seed(1), np.random.seed(1)  # as another start: seeded again
        resumed = _toy_loader(seed=5)
        TrainingResumeState(resumed).load_state_dict(saved)
        it = iter(resumed)
        assert [next(it) for _ in range(12 - k)] == expected[k:], k
    assert waited >= 2  # some states were saved with an image waiting in its bucket
    restarted = iter(_toy_loader(seed=5))
    assert [next(restarted) for _ in range(12 - 3)] != expected[3:]
