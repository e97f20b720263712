"""Checkpoint files that are not what they should be: weights a user hands in (empty, truncated,
not a checkpoint, an mmdetection checkpoint) are named with what they are and what to do;
``--resume`` goes past an unreadable newest checkpoint or a bad ``last_checkpoint`` to the newest
readable one, and stops when none is; a save that fills the disk keeps the last good checkpoint,
names the folder and the space, and stops the training without its final evaluation.

Every file here is real: saved by the checkpointer, then cut short, emptied or replaced."""

import errno
import json
import logging
import os
import pickle
import re
import shlex
import subprocess
import time
import uuid

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer, hooks
from torch import nn
from utils import DEMO_LAZY, REPO

from nonlocal_det.engine import AtomicCheckpointer, CheckpointError, check_weights_file
from nonlocal_det.engine import checkpoint as checkpoint_module


class Net(nn.Module):
    """A small model with Detectron2's loss-dict interface; 2 x 64 x 64 weights (33 kB)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return {"loss": self.b(torch.relu(self.a(x))).pow(2).mean()}


def _net(seed: int, width: int = 64) -> Net:
    torch.manual_seed(seed)
    return Net(width)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _saved(directory, name="model_0000009", seed=0, **extra) -> str:
    """A real checkpoint of ``_net(seed)`` saved by the checkpointer; returns its path."""
    os.makedirs(directory, exist_ok=True)
    AtomicCheckpointer(_net(seed), str(directory)).save(name, **extra)
    return os.path.join(str(directory), f"{name}.pth")


def _cut(path, keep: float) -> int:
    """Cut ``path`` to ``keep`` of its size (a copy cut short); returns the new size."""
    data = open(path, "rb").read()
    size = int(len(data) * keep)
    open(path, "wb").write(data[:size])
    return size


# ----- weights a user hands in ------------------------------------------------------------------


def _bad_files(tmp_path):
    good = _saved(tmp_path / "good")
    size = os.path.getsize(good)
    files = {}
    data = open(good, "rb").read()
    for name, content in [
        ("empty.pth", b""),
        ("truncated.pth", data[:5000]),
        ("random.pth", np.random.default_rng(0).bytes(4000)),
        ("notes.pth", b"weights of the model we trained last week\n"),
        ("metrics.json", json.dumps({"iteration": 19, "total_loss": 1.5}).encode()),
    ]:
        files[name] = tmp_path / name
        files[name].write_bytes(content)
    legacy = tmp_path / "legacy.pth"  # torch's pre-1.6 format, a pickle
    torch.save({"model": _net(0).state_dict()}, legacy, _use_new_zipfile_serialization=False)
    _cut(legacy, 0.5)
    files["legacy.pth"] = legacy
    return files, size


EXPECTED = {  # what the message says the file is
    "empty.pth": r"it is empty \(0 bytes\)",
    "truncated.pth": r"it is truncated: 5000 bytes, it ends inside entry 'archive/data/0', \d+ bytes "
    r"into its data, the rest and the archive's directory \(written last\) are missing",
    "random.pth": r"not a PyTorch or pickle checkpoint: binary data of an unknown format",
    "notes.pth": r"not a PyTorch or pickle checkpoint: a text file \(it starts with 'weights of",
    "metrics.json": r"not a PyTorch or pickle checkpoint: a JSON file",
    "legacy.pth": r"it is truncated: \d+ bytes \(RuntimeError: unexpected EOF",
}


def test_bad_weights_are_named_with_what_they_are(tmp_path):
    files, _ = _bad_files(tmp_path)
    for name, path in files.items():
        model = _net(1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError) as e:
            AtomicCheckpointer(model).load(str(path))
        message = str(e.value)
        assert message.startswith(f"MODEL.WEIGHTS={path}: cannot be loaded: "), message
        assert e.value.path == str(path)
        assert re.search(EXPECTED[name], message), message
        assert "weights_only" not in message and "Unsupported operand" not in message
        assert ("Copy or download it again" in message) == (name in ("empty.pth", "truncated.pth",
                                                                     "legacy.pth"))  # fmt: skip
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        # the same before any training work (the legacy pickle's cut shows only when read)
        if name != "legacy.pth":
            with pytest.raises(CheckpointError, match=EXPECTED[name]):
                check_weights_file(str(path))
    with pytest.raises(CheckpointError, match=r"train.init_checkpoint=\S+absent.pth: no such file"):
        check_weights_file(str(tmp_path / "absent.pth"), "train.init_checkpoint")
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS=.*absent.pth: no such file"):
        AtomicCheckpointer(_net(0)).load(str(tmp_path / "absent.pth"))
    # a pickle holding something else than a state dict
    other = tmp_path / "list.pth"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="it holds a list, not a state dict"):
        AtomicCheckpointer(_net(0)).load(str(other))


def test_detectron2_files_load_as_before(tmp_path, monkeypatch):
    """A Detectron2 .pth, a model-zoo .pkl (``model`` + ``__author__``), a Caffe2-style .pkl (name
    matching) and a ``detectron2://`` URL (served from the download cache) still load."""
    source = _net(0)
    pth = _saved(tmp_path, "model_final", seed=0)
    arrays = {k: v.numpy() for k, v in source.state_dict().items()}
    zoo = tmp_path / "zoo.pkl"
    zoo.write_bytes(pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}))
    caffe2 = tmp_path / "caffe2.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": arrays}, protocol=2))
    url_dir = f"nonlocal_det_test_{uuid.uuid4().hex}"
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "detectron2" / url_dir
    cached.mkdir(parents=True)
    (cached / "model.pkl").write_bytes(zoo.read_bytes())
    (cached / "cut.pkl").write_bytes(zoo.read_bytes()[:500])
    for path in (pth, str(zoo), str(caffe2), f"detectron2://{url_dir}/model.pkl"):
        check_weights_file(path)
        model = _net(1)
        AtomicCheckpointer(model).resume_or_load(path, resume=False)
        assert _same_weights(model, source), path
    with pytest.raises(CheckpointError, match=rf"{url_dir}/cut.pkl: cannot be loaded: it is trunc"):
        AtomicCheckpointer(_net(1)).load(f"detectron2://{url_dir}/cut.pkl")


# ----- mmdetection checkpoints ------------------------------------------------------------------


def _mmdet_file(tmp_path, name: str, layout: str, extra_meta=None) -> str:
    """An mmdetection checkpoint of the published config ``name``, saved as mmdetection does;
    every tensor a zero-stride view of one zero (names and shapes only: 60 kB instead of 170 MB)."""
    H = pytest.importorskip("mmdet_harness")
    cfg = H.load_config(name)
    shapes = H.build(cfg, "meta").state_dict()
    zero = torch.zeros(())

    class Weights(nn.Module):
        def state_dict(self, *args, **kwargs):
            return type(shapes)((k, zero.expand(v.shape)) for k, v in shapes.items())

    path = str(tmp_path / f"{layout}_{os.path.basename(name)}.pth")
    H.save_like_mmdetection(Weights(), cfg, path, layout)
    if extra_meta:
        ckpt = torch.load(path, weights_only=False)
        ckpt["meta"].update(extra_meta)
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "name, layout, ours, model",
    [
        ("gcnet/mask-rcnn_r50-gcb-r16-c3-c5_fpn_1x_coco.py", "3.x", "mask_rcnn_R50_GC_r16.yaml",
         "Mask R-CNN, ResNet-50-FPN with GC blocks"),
        ("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "2.x", "faster_rcnn_R50.yaml",
         "Faster R-CNN, ResNet-50-FPN"),
    ],
)  # fmt: skip
def test_mmdetection_checkpoint_gets_the_convert_command(tmp_path, monkeypatch, name, layout, ours,
                                                         model):  # fmt: skip
    from nonlocal_det.tools import convert_mmdet

    monkeypatch.chdir(REPO)
    path = _mmdet_file(tmp_path, name, layout)
    for check in (lambda: check_weights_file(path), lambda: AtomicCheckpointer(_net(0)).load(path)):
        with pytest.raises(CheckpointError) as e:
            check()
        message = str(e.value)
        assert message.startswith(f"MODEL.WEIGHTS={path}: it is an mmdetection checkpoint")
        assert f"of a {model}, not a Detectron2 checkpoint" in message, message
        assert ("(mmdetection 2.28.2)" in message) == (layout == "2.x")
        command = message.splitlines()[1].strip()
        config = f"configs/mmdet/{ours}"
        assert command.startswith(f"python -m nonlocal_det.tools.convert_mmdet {path} ")
        assert command.endswith(f"--config-file {config}"), command
    # the command converts it, and the result is a Detectron2 checkpoint
    args = shlex.split(command)[3:]
    assert convert_mmdet.main(args) == 0
    check_weights_file(args[1])
    assert f"then evaluate or train with --config-file {config} MODEL.WEIGHTS {args[1]}" in message


def test_mmdetection_checkpoint_with_python_objects(tmp_path):
    """A training checkpoint of mmengine holds its objects (here a HistoryBuffer): torch's safe
    loading refuses it; the message says it is from mmdetection and gives --unsafe-load."""
    from mmengine.logging import HistoryBuffer

    path = _mmdet_file(
        tmp_path, "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "3.x", {"hub": HistoryBuffer()}
    )
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(_net(0), weights_key="train.init_checkpoint").load(path)
    message = str(e.value)
    assert message.startswith(f"train.init_checkpoint={path}: it is an mmdetection checkpoint")
    assert message.splitlines()[1].strip().endswith("--unsafe-load"), message
    assert "weights_only=False" not in message


# ----- --resume past unreadable checkpoints -----------------------------------------------------


def _run_folder(tmp_path):
    """A run's folder with two real checkpoints (iterations 9 and 19, of models seeded 9 and 19),
    19 the newest; returns (folder, path of 9, path of 19)."""
    out = tmp_path / "out"
    nine = _saved(out, "model_0000009", seed=9, iteration=9)
    nineteen = _saved(out, "model_0000019", seed=19, iteration=19)
    os.utime(nine, (time.time() - 60,) * 2)
    return out, nine, nineteen


def _resume(out, caplog):
    model = _net(0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nonlocal_det.engine.checkpoint"):
        ckpt = AtomicCheckpointer(model, str(out))
        extra = ckpt.resume_or_load("", resume=True)
    return model, ckpt, extra, caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, caplog, damage):
    out, nine, nineteen = _run_folder(tmp_path)
    size = _cut(nineteen, 0.6 if damage == "truncated" else 0.0)
    model, ckpt, extra, log = _resume(out, caplog)
    assert _same_weights(model, _net(9)) and extra["iteration"] == 9
    assert ckpt.has_checkpoint() and ckpt.get_checkpoint_file() == nine
    why = f"it is truncated: {size} bytes, it ends inside entry" if size else "it is empty"
    assert f"--resume: skipped {nineteen}: {why}" in log, log
    assert f"resumed from {nine} instead" in log
    # the next save is tagged as usual
    ckpt.save("model_0000029", iteration=29)
    assert (out / "last_checkpoint").read_text() == "model_0000029.pth"
    assert ckpt.get_checkpoint_file() == str(out / "model_0000029.pth")


@pytest.mark.parametrize(
    "tag, why",
    [
        (b"", "it is empty"),
        (b"\xff\xfe\x9c\x00garbage", "it is garbled (11 bytes, not a file name)"),
        (b"model_0000099.pth", "it names model_0000099.pth, which does not exist"),
        (None, None),  # deleted
    ],
)
def test_resume_past_a_bad_last_checkpoint(tmp_path, caplog, tag, why):
    out, nine, nineteen = _run_folder(tmp_path)
    if tag is None:
        os.remove(out / "last_checkpoint")
    else:
        (out / "last_checkpoint").write_bytes(tag)
    model, ckpt, extra, log = _resume(out, caplog)
    assert _same_weights(model, _net(19)) and extra["iteration"] == 19
    assert ckpt.has_checkpoint() and ckpt.get_checkpoint_file() == nineteen
    if why:
        assert f"--resume: skipped {out / 'last_checkpoint'}: {why}" in log, log
        assert f"resumed from {nineteen} instead" in log


def test_resume_stops_when_no_checkpoint_is_readable(tmp_path, caplog):
    out, nine, nineteen = _run_folder(tmp_path)
    _cut(nine, 0.0)
    size = _cut(nineteen, 0.3)
    (out / "last_checkpoint").write_bytes(b"\x00\xff")
    model = _net(0)
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(model, str(out)).resume_or_load("", resume=True)
    lines = str(e.value).splitlines()
    assert lines[0] == f"--resume: no checkpoint in {out} can be read:"
    assert lines[1] == f"  {out / 'last_checkpoint'}: it is garbled (2 bytes, not a file name)"
    assert lines[2].startswith(f"  {nineteen}: it is truncated: {size} bytes, it ends ")
    assert lines[3] == f"  {nine}: it is empty (0 bytes)"
    assert "OUTPUT_DIR" in lines[4]
    assert _same_weights(model, _net(0))  # nothing loaded
    # Detectron2's own checkpointer: a bare UnicodeDecodeError
    with pytest.raises(UnicodeDecodeError):
        DetectionCheckpointer(_net(0), str(out)).resume_or_load("", resume=True)


def test_resume_without_checkpoints_starts_from_the_weights(tmp_path, caplog):
    weights = _saved(tmp_path / "init", "init", seed=5)
    out = tmp_path / "out"
    out.mkdir()
    model, ckpt, extra, log = _resume(out, caplog)  # an empty folder: from scratch, silently
    assert not ckpt.has_checkpoint() and log == ""
    (out / "last_checkpoint").write_text("model_0000019.pth")  # its checkpoints deleted
    model = _net(0)
    with caplog.at_level(logging.WARNING, logger="nonlocal_det.engine.checkpoint"):
        ckpt = AtomicCheckpointer(model, str(out))
        ckpt.resume_or_load(weights, resume=True)
    assert _same_weights(model, _net(5)) and not ckpt.has_checkpoint()
    assert "it names model_0000019.pth, which does not exist" in caplog.text
    assert f"holds no model_*.pth: starting from MODEL.WEIGHTS={weights}" in caplog.text
    # the weights are not checked early when the folder holds checkpoints to resume
    check_weights_file(str(tmp_path / "absent.pth"), resume_from=str(out))


def test_save_over_a_garbled_last_checkpoint(tmp_path):
    (tmp_path / "last_checkpoint").write_bytes(b"\xff\xfe")  # Detectron2: UnicodeDecodeError
    ckpt = AtomicCheckpointer(_net(0), str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


# ----- a full disk during a save ----------------------------------------------------------------


def _failing_writes(monkeypatch, budget: int, name: str):
    """Writes of the checkpointer to files called ``name`` fail with ENOSPC once ``budget`` bytes
    are written (the error a full disk gives, raised where the file is written)."""
    original = checkpoint_module.atomic_open

    class Full:
        def __init__(self, f):
            self._f, self.left = f, budget

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    import contextlib

    @contextlib.contextmanager
    def atomic_open(path, mode="wb", **kwargs):
        with original(path, mode, **kwargs) as f:
            yield Full(f) if os.path.basename(path) == name else f

    monkeypatch.setattr(checkpoint_module, "atomic_open", atomic_open)


class _Steps:
    """An endless data loader of random inputs."""

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, 64, generator=gen)


def _train(out, max_iter: int, evaluations: list):
    """Detectron2's training loop with a checkpoint every 2 iterations and an evaluation hook
    (final evaluation included)."""
    model = _net(0)
    trainer = SimpleTrainer(model, _Steps(), torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = AtomicCheckpointer(model, str(out), trainer=trainer)
    trainer.register_hooks(
        [
            hooks.PeriodicCheckpointer(ckpt, 2),
            hooks.EvalHook(0, lambda: evaluations.append(trainer.iter) or {}),
        ]
    )
    trainer.train(0, max_iter)
    return model


def _check_stopped(out, error, evaluations, kept="model_0000003.pth"):
    message = str(error)
    assert f"cannot save checkpoint model_final.pth in {out}: the disk is full (" in message
    size = os.path.getsize(out / kept)
    assert f"this checkpoint needs about {size} bytes (the size of {kept})" in message
    assert f"{kept} and last_checkpoint are intact. The training stopped" in message
    assert f"rerun with --resume: it continues from {kept}" in message
    assert evaluations == []  # no final evaluation of a run whose save failed
    assert (out / "last_checkpoint").read_text() == kept
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the partial file removed
    model = _net(1)
    extra = AtomicCheckpointer(model, str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    return message


def test_disk_full_at_the_final_save_injected(tmp_path, monkeypatch):
    """The last save fails: Detectron2's loop would then run its final evaluation (the failing
    iteration is the last one) and end in torch's "unexpected pos"."""
    out = tmp_path / "out"
    out.mkdir()
    evaluations = []
    # saves model_0000001 and model_0000003; model_final: ENOSPC after 5 kB (of 35 kB)
    _failing_writes(monkeypatch, 5000, "model_final.pth")
    with pytest.raises(CheckpointError) as e:
        _train(out, 4, evaluations)
    message = _check_stopped(out, e.value, evaluations)
    assert "No space left on device" in message and "unexpected pos" not in message
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]


def _mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def test_disk_full_on_a_small_filesystem(tmp_path):
    """A real 256 kB tmpfs: three checkpoints of 50 kB (and two in flight) fit, more do not."""
    out = tmp_path / "small"
    if not _mount_tmpfs(out, "256k"):
        pytest.skip("mounting a tmpfs is not permitted here (test_disk_full_... _injected runs)")
    try:
        evaluations = []
        with pytest.raises(CheckpointError) as e:
            _train(out, 100, evaluations)
        message = str(e.value)
        assert "the disk is full (No space left on device)" in message, message
        kept = (out / "last_checkpoint").read_text()
        iteration = int(kept[len("model_") : -len(".pth")])
        assert f"{kept} and last_checkpoint are intact" in message
        assert f"{os.path.getsize(out / kept)} bytes (the size of {kept})" in message
        free = __import__("shutil").disk_usage(out).free
        assert f"{free} bytes are free" in message or f"({free / 2**20:.1f} MB) are free" in message
        assert evaluations == [] and not [f for f in os.listdir(out) if f.endswith(".tmp")]
        extra = AtomicCheckpointer(_net(1), str(out)).resume_or_load("", resume=True)
        assert extra["iteration"] == iteration
    finally:
        subprocess.run(["umount", str(out)], check=True)


# ----- the commands -----------------------------------------------------------------------------


def test_lazy_config_names_a_bad_init_checkpoint_before_any_work(tmp_path):
    """A LazyConfig (training and ``--eval-only``): a truncated ``train.init_checkpoint`` stops
    right after the config is read, naming the key and the file."""
    from nonlocal_det.engine import train

    weights = _saved(tmp_path, "model_final")
    size = _cut(weights, 0.5)
    for mode in (["--eval-only"], []):
        args = train.default_argument_parser().parse_args(
            [
                "--config-file",
                DEMO_LAZY,
                *mode,
                f"train.init_checkpoint={weights}",
                f"train.output_dir={tmp_path / ('eval' if mode else 'train')}",
            ]
        )
        with pytest.raises(CheckpointError) as e:
            train.main(args)
        assert str(e.value).startswith(
            f"train.init_checkpoint={weights}: cannot be loaded: it is truncated: {size} bytes"
        )


@pytest.mark.slow
def test_train_net_eval_only_names_bad_weights(tmp_path, tmp_path_factory):
    """``train_net.py --eval-only MODEL.WEIGHTS <empty file>``: exit status 1, the last line
    names the file and what it is, before any model is built."""
    from subproc import DEMO, TINY, env_for, run_train_net
    from utils import shared_datasets_dir

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")
    env = env_for(shared_datasets_dir(tmp_path_factory))
    args = ["--config-file", DEMO, "--eval-only", *TINY, "MODEL.WEIGHTS", weights]
    log = run_train_net([*args, "OUTPUT_DIR", tmp_path / "out"], env, ok=False, timeout=240)
    last = log.strip().splitlines()[-1]
    assert last == (
        f"nonlocal_det.engine.checkpoint.CheckpointError: MODEL.WEIGHTS={weights}: cannot be "
        "loaded: it is empty (0 bytes). Copy or download it again, or set MODEL.WEIGHTS to "
        "another checkpoint"
    ), log[-3000:]
    assert "GeneralizedRCNN(" not in log and "Weights only load failed" not in log
