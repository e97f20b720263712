"""HeadSampledROIHeads: the mask and keypoint heads train on at most N foreground RoIs per image;
with 0 (the default) and at inference it is Detectron2's StandardROIHeads."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from utils import DEMO_YAML, load_cfg

from nonlocal_demo.roi_heads import HeadSampledROIHeads, subsample_per_image

SIZE, CHANNELS = 128, 16
SHAPES = {f"p{k}": ShapeSpec(channels=CHANNELS, stride=2**k) for k in range(2, 7)}


def heads_cfg(name="HeadSampledROIHeads", mask_rois=0, keypoint_rois=0):
    cfg = load_cfg(DEMO_YAML)
    cfg.MODEL.ROI_HEADS.NAME = name
    cfg.MODEL.ROI_MASK_HEAD.TRAIN_ROIS_PER_IMAGE = mask_rois
    cfg.MODEL.ROI_KEYPOINT_HEAD.TRAIN_ROIS_PER_IMAGE = keypoint_rois
    cfg.MODEL.ROI_HEADS.GATHER_ROI_ALIGN = False  # torchvision's, as StandardROIHeads (test_roi_align)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 48  # 24 foreground: more than the caps tested
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_roi_heads(cfg, SHAPES)


def inputs(seed=1):
    """Two images' features, proposals (60 jittered around the objects, 20 anywhere) and targets
    (two objects each, one of them with visible keypoints)."""
    g = torch.Generator().manual_seed(seed)
    features = {
        k: torch.randn(2, CHANNELS, SIZE // s.stride, SIZE // s.stride, generator=g)
        for k, s in SHAPES.items()
    }
    proposals, targets = [], []
    for _ in range(2):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]])
        gt = Instances((SIZE, SIZE))
        gt.gt_boxes = Boxes(boxes)
        gt.gt_classes = torch.tensor([0, 3])
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        gt.gt_masks = BitMasks(masks)
        kp = torch.zeros(2, 5, 3)
        kp[1, :, :2] = boxes[1, :2] + 10 * torch.arange(1, 6.0)[:, None]
        kp[1, :, 2] = 2  # object 0 has no visible keypoint
        gt.gt_keypoints = Keypoints(kp)
        targets.append(gt)
        near = boxes.repeat(30, 1) + 4 * torch.randn(60, 4, generator=g)
        anywhere = torch.rand(20, 2, generator=g) * SIZE / 2
        anywhere = torch.cat([anywhere, anywhere + 8 + torch.rand(20, 2, generator=g) * 50], 1)
        p = Instances((SIZE, SIZE))
        p.proposal_boxes = Boxes(torch.cat([near, anywhere]).clamp(0, SIZE))
        p.objectness_logits = torch.randn(80, generator=g)
        proposals.append(p)
    return features, proposals, targets


def record_rois(heads):
    """The instances each image gives the mask and keypoint heads, per forward."""
    seen = {"mask": [], "keypoint": []}
    for name in seen:
        head = getattr(heads, f"{name}_head")
        head.register_forward_pre_hook(lambda m, args, n=name: seen[n].append(list(args[1])))
    return seen


def train_losses(heads, seed=2, keypoints=True):
    """One training forward's losses; ``keypoints`` False: the targets without keypoints."""
    heads.train()
    features, proposals, targets = inputs()
    if not keypoints:
        for t in targets:
            t.remove("gt_keypoints")
    torch.manual_seed(seed)
    with EventStorage():
        _, losses = heads(None, features, proposals, targets)
    return losses


def test_zero_is_detectron2s_standard_roi_heads():
    ours, theirs = build(heads_cfg()), build(heads_cfg("StandardROIHeads"))
    assert isinstance(ours, HeadSampledROIHeads)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    a, b = train_losses(ours), train_losses(theirs)
    assert a.keys() == b.keys() and {"loss_mask", "loss_keypoint"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mask_rois,keypoint_rois", [(8, 4), (3, 0), (0, 2)])
def test_heads_train_on_at_most_n_foreground_rois_per_image(mask_rois, keypoint_rois):
    capped = build(heads_cfg(mask_rois=mask_rois, keypoint_rois=keypoint_rois))
    full = build(heads_cfg())
    seen_capped, seen_full = record_rois(capped), record_rois(full)
    train_losses(capped), train_losses(full)
    for name, cap in (("mask", mask_rois), ("keypoint", keypoint_rois)):
        (capped_images,), (full_images,) = seen_capped[name], seen_full[name]
        for got, every in zip(capped_images, full_images):
            assert len(every) > 8  # the uncapped head sees many foreground RoIs per image
            assert len(got) == (min(cap, len(every)) if cap else len(every))
            assert (got.gt_classes < 4).all()  # foreground only (4: background)
            if name == "keypoint":  # only RoIs with a visible keypoint (object 1's)
                assert (got.gt_keypoints.tensor[:, :, 2] > 0).any(1).all()
            # a subset of what Detectron2's head would see, in the same order
            every_boxes = [tuple(b) for b in every.proposal_boxes.tensor.tolist()]
            idx = [every_boxes.index(tuple(b)) for b in got.proposal_boxes.tensor.tolist()]
            assert idx == sorted(set(idx))


def test_the_cap_draws_other_rois_each_step_and_keeps_the_box_head():
    heads = build(heads_cfg(mask_rois=4, keypoint_rois=2))
    seen = record_rois(heads)
    first, second = train_losses(heads, seed=2), train_losses(heads, seed=3)
    boxes = [[x.proposal_boxes.tensor for x in step] for step in seen["mask"]]
    assert any(not torch.equal(a, b) for a, b in zip(*boxes))  # another random subset
    full = build(heads_cfg())
    box_losses = train_losses(full, seed=2)
    for k in ("loss_cls", "loss_box_reg"):  # the box head's RoIs and losses are unchanged
        assert torch.equal(first[k], box_losses[k]), k
    assert torch.isfinite(torch.stack(list(second.values()))).all()


def test_a_cap_of_a_head_that_is_off_is_ignored():
    cfg = heads_cfg(mask_rois=4, keypoint_rois=2)
    cfg.MODEL.KEYPOINT_ON = False  # the targets have no keypoints then
    heads = build(cfg)
    seen = []
    heads.mask_head.register_forward_pre_hook(lambda m, args: seen.append(list(args[1])))
    losses = train_losses(heads, keypoints=False)
    assert "loss_keypoint" not in losses and [len(x) for x in seen[0]] == [4, 4]


def test_inference_is_unchanged():
    capped = build(heads_cfg(mask_rois=2, keypoint_rois=1)).eval()
    full = build(heads_cfg("StandardROIHeads")).eval()
    features, proposals, _ = inputs()
    with torch.no_grad():
        a, _ = capped(None, features, proposals)
        b, _ = full(None, features, proposals)
    for x, y in zip(a, b):
        assert len(x) > 0
        for field in ("pred_boxes", "scores", "pred_masks", "pred_keypoints"):
            u, v = x.get(field), y.get(field)
            u, v = (u.tensor, v.tensor) if isinstance(u, Boxes) else (u, v)
            assert torch.equal(u, v), field


@pytest.mark.parametrize("value", [-1, 2.5, True])
@pytest.mark.parametrize("key", ["ROI_MASK_HEAD", "ROI_KEYPOINT_HEAD"])
def test_bad_values_name_the_key(key, value):
    cfg = heads_cfg()
    cfg.MODEL[key].TRAIN_ROIS_PER_IMAGE = value
    with pytest.raises(ValueError, match=rf"MODEL.{key}.TRAIN_ROIS_PER_IMAGE={value!r}.*>= 0"):
        build(cfg)


def test_subsample_per_image():
    images = []
    for n in (3, 10):
        x = Instances((8, 8))
        x.proposal_boxes = Boxes(torch.arange(4 * n, dtype=torch.float32).view(n, 4))
        images.append(x)
    assert subsample_per_image(images, 0) is images
    torch.manual_seed(0)
    small, large = subsample_per_image(images, 4)
    assert small is images[0]  # fewer than the cap: kept whole
    rows = large.proposal_boxes.tensor[:, 0].long().tolist()
    assert len(rows) == 4 and rows == sorted(set(rows)) and set(rows) <= set(range(0, 40, 4))
