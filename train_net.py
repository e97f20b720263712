#!/usr/bin/env python
"""Train and evaluate Mask R-CNN / Faster R-CNN / Keypoint R-CNN with non-local blocks.

Detectron2's standard training script, plus the project's config keys and datasets:

    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --num-gpus 8
    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --resume   # after a stop

Trailing ``KEY VALUE`` pairs override the config (``DATASETS.TRAIN_JSON FILE DATASETS.TRAIN_IMAGES
DIR``: your own COCO-format data). Without CUDA it runs on the CPU, and ``--num-gpus N`` starts N
CPU processes. The config and the datasets are checked before any training work starts;
``--eval-only`` reads only the test datasets (``DATASETS.TEST``) and the weights. Checkpoints are
written atomically; ``--resume`` continues from the last one, once its config is checked against
the checkpoint's (a changed model stops it; ignored keys are named). One run at a time per
``OUTPUT_DIR``: a second one stops at once, naming the first. SIGTERM, SIGUSR1
(``SOLVER.STOP_SIGNALS``) and Ctrl-C save a checkpoint of the current iteration and exit with
status 75; a NaN or infinite loss stops with status 1, naming the last good checkpoint. On
several machines (``--num-machines``, ``--machine-rank``, ``--dist-url``), ``--dist-timeout
SECONDS`` bounds the wait for all of them to join (docs/coco.md).
"""

import logging
import os

import torch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from nonlocal_det.config import check_config_values, get_nonlocal_cfg
from nonlocal_det.data import (
    EVAL_ONLY_KEYS,
    check_datasets,
    configure_coco_json_datasets,
    register_datasets_for_config,
)
from nonlocal_det.engine import (
    AtomicCheckpointer,
    NonLocalTrainer,
    check_weights_file,
    fall_back_to_cpu,
    share_cpu_threads,
)
from nonlocal_det.engine.launch import default_argument_parser, launch
from nonlocal_det.engine.output_dir import setup_output_dir
from nonlocal_det.modeling import check_model_config


class Trainer(NonLocalTrainer):
    """``NonLocalTrainer`` with a COCO evaluator (bbox, and segm / keypoints when turned on)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        )


def setup(args):
    """The checked config, logging and the registered datasets; a bad key, value or dataset file
    stops here, before any training work. ``--eval-only`` needs only the test datasets."""
    keys = EVAL_ONLY_KEYS if args.eval_only else ("TRAIN", "TEST")
    cfg = get_nonlocal_cfg(args.config_file, args.opts)
    on_cpu = fall_back_to_cpu(cfg)  # MODEL.DEVICE cpu when CUDA is absent
    configure_coco_json_datasets(cfg, keys)  # DATASETS.*_JSON: files checked, classes from them
    check_model_config(cfg)
    check_config_values(cfg, comm.get_world_size())  # solver, input sizes, test, data loader
    cfg.freeze()
    setup_output_dir(cfg, args)  # one run per OUTPUT_DIR; --resume checked; then default_setup
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nonlocal_det", abbrev_name="nl"
    )
    if cfg.MODEL.DEVICE == "cpu":
        why = ": CUDA is not available" if on_cpu or not torch.cuda.is_available() else ""
        threads = share_cpu_threads(cfg)  # --num-gpus N: each process its share of the cores
        logging.getLogger("detectron2").info(
            f"Running on the CPU (MODEL.DEVICE=cpu){why}; {threads} torch thread(s) per process"
        )
    register_datasets_for_config(cfg, keys)  # the demo data (made on first use), own files
    check_datasets(cfg, keys)
    return cfg


def main(args):
    cfg = setup(args)
    # MODEL.WEIGHTS empty, truncated, not a checkpoint, from mmdetection: named before any work
    check_weights_file(cfg.MODEL.WEIGHTS, resume_from=cfg.OUTPUT_DIR if args.resume else "")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, save_to_disk=False).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args)  # --num-gpus / --num-machines processes, --dist-timeout to join
