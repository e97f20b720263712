"""The output folder (``nonlocal_det.engine.output_dir``): one run per ``OUTPUT_DIR`` (a second one
stops at once, naming the first; a dead run's lock is taken over), ``--resume`` compared with the
config the checkpoint was trained with before anything is written, config values checked before
work, and commands that never write over their own input. In-process wherever possible:
``nonlocal_det.engine.train.setup`` as ``train_net.py`` calls it, for YAML and LazyConfig."""

import multiprocessing
import os
import shutil
import signal
import socket
import time

import pytest
import torch
from coco_files import write_dataset
from detectron2.config import LazyConfig
from subproc import DEMO, TINY, env_for, run_train_net
from test_bad_inputs import assert_documented
from utils import CONFIGS, DEMO_LAZY

from nonlocal_det.config import check_config_values, check_lazy_config_values, get_nonlocal_cfg
from nonlocal_det.engine import train as train_net
from nonlocal_det.engine.output_dir import (
    LOCK_NAME,
    OutputDirInUseError,
    ResumeConfigError,
    check_resume_iteration,
    lock_output_dir,
    run_config_text,
)

LAZY_DEMO = DEMO_LAZY


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small COCO-format dataset of the demo's kind (3 keypoints): the four config values."""
    return write_dataset(str(tmp_path_factory.mktemp("output_dir_data")))


def _argv(files, out, *extra, flags=()):
    data = [x for kv in files.items() for x in kv]
    data += ["TEST.KEYPOINT_OKS_SIGMAS", "[0.08, 0.08, 0.08]"]  # the dataset's 3 keypoints
    return ["--config-file", DEMO, *flags, *data, *TINY, "OUTPUT_DIR", str(out), *extra]


def setup(files, out, *extra, flags=()):
    """``train_net.py``'s setup, in this process."""
    args = train_net.default_argument_parser().parse_args(_argv(files, out, *extra, flags=flags))
    return train_net.setup(args)


def snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock file aside: it names the process that
    holds the folder, or nothing)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in set(names) - {LOCK_NAME}:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return f.read()


def _hold(out, ready):
    """A run holding ``out``'s lock (forked: no interpreter start-up) until it is killed."""
    lock_output_dir(out)
    ready.set()
    time.sleep(120)


def test_second_run_stops_at_once_and_a_dead_runs_lock_is_taken_over(files, tmp_path):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    first = ctx.Process(target=_hold, args=(str(out), ready))
    first.start()
    try:
        assert ready.wait(60)
        for flags in ((), ("--eval-only",), ("--resume",)):
            with pytest.raises(OutputDirInUseError) as e:
                setup(files, out, flags=flags)
            message = str(e.value)
            assert f"OUTPUT_DIR={out} is in use by another run: pid {first.pid} on host " in message
            assert socket.gethostname() in message and "command: " in message
            assert_documented("a second run into the same `OUTPUT_DIR`", e.value, tmp_path)
            assert os.listdir(out) == [LOCK_NAME]  # nothing written: no config.yaml, no log.txt
        # the first run is killed: its lock file stays, naming it; the kernel dropped its lock
        os.kill(first.pid, signal.SIGKILL)
        first.join(30)
    finally:
        first.kill()
        first.join(30)
    assert f'"pid": {first.pid}' in (out / LOCK_NAME).read_text()
    setup(files, out)
    log = _log(out)
    assert f"Took over the lock {out / LOCK_NAME}, left by pid {first.pid} on host " in log
    assert "which is no longer running" in log
    assert f'"pid": {os.getpid()}' in (out / LOCK_NAME).read_text()
    assert (out / "config.yaml").is_file()


def test_released_lock_is_not_stale(tmp_path):
    lock = lock_output_dir(str(tmp_path))
    assert lock_output_dir(str(tmp_path)) is lock  # re-entrant within a process
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # an empty lock file: nothing to take over
    again = lock_output_dir(str(tmp_path))
    assert again is not lock and again.notes == []
    again.release()


@pytest.mark.slow
def test_train_net_into_a_busy_folder_exits_1(files, tmp_path):
    """The real command: exit status 1 within its start-up, naming the running process."""
    out = tmp_path / "out"
    lock = lock_output_dir(str(out))  # this test process is "the first run"
    try:
        # two processes: rank 1 gets rank 0's verdict (no rank left waiting on the other)
        log = run_train_net(["--num-gpus", "2", *_argv(files, out)], env_for(tmp_path), False, 120)
    finally:
        lock.release()
    assert (
        f"OutputDirInUseError: OUTPUT_DIR={out} is in use by another run: pid {os.getpid()}" in log
    )
    assert "Starting training" not in log and os.listdir(out) == [LOCK_NAME]


@pytest.fixture(scope="module")
def checkpointed(files, tmp_path_factory):
    """A folder as a run leaves it: config.yaml, log.txt, and the trainer's checkpoint of
    iteration 9 (``last_checkpoint``), with the run's config stored in it."""
    out = tmp_path_factory.mktemp("checkpointed") / "out"
    cfg = setup(files, out, "SOLVER.MAX_ITER", "20")
    trainer = train_net.Trainer(cfg)
    trainer.iter = 9
    trainer.checkpointer.save("model_0000009", iteration=9)  # as the PeriodicCheckpointer
    lrs = list(trainer.scheduler.base_lrs)
    del trainer
    assert torch.load(out / "model_0000009.pth", weights_only=True)["run_config"]["yaml"] == (
        cfg.dump()
    )
    return out, lrs


@pytest.fixture
def copy(checkpointed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(checkpointed[0], out)
    return out


def test_resume_with_another_model_stops_before_writing(files, copy, tmp_path):
    before = snapshot(copy)
    changed = ["MODEL.NONLOCAL.TYPE", "global_context", "MODEL.NONLOCAL.PLACEMENT", "paper_10"]
    with pytest.raises(ResumeConfigError) as e:
        setup(files, copy, "SOLVER.MAX_ITER", "20", *changed, flags=("--resume",))
    message = str(e.value)
    assert "  MODEL.NONLOCAL.PLACEMENT: 'paper_1' -> 'paper_10'\n" in message
    assert "  MODEL.NONLOCAL.TYPE: 'nonlocal' -> 'global_context'\n" in message
    assert message.count("\n  ") == 2  # only those keys
    assert f"MODEL.WEIGHTS {copy / 'model_0000009.pth'}" in message
    row = "`--resume` with another `MODEL.NONLOCAL.TYPE` and `PLACEMENT`"
    assert_documented(row, e.value, tmp_path)
    assert snapshot(copy) == before  # config.yaml, log.txt, metrics: not a byte changed


def test_resume_past_a_garbled_tag_compares_the_checkpoint_it_continues(files, copy):
    """A ``last_checkpoint`` the checkpointer resumes past (garbled): the config check reads
    the checkpoint the resume falls back to, not nothing."""
    (copy / "last_checkpoint").write_bytes(b"\xff\xfe garbled")
    before = snapshot(copy)
    with pytest.raises(ResumeConfigError, match=r"cannot continue .*model_0000009\.pth"):
        setup(files, copy, "MODEL.NONLOCAL.TYPE", "global_context", flags=("--resume",))
    assert snapshot(copy) == before


def test_resume_names_the_keys_it_ignores_and_keeps_the_earlier_config(files, copy, checkpointed):
    old_config = (copy / "config.yaml").read_bytes()
    cfg = setup(
        files, copy, "SOLVER.MAX_ITER", "30", "SOLVER.BASE_LR", "0.005",
        "MODEL.WEIGHTS", "elsewhere.pth", "TEST.EVAL_PERIOD", "7", flags=("--resume",),
    )  # fmt: skip
    log = _log(copy)
    assert (
        "--resume ignores these changed keys: MODEL.WEIGHTS: '' (the checkpoint's, in use) -> "
        "'elsewhere.pth' (ignored: the weights come from the checkpoint); SOLVER.BASE_LR: 0.03 "
        "(the checkpoint's, in use) -> 0.005 (ignored: restored from the optimizer and scheduler "
        "state). To train with the new values, start a new run (without --resume) in another "
        f"OUTPUT_DIR with MODEL.WEIGHTS {copy / 'model_0000009.pth'}"
    ) in log
    assert (
        "--resume with changed keys, applied: SOLVER.MAX_ITER: 20 -> 30; TEST.EVAL_PERIOD:" in log
    )
    kept = [f for f in os.listdir(copy) if f.startswith("config.") and f != "config.yaml"]
    assert len(kept) == 1 and (copy / kept[0]).read_bytes() == old_config
    assert b"BASE_LR: 0.005" in (copy / "config.yaml").read_bytes()
    # the warning is true: the learning rate in use after the resume is the checkpoint's
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 10
    assert trainer.scheduler.base_lrs == checkpointed[1] and max(checkpointed[1]) == 0.03


def test_max_iter_below_the_checkpoint_is_an_error(files, copy, tmp_path):
    before = snapshot(copy)
    with pytest.raises(ResumeConfigError) as e:
        setup(files, copy, "SOLVER.MAX_ITER", "5", flags=("--resume",))
    assert_documented("`--resume` with `SOLVER.MAX_ITER` below the checkpoint's", e.value, tmp_path)
    assert snapshot(copy) == before
    # the trainer's own check (after its load, whichever checkpoint it loaded)
    assert check_resume_iteration(11, 10, "c.pth") is None
    assert "trains nothing more" in check_resume_iteration(10, 10, "c.pth")
    with pytest.raises(
        ResumeConfigError, match="train.max_iter=9: the checkpoint .* has trained 10 "
    ):
        check_resume_iteration(9, 10, "c.pth", "train.max_iter")


def test_lazy_config_resume_is_checked_the_same_way(tmp_path):
    """A LazyConfig: the same lock and comparison, in LazyConfig keys (a checkpoint that holds
    only the iteration and the run's config stands in for a trained one)."""
    out = tmp_path / "lazy"
    out.mkdir()
    cfg = LazyConfig.apply_overrides(LazyConfig.load(LAZY_DEMO), [f"train.output_dir={out}"])
    torch.save({"iteration": 9, "run_config": {"yaml": run_config_text(cfg)}}, out / "m.pth")
    (out / "last_checkpoint").write_text("m.pth")
    before = snapshot(out)

    def lazy_setup(*opts):
        argv = ["--config-file", LAZY_DEMO, "--resume", f"train.output_dir={out}", *opts]
        return train_net.setup(train_net.default_argument_parser().parse_args(argv))

    classes = cfg.model.roi_heads.num_classes
    with pytest.raises(ResumeConfigError, match=f"model.roi_heads.num_classes: {classes} -> 9"):
        lazy_setup("model.roi_heads.num_classes=9")
    with pytest.raises(
        ResumeConfigError, match="train.max_iter=5: the checkpoint .* has trained 10 "
    ):
        lazy_setup("train.max_iter=5")
    assert snapshot(out) == before
    lazy_setup("optimizer.lr=0.5")
    assert "--resume ignores these changed keys: optimizer.lr: " in _log(out)
    assert "-> 0.5 (ignored: restored from the optimizer state)" in _log(out)


@pytest.mark.parametrize(
    "opts,message",
    [
        (["SOLVER.IMS_PER_BATCH", "3"], "SOLVER.IMS_PER_BATCH=3 is not supported; allowed: a "
         "multiple of the number of processes, 2 (the images of a step are split evenly among "
         "them)"),
        (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "INPUT.MIN_SIZE_TRAIN", "(800,)"],
         "INPUT.MIN_SIZE_TRAIN=(800,) is not supported; allowed: two ints >= 1, the smallest and "
         "largest short side (MIN_SIZE_TRAIN_SAMPLING 'range')"),
        (["SOLVER.WARMUP_METHOD", "cosine"], "SOLVER.WARMUP_METHOD='cosine' is not supported; "
         "allowed: ['linear', 'constant']"),
    ],
)  # fmt: skip
def test_config_values_with_two_processes(opts, message):
    with pytest.raises(ValueError) as e:
        check_config_values(get_nonlocal_cfg(DEMO, opts), world_size=2)
    assert str(e.value) == message


def test_lazy_config_values():
    cfg = LazyConfig.apply_overrides(LazyConfig.load(LAZY_DEMO), ["train.checkpointer.period=0"])
    with pytest.raises(ValueError, match=r"^train.checkpointer.period=0 is not supported; allowed"):
        check_lazy_config_values(cfg)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(LAZY_DEMO), ["train.checkpointer.period=5"])
    check_lazy_config_values(cfg)
    with pytest.raises(ValueError, match="total_batch_size=.* multiple of the number of processes"):
        check_lazy_config_values(cfg, world_size=cfg.dataloader.train.total_batch_size + 1)
    cfg = LazyConfig.apply_overrides(cfg, ["train.stop_signals=[SIGTERM,SIGKILL]"])
    with pytest.raises(ValueError, match=r"^train.stop_signals=\(.*supported; allowed: signal"):
        check_lazy_config_values(cfg)


def test_commands_refuse_to_write_over_their_input(files, tmp_path):
    from nonlocal_det.tools import convert_mmdet, predict, visualize

    image = tmp_path / "a.png"
    shutil.copy(os.path.join(files["DATASETS.TRAIN_IMAGES"], "000.png"), image)
    (tmp_path / "link.png").symlink_to(image)
    pred = tmp_path / "a_pred.png"
    shutil.copy(image, pred)
    before = snapshot(tmp_path)
    common = ["--config-file", DEMO]
    with pytest.raises(ValueError) as e:
        predict.main([*common, "--input", str(image), "--output", str(image)])
    assert_documented("`tools.predict --input a.png --output a.png`", e.value, tmp_path)
    with pytest.raises(ValueError, match="--output .*link.png is the same file as --input "):
        predict.main([*common, "--input", str(image), "--output", str(tmp_path / "link.png")])
    with pytest.raises(ValueError, match="a_pred.png is the same file as --input .*a_pred.png"):
        predict.main([*common, "--input", str(image), str(pred), "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="--output .*a.png is the same file as --input "):
        visualize.main([*common, "--input", str(image), "--output", str(image)])
    ckpt = tmp_path / "mmdet.pth"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ValueError, match="OUT.pth .*mmdet.pth is the same file as IN.pth "):
        convert_mmdet.main([str(ckpt), str(ckpt)])
    assert snapshot(tmp_path) == {**before, "mmdet.pth": b"not read"}
