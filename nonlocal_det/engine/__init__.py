"""Training engine pieces: a ``DefaultTrainer`` that survives being killed and runs on CPU."""

from .checkpoint import AtomicCheckpointer
from .metrics import trim_metrics_after
from .trainer import CPUAutocast, NonLocalTrainer

__all__ = ["AtomicCheckpointer", "CPUAutocast", "NonLocalTrainer", "trim_metrics_after"]
