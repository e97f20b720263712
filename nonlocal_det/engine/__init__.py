"""Training: a ``DefaultTrainer`` that survives being killed and runs on CPU, and its pieces."""

from .checkpoint import AtomicCheckpointer, CheckpointError, check_weights_file
from .metrics import trim_metrics_after
from .resume_state import TrainingResumeState, preserved_rng
from .solver import clip_each_parameter_norm, optimizer_with_gradient_clipping
from .trainer import (
    CPUAutocast,
    ImageLoadError,
    NamedErrorsMapper,
    NonLocalTrainer,
    fall_back_to_cpu,
    share_cpu_threads,
)

__all__ = [
    "AtomicCheckpointer",
    "CPUAutocast",
    "CheckpointError",
    "ImageLoadError",
    "NamedErrorsMapper",
    "NonLocalTrainer",
    "TrainingResumeState",
    "check_weights_file",
    "clip_each_parameter_norm",
    "fall_back_to_cpu",
    "optimizer_with_gradient_clipping",
    "preserved_rng",
    "share_cpu_threads",
    "trim_metrics_after",
]
