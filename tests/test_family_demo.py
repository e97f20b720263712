"""Every block type trains on the demo data and is evaluated, by command-line overrides of the demo
config only (``train_net.py``, as a user runs it; a few iterations of a smaller model)."""

import json

import pytest
from subproc import DEMO, TINY, env_for, run_train_net
from utils import shared_datasets_dir

# The demo's ResNet-18 has BasicBlocks (2 convs): GC and generalized attention go after conv2 there,
# in every block of its last stages (the demo has no res5: res3-res4 for GC, res4 for GA).
EVERY = ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES4_BLOCKS", "[0, 1]"]
OVERRIDES = {
    "simplified": ["MODEL.NONLOCAL.POSITION", "after_add", "MODEL.NONLOCAL.SNL.ZERO_INIT", "True"],
    "global_context": EVERY
    + ["MODEL.NONLOCAL.RES3_BLOCKS", "[0, 1]", "MODEL.NONLOCAL.POSITION", "after_conv2"]
    + ["MODEL.NONLOCAL.GC.RATIO", "0.25"],
    "disentangled": [
        "MODEL.NONLOCAL.POSITION",
        "after_add",
        "MODEL.NONLOCAL.DNL.ZERO_INIT",
        "True",
    ],
    "criss_cross": [],
    "generalized_attention": EVERY + ["MODEL.NONLOCAL.POSITION", "after_conv2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("block_type", sorted(OVERRIDES))
def test_block_type_trains_and_evaluates_on_the_demo_data(block_type, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo_{block_type}")
    args = ["--config-file", DEMO, *TINY, "MODEL.KEYPOINT_ON", "False"]
    args += ["MODEL.NONLOCAL.TYPE", block_type, *OVERRIDES[block_type]]
    args += ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", out]
    datasets = shared_datasets_dir(tmp_path_factory)
    log = run_train_net(args, env_for(datasets), timeout=600)
    assert f"Blocks ({block_type}," in log
    records = [json.loads(line) for line in open(out / "metrics.json")]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, no NaN
    for task in ("bbox", "segm"):
        assert f"copypaste: Task: {task}" in log, task  # Detectron2's COCO evaluation ran
