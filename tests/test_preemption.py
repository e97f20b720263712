"""Preemption and Ctrl-C: on a stop signal (SOLVER.STOP_SIGNALS / train.stop_signals, SIGTERM and
SIGUSR1 by default) or SIGINT, training finishes its iteration, saves that iteration's checkpoint
and ``last_checkpoint``, skips the final evaluation and exits with status 75; ``--resume``
continues from the next iteration. A second signal during the save is ignored. With two
processes both stop after the same iteration and only the main one writes."""

import logging
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from coco_files import write_split
from detectron2.engine import HookBase
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.utils.events import get_event_storage
from subproc import DEMO, TINY, command, env_for, run_train_net
from utils import REPO, lazy_demo_cfg, shared_datasets_dir

from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.engine import PREEMPTED_EXIT_CODE, TrainingPreempted
from nonlocal_det.engine import train as train_net
from nonlocal_det.config import parse_stop_signals

STOP_RE = re.compile(r"Stopped on (\S+) after iteration (\d+)")


def _train_opts(tmp_path, out):
    data = write_split(str(tmp_path / "data"), "train")
    opts = ["DATASETS.TRAIN_JSON", data["json"], "DATASETS.TRAIN_IMAGES", data["images"], *TINY]
    return opts + ["OUTPUT_DIR", str(out)]


def _popen(args, env, log_path):
    """``train_net.py args`` in a new process group (a test's signals reach it alone)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        command(args),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def _wait_for_checkpoint(out, proc, log_path, timeout=240):
    """Until ``last_checkpoint`` exists (the first periodic checkpoint): training is under way."""
    deadline = time.time() + timeout
    while not (out / "last_checkpoint").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    assert proc.poll() is None, open(log_path).read()[-4000:]


def _checkpoints(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("model_"))


@pytest.mark.slow
def test_sigterm_saves_the_iteration_exits_75_and_resume_continues(tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    opts = _train_opts(tmp_path, out) + ["SOLVER.CHECKPOINT_PERIOD", "5"]
    env = env_for(shared_datasets_dir(tmp_path_factory))
    log_path = tmp_path / "stopped.log"
    # two data-loader workers: a scheduler signals the whole process group, and torch's workers die
    # on SIGTERM
    args = ["--config-file", DEMO, *opts, "DATALOADER.NUM_WORKERS", "2", "SOLVER.MAX_ITER", "1000"]
    proc, log_file = _popen(args, env, log_path)
    _wait_for_checkpoint(out, proc, log_path)
    os.killpg(proc.pid, signal.SIGTERM)  # the process and its data-loader workers
    code = proc.wait(timeout=120)
    log_file.close()
    log = open(log_path).read()
    assert code == PREEMPTED_EXIT_CODE, log[-4000:]

    # the iteration the signal reached is saved, named by last_checkpoint; nothing evaluated
    stops = STOP_RE.findall(log)
    assert len(stops) == 1 and stops[0][0] == "SIGTERM", log[-4000:]
    k = int(stops[0][1])
    assert k >= 4 and "SIGTERM received during iteration" in log
    name = (out / "last_checkpoint").read_text()
    assert name == f"model_{k:07d}.pth"
    ckpt = torch.load(out / name, weights_only=False)
    assert ckpt["iteration"] == k and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert "model_final.pth" not in _checkpoints(out)
    assert not (out / "inference").exists()  # the final evaluation did not run
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # no temporary file left

    # --resume continues from the next iteration, to the end and its evaluation
    resumed = run_train_net(
        ["--config-file", DEMO, "--resume", *opts, "SOLVER.MAX_ITER", k + 3], env
    )
    assert f"Starting training from iteration {k + 1}" in resumed
    assert (out / "model_final.pth").is_file()
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == k + 2


@pytest.mark.slow
def test_two_processes_stop_after_the_same_iteration(tmp_path, tmp_path_factory):
    """SIGTERM to the parent process of ``--num-gpus 2`` (CPU, gloo): it passes the signal on,
    both workers stop after the same iteration, the main one saves, the parent exits 75."""
    out = tmp_path / "out"
    opts = _train_opts(tmp_path, out) + ["SOLVER.CHECKPOINT_PERIOD", "3"]
    env = env_for(shared_datasets_dir(tmp_path_factory))
    log_path = tmp_path / "stopped.log"
    args = ["--config-file", DEMO, "--num-gpus", "2", *opts, "SOLVER.MAX_ITER", "1000"]
    proc, log_file = _popen(args, env, log_path)
    _wait_for_checkpoint(out, proc, log_path)
    os.kill(proc.pid, signal.SIGTERM)  # the parent only, as `kill PID` of the job's process
    code = proc.wait(timeout=180)
    log_file.close()
    assert code == PREEMPTED_EXIT_CODE, open(log_path).read()[-4000:]

    rank0, rank1 = (open(out / f).read() for f in ("log.txt", "log.txt.rank1"))
    [(sig0, k0)], [(sig1, k1)] = STOP_RE.findall(rank0), STOP_RE.findall(rank1)
    assert k0 == k1 and sig0 == sig1 == "SIGTERM", (k0, k1)
    k = int(k0)
    assert (out / "last_checkpoint").read_text() == f"model_{k:07d}.pth"
    assert torch.load(out / f"model_{k:07d}.pth", weights_only=False)["iteration"] == k
    assert "Saving checkpoint to" in rank0 and "Saving checkpoint to" not in rank1
    assert "model_final.pth" not in _checkpoints(out)


# ---- in-process: the stop signal of the config, Ctrl-C, a second signal during the save -------
class _SignalAt(HookBase):
    """Sends ``sig`` to this process before iteration ``at`` runs."""

    def __init__(self, at, sig):
        self.at, self.sig = at, sig

    def before_step(self):
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.sig)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def preemption_log():
    handler, log = _Records(), logging.getLogger("nonlocal_det.engine.preemption")
    log.addHandler(handler)
    yield handler.lines
    log.removeHandler(handler)


def _yaml_trainer(tmp_path, max_iter, *opts):
    out = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", DEMO, *_train_opts(tmp_path, out), "SOLVER.MAX_ITER", str(max_iter)]
        + [str(o) for o in opts]
    )
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=False)
    return trainer, out


def _second_signal_during_save(checkpointer, sig, saves):
    """The checkpointer's ``save`` sends ``sig`` to this process first."""
    save = checkpointer.save

    def save_with_a_signal(name, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(0.01)  # the handler runs here, in the middle of the save
        save(name, **kwargs)
        saves.append(name)

    checkpointer.save = save_with_a_signal


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second, at, max_iter",
    [
        # the config's signal mid-run (its periodic evaluation skipped); Ctrl-C during the save
        (signal.SIGUSR2, signal.SIGINT, 2, 6),
        # Ctrl-C at the last iteration: model_final (saved by the periodic checkpointer), no
        # evaluation
        (signal.SIGINT, signal.SIGTERM, 2, 3),
    ],
    ids=["config-signal-then-ctrl-c-in-save", "ctrl-c-at-last-iteration"],
)
def test_signal_in_process_second_signal_ignored(
    tmp_path, monkeypatch, preemption_log, first, second, at, max_iter
):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    trainer, out = _yaml_trainer(
        tmp_path, max_iter, "SOLVER.STOP_SIGNALS", '("SIGTERM", "USR2")', "TEST.EVAL_PERIOD", 3
    )
    evaluations = []
    monkeypatch.setattr(type(trainer), "test", classmethod(lambda *a, **k: evaluations.append(1)))
    saves = []
    _second_signal_during_save(trainer.checkpointer, second, saves)
    trainer.register_hooks([_SignalAt(at, first)])
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train()
    assert stop.value.code == PREEMPTED_EXIT_CODE and stop.value.iteration == at
    assert stop.value.signal_name == first.name
    final = at == max_iter - 1
    name = "model_final.pth" if final else f"model_{at:07d}.pth"
    assert (out / "last_checkpoint").read_text() == name == os.path.basename(stop.value.checkpoint)
    ckpt = torch.load(out / name, weights_only=False)
    assert ckpt["iteration"] == at and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert saves == [name[: -len(".pth")]]  # one save of the stop iteration (not two)
    assert evaluations == []  # neither the periodic evaluation at iteration 2 nor the final one
    assert _checkpoints(out) == [name]
    doing = "stopping after this iteration" if final else "saving the checkpoint"
    assert any(f"{second.name} received again: ignored, {doing}" in m for m in preemption_log)
    assert any(f"Stopped on {first.name} after iteration {at}" in m for m in preemption_log)
    # one process: the handlers are the test process's own again
    assert {s: signal.getsignal(s) for s in handlers} == handlers


@pytest.mark.slow
def test_lazy_trainer_stops_on_its_signal(tmp_path, monkeypatch, preemption_log):
    """A LazyConfig's training: ``train.stop_signals``, an atomic checkpoint of the stop
    iteration, exit status 75, no evaluation."""
    cfg = lazy_demo_cfg(
        tmp_path,
        "train.max_iter=6",
        "train.eval_period=2",
        "train.checkpointer.period=100",
        "train.stop_signals=[SIGUSR1]",
    )
    forward = GeneralizedRCNN.forward

    def forward_with_a_signal(self, batched_inputs):
        if self.training and get_event_storage().iter == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # during iteration 1's forward
        return forward(self, batched_inputs)

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_a_signal)
    monkeypatch.setattr(train_net, "do_test", lambda *a: pytest.fail("evaluated"))
    with pytest.raises(TrainingPreempted) as stop:
        train_net.do_train(cfg)
    assert stop.value.code == PREEMPTED_EXIT_CODE and stop.value.iteration == 1
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=False)["iteration"] == 1
    assert any("SIGUSR1 received" in m for m in preemption_log)


def test_stop_signals_are_checked():
    assert parse_stop_signals(("SIGTERM", "usr1", "SIGTERM")) == (signal.SIGTERM, signal.SIGUSR1)
    cfg = get_nonlocal_cfg("", ["SOLVER.STOP_SIGNALS", '("SIGUSR2",)'])
    assert cfg.SOLVER.STOP_SIGNALS == ("SIGUSR2",)
    assert get_nonlocal_cfg().SOLVER.STOP_SIGNALS == ("SIGTERM", "SIGUSR1")
    for bad in ('("SIGKILL",)', '("SIGTREM",)', '("SIGTERM", 15)'):
        with pytest.raises(ValueError, match=r"SOLVER.STOP_SIGNALS=.*allowed: .*SIGUSR2"):
            get_nonlocal_cfg("", ["SOLVER.STOP_SIGNALS", bad])
