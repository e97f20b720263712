from .atomic import atomic_open, atomic_write_bytes, remove_stale_temp_files
from .config_text import read_config_text

__all__ = ["atomic_open", "atomic_write_bytes", "read_config_text", "remove_stale_temp_files"]
