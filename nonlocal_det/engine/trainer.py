"""``NonLocalTrainer``: Detectron2's ``DefaultTrainer`` made safe to interrupt and runnable on CPU:
atomic checkpoints that resume past unreadable ones (:class:`AtomicCheckpointer`), ``metrics.json``
trimmed back on resume, the data order and random states resumed (:class:`TrainingResumeState`),
a checkpoint and exit status 75 on a stop signal, a clean stop on a non-finite loss
(:class:`SafeStop`), several CPU processes, bfloat16 autocast for ``SOLVER.AMP.ENABLED`` on CPU,
batched per-parameter norm clipping, and loader errors that name the image (docs/reliability.md).
"""

import contextlib
import logging
import os
import weakref
from typing import Any, Callable, Dict, Iterator, Optional
from unittest import mock

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from torch import nn

from ..data import check_datasets
from .checkpoint import AtomicCheckpointer
from .metrics import trim_metrics_after
from .output_dir import RunConfig, check_resume_iteration
from .preemption import SafeStop
from .resume_state import TrainingResumeState, preserved_rng
from .solver import clip_each_parameter_norm

__all__ = [
    "CPUAutocast",
    "ImageLoadError",
    "NamedErrorsMapper",
    "NonLocalTrainer",
    "check_resumed",
    "fall_back_to_cpu",
]

logger = logging.getLogger(__name__)


class CPUAutocast(nn.Module):
    """Runs ``model``'s training forward under CPU autocast to ``dtype`` and returns its losses in
    float32 (eval forward unchanged). Only the trainer sees it: checkpoints hold the model's
    own parameter names."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.model(*args, **kwargs)
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.model(*args, **kwargs)
        if isinstance(out, dict):
            out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        return out


def fall_back_to_cpu(cfg) -> bool:
    """Set the device of an unfrozen config (``MODEL.DEVICE``, a LazyConfig's ``train.device``)
    to ``cpu`` when it asks for CUDA and there is none; returns whether it changed it."""
    node, key = (cfg.MODEL, "DEVICE") if isinstance(cfg, CfgNode) else (cfg.train, "device")
    if node.get(key, "cuda").startswith("cuda") and not torch.cuda.is_available():
        node[key] = "cpu"
        return True
    return False


def check_resumed(checkpointer, start_iter: int, max_iter: int, key="SOLVER.MAX_ITER") -> None:
    """After ``checkpointer`` resumed its last checkpoint: ``max_iter`` (config key ``key``)
    checked against it, the data order's resume logged (its ``resume_state``), and
    ``metrics.json`` in its folder trimmed back to it (main process)."""
    check_resume_iteration(max_iter, start_iter, checkpointer.get_checkpoint_file(), key)
    checkpointer.checkpointables["resume_state"].log_resume()  # continues, or why it restarts
    if comm.is_main_process():
        trim_metrics_after(os.path.join(checkpointer.save_dir, "metrics.json"), start_iter - 1)


class ImageLoadError(RuntimeError):
    """An image (or its annotations) of a dataset could not be loaded; names the file."""


class NamedErrorsMapper:
    """Calls ``mapper(dataset_dict)``; an error is re-raised as :class:`ImageLoadError` naming the
    dataset, the image id and the file, the original error chained."""

    def __init__(self, mapper: Callable[[Dict[str, Any]], Any], dataset_name: Optional[str] = None):
        self.mapper, self.dataset_name = mapper, dataset_name

    def __call__(self, dataset_dict: Dict[str, Any]):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            name = f"dataset {self.dataset_name!r}, " if self.dataset_name else ""
            raise ImageLoadError(
                f"cannot load {name}image id {dataset_dict.get('image_id')!r}, file "
                f"{dataset_dict.get('file_name')}: {type(e).__name__}: {e}; fix or remove this "
                "image (or its annotations) in the dataset"
            ) from e


@contextlib.contextmanager
def _cpu_ddp(cfg) -> Iterator[None]:
    """Inside: Detectron2's ``create_ddp_model`` wraps CPU models with ``device_ids=None`` (the
    one patch of the project: ``DefaultTrainer.__init__`` has no way to pass ``device_ids``)."""
    if comm.get_world_size() == 1 or cfg.MODEL.DEVICE != "cpu":
        yield
        return
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    with mock.patch.object(d2_defaults, "create_ddp_model", create_ddp_model):
        yield


class NonLocalTrainer(DefaultTrainer):
    """``DefaultTrainer`` with the changes listed in the module docstring; ``build_evaluator`` is
    left to the subclass, as in Detectron2.

    Args:
        cfg: a frozen config (``nonlocal_det.config.get_nonlocal_cfg``).
    """

    def __init__(self, cfg):
        with _cpu_ddp(cfg):
            super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
            old = self._trainer
            self._trainer = SimpleTrainer(CPUAutocast(old.model), old.data_loader, old.optimizer)
            logger.info("SOLVER.AMP.ENABLED on CPU: training forward under bfloat16 autocast")

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer right before calling this;
        # replace it before the checkpoint hook takes a reference to it.
        # resume_state: the random states and the data position (TrainingResumeState)
        self.resume_state = TrainingResumeState(self._trainer.data_loader)
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            resume_state=self.resume_state,
            run_config=RunConfig(self.cfg),  # the config a --resume is compared with
        )
        ret = super().build_hooks()
        # SOLVER.STOP_SIGNALS / Ctrl-C / a non-finite loss: a checkpoint first, then stop; before
        # the EvalHook (all processes), after the PeriodicCheckpointer (main process)
        stop = SafeStop(self.checkpointer, self.cfg.SOLVER.STOP_SIGNALS)
        evals = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
        ret.insert(evals[0] if evals else len(ret), stop)
        return ret

    def resume_or_load(self, resume: bool = True):
        """As ``DefaultTrainer.resume_or_load``, then :func:`check_resumed` if it resumed."""
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            check_resumed(self.checkpointer, self.start_iter, self.cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer; with ``SOLVER.CLIP_GRADIENTS`` ``CLIP_TYPE: "norm"`` its
        per-parameter clipping is :func:`clip_each_parameter_norm` (same numbers, batched)."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "norm"):
            return super().build_optimizer(cfg, model)
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(unclipped, model)
        return clip_each_parameter_norm(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test`` that leaves the random states as they were (an evaluation during
        training does not change the random choices of the iterations after it)."""
        with preserved_rng():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader (errors name the image); once its dataset dicts are loaded,
        the datasets are checked against the config again (:func:`check_datasets`): a lazily
        registered dataset knows its classes only now."""
        mapper = NamedErrorsMapper(DatasetMapper(cfg, True))
        loader = build_detection_train_loader(cfg, mapper=mapper)
        check_datasets(cfg, keys=("TRAIN",))
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = NamedErrorsMapper(DatasetMapper(cfg, False), dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
