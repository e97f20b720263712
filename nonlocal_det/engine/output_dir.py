"""The output folder of a run (``OUTPUT_DIR``, ``train.output_dir``): one run at a time (a lock),
and a ``--resume`` checked against the config the checkpoint was trained with, before anything is
written (docs/reliability.md)."""

import atexit
import contextlib
import datetime
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import yaml
from detectron2.config import CfgNode, LazyConfig
from detectron2.engine import default_setup
from detectron2.utils import comm

from .checkpoint import resume_candidates

__all__ = [
    "LOCK_NAME",
    "OutputDirInUseError",
    "OutputDirLock",
    "ResumeConfigError",
    "RunConfig",
    "check_resume_iteration",
    "lock_output_dir",
    "run_config_text",
    "setup_output_dir",
]

logger = logging.getLogger("detectron2")

LOCK_NAME = ".lock"
# Keys a resume does not apply (a trailing "." names a prefix), and why: the optimizer's and the
# scheduler's hyper-parameters come back with their state, the weights with the checkpoint.
IGNORED_ON_RESUME = {
    "MODEL.WEIGHTS": "the weights come from the checkpoint",
    "train.init_checkpoint": "the weights come from the checkpoint",
    "SOLVER.BASE_LR": "restored from the optimizer and scheduler state",
    **{f"SOLVER.{k}": "restored from the optimizer state" for k in ("MOMENTUM", "NESTEROV",
       "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WEIGHT_DECAY_BIAS", "BIAS_LR_FACTOR")},
    "optimizer.": "restored from the optimizer state",
}  # fmt: skip


class OutputDirInUseError(RuntimeError):
    """Another running process holds the output folder's lock."""


class ResumeConfigError(ValueError):
    """``--resume`` with a config the checkpoint cannot continue (another model, a ``MAX_ITER``
    below its iteration)."""


def _describe(owner: Dict[str, Any]) -> str:
    return (
        f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
        f"{owner.get('started', '?')}, command: {owner.get('command', '?')}"
    )


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


class OutputDirLock:
    """The lock of one output folder held by this process: ``path``, the lock file; ``notes``,
    ``(logging level, message)`` pairs to log once logging is set up."""

    def __init__(self, path: str, fd: int, notes: List[Tuple[int, str]], flocked: bool):
        self.path, self._fd, self.notes, self.pid = path, fd, notes, os.getpid()
        self._flocked = flocked

    def release(self) -> None:
        """Empty the lock file (an empty one is not stale) and unlock it. Idempotent."""
        if self._fd is None or os.getpid() != self.pid:  # never from a forked child
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        if self._flocked:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(os.path.realpath(os.path.dirname(self.path)), None)


_HELD: Dict[str, OutputDirLock] = {}


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


def _read_owner(fd: int) -> Dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not raw:
        return {}
    try:
        owner = json.loads(raw)
        return owner if isinstance(owner, dict) else {"command": raw}
    except ValueError:
        return {"command": raw}


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Create ``output_dir`` and lock it for this process's life (``fcntl.flock`` of
    ``output_dir/.lock``, which names this process); re-entrant, released at exit. Raises
    :class:`OutputDirInUseError` naming the process that holds it."""
    real = os.path.realpath(output_dir)
    held = _HELD.get(real)
    if held is not None and held.pid == os.getpid():
        return held
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    notes: List[Tuple[int, str]] = []
    flocked, held_by = True, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held_by = f"it holds {path}"
    except OSError as e:  # a filesystem without locks: the lock file's pid is all there is
        flocked, owner = False, _read_owner(fd)
        if owner.get("host") == socket.gethostname() and _pid_alive(owner.get("pid")):
            held_by = f"{path} names it; this filesystem has no file locks"
        msg = f"Cannot lock {path} ({e}): another run started into {output_dir} on another "
        notes.append((logging.WARNING, msg + "machine would not be stopped"))
    if held_by:
        owner = _read_owner(fd)
        os.close(fd)
        raise OutputDirInUseError(
            f"OUTPUT_DIR={output_dir} is in use by another run: {_describe(owner)} ({held_by}). "
            "Two runs in one folder overwrite each other's checkpoints, config.yaml, metrics.json "
            "and inference/ results: wait for that run to end, or give this one another OUTPUT_DIR."
        ) from None
    owner = _read_owner(fd)
    if owner and owner.get("pid") != os.getpid():
        here = owner.get("host") == socket.gethostname()
        why = "which is no longer running" if here else "which no longer holds it"
        notes.append((logging.WARNING, f"Took over the lock {path}, left by {_describe(owner)}, "
                      f"{why} (killed or crashed: its last checkpoint is the one --resume continues "
                      "from)"))  # fmt: skip
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)
    _HELD[real] = OutputDirLock(path, fd, notes, flocked)
    return _HELD[real]


def run_config_text(cfg) -> Optional[str]:
    """The YAML text Detectron2's ``default_setup`` writes as ``config.yaml`` for ``cfg`` (a
    ``CfgNode`` or a LazyConfig); None when a LazyConfig cannot be written as YAML."""
    if isinstance(cfg, CfgNode):
        return cfg.dump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        try:
            LazyConfig.save(cfg, path)
            with open(path) as f:
                return f.read()
        except Exception:  # LazyConfig.save logs and pickles what YAML cannot hold
            return None


class RunConfig:
    """The run's config as a checkpointable (``checkpointer.checkpointables["run_config"]``):
    each checkpoint then stores the config that trained it (``{"yaml": text}``), which a
    ``--resume`` compares with its own (:func:`setup_output_dir`). Loading it changes nothing."""

    def __init__(self, cfg):
        self.text = run_config_text(cfg)

    def state_dict(self) -> Dict[str, Any]:
        return {"yaml": self.text}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree} if prefix else {}
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Loader(yaml.SafeLoader):
    """YAML's safe loader; a tagged object (``!!python/object:...ShapeSpec {...}`` in a LazyConfig)
    becomes its tag and fields, nothing is imported or called."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {"!": node.tag, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return [node.tag, *loader.construct_sequence(node, deep=True)]
    return f"{node.tag} {loader.construct_scalar(node)}"


_Loader.add_multi_constructor("", _tagged)


def _parse(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if not text:
        return None
    try:
        tree = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    return _flat(tree) if isinstance(tree, dict) else None


def _resumed_checkpoint(output_dir: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The checkpoint ``--resume`` continues (the checkpointer's choice: the first readable one of
    :func:`resume_candidates`) and its dict (tensors memory-mapped); (None, None) without one."""
    for path in resume_candidates(output_dir)[0]:
        with contextlib.suppress(Exception):  # the checkpointer's own load says why
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if isinstance(ckpt, dict):
                return path, ckpt
    return None, None


def _kind(key: str) -> str:
    """What a resume does with a changed key: "model" (the checkpoint cannot continue),
    "ignored" (restored from the checkpoint) or "applies"."""
    if _why_ignored(key):
        return "ignored"
    last = key.rsplit(".", 1)[-1]
    if key.startswith("MODEL."):
        return "applies" if last.endswith("_TEST") or key == "MODEL.DEVICE" else "model"
    if key.startswith("model."):
        return "applies" if last.startswith("test_") or last == "device" else "model"
    return "applies"


def _why_ignored(key: str) -> str:
    for k, why in IGNORED_ON_RESUME.items():
        if key == k or (k.endswith(".") and key.startswith(k)):
            return why
    return ""


def check_resume_iteration(
    max_iter: int, start_iter: int, checkpoint: str, key: str = "SOLVER.MAX_ITER"
) -> Optional[str]:
    """:class:`ResumeConfigError` when a run resumed at ``start_iter`` would train nothing
    (``max_iter`` below it: Detectron2 is silent); a warning when ``max_iter == start_iter``."""
    if max_iter < start_iter:
        raise ResumeConfigError(
            f"{key}={max_iter}: the checkpoint --resume continues, {checkpoint}, has trained "
            f"{start_iter} iterations (iteration {start_iter - 1}), so this run would train "
            f"none; allowed: {key} >= {start_iter} (above it to train "
            f"on), or --eval-only with MODEL.WEIGHTS {checkpoint} to evaluate it"
        )
    if max_iter == start_iter:
        return (
            f"{key}={max_iter}: the checkpoint {checkpoint} has trained all {max_iter} "
            "iterations; --resume trains nothing more and runs the final evaluation again"
        )
    return None


def _check_resume(
    cfg, output_dir: str, checkpoint: str, ckpt: Dict[str, Any], eval_only: bool
) -> List[Tuple[int, str]]:
    """Compare ``cfg`` with the config ``checkpoint`` (its dict: ``ckpt``) was trained with;
    returns the notes to log. Raises ResumeConfigError for a changed model key."""
    notes: List[Tuple[int, str]] = []
    stored = ckpt.get("run_config")
    old_text, source = (stored.get("yaml") if isinstance(stored, dict) else None), "checkpoint"
    if not old_text:
        source = os.path.join(output_dir, "config.yaml")
        try:
            with open(source) as f:
                old_text = f.read()
        except (OSError, UnicodeDecodeError):
            old_text = None
    old, new = _parse(old_text), _parse(run_config_text(cfg))
    if old is None or new is None:
        notes.append((logging.WARNING, f"--resume of {checkpoint}: the config it was trained with "
                      "is not known (no run config in it, no readable config.yaml); not compared"))  # fmt: skip
    else:
        where = "stored in it" if source == "checkpoint" else f"as recorded in {source}"
        changes: Dict[str, List[Tuple[str, Any, Any]]] = {"model": [], "ignored": [], "applies": []}
        for k in sorted(set(old) & set(new) - {"OUTPUT_DIR", "train.output_dir"}):
            if old[k] != new[k]:
                changes[_kind(k)].append((k, old[k], new[k]))
        if changes["model"]:
            keys = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, o, n in changes["model"])
            raise ResumeConfigError(
                f"--resume cannot continue {checkpoint}: it was trained with another model. "
                f"Keys that differ (the checkpoint's value {where} -> this run's):\n{keys}\n"
                "A checkpoint resumes only the model it was trained with: set these keys back "
                "to continue it, or start a new run (without --resume) in another OUTPUT_DIR "
                f"with MODEL.WEIGHTS {checkpoint} to train from its weights."
            )
        if changes["ignored"] and not eval_only:
            keys = "; ".join(
                f"{k}: {o!r} (the checkpoint's, in use) -> {n!r} (ignored: {_why_ignored(k)})"
                for k, o, n in changes["ignored"]
            )
            notes.append((logging.WARNING, f"--resume ignores these changed keys: {keys}. To train "
                          "with the new values, start a new run (without --resume) in another "
                          f"OUTPUT_DIR with MODEL.WEIGHTS {checkpoint}"))  # fmt: skip
        if changes["applies"] and not eval_only:
            keys = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes["applies"])
            notes.append((logging.INFO, f"--resume with changed keys, applied: {keys}"))
    return notes


def _keep_previous_config(output_dir: str, text: Optional[str]) -> List[Tuple[int, str]]:
    """Copy a ``config.yaml`` that differs from this run's to ``config.<its mtime>.yaml``."""
    path = os.path.join(output_dir, "config.yaml")
    try:
        with open(path) as f:
            if f.read() == text:
                return []
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError):
        pass
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y%m%d-%H%M%S")
    kept, n = os.path.join(output_dir, f"config.{stamp}.yaml"), 1
    while os.path.exists(kept):
        kept, n = os.path.join(output_dir, f"config.{stamp}-{n}.yaml"), n + 1
    shutil.copy2(path, kept)
    return [(logging.INFO, f"Kept the previous run's config.yaml as {kept} (this run's differs)")]


class RunKeys(NamedTuple):
    """What a run reads from a ``CfgNode`` or a LazyConfig, and the keys that say it."""

    device: str
    weights_key: str  # MODEL.WEIGHTS / train.init_checkpoint
    weights: str
    output_dir: str
    max_iter_key: str  # SOLVER.MAX_ITER / train.max_iter
    max_iter: Optional[int]


def run_keys(cfg) -> RunKeys:
    """The device, weights, output folder and length of a YAML config or a LazyConfig."""
    if isinstance(cfg, CfgNode):
        return RunKeys(cfg.MODEL.DEVICE, "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR,
                       "SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER)  # fmt: skip
    t = cfg.get("train") or {}
    return RunKeys(t.get("device", "cuda"), "train.init_checkpoint", t.get("init_checkpoint", ""),
                   t.get("output_dir", ""), "train.max_iter", t.get("max_iter"))  # fmt: skip


def _claim(cfg, args) -> List[Tuple[int, str]]:
    _, _, _, output_dir, key, max_iter = run_keys(cfg)
    if not output_dir or "://" in output_dir:  # none, or a remote one: Detectron2's as it is
        return []
    lock = lock_output_dir(output_dir)
    notes = list(lock.notes)
    try:
        resume, eval_only = getattr(args, "resume", False), getattr(args, "eval_only", False)
        checkpoint, ckpt = _resumed_checkpoint(output_dir)
        if checkpoint and resume:
            notes += _check_resume(cfg, output_dir, checkpoint, ckpt, eval_only)
            iteration = ckpt.get("iteration", ckpt.get("trainer", {}))
            if isinstance(iteration, dict):  # saved without it: the trainer's own
                iteration = iteration.get("iteration")
            if not eval_only and isinstance(iteration, int) and isinstance(max_iter, int):
                note = check_resume_iteration(max_iter, iteration + 1, checkpoint, key)
                notes += [(logging.WARNING, note)] if note else []
        elif checkpoint and not eval_only:
            notes.append((logging.WARNING, f"{output_dir} holds the checkpoints of an earlier run "
                          f"(last: {checkpoint}); this run starts without them (no --resume) and "
                          "overwrites the files of the same names as it saves its own"))  # fmt: skip
        notes += _keep_previous_config(output_dir, run_config_text(cfg))
    except BaseException:
        lock.release()
        raise
    return notes


def setup_output_dir(cfg, args) -> None:
    """Detectron2's ``default_setup(cfg, args)``, preceded on the main process by the folder's lock
    and, with ``args.resume``, the comparison with the checkpoint's config; what they found is
    logged once logging is set up. Call it on every process: the others raise rank 0's error too.

    Raises:
        OutputDirInUseError: another run holds the folder.
        ResumeConfigError: ``--resume`` with a changed model, or ``MAX_ITER`` below the
            checkpoint's iteration.
    """
    notes: List[Tuple[int, str]] = []
    error: Optional[BaseException] = None
    if comm.get_rank() == 0:
        try:
            notes = _claim(cfg, args)
        except Exception as e:
            error = e
    if comm.get_world_size() > 1:
        verdict = comm.all_gather(None if error is None else (type(error).__name__, str(error)))
        if error is None and verdict[0] is not None:
            name, message = verdict[0]
            kind = {e.__name__: e for e in (OutputDirInUseError, ResumeConfigError)}.get(name)
            raise (kind or RuntimeError)(f"rank 0 stopped: {name}: {message}")
    if error is not None:
        raise error
    default_setup(cfg, args)
    for level, message in notes:
        logger.log(level, message)
