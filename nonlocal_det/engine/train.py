"""The trainer of ``train_net.py``: train or evaluate a YAML config, or a LazyConfig ``.py`` file
(as ``LazyConfig.load``, by the extension) of Detectron2's layout (``model``, ``dataloader``,
``optimizer``, ``lr_multiplier``, ``train``). A YAML config trains with :class:`Trainer`
(Detectron2's ``DefaultTrainer``), a LazyConfig with :func:`do_train` (the way of Detectron2's
``tools/lazyconfig_train_net.py``), both with the guarantees of
:class:`~nonlocal_det.engine.trainer.NonLocalTrainer`: checks before any work (config, weights,
output folder), atomic checkpoints, an exact and checked ``--resume``, a stop signal saves and
exits with status 75, a non-finite loss stops with status 1, CPU fallback, and the processes and
machines of :func:`~nonlocal_det.engine.launch.launch`.
A project's own script calls :func:`cli`, or ``launch(main, args)``.
"""

import logging
import os
from typing import Optional

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import (
    COCOEvaluator,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import (
    DEFAULT_STOP_SIGNALS,
    check_config_values,
    check_lazy_config_values,
    get_nonlocal_cfg,
)
from ..data import (
    EVAL_ONLY_KEYS,
    check_datasets,
    configure_coco_json_datasets,
    register_datasets_for_config,
)
from ..modeling import check_model_config
from .checkpoint import AtomicCheckpointer, check_weights_file
from .launch import default_argument_parser, launch
from .output_dir import RunConfig, run_keys, setup_output_dir
from .preemption import SafeStop
from .resume_state import TrainingResumeState, preserved_rng
from .trainer import CPUAutocast, NonLocalTrainer, check_resumed, fall_back_to_cpu

__all__ = ["Trainer", "cli", "do_test", "do_train", "main", "setup"]

logger = logging.getLogger("detectron2")


class Trainer(NonLocalTrainer):
    """``NonLocalTrainer`` with a COCO evaluator (bbox, and segm / keypoints when turned on)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(
            dataset_name,
            output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name),
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        )


def setup(args):
    """The checked config of ``args.config_file`` with the overrides ``args.opts`` (a LazyConfig
    for a ``.py`` file), logging, the output folder (:func:`setup_output_dir`), and the registered
    datasets of a YAML config: a bad key, value, dataset file or a busy output folder stops here,
    before any training work. ``--eval-only`` needs only the test datasets."""
    keys, world = EVAL_ONLY_KEYS if args.eval_only else ("TRAIN", "TEST"), comm.get_world_size()
    lazy = args.config_file.endswith(".py")
    if lazy:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    else:
        cfg = get_nonlocal_cfg(args.config_file, args.opts)
    on_cpu = fall_back_to_cpu(cfg)  # the device cpu when CUDA is absent
    if lazy:  # train.*, optimizer.lr, dataloader.train.*
        check_lazy_config_values(cfg, world)
    else:
        configure_coco_json_datasets(cfg, keys)  # DATASETS.*_JSON: files checked, classes
        check_model_config(cfg)
        check_config_values(cfg, world)  # solver, input sizes, test, data loader
        cfg.freeze()
    setup_output_dir(cfg, args)  # one run per output folder; --resume checked; then default_setup
    device, _, _, output_dir = run_keys(cfg)[:4]
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="nonlocal_det", abbrev_name="nl")
    if device == "cpu":  # --num-gpus N: each process its share of the cores
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        why = ": CUDA is not available" if on_cpu or not torch.cuda.is_available() else ""
        logger.info(f"Running on the CPU{why}; {torch.get_num_threads()} torch thread(s)/process")
    if not lazy:
        register_datasets_for_config(cfg, keys)  # DATASETS.*_JSON and the projects' registrars
        check_datasets(cfg, keys)
    return cfg


def do_test(cfg, model) -> Optional[dict]:
    """Run a LazyConfig's ``dataloader.evaluator`` on ``dataloader.test``; None without an
    evaluator. The random states are left as they were (an evaluation during training)."""
    if "evaluator" not in cfg.dataloader:
        return None
    with preserved_rng():
        results = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, resume: bool = False) -> None:
    """Train a LazyConfig's ``model`` for ``train.max_iter`` iterations with Detectron2's trainer
    and hooks (checkpoints, LR schedule, evaluation every ``train.eval_period`` and at the end,
    metrics), with the guarantees of :class:`NonLocalTrainer` (module docstring)."""
    run, t = RunConfig(cfg), cfg.train  # the run's config: in each checkpoint, before the model
    model = instantiate(cfg.model).to(t.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data = instantiate(cfg.dataloader.train)
    state = TrainingResumeState(data)  # checkpoints store the data position and RNGs
    cpu = t.device == "cpu"  # several CPU processes: DistributedDataParallel without device_ids
    model = create_ddp_model(model, **({"device_ids": None} if cpu else {}), **t.ddp)
    if t.amp.enabled and cpu:  # AMPTrainer needs CUDA: bfloat16 autocast instead
        trainer = SimpleTrainer(CPUAutocast(model), data, optimizer)
    else:
        trainer = (AMPTrainer if t.amp.enabled else SimpleTrainer)(model, data, optimizer)
    key = "train.init_checkpoint"
    ckpt = AtomicCheckpointer(
        model, t.output_dir, weights_key=key, trainer=trainer, run_config=run, resume_state=state
    )
    main_process = comm.is_main_process()  # the one that writes files
    writers = default_writers(t.output_dir, t.max_iter) if main_process else []
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(ckpt, **t.checkpointer) if main_process else None,
            # train.stop_signals / Ctrl-C / a non-finite loss: a checkpoint first, then stop
            SafeStop(ckpt, t.get("stop_signals", DEFAULT_STOP_SIGNALS), "train.stop_signals"),
            hooks.EvalHook(t.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(writers, t.log_period),
        ]
    )
    ckpt.resume_or_load(t.init_checkpoint, resume=resume)
    start_iter = 0
    if resume and ckpt.has_checkpoint():
        start_iter = trainer.iter + 1  # a checkpoint stores the iteration that just finished
        check_resumed(ckpt, start_iter, t.max_iter, "train.max_iter")
    trainer.train(start_iter, t.max_iter)


def main(args) -> Optional[dict]:
    """Train, or with ``--eval-only`` evaluate the weights (``MODEL.WEIGHTS`` /
    ``train.init_checkpoint``; with ``--resume`` the output folder's last checkpoint): only the
    model and the test data are built then. Returns the evaluation results, if any."""
    cfg = setup(args)
    device, key, weights, output_dir = run_keys(cfg)[:4]
    # the weights empty, truncated, not a checkpoint, from mmdetection: named before any work
    check_weights_file(weights, key, resume_from=output_dir if args.resume else "")
    lazy = not isinstance(cfg, CfgNode)
    if not args.eval_only:
        if lazy:
            return do_train(cfg, resume=args.resume)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    model = instantiate(cfg.model).to(device) if lazy else Trainer.build_model(cfg)
    checkpointer = AtomicCheckpointer(model, output_dir, save_to_disk=False, weights_key=key)
    checkpointer.resume_or_load(weights, resume=args.resume)
    if lazy:
        return do_test(cfg, model)
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results


def cli(argv=None) -> None:
    """Parse the arguments (``argv``, default the command line's: Detectron2's standard ones and
    ``--dist-timeout``) and run :func:`main` in every process of the run (:func:`launch`)."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(main, args)
