"""NonLocalKRCNNHead: structure, identity at initialisation, baseline checkpoints, errors."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_keypoint_head
from utils import load_cfg, small_opts

from nonlocal_det import NonLocalBlock

SHAPE = ShapeSpec(channels=32, height=14, width=14)


def head_cfg(name="NonLocalKRCNNHead", opts=()):
    cfg = load_cfg(None, ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (48,) * 8, *opts])
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = name
    return cfg


def test_blocks_after_every_second_conv():
    head = build_keypoint_head(head_cfg(), SHAPE)
    names = [n for n, _ in head.named_children()]
    for k in (2, 4, 6, 8):
        assert names.index(f"nonlocal{k}") == names.index(f"conv_fcn_relu{k}") + 1
    blocks = head.nonlocal_blocks()
    assert len(blocks) == 4 and all(isinstance(b, NonLocalBlock) for b in blocks)
    assert {(b.in_channels, b.inner_channels) for b in blocks} == {(48, 24)}
    assert names[-1] == "score_lowres"


def test_configurable_positions_and_channels():
    cfg = head_cfg(
        opts=[
            "MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS",
            [1, 3],
            "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS",
            (16, 32, 64),
            "MODEL.NONLOCAL.PAIRWISE",
            "concatenation",
        ]
    )
    head = build_keypoint_head(cfg, SHAPE)
    got = {
        n: (m.in_channels, m.inner_channels, m.pairwise)
        for n, m in head.named_children()
        if isinstance(m, NonLocalBlock)
    }
    assert got == {"nonlocal1": (16, 8, "concatenation"), "nonlocal3": (64, 32, "concatenation")}


def test_identity_at_init_despite_parent_reinitialisation():
    torch.manual_seed(0)
    head = build_keypoint_head(head_cfg(), SHAPE)
    torch.manual_seed(0)
    base = build_keypoint_head(head_cfg("KRCNNConvDeconvUpsampleHead"), SHAPE)
    for b in head.nonlocal_blocks():
        assert torch.count_nonzero(b.out.weight) == 0  # W_z stayed zero
        assert b.theta.weight.std() < 0.05  # normal(0, 0.01), not kaiming
    # Same seed: the parent's weights are untouched by the blocks, outputs are identical.
    x = torch.randn(5, 32, 14, 14)
    assert torch.equal(head.layers(x), base.layers(x))


def test_blocks_learn():
    head = build_keypoint_head(head_cfg(), SHAPE)
    x = torch.randn(4, 32, 14, 14)
    head.layers(x).square().mean().backward()
    for b in head.nonlocal_blocks():
        assert b.out.weight.grad.abs().sum() > 0


def test_baseline_keypoint_checkpoint_loads_and_predicts_identically(tmp_path):
    opts = small_opts(depth=18) + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    torch.manual_seed(1)
    base = build_model(load_cfg("keypoint_rcnn_R50.yaml", opts)).eval()
    DetectionCheckpointer(base, save_dir=str(tmp_path)).save("baseline")
    torch.manual_seed(2)
    nl = build_model(load_cfg("keypoint_rcnn_R50_NL.yaml", opts)).eval()
    ckpt = torch.load(tmp_path / "baseline.pth", weights_only=False)
    result = DetectionCheckpointer(nl)._load_model(ckpt)
    missing = set(result.missing_keys)
    assert missing and all(".nonlocal" in k for k in missing)
    assert {k.split(".nonlocal")[0] for k in missing} == {
        "backbone.bottom_up.res4",
        "roi_heads.keypoint_head",
    }
    assert not result.unexpected_keys
    torch.manual_seed(3)
    image = (torch.rand(3, 96, 128) * 255).round()
    with torch.no_grad():
        out_b = base([{"image": image}])[0]["instances"]
        out_n = nl([{"image": image}])[0]["instances"]
    assert len(out_b) > 0
    assert torch.equal(out_b.pred_boxes.tensor, out_n.pred_boxes.tensor)
    assert torch.equal(out_b.pred_keypoints, out_n.pred_keypoints)
    assert torch.equal(out_b.pred_keypoint_heatmaps, out_n.pred_keypoint_heatmaps)


@pytest.mark.parametrize("blocks", [[0], [9], [2, 2], [1.5]])
def test_bad_positions_name_the_key(blocks):
    cfg = head_cfg(opts=["MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS", blocks])
    with pytest.raises(ValueError) as err:
        build_keypoint_head(cfg, SHAPE)
    msg = str(err.value)
    assert "MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS" in msg and "1..8" in msg and str(blocks) in msg


@pytest.mark.parametrize("block_type", ["global_context", "criss_cross", "generalized_attention"])
def test_other_block_types_in_the_head_start_as_the_identity(block_type):
    from nonlocal_det.layers import BLOCK_TYPES

    cfg = head_cfg(opts=["MODEL.NONLOCAL.TYPE", block_type])
    torch.manual_seed(0)
    head = build_keypoint_head(cfg, SHAPE)
    torch.manual_seed(0)
    base = build_keypoint_head(head_cfg("KRCNNConvDeconvUpsampleHead"), SHAPE)
    blocks = head.nonlocal_blocks()
    assert len(blocks) == 4 and all(isinstance(b, BLOCK_TYPES[block_type]) for b in blocks)
    x = torch.randn(3, 32, 14, 14)
    with torch.no_grad():
        assert torch.equal(head.layers(x), base.layers(x))
