"""A ``DetectionCheckpointer`` that writes atomically, names the file in every load error, resumes
past unreadable checkpoints and stops cleanly when a save fails (docs/reliability.md)."""

import contextlib
import errno
import glob
import json
import logging
import mmap
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..from_mmdet.advice import MMDET_PACKAGES, conversion_advice, mmdet_parts, names_mmdet_tensors
from ..utils.atomic import atomic_open, remove_stale_temp_files

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "check_weights_file",
    "describe_unreadable",
    "last_checkpoint_file",
    "resume_candidates",
    "skip_final_evaluation",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"model_(\d+|final)\.pth")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or saved. The message names the file, what is wrong and
    what to do; ``path`` is the file and ``reason`` what is wrong with it (without advice)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path = path
        self.reason = reason or message


def _size(n: int) -> str:
    return f"{n} bytes" + (f" ({n / 2**20:.1f} MB)" if n >= 2**20 else "")


def _descriptor_end(mm, start: int) -> int:
    """The end of the data descriptor (``PK\\x07\\x08``, crc, sizes) of an entry whose data begin
    at ``start``, found by its compressed size; -1 when the file ends before it."""
    pos = start
    while True:
        pos = mm.find(b"PK\x07\x08", pos)
        if pos < 0:
            return -1
        for fmt, length in (("<I", 16), ("<Q", 24)):  # zip, zip64
            width = struct.calcsize(fmt)
            field = mm[pos + 8 : pos + 8 + width]
            if len(field) == width and struct.unpack(fmt, field)[0] == pos - start:
                return pos + length
        pos += 1


def _zip_end(path: str, size: int) -> str:
    """Where a zip archive without its directory ends: the entry it stops in."""
    offset, last = 0, None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while offset + 30 <= size and mm[offset : offset + 4] == b"PK\x03\x04":
            flags, csize, nlen, elen = struct.unpack("<6xH10xI4xHH", mm[offset : offset + 30])
            name = mm[offset + 30 : offset + 30 + nlen].decode("utf-8", "replace")
            start = offset + 30 + nlen + elen
            if start > size:
                return f"it ends in the header of the entry after {last!r}"
            end = _descriptor_end(mm, start) if flags & 0x08 else start + csize
            if end < 0 or end > size:
                return f"it ends inside entry {name!r}, {size - start} bytes into its data"
            last, offset = name, end
    return f"it ends after entry {last!r}" if last else ""


def _looks_like(path: str, size: int) -> str:
    """What a file that is neither a zip nor a pickle is: a JSON file, text, or bytes."""
    with open(path, "rb") as f:
        head = f.read(min(size, 4096))
    text = head.decode("utf-8", "replace")
    if "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        if text.lstrip()[:1] in ("{", "[") and size <= 2**24:
            with contextlib.suppress(ValueError, OSError), open(path, encoding="utf-8") as f:
                json.load(f)
                return "a JSON file"
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"a text file (it starts with {first!r})"
    return f"binary data of an unknown format (its first bytes are {head[:8].hex(' ')})"


def describe_unreadable(path: str, error: Optional[BaseException] = None) -> str:
    """What is wrong with a local checkpoint file ("it is empty (0 bytes)", "it is truncated:
    ... (where it ends)", ...), given what loading it raised (``error``), or before loading it
    (``error`` None: "" for a file that looks whole)."""
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    message = f"{type(error).__name__}: {error}".splitlines()[0][:300] if error else ""
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            where = _zip_end(path, size)
            return (
                f"it is truncated: {_size(size)}, {where + ', ' if where else ''}"
                "the rest and the archive's directory (written last) are missing"
            )
        if not any(n.endswith("data.pkl") for n in names):
            return "it is a zip archive, not a PyTorch checkpoint (no data.pkl inside)"
        return message
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle: Detectron2's .pkl, torch's legacy
        truncated = isinstance(error, EOFError) or re.search(
            r"truncated|unexpected EOF|Ran out of input", message, re.I
        )
        if truncated:
            return f"it is truncated: {_size(size)} ({message})"
        return message
    if error is None and path.endswith(".pkl"):
        return ""  # old pickle protocols of Detectron1's files: left to the unpickler
    if error is None or isinstance(error, (pickle.UnpicklingError, EOFError, KeyError)):
        return f"it is not a PyTorch or pickle checkpoint: {_looks_like(path, size)}"
    return message


def _refused_global(path: str, key: str, error: BaseException) -> str:
    """The global ``torch.load`` refused to unpickle ("" if none); raises the convert advice
    (:func:`_mmdet_error`) when it is mmdetection's."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    refused = found[1] if found else ""
    if refused.split(".")[0] in MMDET_PACKAGES:
        raise _mmdet_error(path, key, None, {}, unsafe=refused) from error
    return refused


def _unloadable(key: str, path: str, reason: str, advice: str = "") -> CheckpointError:
    if not advice and ("truncated" in reason or "empty" in reason):
        advice = f"Copy or download it again, or set {key} to another checkpoint"
    advice = advice or (
        f"{key} must name a Detectron2 checkpoint: a .pth written by train_net.py, a Detectron2 "
        "model-zoo .pkl, or a detectron2:// URL."
    )
    return CheckpointError(f"{key}={path}: cannot be loaded: {reason}. {advice}", path, reason)


def check_weights_file(path: str, key: str = "MODEL.WEIGHTS", *, resume_from: str = "") -> None:
    """Check a local weights file (config key ``key``) before any work: it exists, is whole and
    is a Detectron2 checkpoint; remote paths, "" and, with ``resume_from`` (``--resume``'s output
    folder) holding checkpoints, any path pass. Raises :class:`CheckpointError`."""
    if resume_from and (
        os.path.exists(os.path.join(resume_from, "last_checkpoint"))
        or glob.glob(os.path.join(glob.escape(resume_from), "model_*.pth"))
    ):
        return
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise CheckpointError(f"{key}={path}: no such file", path, "no such file")
    reason = describe_unreadable(path)
    if reason:
        raise _unloadable(key, path, reason)
    if names_mmdet_tensors(path):  # then read it whole, for the model and the config inside
        try:
            loaded = torch.load(path, map_location="cpu")
        except Exception as e:
            _refused_global(path, key, e)
            return  # the loader names what is wrong
        state, meta = mmdet_parts(loaded)
        if state is not None:
            raise _mmdet_error(path, key, state, meta)


def _mmdet_error(path: str, key: str, state=None, meta=None, unsafe: str = "") -> CheckpointError:
    reason, message = conversion_advice(path, key, state, meta or {}, unsafe)
    return CheckpointError(message, path, reason)


class _CountingWriter:
    """A binary file that counts the bytes written and keeps the first OSError of a write."""

    def __init__(self, f):
        self._f, self.written, self.error = f, 0, None

    def _call(self, method, *args):
        try:
            return method(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data) -> int:
        n = self._call(self._f.write, data)
        self.written += len(data) if n is None else n
        return n

    def flush(self) -> None:
        self._call(self._f.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _AtomicWrites:
    """A path manager that writes local files with :func:`atomic_open` (``last_write``: the
    :class:`_CountingWriter` of the latest binary write); the rest goes to the one it wraps."""

    def __init__(self, path_manager: Any):
        self._pm, self.last_write = path_manager, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pm, name)

    def open(self, path: str, mode: str = "r", **kwargs: Any):
        if "w" in mode and "://" not in str(path):
            return self._atomic(path, mode, **kwargs)
        return self._pm.open(path, mode, **kwargs)

    @contextlib.contextmanager
    def _atomic(self, path: str, mode: str, **kwargs: Any):
        with atomic_open(path, mode, **kwargs) as f:
            if "b" in mode:
                f = self.last_write = _CountingWriter(f)
            yield f


def _os_error(error: BaseException, recorded: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind a failed save: the one a write raised, or one in the chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return recorded if isinstance(recorded, OSError) else None


def skip_final_evaluation(trainer: Any) -> None:
    """Drop the trainer's hooks whose ``after_train`` evaluates or saves again (``EvalHook``,
    ``PeriodicCheckpointer``, ``BestCheckpointer``): Detectron2's training loop runs
    ``after_train`` even when it stops with an error, and ``EvalHook`` evaluates there when the
    error came at the last iteration."""
    from detectron2.engine import hooks

    if trainer is None or not hasattr(trainer, "_hooks"):
        return
    stop = (hooks.PeriodicCheckpointer, hooks.EvalHook, hooks.BestCheckpointer)
    trainer._hooks = [h for h in trainer._hooks if not isinstance(h, stop)]


def last_checkpoint_file(checkpointer) -> str:
    """The file ``checkpointer``'s ``last_checkpoint`` names, or "" (none, or an unreadable tag)."""
    try:
        return checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
    except Exception:  # a garbled tag (UnicodeDecodeError): none known
        return ""


def resume_candidates(save_dir: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The checkpoints of ``save_dir`` a ``--resume`` tries, best first (the one
    ``last_checkpoint`` names, then every ``model_*.pth``, newest first), and what is wrong with
    the tag: (file, why) pairs."""
    tag = os.path.join(save_dir, "last_checkpoint")
    problems, tagged = [], None
    if os.path.isfile(tag):
        with open(tag, "rb") as f:
            raw = f.read()
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append((tag, f"it is garbled ({len(raw)} bytes, not a file name)"))
        else:
            if not name:
                problems.append((tag, "it is empty"))
            elif not os.path.isfile(os.path.join(save_dir, name)):
                problems.append((tag, f"it names {name}, which does not exist"))
            else:
                tagged = os.path.join(save_dir, name)

    def newest_first(path: str):
        number = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))[1]
        return os.path.getmtime(path), float("inf") if number == "final" else int(number)

    found = glob.glob(os.path.join(glob.escape(save_dir), "model_*.pth"))
    found = [p for p in found if _CHECKPOINT_NAME.fullmatch(os.path.basename(p))]
    found = sorted(filter(os.path.isfile, found), key=newest_first, reverse=True)
    rest = [p for p in found if tagged is None or not os.path.samefile(p, tagged)]
    return ([tagged] if tagged else []) + rest, problems


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes, named load errors, resuming past unreadable
    checkpoints, and a clean stop when a save fails. A process that saves deletes the temporary
    files a killed one left in ``save_dir``; remote paths are written as Detectron2 writes them.

    Args:
        weights_key: the config key of the weights, for messages ("train.init_checkpoint").
        others: as ``DetectionCheckpointer``'s.
    """

    def __init__(self, model, save_dir: str = "", *, weights_key="MODEL.WEIGHTS", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)
        self.weights_key = weights_key
        self._key = weights_key  # the name of the file being loaded, in messages
        self._resumed: Optional[bool] = None  # whether resume_or_load resumed a checkpoint
        self._resumed_file = ""  # the file it resumed, until the next save
        if self.save_to_disk and save_dir and os.path.isdir(save_dir):
            for path in remove_stale_temp_files(save_dir):
                logger.info(f"Removed {path}, left by an interrupted save")

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """As Detectron2's; :class:`CheckpointError` for a file that is empty, truncated, not a
        checkpoint, or an mmdetection checkpoint."""
        key = self._key
        try:
            loaded = super()._load_file(filename)
        except Exception as e:
            if isinstance(e, (AssertionError, ValueError)) and "query" in str(e):
                raise
            refused = _refused_global(filename, key, e)
            reason = describe_unreadable(filename, e)
            if refused and not reason.startswith("it is"):
                reason = (
                    f"it holds Python objects ({refused}) that torch.load refuses to unpickle "
                    "(weights_only=True): not a checkpoint of Detectron2 or this project"
                )
                advice = (
                    "If you trust the file, load it with torch.load(..., weights_only=False) and "
                    f"save {{'model': <its state dict>}} with torch.save; then set {key} to that file"
                )
                raise _unloadable(key, filename, reason, advice) from e
            raise _unloadable(key, filename, reason) from e
        model = loaded.get("model") if isinstance(loaded, Mapping) else None
        if not isinstance(model, Mapping):
            raise _unloadable(key, filename, f"it holds a {type(model).__name__}, not a state dict")
        own = self.model.state_dict()
        state, meta = mmdet_parts(loaded)
        if state is not None and not any(k in own for k in state):
            raise _mmdet_error(filename, key, state, meta)
        return loaded

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """As Detectron2's; a missing local file raises :class:`CheckpointError` naming it."""
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"{self._key}={path}: no such file", path, "no such file")
        try:
            return super().load(path, *args, **kwargs)
        finally:  # Detectron2 resets it only after a success: the next load would assert
            self._parsed_url_during_load = None

    def has_checkpoint(self) -> bool:
        """After :meth:`resume_or_load` with ``resume=True``: whether it resumed a checkpoint;
        before: whether ``last_checkpoint`` exists (Detectron2's answer)."""
        if self._resumed is not None:
            return self._resumed
        return super().has_checkpoint()

    def get_checkpoint_file(self) -> str:
        """The checkpoint :meth:`resume_or_load` resumed (until the next save), else the file
        ``last_checkpoint`` names (Detectron2's answer)."""
        return self._resumed_file or super().get_checkpoint_file()

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """As Detectron2's; with ``resume`` the first readable one of :func:`resume_candidates`
        (each skipped file and why logged), else ``path`` (model only).

        Raises:
            CheckpointError: the folder holds checkpoints and none is readable (each listed with
                the reason), or ``path`` cannot be loaded.
        """
        if not resume or not self.save_dir or "://" in self.save_dir:
            self._resumed = None if resume else False
            if resume:
                return super().resume_or_load(path, resume=True)
            return self.load(path, checkpointables=[])
        candidates, rejected = resume_candidates(self.save_dir)
        for file in candidates:
            self._key = "the checkpoint to resume"
            try:
                result = self.load(file)
            except CheckpointError as e:
                rejected.append((file, e.reason))
                continue
            finally:
                self._key = self.weights_key
            for skipped, why in rejected:
                logger.warning(f"--resume: skipped {skipped}: {why}")
            if rejected:
                logger.warning(f"--resume: resumed from {file} instead")
            self._resumed, self._resumed_file = True, file
            return result
        if candidates:
            listing = "".join(f"\n  {f}: {why}" for f, why in rejected)
            raise CheckpointError(
                f"--resume: no checkpoint in {self.save_dir} can be read:{listing}\nCopy a "
                "readable checkpoint there (and its name into last_checkpoint), or train into "
                "another OUTPUT_DIR to start afresh",
                self.save_dir,
                "no readable checkpoint",
            )
        for file, why in rejected:
            logger.warning(
                f"--resume: {file}: {why}, and {self.save_dir} holds no model_*.pth: starting "
                f"from {self.weights_key}={path or '(none)'}"
            )
        self._resumed = False
        return self.load(path, checkpointables=[])

    def save(self, name: str, **kwargs: Any) -> None:
        """As Detectron2's; a failed write raises :class:`CheckpointError` naming the folder, the
        space needed and free, and skips the trainer's final evaluation (the files stay as they
        were)."""
        if not self.save_dir or not self.save_to_disk:
            return
        previous = last_checkpoint_file(self)  # the last good one, for the message of a failure
        previous = previous if os.path.isfile(previous) else ""
        size = os.path.getsize(previous) if previous else 0
        self.path_manager.last_write = None
        try:
            super().save(name, **kwargs)
        except Exception as e:
            skip_final_evaluation(self.checkpointables.get("trainer"))
            raise self._save_error(f"{name}.pth", previous, size, e) from e
        self._resumed, self._resumed_file = None, ""  # last_checkpoint names the new file

    def _save_error(self, file: str, previous: str, size: int, error: Exception):
        """The :class:`CheckpointError` of a failed save of ``file``; ``previous``: the last
        good checkpoint, ``size`` its size (the estimate of the space a checkpoint takes)."""
        writer = self.path_manager.last_write
        written = writer.written if writer is not None else 0
        os_error = _os_error(error, writer.error if writer is not None else None)
        folder = os.path.abspath(self.save_dir)
        kept, resume = "no earlier checkpoint of this run exists", "then train again"
        if previous:
            name = os.path.basename(previous)
            kept = f"{name} and last_checkpoint are intact"
            resume = f"then rerun with --resume: it continues from {name}"
        if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = 0
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(folder).free
            need = f"about {_size(size)} (the size of {os.path.basename(previous)})"
            need = need if size >= written else f"more than {_size(written)}"
            reason = (
                f"the disk is full ({os_error.strerror}): this checkpoint needs {need}, "
                f"{_size(written)} of it were written before the failure, {_size(free)} are free"
            )
            more = f"at least {_size(size - free)} more" if size > free else "more space"
            todo = f"Free {more} in {folder} (or set OUTPUT_DIR to another disk), {resume}"
        else:
            what = os_error if os_error is not None else error
            reason = f"{type(what).__name__}: {what}".splitlines()[0]
            todo = f"Fix the cause, {resume}"
        return CheckpointError(
            f"cannot save checkpoint {file} in {folder}: {reason}. The partial file was removed; "
            f"{kept}. The training stopped. {todo}.",
            os.path.join(folder, file),
            reason,
        )
