"""Keep ``metrics.json`` consistent with the checkpoint a run resumes from: the records after it
(iterations the resumed run redoes) and a line torn by a kill are moved to a side file."""

import json
import logging
import os
from typing import Tuple

__all__ = ["trim_metrics_after", "INTERRUPTED_SUFFIX"]

logger = logging.getLogger(__name__)

# The tail removed from metrics.json goes to metrics.json + this suffix (appended, never lost).
INTERRUPTED_SUFFIX = ".interrupted"


def _iteration(line: bytes):
    """The record's iteration, or None for a line that is not a complete JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("iteration") if isinstance(record, dict) else None


def trim_metrics_after(path: str, iteration: int) -> Tuple[int, int]:
    """Move the lines after the last complete record of an iteration ``<= iteration`` to
    ``path + INTERRUPTED_SUFFIX`` (appended and fsynced first), then truncate ``path`` in place
    (a writer holding it open in append mode writes after the kept part). Returns the numbers
    of lines (kept, moved); a missing file: (0, 0)."""
    if not os.path.isfile(path):
        return 0, 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    cut = len(lines)
    while cut > 0:
        it = _iteration(lines[cut - 1])
        if it is not None and it <= iteration:
            break
        cut -= 1
    kept, moved = lines[:cut], lines[cut:]
    if moved:
        with open(path + INTERRUPTED_SUFFIX, "ab") as f:
            f.write(b"".join(m if m.endswith(b"\n") else m + b"\n" for m in moved))
            f.flush()
            os.fsync(f.fileno())
    size = sum(len(x) for x in kept)
    with open(path, "r+b") as f:
        f.truncate(size)
        if kept and not kept[-1].endswith(b"\n"):
            f.seek(size)
            f.write(b"\n")  # a complete last record without its newline
        f.flush()
        os.fsync(f.fileno())
    if moved:
        logger.info(
            f"{path}: moved {len(moved)} line(s) written after iteration {iteration} (the "
            f"checkpoint resumed from) or torn by the interruption to {path}{INTERRUPTED_SUFFIX}"
        )
    return len(kept), len(moved)
