"""NonLocalKRCNNHead: structure, identity at initialisation, baseline checkpoints, errors, keypoint
decoding of heatmaps that Detectron2's decoding asserts on."""

import math
import os
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_keypoint_head
from detectron2.structures import Boxes, Instances, heatmaps_to_keypoints
from utils import REPO, load_cfg, small_opts

from nonlocal_det import NonLocalBlock
from nonlocal_det.modeling.keypoint_head import DECODABLE_SPREAD, decodable_heatmaps

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


# Keypoint decoding. Detectron2's heatmaps_to_keypoints asserts when a heatmap's bicubic upsampling
# overshoots every logit of the heatmap by more than float32's exp range (~104): the scores'
# normaliser underflows to 0 and 0/0 gives NaN. A 2x2 plateau of 0 in a field of -400, decoded in
# a 56x56 box, does it (measured: -250 does not, -300 does).
def plateau_maps(low=-400.0, n=1, k=1, size=14):
    maps = torch.full((n, k, size, size), low)
    maps[..., 6:8, 6:8] = 0.0
    return maps


def decode_with(head, maps, boxes, image_size=(200, 200)):
    """``head``'s inference on heatmaps ``maps`` of the boxes ``boxes`` (one image)."""
    head.eval()
    head.layers = lambda x: maps  # the head's layers give these heatmaps
    inst = Instances(image_size, pred_boxes=Boxes(boxes))
    with torch.no_grad():
        return head(None, [inst])[0]


def detectron2_decode(maps, boxes):
    """(x, y, score) of each keypoint as Detectron2's keypoint head gives them."""
    return heatmaps_to_keypoints(maps, boxes)[:, :, [0, 1, 3]]


def kp_head(name="NonLocalKRCNNHead", k=5):
    cfg = head_cfg(
        name,
        ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (8, 8), "MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS", [2]],
    )
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = k
    torch.manual_seed(0)
    return build_keypoint_head(cfg, SHAPE)


def test_detectron2_decoding_asserts_on_the_plateau_and_the_head_decodes_it():
    maps, boxes = plateau_maps(), torch.tensor([[10.0, 20.0, 66.0, 76.0]])
    with pytest.raises(AssertionError):
        heatmaps_to_keypoints(maps, boxes)
    with pytest.raises(AssertionError):
        decode_with(kp_head("KRCNNConvDeconvUpsampleHead", k=1), maps, boxes)
    out = decode_with(kp_head(k=1), maps, boxes)
    x, y, score = out.pred_keypoints[0, 0].tolist()
    # The plateau covers heatmap cells 6..7 of 14: pixels 24..32 of the 56-pixel box.
    assert 10 + 24 <= x <= 10 + 32 and 20 + 24 <= y <= 20 + 32
    assert 0 < score < float("inf")
    assert torch.equal(out.pred_keypoint_heatmaps, maps)  # the head's own heatmaps are kept


def test_head_decodes_as_detectron2_wherever_detectron2_decodes():
    """Random heatmaps of every scale (logit ranges 1e-6 to 1e3), random boxes, several images:
    every keypoint Detectron2 decodes (on its own) gets Detectron2's (x, y, score) bit for bit;
    the others (their image's decoding asserts in Detectron2) a finite score, inside their box,
    at the maximum of the upsampled heatmap."""
    g = torch.Generator().manual_seed(0)
    r, k, s = 40, 5, 14
    scale = 10 ** (torch.rand(r, k, 1, 1, generator=g) * 9 - 6)
    maps = torch.randn(r, k, s, s, generator=g) * scale + torch.randn(r, k, 1, 1, generator=g) * 30
    maps[7, 2], maps[30, 0] = plateau_maps()[0, 0], plateau_maps(-1e4)[0, 0]
    xy = torch.rand(r, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 120 + 0.5], 1)
    head = kp_head()
    sizes = [12, 1, 0, 27]  # instances per image
    head.layers = lambda x: maps
    instances = []
    for part in boxes.split(sizes):
        instances.append(Instances((300, 300), pred_boxes=Boxes(part)))
    with torch.no_grad():
        out = head.eval()(None, instances)
    got = torch.cat([i.pred_keypoints for i in out])
    assert torch.equal(torch.cat([i.pred_keypoint_heatmaps for i in out]), maps)
    decoded = failed = 0
    for i in range(r):
        for j in range(k):
            try:
                ref = detectron2_decode(maps[i : i + 1, j : j + 1], boxes[i : i + 1])[0, 0]
            except AssertionError:
                failed += 1
                x0, y0, x1, y1 = boxes[i].tolist()
                x, y, score = got[i, j].tolist()
                assert x0 <= x <= x1 and y0 <= y <= y1 and 0 < score < float("inf"), (i, j)
                up = F.interpolate(
                    maps[i : i + 1, j : j + 1],
                    size=(math.ceil(y1 - y0), math.ceil(x1 - x0)),
                    mode="bicubic",
                    align_corners=False,
                )[0, 0]
                col = round((x - x0) * up.shape[1] / (x1 - x0) - 0.5)
                row = round((y - y0) * up.shape[0] / (y1 - y0) - 0.5)
                assert up[row, col] >= up.max() - 1e-5 * (up.max() - up.min()), (i, j)
                continue
            decoded += 1
            assert torch.equal(got[i, j], ref), (i, j)
    assert failed >= 3 and decoded > 150, (failed, decoded)  # both kinds are covered


def test_head_decodes_a_batch_without_trouble_as_detectron2():
    """Ordinary heatmaps: the head's keypoints are exactly Detectron2's head's (same weights)."""
    x = torch.randn(6, 32, 14, 14)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 40.0], [5.0, 5.0, 60.5, 33.0]] * 3)
    ours, base = kp_head(), kp_head("KRCNNConvDeconvUpsampleHead")
    base.load_state_dict({k: v for k, v in ours.state_dict().items() if "nonlocal" not in k})
    ours.nonlocal_blocks()[0].out.weight.data.zero_()  # the block adds nothing: same heatmaps
    outs = []
    for head in (ours, base):
        inst = [
            Instances((100, 100), pred_boxes=Boxes(boxes[:4])),
            Instances((90, 90), pred_boxes=Boxes(boxes[4:])),
        ]
        with torch.no_grad():
            outs.append(head.eval()(x, inst))
    for a, b in zip(*outs):
        assert torch.equal(a.pred_keypoints, b.pred_keypoints)
        assert torch.equal(a.pred_keypoint_heatmaps, b.pred_keypoint_heatmaps)


def test_decodable_heatmaps_changes_only_the_maps_beyond_the_spread():
    maps = torch.randn(3, 4, 8, 8)
    maps[1, 2] *= 1e3
    maps[2, 0, 0, 0], maps[2, 1, 0, 0], maps[2, 3, 1, 1] = float("nan"), float("inf"), float("-inf")
    out = decodable_heatmaps(maps)
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[1, 2] = bad[2, 0] = bad[2, 1] = bad[2, 3] = True
    assert torch.equal(out[~bad], maps[~bad])
    flat = out[bad].flatten(1)
    assert torch.isfinite(flat).all()
    assert torch.equal(flat.amax(1), torch.zeros(4))
    assert (flat.amin(1) >= -DECODABLE_SPREAD).all()
    assert flat[0].argmax() == maps[1, 2].argmax()  # a finite map: its maximum stays where it was
    ordinary = torch.randn(2, 3, 5, 5)
    assert decodable_heatmaps(ordinary) is ordinary  # nothing to change: no copy


def test_no_test_or_command_turns_asserts_off():
    """Tests, benchmarks and scripts run Python as users do: with its asserts (and so with
    Detectron2's checks)."""
    flag = "PYTHON" + "OPTIMIZE"
    found = []
    for top in ("tests", "benchmarks", "scripts", "tools", "nonlocal_det", "examples", "demo"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh", ".yaml", ".cfg", ".toml")):
                    path = os.path.join(root, name)
                    with open(path, errors="replace") as f:
                        if flag in f.read():
                            found.append(os.path.relpath(path, REPO))
    for name in ("Makefile", "pyproject.toml", "train_net.py"):
        path = os.path.join(REPO, name)
        if os.path.isfile(path) and flag in open(path).read():
            found.append(name)
    assert not found


class _HeadOnBoxes(torch.nn.Module):
    """The keypoint head on one image's boxes: tensors in and out (for scripting)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inst = Instances((100, 100))
        inst.pred_boxes = Boxes(boxes)
        out = self.head(x, [inst])[0]
        return out.pred_keypoints, out.pred_keypoint_heatmaps


def test_head_scripts_as_detectron2s_inference():
    """Scripted (TorchScript has no ``try``), the head runs Detectron2's decoding: the same
    keypoints and heatmaps as in eager mode on ordinary heatmaps."""
    from detectron2.export import scripting_with_instances

    cfg = head_cfg(opts=["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (8, 8)])
    cfg.MODEL.NONLOCAL.ENABLED = False  # the head's forward only (test_export: with blocks)
    torch.manual_seed(0)
    head = build_keypoint_head(cfg, SHAPE).eval()
    x = torch.randn(3, 32, 14, 14)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 40.0], [5.0, 5.0, 60.5, 33.0], [1.0, 2.0, 9.0, 9.5]])
    fields = {"pred_boxes": Boxes, "pred_keypoints": torch.Tensor}
    fields["pred_keypoint_heatmaps"] = torch.Tensor
    with torch.no_grad():
        ref = _HeadOnBoxes(head)(x, boxes)
        out = scripting_with_instances(_HeadOnBoxes(head).eval(), fields)(x, boxes)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
