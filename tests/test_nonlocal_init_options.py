"""The non-local block's initialisation options at the model level (issue 22): the config keys
reach the block, the COCO configs keep the authors' initialisation, and a baseline checkpoint
predicts the same with an option on (exactly where W_z starts at zero)."""

import glob
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from utils import CONFIGS, PROBE_YAML, load_cfg

from nonlocal_det import NonLocalBlock
from nonlocal_det.modeling import check_model_config

PROBE = PROBE_YAML
SMALL = ["MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64]
SMALL += ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128]
OPTIONS = {
    "he": ["MODEL.NONLOCAL.THETA_PHI_INIT", "he"],
    "lecun": ["MODEL.NONLOCAL.THETA_PHI_INIT", "lecun"],
    "whiten": ["MODEL.NONLOCAL.WHITEN", True],
    "no_scale": ["MODEL.NONLOCAL.USE_SCALE", False],
    "out_init_std": ["MODEL.NONLOCAL.OUT_INIT_STD", 0.01],
}


def _block(model) -> NonLocalBlock:
    (block,) = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    return block


def test_config_keys_reach_the_block():
    cfg = load_cfg(PROBE, SMALL + OPTIONS["he"] + OPTIONS["whiten"] + OPTIONS["out_init_std"])
    block = _block(build_model(cfg))
    assert (block.theta_phi_init, block.whiten, block.out_init_std) == ("he", True, 0.01)
    assert block.out.weight.std().item() == pytest.approx(0.01, rel=0.05)
    bad = load_cfg(PROBE, SMALL + ["MODEL.NONLOCAL.THETA_PHI_INIT", "xavier"])
    with pytest.raises(ValueError, match=r"MODEL\.NONLOCAL\.THETA_PHI_INIT='xavier'.*'lecun'"):
        check_model_config(bad)
    bad = load_cfg(PROBE, SMALL + OPTIONS["out_init_std"] + ["MODEL.NONLOCAL.NORM", "GN"])
    with pytest.raises(ValueError, match=r"OUT_INIT_STD=0\.01.*MODEL\.NONLOCAL\.NORM='GN'"):
        check_model_config(bad)


def test_every_config_keeps_the_authors_initialisation():
    names = [
        os.path.relpath(p, CONFIGS)
        for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    ]
    assert len(names) > 10
    for name in names:
        nl = load_cfg(name).MODEL.NONLOCAL
        assert (nl.THETA_PHI_INIT, nl.OUT_INIT_STD, nl.WHITEN) == ("normal", 0.0, False), name


def _matched(expected, got, eps: float, top: int = 20) -> bool:
    """Each of the ``top`` best detections of ``expected`` has one in ``got`` of its class, its
    score within ``eps`` and its box within ``eps`` x 100 px (near-tied scores may swap places,
    the tail of the list change)."""
    for i in range(min(top, len(expected))):
        box, score, cls = (
            expected.pred_boxes.tensor[i],
            expected.scores[i],
            expected.pred_classes[i],
        )
        same = (got.pred_classes == cls) & ((got.scores - score).abs() <= eps)
        if not ((got.pred_boxes.tensor[same] - box).abs().amax(dim=1) <= eps * 100).any():
            return False
    return True


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A baseline model (no block) and its checkpoint."""
    torch.manual_seed(1)
    base = build_model(load_cfg(PROBE, SMALL + ["MODEL.NONLOCAL.ENABLED", False])).eval()
    path = tmp_path_factory.mktemp("baseline")
    DetectionCheckpointer(base, save_dir=str(path)).save("baseline")
    base.roi_heads.box_predictor.test_score_thresh = 0.0  # many detections from an untrained net
    return base, str(path / "baseline.pth")


# lecun and use_scale take the paths of he and the default; the block tests cover their identity
@pytest.mark.parametrize("option", ["he", "whiten", "out_init_std"])
def test_baseline_checkpoint_predicts_the_same(baseline, option):
    """A baseline checkpoint loaded into the model with a fresh block predicts what the baseline
    predicts: exactly with W_z = 0; with W_z ~ N(0, 0.01^2) (eps of this option), the FPN
    features within 2% of their largest value, and each of the 20 best detections found with
    its class, its score within 1e-3 and its box within 0.1 px."""
    base, checkpoint = baseline
    torch.manual_seed(2)
    model = build_model(load_cfg(PROBE, SMALL + OPTIONS[option])).eval()
    DetectionCheckpointer(model).load(checkpoint)
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    torch.manual_seed(3)
    image = (torch.rand(3, 96, 128) * 255).round()
    with torch.no_grad():
        expected = base([{"image": image}])[0]["instances"]
        got = model([{"image": image}])[0]["instances"]
        images = base.preprocess_image([{"image": image}]).tensor
        f_base, f_model = base.backbone(images), model.backbone(images)
    assert len(expected) >= 20
    feature_err = max((f_model[k] - f_base[k]).abs().max() / f_base[k].abs().max() for k in f_base)
    if option != "out_init_std":
        assert feature_err == 0
        assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
        assert torch.equal(got.scores, expected.scores)
        return
    assert 0 < feature_err <= 2e-2  # not the identity (the test would catch a zero W_z)
    assert _matched(expected, got, 1e-3)


def test_space_time_view_keeps_whitening():
    """The clip view of a whitened block attends as the block does (one frame)."""
    from nonlocal_det.tools.visualize import space_time_view

    torch.manual_seed(0)
    block = NonLocalBlock(8, subsample=False, theta_phi_init="he", whiten=True).eval()
    x = torch.randn(1, 8, 4, 5).relu() + 0.5
    queries = torch.tensor([0, 7, 19])
    with torch.no_grad():
        expected = block.attention_for_queries(x, queries)
        got = space_time_view(block).attention_for_queries(x[:, :, None], queries)
    torch.testing.assert_close(got[:, :, 0], expected)
