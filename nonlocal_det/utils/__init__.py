from .atomic import atomic_open, atomic_write_bytes, remove_stale_temp_files

__all__ = ["atomic_open", "atomic_write_bytes", "remove_stale_temp_files"]
