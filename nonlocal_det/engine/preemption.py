"""Stopping a training run cleanly on a stop signal or Ctrl-C (a checkpoint of the current
iteration, then exit status 75) and on a non-finite loss (no save, no evaluation); the parent
process of several workers passes the signals on (docs/reliability.md)."""

import contextlib
import logging
import os
import re
import signal
import sys
import time
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from ..config import ALLOWED_STOP_SIGNALS, DEFAULT_STOP_SIGNALS, parse_stop_signals
from .checkpoint import last_checkpoint_file, resume_candidates, skip_final_evaluation

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "NonFiniteLossError",
    "SafeStop",
    "TrainingPreempted",
    "forward_stop_signals",
]

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by a signal after saving its checkpoint: requeue it with --resume.
PREEMPTED_EXIT_CODE = 75

_GO, _STOP, _DIVERGED = 0, 1, 2  # what the processes tell each other after each iteration


class TrainingPreempted(SystemExit):
    """A ``SystemExit`` with status :data:`PREEMPTED_EXIT_CODE`: the run stopped on
    ``signal_name`` after saving the checkpoint of ``iteration`` (``checkpoint``, "" off the
    main process)."""

    def __init__(self, iteration: int, checkpoint: str, signal_name: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.iteration, self.checkpoint, self.signal_name = iteration, checkpoint, signal_name


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite: the message names the iteration, each loss's value and the
    last good checkpoint."""


def _non_finite_tensors(path: str) -> Optional[List[str]]:
    """The names of the checkpoint's non-finite model tensors; None if it cannot be read."""
    try:
        model = torch.load(path, map_location="cpu", weights_only=False).get("model", {})
    except Exception:
        return None
    return [k for k, v in model.items() if torch.is_tensor(v) and v.is_floating_point()
            and not torch.isfinite(v).all()]  # fmt: skip


def _last_good_checkpoint(checkpointer, tries: int = 5) -> str:
    """Which checkpoint to resume from after a divergence: the one ``last_checkpoint`` names if its
    weights are finite, else the newest such ``model_*.pth`` (one saved right before the loss
    turned NaN often holds NaN weights already)."""
    folder = getattr(checkpointer, "save_dir", "") or ""
    last = last_checkpoint_file(checkpointer)
    if not last:
        return f"No checkpoint was written in {folder or 'the output folder'}."
    said = f"last_checkpoint names {last} (nothing was saved after it)"
    files = resume_candidates(folder)[0]
    files = [last] + [f for f in files if os.path.basename(f) != os.path.basename(last)]
    for n, path in enumerate(files[:tries]):
        bad = _non_finite_tensors(path)
        if bad == [] and n == 0:
            return f"{said}: its weights are finite; --resume restarts from it."
        if bad == []:
            return (
                f"{said}, but its weights hold NaN / inf. The newest checkpoint with finite "
                f"weights is {path}: write {os.path.basename(path)} into "
                f"{os.path.join(folder, 'last_checkpoint')} and --resume restarts from it."
            )
        if n == 0:
            said += f", but {'it cannot be read' if bad is None else 'its weights hold NaN / inf'}"
            said += f" ({len(bad)} tensors, e.g. {bad[0]})" if bad else ""
    return (
        f"{said}; none of the {len(files[:tries])} newest checkpoints has finite weights: train "
        "again from the start (without --resume, in another OUTPUT_DIR)."
    )


def _restore(handlers) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _losses(error: FloatingPointError) -> str:
    """Each loss of Detectron2's message (``loss_dict = {'loss_cls': np.float64(0.69), ...}``) as
    ``loss_cls=0.69, ...``; the message itself if it has another form."""
    text = str(error)
    found = re.findall(r"'(\w+)': (?:np\.float\d+\()?([-+\w.]+)\)?", text.partition("loss_dict")[2])
    if not found:
        return text
    mean = " (each the mean over the processes)" if comm.get_world_size() > 1 else ""
    return ", ".join(f"{k}={v}" for k, v in found) + mean


class SafeStop(HookBase):
    """Stops training after the current iteration on a signal (a checkpoint of it, then
    :class:`TrainingPreempted`), and at once on a non-finite loss (:class:`NonFiniteLossError`).
    Register it on every process, after the ``PeriodicCheckpointer`` and before the ``EvalHook``;
    with several processes the stop flag is all-reduced after each iteration (a gloo group).

    Args:
        checkpointer: the trainer's checkpointer (it saves on the main process only).
        stop_signals: signal names besides SIGINT (:func:`parse_stop_signals`).
        key: the config key of ``stop_signals``, for error messages.
    """

    def __init__(self, checkpointer, stop_signals=DEFAULT_STOP_SIGNALS, key="SOLVER.STOP_SIGNALS"):
        self.checkpointer = checkpointer
        signals = parse_stop_signals(stop_signals, key) + (signal.SIGINT,)
        self.signals = tuple(dict.fromkeys(signals))
        self.requested: Optional[int] = None  # the first signal received
        self._requested_at, self._saving, self._stopping = 0.0, False, False
        self._previous, self._pid, self._group = {}, os.getpid(), None

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: its parent process stops it
            return
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._requested_at = signum, time.monotonic()
            # A signal to the whole process group (a scheduler's, Ctrl-C) also reaches the data
            # loader's workers, and torch's workers die on SIGTERM from any process but their
            # parent: torch's SIGCHLD handler would then raise in the middle of the save.
            if signal.SIGCHLD not in self._previous:
                self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            logger.warning(
                f"{name} received during iteration {self.trainer.iter}: the current iteration "
                f"finishes, then a checkpoint is saved and the process exits with status "
                f"{PREEMPTED_EXIT_CODE} (--resume continues)"
            )
        elif signum == self.requested and time.monotonic() - self._requested_at < 2.0:
            pass  # the same signal passed on by the parent process too (Ctrl-C reaches both)
        else:
            doing = "saving the checkpoint" if self._saving else "stopping after this iteration"
            logger.warning(f"{name} received again: ignored, {doing} (pid {os.getpid()})")

    def install(self) -> None:
        """Install the signal handlers (main thread only; elsewhere nothing is done)."""
        self._pid = os.getpid()
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: leave the process's handlers alone
                logger.warning(f"not the main thread: {s.name} will not stop training cleanly")
                return

    def uninstall(self) -> None:
        """Put back the signal handlers found by :meth:`install`."""
        _restore(self._previous)
        self._previous = {}

    def before_train(self):
        self.requested, self._saving, self._stopping = None, False, False
        if comm.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        trainer = self.trainer
        run_step = trainer.run_step

        def guarded_run_step():
            try:
                run_step()
            except FloatingPointError as e:
                if isinstance(e, NonFiniteLossError):
                    raise
                self._diverged(e)

        trainer.run_step = guarded_run_step
        self.install()

    def after_step(self):
        flag = self._reduce(_STOP if self.requested is not None else _GO)
        if flag == _DIVERGED:
            self._stop_other_hooks()
            raise NonFiniteLossError(
                f"Loss became infinite or NaN at iteration={self.trainer.iter} (the main process "
                "logs each loss and the last good checkpoint); nothing was saved"
            )
        if flag == _STOP:
            self._preempt()

    def after_train(self):
        with contextlib.suppress(AttributeError):
            del self.trainer.run_step  # the class's run_step again
        # After a stop with several processes the handlers stay: the parent process terminates
        # the others once one has exited, and the main one may still be writing its logs.
        if not self._stopping or comm.get_world_size() == 1:
            self.uninstall()

    def _reduce(self, flag: int) -> int:
        if self._group is None:
            return flag
        t = torch.tensor([flag], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.item())

    def _stop_other_hooks(self) -> None:
        """Drop the hooks whose ``after_train`` saves ``model_final`` or evaluates."""
        self._stopping = True
        skip_final_evaluation(self.trainer)

    def _preempt(self) -> None:
        it = self.trainer.iter
        name = signal.Signals(self.requested).name if self.requested else "another process's signal"
        self._saving = True
        path = ""
        try:
            if comm.is_main_process():
                final = it >= self.trainer.max_iter - 1
                want = "model_final.pth" if final else f"model_{it:07d}.pth"
                path = last_checkpoint_file(self.checkpointer)
                if os.path.basename(path) != want:  # the PeriodicCheckpointer has not saved it
                    self.checkpointer.save(want[: -len(".pth")], iteration=it)
                    path = last_checkpoint_file(self.checkpointer)
            if self._group is not None:
                dist.barrier(group=self._group)  # no process exits before the checkpoint exists
        finally:
            self._saving = False
        self._stop_other_hooks()
        if comm.is_main_process():
            logger.warning(
                f"Stopped on {name} after iteration {it}: saved {path}. Exit status "
                f"{PREEMPTED_EXIT_CODE}; run again with --resume to continue from iteration "
                f"{it + 1}."
            )
        else:
            logger.info(
                f"Stopped on {name} after iteration {it} (process {comm.get_rank()}; the main "
                "process saves the checkpoint)"
            )
        raise TrainingPreempted(it, path, name)

    def _diverged(self, error: FloatingPointError) -> None:
        it = self.trainer.iter
        loss = str(error).startswith("Loss became infinite or NaN")  # SimpleTrainer's check
        what = f"Loss became infinite or NaN at iteration {it}: {_losses(error)}" if loss else (
            f"Training diverged at iteration {it}: {str(error).rstrip('.')}"
        )  # fmt: skip
        message = (
            f"{what}. Training stopped; the diverged model was not saved and not evaluated.\n"
            f"{_last_good_checkpoint(self.checkpointer)}\nTo avoid the divergence, lower "
            "SOLVER.BASE_LR (optimizer.lr in a LazyConfig) or enable SOLVER.CLIP_GRADIENTS."
        )
        logger.error(message)
        if loss:  # found by the main process only, while the others go on to after_step
            self._reduce(_DIVERGED)
        self._stop_other_hooks()
        raise NonFiniteLossError(message) from error


@contextlib.contextmanager
def forward_stop_signals(world_size: int) -> Iterator[None]:
    """Around Detectron2's ``launch`` with ``world_size`` > 1: this parent process passes each
    signal of :data:`ALLOWED_STOP_SIGNALS` on to its workers rather than dying first, and exits
    with :data:`PREEMPTED_EXIT_CODE` when one was ended by such a signal before training."""
    if world_size <= 1:
        yield
        return
    import multiprocessing

    from torch.multiprocessing import ProcessExitedException

    received = []

    def forward(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    signals = parse_stop_signals(ALLOWED_STOP_SIGNALS, "ALLOWED_STOP_SIGNALS")
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code < 0 and -e.exit_code in received:
            print(
                f"Worker process ended by {signal.Signals(-e.exit_code).name} before training "
                f"could stop cleanly: exit status {PREEMPTED_EXIT_CODE}",
                file=sys.stderr,
            )
            sys.exit(PREEMPTED_EXIT_CODE)
        raise
    finally:
        _restore(previous)
