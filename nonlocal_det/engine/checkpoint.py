"""A ``DetectionCheckpointer`` whose checkpoints and ``last_checkpoint`` tag are written
atomically.

Detectron2 (through fvcore) writes ``model_XXXXXXX.pth`` in place and then rewrites the
``last_checkpoint`` tag in place. A process killed during either write leaves a truncated file:
a truncated ``last_checkpoint`` makes ``--resume`` fail, and a truncated checkpoint that the tag
already names (``model_final.pth`` saved again by a resumed run) is lost. Here both go through
:func:`nonlocal_det.utils.atomic_open`: a kill leaves the previous tag and the file it names.
"""

import logging
import os
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.atomic import atomic_open, remove_stale_temp_files

__all__ = ["AtomicCheckpointer"]

logger = logging.getLogger(__name__)


class _AtomicWrites:
    """A path manager that opens local files for writing with :func:`atomic_open`; every other
    call goes to the wrapped path manager (Detectron2's ``PathManager``)."""

    def __init__(self, path_manager: Any):
        self._pm = path_manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pm, name)

    def open(self, path: str, mode: str = "r", **kwargs: Any):
        if "w" in mode and "://" not in str(path):
            return atomic_open(path, mode, **kwargs)
        return self._pm.open(path, mode, **kwargs)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes of checkpoints and of ``last_checkpoint``.

    Same arguments as ``DetectionCheckpointer``. On construction, a process that saves
    (``save_to_disk``) deletes temporary files that a killed predecessor left in ``save_dir``.
    Remote paths (``scheme://``) are written as Detectron2 writes them.
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = _AtomicWrites(self.path_manager)
        if self.save_to_disk and save_dir and os.path.isdir(save_dir):
            for path in remove_stale_temp_files(save_dir):
                logger.info(f"Removed {path}, left by an interrupted save")
