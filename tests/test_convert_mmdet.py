"""A converted mmdetection checkpoint computes what mmdetection's own model computes.

For R50 + GC r16 (Mask R-CNN), R50 + generalized attention '1111' and '0010' (Faster R-CNN) and
their baselines: mmdetection builds its model from its own config, random weights are drawn
(tests/mmdet_harness.py), the model is saved as mmdetection saves it (the 2.x or 3.x layout,
config text in ``meta``), ``python -m nonlocal_det.tools.convert_mmdet`` converts it for our
``configs/mmdet`` config, and both models run on the same image: the normalised input,
P2-P6, the RPN proposals, every detection before the cut to the best N, and the final boxes,
scores, classes and masks are compared. Then the attention picture of a converted GC block,
and the command's refusals (nothing written).
"""

import os

import cv2
import mmdet_harness as H
import numpy as np
import pytest
import torch
from detectron2.modeling import GeneralizedRCNN, build_model
from utils import CONFIGS

from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.layers import GlobalContextBlock
from nonlocal_det.tools import convert_mmdet, visualize
from nonlocal_det.tools.warm_start import load_and_report

GC = "mask_rcnn_R50_GC_r16.yaml"
# our config -> the layout mmdetection's checkpoint is saved in (its config: H.PUBLISHED)
EQUIVALENT = {
    GC: "3.x",
    "mask_rcnn_R50.yaml": "2.x",
    "faster_rcnn_R50_GA_1111.yaml": "2.x",
    "faster_rcnn_R50_GA_0010.yaml": "3.x",
    "faster_rcnn_R50.yaml": "3.x",
}
PROPOSALS, DETECTIONS = 200, 10  # both models, to keep the heads cheap on the CPU
OPTS = [
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    str(PROPOSALS),
    "TEST.DETECTIONS_PER_IMAGE",
    str(DETECTIONS),
]
FEATURE_RTOL, BOX_ATOL, SCORE_ATOL = 1e-5, 1e-3, 1e-4  # features: of the level's largest value
GC_BLOCK = ("layer3.3.context_block", "backbone.bottom_up.res4.3.nonlocal_block")


def _image(h: int = 200, w: int = 272) -> np.ndarray:
    """A BGR uint8 image with smooth colour regions and noise, not a multiple of 32 (padding)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


@torch.no_grad()
def _run_detectron2(model: GeneralizedRCNN, image: np.ndarray) -> dict:
    """The stages of ``GeneralizedRCNN.inference``, kept apart (RGB input, as the config says)."""
    rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))).float()
    inputs = [{"image": rgb, "height": image.shape[0], "width": image.shape[1]}]
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features)
    predictor = model.roi_heads.box_predictor
    topk, predictor.test_topk_per_image = predictor.test_topk_per_image, -1
    ranked = model.roi_heads._forward_box(features, proposals)[0]
    predictor.test_topk_per_image = topk
    results, _ = model.roi_heads(images, features, proposals)
    final = GeneralizedRCNN._postprocess(results, inputs, images.image_sizes)[0]["instances"]
    out = {
        "inputs": images.tensor,
        "features": [features[f"p{i}"] for i in range(2, 7)],
        "proposals": proposals[0].proposal_boxes.tensor,
        "proposal_scores": proposals[0].objectness_logits.sigmoid(),
        "ranked": (ranked.pred_boxes.tensor, ranked.scores, ranked.pred_classes),
        "boxes": final.pred_boxes.tensor,
        "scores": final.scores,
        "labels": final.pred_classes,
    }
    if final.has("pred_masks"):
        out["masks"] = final.pred_masks
    return out


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """``equivalence(config)``: mmdetection's and the converted model's outputs, the two
    checkpoints and what loading reported; each model pair built once."""
    cache = {}

    def get(ours: str) -> dict:
        if ours not in cache:
            theirs, layout = H.PUBLISHED[ours], EQUIVALENT[ours]
            image = _image()
            cfg = H.load_config(theirs, PROPOSALS, DETECTIONS)
            model = H.build(cfg)
            H.randomize(model, image)
            caught = []
            if ours == GC:  # the input of one GC block and mmcv's attention map on it
                block = model.backbone.get_submodule(GC_BLOCK[0])
                block.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
            expected = H.run(model, image)
            if caught:
                with torch.no_grad():
                    x = caught[0]
                    att = block.conv_mask(x).flatten(1).softmax(1).reshape(x.shape[-2:])
                expected["gc_block"] = (x, att)
            folder = tmp_path_factory.mktemp(ours[:-5])
            source, target = str(folder / "mmdet.pth"), str(folder / "detectron2.pth")
            H.save_like_mmdetection(model, cfg, source, layout)
            del model
            config = os.path.join(CONFIGS, "mmdet", ours)
            assert convert_mmdet.main([source, target, "--config-file", config, *OPTS]) == 0
            d2_cfg = get_nonlocal_cfg(config, OPTS + ["MODEL.DEVICE", "cpu"])
            d2 = build_model(d2_cfg).eval()
            report = load_and_report(d2, target)
            cache[ours] = dict(
                expected=expected,
                got=_run_detectron2(d2, image),
                report=report,
                image=image,
                source=source,
                target=target,
            )
        return cache[ours]

    return get


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("ours", sorted(EQUIVALENT))
def test_converted_model_loads_every_tensor(equivalence, ours):
    report = equivalence(ours)["report"]
    assert report == {"missing": [], "unexpected": [], "wrong_shape": []}


@pytest.mark.parametrize("ours", sorted(EQUIVALENT))
def test_same_input_and_features(equivalence, ours):
    r = equivalence(ours)
    exp, got = r["expected"], r["got"]
    assert torch.equal(got["inputs"], exp["inputs"])  # RGB, mmdetection's mean/std, padding
    rel = [_relative(g, e) for g, e in zip(got["features"], exp["features"])]
    print(f"{ours}: P2-P6 max |diff| / max |mmdetection| = {max(rel):.2e}")
    assert max(rel) <= FEATURE_RTOL, rel


def _same_ranking(got_boxes, got_scores, exp_boxes, exp_scores, what, labels=None):
    """The same boxes in the same order up to the order of equal scores (random weights leave
    ties: mmdetection ranks the objectness sigmoid, Detectron2 the logit, and a sort orders
    equal keys as it will); ``labels`` (got, expected): boxes of the same class only. Returns
    (max box difference, max score difference, how many were reordered)."""
    assert got_boxes.shape == exp_boxes.shape, what
    gap = (got_boxes[:, None, :] - exp_boxes[None, :, :]).abs().amax(2)
    if labels is not None:
        gap[labels[0][:, None] != labels[1][None, :]] = float("inf")
    match = gap.argmin(1)  # the mmdetection box of each Detectron2 box
    assert torch.equal(match.sort().values, torch.arange(len(exp_boxes))), f"{what}: other boxes"
    moved = (match != torch.arange(len(match))).nonzero().flatten()
    ties = (exp_scores[match[moved]] - exp_scores[moved]).abs()
    # equal within the score tolerance: GA '1111' sums its energy terms in another order than mmcv
    assert (
        ties <= SCORE_ATOL
    ).all(), f"{what}: reordered without a tie of scores: {moved.tolist()}"
    box_diff = gap[torch.arange(len(match)), match].max().item()
    score_diff = (got_scores - exp_scores[match]).abs().max().item()
    return box_diff, score_diff, len(moved)


@pytest.mark.parametrize("ours", sorted(EQUIVALENT))
def test_same_rpn_proposals(equivalence, ours):
    r = equivalence(ours)
    exp, got = r["expected"], r["got"]
    assert len(got["proposals"]) == len(exp["proposals"]) == PROPOSALS
    boxes, scores, moved = _same_ranking(
        got["proposals"], got["proposal_scores"], exp["proposals"], exp["proposal_scores"], ours
    )
    print(
        f"{ours}: the same {PROPOSALS} proposals ({moved} swapped among equal scores), max "
        f"|diff| {boxes:.2e} px, objectness {scores:.2e}"
    )
    assert boxes <= BOX_ATOL and scores <= SCORE_ATOL


@pytest.mark.parametrize("ours", sorted(EQUIVALENT))
def test_same_detections_before_and_after_the_cut(equivalence, ours):
    """Every detection above the score threshold after NMS is compared before the cut to the
    best N (random weights can leave ties of scores there), then the N kept, with masks."""
    r = equivalence(ours)
    exp, got = r["expected"], r["got"]
    (gb, gs, gl), (eb, es, el) = got["ranked"], exp["ranked"]
    assert len(gs) == len(es) > DETECTIONS
    boxes, scores, moved = _same_ranking(gb, gs, eb, es, ours, labels=(gl, el))
    cut = torch.sort(es, descending=True).values
    assert cut[DETECTIONS - 1] - cut[DETECTIONS] > SCORE_ATOL, "a tie at the cut"
    assert len(got["scores"]) == len(exp["scores"]) == DETECTIONS
    assert torch.equal(got["labels"], exp["labels"])
    box_diff = (got["boxes"] - exp["boxes"]).abs().max().item()
    score_diff = (got["scores"] - exp["scores"]).abs().max().item()
    line = (
        f"{ours}: {len(gs)} detections before the cut ({moved} swapped among equal scores; max "
        f"|diff| boxes {boxes:.2e} px, scores {scores:.2e}); {DETECTIONS} kept: same classes, "
        f"boxes {box_diff:.2e} px, scores {score_diff:.2e}"
    )
    assert max(boxes, box_diff) <= BOX_ATOL and max(scores, score_diff) <= SCORE_ATOL
    if "masks" in exp:
        differing = (got["masks"] != exp["masks"]).sum().item()
        line += f", mask pixels differing: {differing} of {exp['masks'].numel()}"
        assert differing == 0
    print(line)


def test_attention_picture_of_a_converted_gc_block(equivalence, tmp_path):
    """``visualize`` draws the map of one converted block, and that block's map is mmcv's
    ``ContextBlock`` attention on the same input."""
    r = equivalence(GC)
    image_path, out = str(tmp_path / "image.png"), str(tmp_path / "attention.png")
    cv2.imwrite(image_path, r["image"])
    argv = ["--config-file", os.path.join(CONFIGS, "mmdet", GC), "--input", image_path]
    argv += ["--output", out, "--block", GC_BLOCK[1], "--num-queries", "1", *OPTS]
    argv += ["INPUT.MIN_SIZE_TEST", "200", "MODEL.WEIGHTS", r["target"]]
    assert visualize.main(argv) is None  # a GC block: a heat map, no arrows
    assert min(cv2.imread(out).shape[:2]) >= 512
    x, mmcv_map = r["expected"]["gc_block"]
    weights = torch.load(r["target"], weights_only=True)["model"]
    prefix = GC_BLOCK[1] + "."
    block = GlobalContextBlock(1024, 1 / 16)
    block.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    np.testing.assert_allclose(visualize.context_map(block, x), mmcv_map, rtol=1e-5, atol=1e-9)


def test_refusals_write_nothing(equivalence, tmp_path, capsys):
    source = equivalence(GC)["source"]
    target = str(tmp_path / "out.pth")
    wrong_ratio = os.path.join(CONFIGS, "mmdet", "mask_rcnn_R50_GC_r4.yaml")
    assert convert_mmdet.main([source, target, "--config-file", wrong_ratio, *OPTS]) == 1
    err = capsys.readouterr().err
    assert "MODEL.NONLOCAL.GC.RATIO: the config has 0.25, the checkpoint needs 0.0625" in err
    config = os.path.join(CONFIGS, "mmdet", GC)
    classes = ["MODEL.ROI_HEADS.NUM_CLASSES", "20"]
    assert convert_mmdet.main([source, target, "--config-file", config, *OPTS, *classes]) == 1
    err = capsys.readouterr().err
    assert "MODEL.ROI_HEADS.NUM_CLASSES: the config has 20, the checkpoint needs 80" in err
    missing = str(tmp_path / "missing.pth")
    assert convert_mmdet.main([missing, target]) == 1
    assert f"{missing} not converted: no such file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no file, no temporary file


def test_a_checkpoint_without_config_needs_assume_defaults(equivalence):
    state, meta = convert_mmdet.load_mmdet_checkpoint(equivalence(GC)["source"])
    assert "cfg" in meta and "mmengine_version" in meta
    with pytest.raises(convert_mmdet.UnsupportedCheckpoint, match="--assume-defaults"):
        convert_mmdet.convert_checkpoint(state, {})
    config = os.path.join(CONFIGS, "mmdet", GC)
    converted, _, notes = convert_mmdet.convert_checkpoint(state, {}, config, assume_defaults=True)
    assert notes == ["no config in the checkpoint: mmdetection's R-CNN defaults assumed"]
    target = torch.load(equivalence(GC)["target"], weights_only=True)["model"]
    assert converted.keys() == target.keys()
    assert all(torch.equal(converted[k], target[k]) for k in target)
