"""Crash-safe training: train_net.py killed with SIGKILL mid-run, then ``--resume``: it continues
from the last checkpoint with its iteration, optimiser and scheduler state, and metrics.json stays
valid JSON lines with every record up to that checkpoint kept."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from coco_files import write_split
from subproc import DEMO, TINY, command, env_for, run_train_net
from utils import REPO, shared_datasets_dir

from nonlocal_det.engine import train as train_net


def _last_record_iteration(path):
    try:
        lines = open(path).read().splitlines()
        return json.loads(lines[-1])["iteration"] if lines else -1
    except (OSError, ValueError):
        return -1


def _records(path):
    return [json.loads(line) for line in open(path)]  # every line must parse


def _equal(a, b):
    """Recursive equality of (nested) state dicts holding tensors."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path, tmp_path_factory):
    data = write_split(str(tmp_path / "data"), "train")
    out = tmp_path / "out"
    opts = ["DATASETS.TRAIN_JSON", data["json"], "DATASETS.TRAIN_IMAGES", data["images"], *TINY]
    opts += ["SOLVER.CHECKPOINT_PERIOD", "15", "OUTPUT_DIR", str(out)]
    env = env_for(shared_datasets_dir(tmp_path_factory))  # the evaluation's demo data, small

    # 1. train, and kill -9 right after the second metrics.json record (Detectron2 writes one every
    # 20 iterations: 19, 39), i.e. between the checkpoints of iterations 29 and 44
    log_file = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        command(["--config-file", DEMO, *opts, "SOLVER.MAX_ITER", "1000"]),
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    metrics = out / "metrics.json"
    while _last_record_iteration(metrics) < 39 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    log_file.close()

    # 2. what the kill left: a loadable last checkpoint, and metrics.json records up to it
    name = (out / "last_checkpoint").read_text()
    ckpt = torch.load(out / name, weights_only=False)
    k = ckpt["iteration"]
    assert name == f"model_{k:07d}.pth" and k >= 29
    killed = _records(metrics)
    before = [r for r in killed if r["iteration"] <= k]
    after = [r for r in killed if r["iteration"] > k]  # the model state of these is lost
    assert [r["iteration"] for r in before][0] == 19

    # 3. resuming restores exactly the stored optimiser / scheduler state and iteration (checked
    # in-process on a copy of what resume reads, so that step 4 is untouched)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("last_checkpoint", name, "metrics.json"):
        shutil.copy(out / f, copy / f)
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", DEMO, "--resume", *opts[:-1], str(copy), "SOLVER.MAX_ITER", "1000"]
    )
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == k + 1
    assert _equal(trainer.optimizer.state_dict(), ckpt["trainer"]["_trainer"]["optimizer"])
    assert trainer.optimizer.state_dict()["state"]  # momentum buffers, not a fresh optimiser
    assert _equal(trainer.scheduler.state_dict(), ckpt["trainer"]["hooks"]["LRScheduler"])
    assert trainer.scheduler.last_epoch == k + 1
    del trainer

    # 4. the real thing: --resume continues from k + 1 to the end
    log = run_train_net(["--config-file", DEMO, "--resume", *opts, "SOLVER.MAX_ITER", k + 4], env)
    assert f"Starting training from iteration {k + 1}" in log
    records = _records(metrics)
    assert records[: len(before)] == before  # nothing before the checkpoint lost or changed
    iters = [r["iteration"] for r in records]
    assert iters == sorted(set(iters))  # no iteration twice (the killed run's tail was moved)
    assert iters[-1] == k + 3 and all(r["total_loss"] == r["total_loss"] for r in records)
    assert (out / "model_final.pth").is_file()
    if after:  # usually [39] (checkpoint 29): moved aside, not lost
        assert _records(str(metrics) + ".interrupted") == after
        assert "line(s) written after iteration" in log
