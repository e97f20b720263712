"""Train or evaluate any LazyConfig ``.py`` file: ``python -m nonlocal_det.tools.lazy_train``.

    python -m nonlocal_det.tools.lazy_train --config-file configs/lazy/mask_rcnn_R50_NL.py --num-gpus 8
    python -m nonlocal_det.tools.lazy_train --config-file configs/lazy/mask_rcnn_R50_NL.py --eval-only \\
        train.init_checkpoint=output/model_final.pth
    python -m nonlocal_det.tools.lazy_train --config-file configs/lazy/mask_rcnn_R18_NL_demo.py \\
        train.max_iter=100 train.output_dir=output/demo_lazy

Detectron2 ships such a script only in its source tree (``tools/lazyconfig_train_net.py``), not
in the installed package, so the project carries this one. It expects the usual LazyConfig
layout (``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``, ``lr_multiplier`` and
``train`` as in Detectron2's ``configs/common/train.py``) and works with any such file, with or
without non-local blocks. Trailing ``key=value`` pairs override the config. Without CUDA,
``train.device`` falls back to the CPU (logged).

Checkpoints are written atomically. On SIGTERM or SIGUSR1 (``train.stop_signals``, e.g.
``train.stop_signals=[SIGTERM,SIGUSR2]``) or Ctrl-C, training finishes its iteration, saves its
checkpoint and exits with status 75 (``--resume`` continues); a NaN or infinite loss stops it
with status 1, naming the last good checkpoint. As ``train_net.py``: one run at a time per
``train.output_dir``, and ``--resume`` checked against the checkpoint's config (``model.*`` keys)
before anything is written (``nonlocal_det.engine.output_dir``).
"""

import logging
from typing import Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..config import check_lazy_config_values
from ..engine.checkpoint import AtomicCheckpointer, check_weights_file
from ..engine.resume_state import TrainingResumeState, preserved_rng
from ..engine.launch import default_argument_parser, launch
from ..engine.output_dir import RunConfig, check_resume_iteration, setup_output_dir
from ..engine.preemption import (
    DEFAULT_STOP_SIGNALS,
    SafeStop,
    parse_stop_signals,
)

__all__ = ["setup", "evaluate", "train", "main", "cli", "parser"]

logger = logging.getLogger("detectron2")


def setup(args):
    """The config of ``--config-file`` with the overrides, a usable device, and logging."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    device = cfg.train.get("device", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    parse_stop_signals(_stop_signals(cfg), "train.stop_signals")  # before any work
    check_lazy_config_values(cfg, comm.get_world_size())
    setup_output_dir(cfg, args)  # one run per output_dir; --resume checked; then default_setup
    if cfg.train.device != device:
        logger.info(f"Running on the CPU (train.device={device!r} but CUDA is not available)")
    return cfg


def _stop_signals(cfg):
    """``train.stop_signals`` (not in Detectron2's ``train`` dict: SIGTERM and SIGUSR1 if unset)."""
    return cfg.train.get("stop_signals", DEFAULT_STOP_SIGNALS)


def evaluate(cfg, model) -> Optional[dict]:
    """Run ``dataloader.evaluator`` on ``dataloader.test``; None if the config has no evaluator."""
    if "evaluator" not in cfg.dataloader:
        return None
    with preserved_rng():  # during training: the random choices after it as without it
        results = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def train(cfg, resume: bool = False) -> None:
    """Train ``cfg.model`` for ``train.max_iter`` iterations with Detectron2's trainer and hooks
    (checkpoints, LR schedule, evaluation every ``train.eval_period`` and at the end, metrics)."""
    run_config = RunConfig(cfg)  # stored in each checkpoint, before the model goes into cfg
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data = instantiate(cfg.dataloader.train)
    resume_state = TrainingResumeState(data)  # checkpoints store the data position and RNGs
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_class(model, data, optimizer)
    checkpointer = AtomicCheckpointer(
        model,
        cfg.train.output_dir,
        weights_key="train.init_checkpoint",
        trainer=trainer,
        run_config=run_config,
        resume_state=resume_state,
    )
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            # train.stop_signals / Ctrl-C / a non-finite loss: a checkpoint first, then stop
            SafeStop(checkpointer, _stop_signals(cfg), key="train.stop_signals"),
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # A checkpoint stores the iteration that just finished.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter:
        resume_state.log_resume()  # the data order continues, or why it restarts
    if start_iter:  # train.max_iter below the checkpoint's iteration: an error
        last = checkpointer.get_checkpoint_file()
        check_resume_iteration(cfg.train.max_iter, start_iter, last, "train.max_iter")
    trainer.train(start_iter, cfg.train.max_iter)


def main(args) -> Optional[dict]:
    """Train, or with ``--eval-only`` evaluate ``train.init_checkpoint`` (only ``model`` and
    ``dataloader.test`` / ``evaluator`` are instantiated then: no training data is read)."""
    cfg = setup(args)
    # train.init_checkpoint empty, truncated, not a checkpoint, from mmdetection: named at once
    resume_from = cfg.train.output_dir if args.resume and not args.eval_only else ""
    check_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint", resume_from=resume_from)
    if not args.eval_only:
        train(cfg, resume=args.resume)
        return None
    model = instantiate(cfg.model).to(cfg.train.device)
    model = create_ddp_model(model)
    AtomicCheckpointer(model, weights_key="train.init_checkpoint").load(cfg.train.init_checkpoint)
    return evaluate(cfg, model)


def parser():
    """Detectron2's standard arguments (``--config-file``, ``--num-gpus``, ``--eval-only``, ...)
    and ``--dist-timeout``, as ``train_net.py``."""
    return default_argument_parser(epilog=__doc__)


def cli(argv=None) -> None:
    """Parse the arguments and run :func:`main` on every process (``nonlocal_det.engine.launch``:
    the same launch, timeout and errors as ``train_net.py``)."""
    launch(main, parser().parse_args(argv))  # the workers stop on SIGTERM..., not the launcher


if __name__ == "__main__":
    cli()
