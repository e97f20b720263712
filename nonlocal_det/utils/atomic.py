"""Files that appear whole or not at all: written to a hidden temporary file beside the target,
flushed and fsynced, then renamed over it. A process killed at any point leaves the old file or
the new one, plus at worst a ``.<name>.<random>.tmp`` that :func:`remove_stale_temp_files` deletes.
"""

import contextlib
import glob
import os
import tempfile
from typing import IO, Iterator, List

__all__ = ["atomic_open", "atomic_write_bytes", "remove_stale_temp_files"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f: ...`` replaces ``path`` when the block ends without
    an error; with an error, ``path`` is left as it was. ``mode``: "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode={mode!r} is not supported; allowed: 'w', 'wb'")
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself to disk (not possible on Windows)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the temporary files killed :func:`atomic_open` writers left in ``directory`` (call it
    only when no other process writes there); returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), ".*.????????.tmp")):
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed
