"""Running ``train_net.py`` as a user does, in a subprocess (shared by the end-to-end tests)."""

import os
import subprocess
import sys
from typing import List, Optional

from utils import DEMO_DIR, DEMO_YAML, REPO

DEMO = DEMO_YAML
TRAIN_NET = os.path.join(REPO, "train_net.py")
# The demo project's train_net.py: the same trainer with the demo's datasets, keys and heads.
DEMO_TRAIN_NET = os.path.join(DEMO_DIR, "train_net.py")
# A smaller, faster demo model; evaluation keeps every box of a barely trained model.
TINY = [
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(16, 16, 16, 16)",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip


def env_for(datasets_dir: str, threads: int = 1) -> dict:
    """The environment of a subprocess: the generated data under ``datasets_dir``, ``threads``
    threads."""
    return dict(
        os.environ,
        NONLOCAL_DET_DATASETS=str(datasets_dir),
        OMP_NUM_THREADS=str(threads),
    )


def command(args: List[str]) -> List[str]:
    """``train_net.py args``: the demo project's for a config of the demo project, as a user runs
    it."""
    args = [str(a) for a in args]
    demo = any(a.startswith(DEMO_DIR) for a in args)
    return [sys.executable, DEMO_TRAIN_NET if demo else TRAIN_NET, *args]


def run_train_net(args: List[str], env: dict, ok: Optional[bool] = True, timeout: int = 300) -> str:
    """Run ``train_net.py args``; returns stdout + stderr. ``ok``: expected success (None: any)."""
    proc = subprocess.run(
        command(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = proc.stdout + proc.stderr
    if ok is not None:
        assert (proc.returncode == 0) == ok, f"exit status {proc.returncode}:\n{log[-5000:]}"
    return log


def load_train_net():
    """``train_net.py`` imported as a module (for in-process ``setup`` / ``Trainer``)."""
    import importlib.util

    if "train_net" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_net", TRAIN_NET)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["train_net"] = module
    return sys.modules["train_net"]
