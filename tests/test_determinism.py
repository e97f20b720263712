"""The same SEED gives the same first-iteration losses on CPU (model initialisation, data order,
sampling of proposals and ROIs all seeded by train_net.py's setup); another seed changes them."""

import pytest
from coco_files import write_split
from subproc import DEMO, TINY

from nonlocal_det.engine import train as train_net


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("seed")), "train")


def _first_iteration_losses(data, out, seed):
    opts = ["DATASETS.TRAIN_JSON", data["json"], "DATASETS.TRAIN_IMAGES", data["images"], *TINY]
    opts += ["SOLVER.MAX_ITER", "1", "SEED", str(seed), "OUTPUT_DIR", str(out)]
    args = train_net.default_argument_parser().parse_args(["--config-file", DEMO, *opts])
    trainer = train_net.Trainer(train_net.setup(args))  # setup seeds every RNG from SEED
    trainer.train()
    return {k: h.latest() for k, h in trainer.storage.histories().items() if k.startswith("loss")}


def test_same_seed_same_first_iteration_losses(data, tmp_path):
    a = _first_iteration_losses(data, tmp_path / "a", 42)
    b = _first_iteration_losses(data, tmp_path / "b", 42)
    c = _first_iteration_losses(data, tmp_path / "c", 7)
    assert set(a) >= {"loss_cls", "loss_box_reg", "loss_mask", "loss_keypoint", "loss_rpn_cls"}
    assert a == b  # bit for bit
    assert a != c
