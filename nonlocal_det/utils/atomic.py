"""Files that appear whole or not at all: write to a temporary file beside the target, flush and
fsync it, then ``os.replace`` it over the target (atomic on POSIX and Windows) and fsync the
folder. A process killed at any point leaves either the old file or the new one, plus at worst a
hidden ``.<name>.<random>.tmp`` file that :func:`remove_stale_temp_files` deletes.
"""

import contextlib
import glob
import os
import tempfile
from typing import Any

__all__ = ["AtomicFile", "atomic_write_bytes", "remove_stale_temp_files", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A writable file object that replaces ``path`` only when closed without an error.

    Use it as a context manager (``with AtomicFile(path, "wb") as f: f.write(...)``): leaving the
    block with an exception discards what was written and leaves ``path`` as it was. Other file
    methods (``write``, ``flush``, ``seek``, ...) are those of the temporary file.

    Args:
        path: the file to create or replace.
        mode: ``"w"``, ``"wb"`` (or ``"w+"`` / ``"wb+"``).
        **kwargs: passed to ``open`` (e.g. ``encoding``).
    """

    def __init__(self, path: str, mode: str = "wb", **kwargs: Any):
        if "w" not in mode:
            raise ValueError(f"AtomicFile: mode={mode!r} is not supported; allowed: 'w', 'wb'")
        self.path = os.path.abspath(path)
        directory, name = os.path.split(self.path)
        fd, self.tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TMP_SUFFIX)
        try:
            self._file = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            os.remove(self.tmp_path)
            raise
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def close(self) -> None:
        """Flush, fsync and move the file into place (idempotent)."""
        if self._done:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self.tmp_path, 0o644)  # mkstemp makes 0600 files
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.discard()
            raise
        self._done = True
        _fsync_dir(os.path.dirname(self.path))

    def discard(self) -> None:
        """Drop what was written; ``path`` is left untouched (idempotent)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp_path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :class:`AtomicFile`)."""
    with AtomicFile(path, "wb") as f:
        f.write(data)


def remove_stale_temp_files(directory: str) -> list:
    """Delete the temporary files that killed :class:`AtomicFile` writers left in ``directory``.

    Only call it when no other process is writing there.

    Returns:
        list[str]: the deleted paths.
    """
    removed = []
    # mkstemp's names: "." + target name + "." + 8 random characters + suffix
    for path in glob.glob(os.path.join(glob.escape(directory), f".*.????????{TMP_SUFFIX}")):
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed
