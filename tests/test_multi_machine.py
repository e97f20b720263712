"""Several machines: two ``train_net.py`` processes on this host as machines 0 and 1 of one run
(``--num-machines 2 --machine-rank 0|1 --dist-url tcp://127.0.0.1:PORT``, gloo on CPU) train,
stop together on a signal to machine 0 with one checkpoint (machine 0's), resume and evaluate; a
machine that never joins stops the other within ``--dist-timeout`` with a message naming the
address, the machine and the timeout; the Slurm script runs one task per node with its node id
and requeues after a preemption."""

import json
import math
import os
import signal
import socket
import stat
import subprocess
import time

import pytest
import torch
from subproc import DEMO, TINY, command, env_for
from utils import REPO, shared_datasets_dir

from nonlocal_det.engine.launch import (
    DEFAULT_DIST_TIMEOUT,
    check_launch_args,
    default_argument_parser,
)

SLURM_SCRIPT = os.path.join(REPO, "scripts", "slurm_train.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_machines(args, env, tmp_path, machines=2, stop_signal=None, timeout=400):
    """``train_net.py args`` as machines 0..machines-1 of one run on this host, started together;
    returns [(exit status, output)] by machine rank. ``stop_signal``: sent to machine 0's
    ``train_net.py`` (not to its worker, nor to machine 1) 2 s after its training started."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for rank in range(machines):
        log = open(tmp_path / f"machine{rank}_{time.monotonic_ns()}.txt", "w+")
        launch = ["--num-machines", machines, "--machine-rank", rank, "--dist-url", url]
        procs.append(
            subprocess.Popen(
                command([*launch, *args]),  # flags before the config's KEY VALUE pairs
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its worker process with it, to end both on a timeout
            )
        )
        logs.append(log)
    out = []
    try:
        deadline = time.monotonic() + timeout
        while stop_signal and time.monotonic() < deadline and procs[0].poll() is None:
            if "Starting training from iteration" in open(logs[0].name).read():
                time.sleep(2)
                procs[0].send_signal(stop_signal)
                break
            time.sleep(0.2)
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for proc, log in zip(procs, logs):
        log.seek(0)
        out.append((proc.returncode, log.read()))
        log.close()
    return out


@pytest.mark.slow
def test_two_machines_train_checkpoint_resume_and_evaluate(tmp_path, tmp_path_factory):
    """Machine 0 gets SIGUSR1 (as Slurm sends before a time limit): both machines stop after the
    same iteration, machine 0 alone saves, both exit with the preemption status; ``--resume`` on
    both continues from there, checkpoints and evaluates, both exit 0."""
    from nonlocal_det.engine.preemption import PREEMPTED_EXIT_CODE

    out = tmp_path / "out"
    env = env_for(shared_datasets_dir(tmp_path_factory))
    args = ["--config-file", DEMO, *TINY, "SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", out]

    # 1. train until machine 0 is told to stop (no evaluation): one checkpoint, by machine 0
    train = [*args, "SOLVER.MAX_ITER", "1000", "DATASETS.TEST", "()"]
    (rc0, log0), (rc1, log1) = run_machines(train, env, tmp_path, stop_signal=signal.SIGUSR1)
    assert rc0 == rc1 == PREEMPTED_EXIT_CODE, (rc0, rc1, log0[-3000:], log1[-3000:])
    rank1 = (out / "log.txt.rank1").read_text()
    assert "Rank of current process: 0. World size: 2" in log0
    assert "Rank of current process: 1. World size: 2" in rank1
    for text in (log0, rank1):
        assert "Starting training from iteration 0" in text
    files = sorted(os.listdir(out))
    (saved,) = [f for f in files if f.endswith(".pth")]
    assert (out / "last_checkpoint").read_text().strip() == saved
    stop = torch.load(out / saved, weights_only=False)["iteration"]
    assert f"Stopped on SIGUSR1 after iteration {stop}" in log0
    assert f"after iteration {stop}" in rank1  # the same iteration on machine 1
    assert [f for f in files if f.startswith("metrics")] == ["metrics.json"]
    assert "Saving checkpoint to" in log0
    assert "Saving checkpoint to" not in log1 + rank1

    # 2. resume on both machines: from the next iteration, one more, a checkpoint, then the
    # evaluation, which machine 0 reports and writes
    resume = ["--resume", *args, "SOLVER.MAX_ITER", stop + 2]
    (rc0, log0), (rc1, log1) = run_machines(resume, env, tmp_path)
    assert rc0 == 0 and rc1 == 0, (log0[-3000:], log1[-3000:])
    rank1 = (out / "log.txt.rank1").read_text()
    assert f"Starting training from iteration {stop + 1}" in log0
    assert rank1.count(f"Starting training from iteration {stop + 1}") == 1
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == stop + 1
    assert {f for f in os.listdir(out) if f.endswith(".pth")} == {saved, "model_final.pth"}
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log0
        assert f"Evaluation results for {task}" not in log1 + rank1
    assert (out / "inference" / "nl_synthetic_val" / "coco_instances_results.json").is_file()
    records = [json.loads(line) for line in open(out / "metrics.json")]
    losses = {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}
    assert {stop, stop + 1} <= set(losses) and all(math.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_machine_that_never_joins_is_named_within_the_timeout(tmp_path):
    """Machine 0 of 2 started alone: it stops within --dist-timeout (plus start-up), naming the
    address, its rank, the machine count and the timeout; nothing is written."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    args = ["--config-file", DEMO, "--num-machines", "2", "--machine-rank", "0"]
    args += ["--dist-url", url, "--dist-timeout", "3", "OUTPUT_DIR", out]
    start = time.monotonic()
    proc = subprocess.run(
        command(args), cwd=REPO, env=env_for(tmp_path), capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    message = log.strip().splitlines()[-1]
    assert message.startswith("nonlocal_det.engine.launch.DistributedLaunchError: "), message
    for needle in (
        f"did not all join at --dist-url {url} within --dist-timeout 3 s",
        "This is machine --machine-rank 0 of --num-machines 2",
        "1/2 clients joined",  # torch's own words
        "its own --machine-rank (0..1, each once)",
    ):
        assert needle in message, (needle, message)
    assert elapsed < 120, elapsed  # 3 s, plus starting two Python processes on a loaded machine
    assert not out.exists()


def _args(*argv):
    return default_argument_parser().parse_args(["--config-file", "c.yaml", *argv])


def test_launch_arguments_are_checked():
    assert _args().dist_timeout == DEFAULT_DIST_TIMEOUT == 1800  # Detectron2's 30 minutes
    assert _args("--dist-timeout", "2.5").dist_timeout == 2.5
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit):
            _args("--dist-timeout", bad)
    cases = [
        (("--num-machines", "2", "--machine-rank", "2"), "--machine-rank 2 with --num-machines 2"),
        (("--machine-rank", "-1"), "allowed: 0..0"),
        (("--num-gpus", "0"), "--num-gpus 0: allowed: 1 or more"),
        (("--num-machines", "2", "--dist-url", "auto"), "--dist-url auto with --num-machines 2"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            check_launch_args(_args(*argv))
    two = ("--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://10.0.0.1:29500")
    check_launch_args(_args(*two))
    # the trainer's command line (YAML or LazyConfig) parses and checks them before any start
    from nonlocal_det.engine.train import cli

    with pytest.raises(SystemExit):  # argparse: --dist-timeout 0 is refused
        cli(["--config-file", "x.yaml", "--dist-timeout", "0"])
    with pytest.raises(ValueError, match="--machine-rank 3 with --num-machines 2"):
        cli(["--config-file", "x.py", "--num-machines", "2", "--machine-rank", "3"])


def _fake_slurm(tmp_path, status: int) -> dict:
    """``srun`` / ``scontrol`` stand-ins that run each node's task here (nodes node-a, node-b) and
    record the requeue; the task's program records its arguments and exits with ``status``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do echo "$1" >> "$RECORD/srun_options"; shift; done
worst=0
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    SLURM_NODEID=$node "$@"; s=$?; [ $s -gt $worst ] && worst=$s
done
exit $worst
""",
        "scontrol": """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$@" >> "$RECORD/scontrol"
""",
        "fake_python": """#!/bin/bash
printf '%s\\n' "$@" > "$RECORD/task$SLURM_NODEID"
exit $FAKE_STATUS
""",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record"
    record.mkdir()
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RECORD=str(record),
        FAKE_STATUS=str(status),
        PYTHON=str(bin_dir / "fake_python"),
        GPUS_PER_NODE="4",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2",
    )


def test_slurm_script_is_valid_bash_with_the_directives_it_needs():
    subprocess.run(["bash", "-n", SLURM_SCRIPT], check=True)
    directives = [line.split()[1] for line in open(SLURM_SCRIPT) if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in directives and "--requeue" in directives
    assert any(d.startswith("--signal=USR1@") for d in directives)


@pytest.mark.parametrize("status", [0, 75, 1])
def test_slurm_script_runs_one_task_per_node_and_requeues_after_a_preemption(tmp_path, status):
    """Each node's train_net.py gets the launch flags of its node; exit 75 (the preemption exit
    code) requeues the job, any other status does not; the script exits with the status."""
    from nonlocal_det.engine.preemption import PREEMPTED_EXIT_CODE

    env = _fake_slurm(tmp_path, status)
    user = ["--config-file", "configs/mask_rcnn_R50_NL.yaml", "MODEL.NONLOCAL.RES3_BLOCKS"]
    user += ["[-2, 1]"]  # one argument with a space
    proc = subprocess.run(
        ["bash", SLURM_SCRIPT, *user], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    record = tmp_path / "record"
    parser = default_argument_parser()  # train_net.py's
    for node in (0, 1):
        words = (record / f"task{node}").read_text().splitlines()
        assert words[0] == "train_net.py"
        args = parser.parse_args(words[1:])
        assert (args.num_gpus, args.num_machines, args.machine_rank) == (4, 2, node)
        assert args.dist_url == "tcp://node-a:29500" and args.resume
        assert args.config_file == user[1] and args.opts == user[2:]
    requeued = (record / "scontrol").read_text() if (record / "scontrol").exists() else ""
    assert requeued == ("requeue 4242\n" if status == PREEMPTED_EXIT_CODE else "")


def test_the_message_quotes_torch_s_error_line_not_its_cpp_frames():
    """torch's c10d errors carry C++ stack frames after the error line (a port that something
    else answers on): the message quotes the error line."""
    from nonlocal_det.engine.launch import _rendezvous_message

    child = """Traceback (most recent call last):
  File "detectron2/engine/launch.py", line 123, in _distributed_worker
    dist.init_process_group(
torch.distributed.DistNetworkError: Ping failed, invalid value returned from server.
Exception raised from ping at torch/csrc/distributed/c10d/TCPStore.cpp:427 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x98 (0x7f3c in libc10.so)
frame #36: _start + 0x21 (0x563d in python)
"""
    args = _args("--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://h:29500")
    message = _rendezvous_message(args, child)
    said = "torch said: torch.distributed.DistNetworkError: Ping failed, invalid value returned "
    assert said + "from server. Check:" in message
    assert "frame #" not in message and "--dist-timeout 1800 s" in message
