"""Helpers shared by the tests: configs from the project's YAML files, small models."""

import os

from detectron2.config import get_cfg

import nonlocal_demo
from nonlocal_demo.synthetic import SYNTHETIC_DATASET_VERSION, generate_synthetic_coco
from nonlocal_det import add_nonlocal_config
from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.data import configure_coco_json_datasets
from nonlocal_det.engine import fall_back_to_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
# The demo project beside the library (projects/demo): most end-to-end tests train its small model
# on its generated data, through nonlocal_det's trainer and commands, as `make demo` does.
DEMO_DIR = os.path.join(REPO, "projects", "demo")
DEMO_CONFIGS = os.path.join(DEMO_DIR, "configs")
DEMO_YAML = os.path.join(DEMO_CONFIGS, "mask_rcnn_R18_NL_demo.yaml")
DEMO_LAZY = os.path.join(DEMO_CONFIGS, "mask_rcnn_R18_NL_demo.py")
PROBE_YAML = os.path.join(DEMO_CONFIGS, "faster_rcnn_R18_NL_probe.yaml")
nonlocal_demo.setup()  # its config keys and datasets, as its scripts do


def load_cfg(name: str = None, opts=()):
    """A config from ``configs/<name>`` (or a path; or Detectron2's defaults) with the project's
    and the demo's keys, on CPU, without pretrained weights."""
    cfg = nonlocal_demo.add_demo_config(add_nonlocal_config(get_cfg()))
    if name:
        cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def small_opts(depth: int = 18):
    """Overrides that shrink a Mask R-CNN config enough for fast CPU tests."""
    opts = [
        "MODEL.RESNETS.DEPTH",
        depth,
        "MODEL.FPN.OUT_CHANNELS",
        32,
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM",
        16,
        "MODEL.ROI_MASK_HEAD.NUM_CONV",
        1,
        "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS",
        (16,) * 8,
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        50,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        32,
        "INPUT.MIN_SIZE_TEST",
        96,
        "INPUT.MAX_SIZE_TEST",
        128,
    ]
    if depth in (18, 34):
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    return opts


# The demo dataset of the tests: the demo's generator and files, fewer images (the demo's 400 / 50
# cost seconds to generate, and every evaluation in a test would run on 50 images).
SMALL_DEMO_DATA = dict(num_train=12, num_val=6)


def shared_datasets_dir(tmp_path_factory) -> str:
    """One ``NONLOCAL_DET_DATASETS`` folder for the whole test session, holding the demo dataset
    (:data:`SMALL_DEMO_DATA`) where the demo looks for it: made once, whichever test needs it
    first (generation is idempotent)."""
    path = tmp_path_factory.getbasetemp() / "nl_datasets"
    path.mkdir(exist_ok=True)
    generate_synthetic_coco(
        os.path.join(path, f"synthetic_coco_v{SYNTHETIC_DATASET_VERSION}"), **SMALL_DEMO_DATA
    )
    return str(path)


def train_cfg(config_file: str, opts=()):
    """The unfrozen config as ``train_net.py``'s setup makes it before its checks: the file and
    overrides, the CPU without CUDA, ``DATASETS.*_JSON`` files checked and taken into account."""
    cfg = get_nonlocal_cfg(config_file, opts)
    fall_back_to_cpu(cfg)
    configure_coco_json_datasets(cfg)
    return cfg


def lazy_demo_cfg(output_dir, *overrides: str):
    """The demo's LazyConfig on the CPU into ``output_dir``, 2 images a step, no
    data-loader workers, and ``overrides`` (``key=value``)."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(DEMO_LAZY)
    return LazyConfig.apply_overrides(
        cfg,
        [
            f"train.output_dir={output_dir}",
            "train.device=cpu",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            *overrides,
        ],
    )
