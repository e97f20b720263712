"""Training: a ``DefaultTrainer`` that survives being killed and runs on CPU, and its pieces."""

from .checkpoint import AtomicCheckpointer, CheckpointError, check_weights_file
from .metrics import trim_metrics_after
from .preemption import (
    PREEMPTED_EXIT_CODE,
    NonFiniteLossError,
    SafeStop,
    TrainingPreempted,
    forward_stop_signals,
)
from .resume_state import TrainingResumeState, preserved_rng
from .solver import clip_each_parameter_norm, optimizer_with_gradient_clipping
from .trainer import (
    CPUAutocast,
    ImageLoadError,
    NamedErrorsMapper,
    NonLocalTrainer,
    fall_back_to_cpu,
)

__all__ = [
    "AtomicCheckpointer",
    "CPUAutocast",
    "CheckpointError",
    "ImageLoadError",
    "NamedErrorsMapper",
    "NonFiniteLossError",
    "NonLocalTrainer",
    "PREEMPTED_EXIT_CODE",
    "SafeStop",
    "TrainingPreempted",
    "TrainingResumeState",
    "check_weights_file",
    "clip_each_parameter_norm",
    "fall_back_to_cpu",
    "forward_stop_signals",
    "optimizer_with_gradient_clipping",
    "preserved_rng",
    "trim_metrics_after",
]
