"""Training engine pieces: a ``DefaultTrainer`` that survives being killed and runs on CPU."""

from .checkpoint import AtomicCheckpointer
from .metrics import trim_metrics_after
from .trainer import NonLocalTrainer

__all__ = ["AtomicCheckpointer", "NonLocalTrainer", "trim_metrics_after"]
