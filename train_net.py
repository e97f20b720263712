#!/usr/bin/env python
"""Train and evaluate Mask R-CNN / Faster R-CNN / Keypoint R-CNN with non-local blocks, from a
YAML config or a LazyConfig ``.py`` file (``nonlocal_det.engine.train``, the library's trainer):

    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --num-gpus 8
    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/mask_rcnn_R50_NL.yaml --resume   # after a stop
    python train_net.py --config-file configs/lazy/mask_rcnn_R50_NL.py --num-gpus 8
    python train_net.py --config-file configs/lazy/mask_rcnn_R50_NL.py --eval-only \
        train.init_checkpoint=output/model_final.pth

Trailing ``KEY VALUE`` pairs (YAML) or ``key=value`` pairs (``.py``) override the config
(``DATASETS.TRAIN_JSON FILE DATASETS.TRAIN_IMAGES DIR``: your own COCO-format data). Without CUDA
it runs on the CPU, and ``--num-gpus N`` starts N CPU processes. The config, the datasets and the
weights are checked before any training work starts; ``--eval-only`` reads only the test datasets
and the weights. Checkpoints are written atomically; ``--resume`` continues from the last one,
once its config is checked against the checkpoint's (a changed model stops it; ignored keys are
named). One run at a time per output folder (``OUTPUT_DIR``, ``train.output_dir``): a second one
stops at once, naming the first. SIGTERM, SIGUSR1 (``SOLVER.STOP_SIGNALS``,
``train.stop_signals``) and Ctrl-C save a checkpoint of the current iteration and exit with status
75; a NaN or infinite loss stops with status 1, naming the last good checkpoint. On several
machines (``--num-machines``, ``--machine-rank``, ``--dist-url``), ``--dist-timeout SECONDS``
bounds the wait for all of them to join (docs/coco.md).
"""

from nonlocal_det.engine.train import cli

if __name__ == "__main__":
    cli()
