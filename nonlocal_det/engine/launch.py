"""Detectron2's ``default_argument_parser`` and ``launch`` with ``--dist-timeout``, checked
arguments, and an error naming the address, the machine and the timeout when the processes
cannot form their group."""

import argparse
import math
import re
import sys
from datetime import timedelta

from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from .preemption import forward_stop_signals

__all__ = [
    "DEFAULT_DIST_TIMEOUT",
    "DistributedLaunchError",
    "check_launch_args",
    "default_argument_parser",
    "launch",
]

# Seconds: Detectron2's default timeout of the process group (30 minutes).
DEFAULT_DIST_TIMEOUT = int(DEFAULT_TIMEOUT.total_seconds())


class DistributedLaunchError(RuntimeError):
    """The processes of a run could not form their process group (e.g. a machine never joined)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a number of seconds > 0")
    return value


def default_argument_parser(epilog=None) -> argparse.ArgumentParser:
    """Detectron2's standard arguments and ``--dist-timeout SECONDS``, the process group's
    timeout (for every machine to join, and for each collective operation)."""
    parser = d2_argument_parser(epilog=epilog)
    parser.add_argument(
        "--dist-timeout", type=_seconds, default=DEFAULT_DIST_TIMEOUT, metavar="SECONDS",
        help="with several processes: how long to wait for all machines to join at --dist-url, "
        "and for each collective operation (default: %(default)s, Detectron2's)",
    )  # fmt: skip
    return parser


def check_launch_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag, its value and what is allowed, before any process starts."""
    if args.num_gpus < 1:
        raise ValueError(f"--num-gpus {args.num_gpus}: allowed: 1 or more processes per machine")
    if args.num_machines < 1:
        raise ValueError(f"--num-machines {args.num_machines}: allowed: 1 or more")
    if not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(
            f"--machine-rank {args.machine_rank} with --num-machines {args.num_machines}; "
            f"allowed: 0..{args.num_machines - 1} (0 on the machine of --dist-url)"
        )
    if args.num_machines > 1 and not str(args.dist_url).startswith(("tcp://", "file://")):
        raise ValueError(
            f"--dist-url {args.dist_url} with --num-machines {args.num_machines}; allowed: "
            "tcp://ADDRESS:PORT of machine 0 (--machine-rank 0), reachable from every machine"
        )


def _error_line(traceback_text: str) -> str:
    """The ``SomeError: message`` line of a formatted traceback (torch's C++ errors add their
    stack frames after it)."""
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return (found or lines or ["no error text"])[-1]


def _rendezvous_message(args: argparse.Namespace, child_error: str) -> str:
    said = _error_line(child_error).rstrip(".")
    n, k, rank = args.num_machines, args.num_gpus, args.machine_rank
    world = n * k
    ranks = f"{rank * k}" if k == 1 else f"{rank * k}..{rank * k + k - 1}"
    where = f"--dist-url {args.dist_url}"
    return (
        f"The {world} processes of this run did not all join at {where} within --dist-timeout "
        f"{args.dist_timeout:g} s. This is machine --machine-rank {rank} of --num-machines {n} "
        f"(--num-gpus {k}: global rank {ranks} of {world}); torch said: {said}. Check: every "
        f"machine runs the same command with --num-machines {n}, the same --num-gpus and "
        f"{where}, and its own --machine-rank (0..{n - 1}, each once); machine 0 is the host of "
        f"{where}, its address and port are reachable from the others (firewall, network "
        "interface) and the port is free; jobs that start minutes apart need a larger "
        "--dist-timeout."
    )


def launch(main_func, args: argparse.Namespace) -> None:
    """Detectron2's ``launch`` of ``main_func(args)`` with ``--dist-timeout``. With several
    processes this one passes stop signals on to the workers (:func:`forward_stop_signals`) and
    exits with a worker's exit status (75 after a preemption).

    Raises:
        ValueError: a launch argument out of range (:func:`check_launch_args`).
        DistributedLaunchError: the group was not formed in time, naming the address, this
            machine's rank, the machine count, the timeout and what to check.
    """
    check_launch_args(args)
    world_size = args.num_gpus * args.num_machines  # > 1: Detectron2 starts worker processes
    try:
        with forward_stop_signals(world_size):
            d2_launch(main_func, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
                      timeout=timedelta(seconds=args.dist_timeout))  # fmt: skip
    except ProcessRaisedException as e:
        if "init_process_group" not in e.msg:  # an error of the run itself: as it is
            raise
        raise DistributedLaunchError(_rendezvous_message(args, e.msg)) from None
    except ProcessExitedException as e:
        if e.exit_code is None or e.exit_code <= 0:  # killed by a signal
            raise
        sys.exit(e.exit_code)
