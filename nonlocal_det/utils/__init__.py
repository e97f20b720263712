"""Small helpers shared by the package (atomic file writes)."""

from .atomic import AtomicFile, atomic_write_bytes, remove_stale_temp_files

__all__ = ["AtomicFile", "atomic_write_bytes", "remove_stale_temp_files"]
