"""Crash safety of the files a run writes: atomic checkpoints and ``last_checkpoint`` (a save
killed by SIGKILL or failing midway leaves the previous checkpoint loadable), and ``metrics.json``
trimmed back to the checkpoint a run resumes from."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from utils import REPO

from detectron2.checkpoint import DetectionCheckpointer

from nonlocal_det.engine import AtomicCheckpointer, CheckpointError, trim_metrics_after
from nonlocal_det.engine.metrics import INTERRUPTED_SUFFIX
from nonlocal_det.utils import atomic_open, atomic_write_bytes, remove_stale_temp_files


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_bytes(str(path), b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path), "w") as f:
            f.write("new, half written")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_open(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ValueError, match="allowed: 'w', 'wb'"):
        with atomic_open(str(path), "r"):
            pass


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(4, 4)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000009")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 a partial zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save("model_0000019")
    with pytest.raises(CheckpointError):
        ckpt.save("model_0000009")  # overwriting the file the tag names
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")
    loaded = torch.load(ckpt.get_checkpoint_file(), weights_only=False)["model"]
    assert all(torch.equal(loaded[k], before[k]) for k in before)


# A process that saves a checkpoint, then is SIGKILLed in the middle of a second save: while
# writing the checkpoint file ("pth", the same name as the first: model_final.pth saved again by
# a resumed run), or after opening the last_checkpoint tag for writing ("tag").
_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    from detectron2.checkpoint import DetectionCheckpointer
    from nonlocal_det.engine import AtomicCheckpointer

    save_dir, kind, where = sys.argv[1:]
    os.makedirs(save_dir)
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    ckpt = (AtomicCheckpointer if kind == "atomic" else DetectionCheckpointer)(model, save_dir)
    ckpt.save("model_final")
    with torch.no_grad():
        model.weight.add_(1.0)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "pth":
        def killed_save(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04 the first bytes of the new file")
            f.flush()
            die()
        torch.save = killed_save
        ckpt.save("model_final")
    else:
        open_ = ckpt.path_manager.open
        def open_then_die(path, mode="r", **kwargs):
            f = open_(path, mode, **kwargs)
            if path.endswith("last_checkpoint") and "w" in mode:
                f.__enter__()  # open for writing (as fvcore's `with` does) ...
                die()  # ... when the process is killed
            return f
        ckpt.path_manager.open = open_then_die
        ckpt.save("model_0000099")
    """)


def _killed_save(save_dir, kind, where):
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(save_dir), kind, where],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed by SIGKILL, not an error


def _resume(save_dir, checkpointer=AtomicCheckpointer):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    expected = model.weight.detach().clone()
    checkpointer(model, str(save_dir)).resume_or_load("", resume=True)
    return torch.equal(model.weight, expected)


@pytest.mark.parametrize("where", ["pth", "tag"])
def test_sigkill_during_save(tmp_path, where):
    # Detectron2's own checkpointer: the kill leaves a "last checkpoint" that cannot be loaded
    plain = tmp_path / "plain"
    _killed_save(plain, "plain", where)
    with pytest.raises(Exception):
        _resume(plain, DetectionCheckpointer)
    # the atomic one: the previous checkpoint, whole, still named by last_checkpoint
    atomic = tmp_path / "atomic"
    _killed_save(atomic, "atomic", where)
    assert (atomic / "last_checkpoint").read_text() == "model_final.pth"
    leftovers = [f for f in os.listdir(atomic) if f.endswith(".tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary file ...
    assert _resume(atomic)  # ... ignored: the first save's weights are loaded
    assert not [f for f in os.listdir(atomic) if f.endswith(".tmp")]  # and removed
    assert remove_stale_temp_files(str(atomic)) == []


def _lines(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_trim_metrics_after_a_kill(tmp_path):
    path = tmp_path / "metrics.json"
    records = [{"iteration": i, "total_loss": 1.0 / (i + 1)} for i in (19, 39, 59, 79)]
    path.write_text(_lines(records) + '{"iteration": 99, "total_lo')  # torn by the kill
    writer = open(path, "a")  # Detectron2's JSONWriter holds the file open in append mode
    assert trim_metrics_after(str(path), 59) == (3, 2)
    writer.write(json.dumps({"iteration": 60}) + "\n")
    writer.close()
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [19, 39, 59, 60]
    moved = (tmp_path / ("metrics.json" + INTERRUPTED_SUFFIX)).read_text().splitlines()
    assert json.loads(moved[0])["iteration"] == 79 and moved[1] == '{"iteration": 99, "total_lo'


def test_trim_metrics_keeps_a_restarted_run_and_adds_a_missing_newline(tmp_path):
    path = tmp_path / "metrics.json"
    # an earlier run (19, 39) and a later one started from scratch in the same folder (19)
    path.write_text(_lines([{"iteration": 19}, {"iteration": 39}]) + '{"iteration": 19}')
    assert trim_metrics_after(str(path), 29) == (3, 0)
    assert path.read_text().endswith('{"iteration": 19}\n')
    assert trim_metrics_after(str(tmp_path / "absent.json"), 5) == (0, 0)
