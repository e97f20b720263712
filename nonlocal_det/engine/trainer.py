"""``NonLocalTrainer``: Detectron2's ``DefaultTrainer`` made safe to interrupt.

What it changes, nothing else:

* checkpoints and the ``last_checkpoint`` tag are written atomically (:class:`AtomicCheckpointer`);
* ``resume_or_load(resume=True)`` trims ``metrics.json`` back to the checkpoint's iteration
  (:func:`trim_metrics_after`), so the file stays valid JSON lines without duplicate iterations.
"""

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

from .checkpoint import AtomicCheckpointer
from .metrics import trim_metrics_after

__all__ = ["NonLocalTrainer"]

logger = logging.getLogger(__name__)


class NonLocalTrainer(DefaultTrainer):
    """``DefaultTrainer`` with the changes listed in the module docstring; ``build_evaluator`` is
    left to the subclass, as in Detectron2.

    Args:
        cfg: a frozen config (``nonlocal_det.config.get_nonlocal_cfg``).
    """

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer right before calling this;
        # replace it before the checkpoint hook takes a reference to it.
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    def resume_or_load(self, resume: bool = True):
        """As ``DefaultTrainer.resume_or_load``; when resuming a checkpoint, ``metrics.json`` is
        trimmed back to the checkpoint's iteration first (main process)."""
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint() and comm.is_main_process():
            trim_metrics_after(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.iter)
