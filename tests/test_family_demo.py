"""Every block type trains on the demo data and is evaluated, by command-line overrides of the demo
config only (the demo project's ``train_net.py``; a few iterations of a smaller model; the five
trainings one after the other in one process)."""

import json
import subprocess
import sys

import pytest
from subproc import DEMO, TINY, env_for
from utils import DEMO_DIR, REPO, shared_datasets_dir

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


# One process trains them all (the demo project's train_net.py: nonlocal_det's trainer with the
# demo's keys and datasets, its cli as the script runs it with one process): one start-up instead
# of five. Each run's output is framed by marker lines.
DRIVER = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import train_net
for name, args in json.loads(sys.argv[2]).items():
    print(f"@@@ begin {name}", flush=True)
    try:
        train_net.cli(args)
        print(f"@@@ end {name} ok", flush=True)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print(f"@@@ end {name} failed", flush=True)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs, outs = {}, {}
    for block_type, overrides in OVERRIDES.items():
        outs[block_type] = out = tmp_path_factory.mktemp(f"demo_{block_type}")
        args = ["--config-file", DEMO, *TINY, "MODEL.KEYPOINT_ON", "False"]
        args += ["MODEL.NONLOCAL.TYPE", block_type, *overrides]
        args += ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(out)]
        runs[block_type] = args
    datasets = shared_datasets_dir(tmp_path_factory)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, DEMO_DIR, json.dumps(runs)],
        cwd=REPO,
        env=env_for(datasets),
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = {}
    for block_type in OVERRIDES:
        begin, end = f"@@@ begin {block_type}\n", f"@@@ end {block_type} "
        text = proc.stdout.split(begin, 1)[-1].split(end, 1)
        ok = len(text) == 2 and text[1].startswith("ok")
        logs[block_type] = (ok, text[0] + ("" if ok else proc.stderr[-3000:]))
    return logs, outs


@pytest.mark.slow
@pytest.mark.parametrize("block_type", sorted(OVERRIDES))
def test_block_type_trains_and_evaluates_on_the_demo_data(block_type, trained):
    logs, outs = trained
    ok, log = logs[block_type]
    assert ok, log[-5000:]
    assert f"Blocks ({block_type}," in log
    records = [json.loads(line) for line in open(outs[block_type] / "metrics.json")]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, no NaN
    for task in ("bbox", "segm"):
        assert f"copypaste: Task: {task}" in log, task  # Detectron2's COCO evaluation ran
