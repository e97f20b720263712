"""Every config of configs/mmdet is the model of its published mmdetection checkpoint, and what
the converter cannot map stops with the reason.

mmdetection builds each model from its own config (on the meta device: names and shapes, no
memory); the converter reads that model's weights and config and must find our YAML holding
every setting it needs and a model taking every tensor, shape for shape (the five configs of
tests/test_convert_mmdet.py are converted there, through the command). R101 and X101-32x4d GC
models are built with random weights. Then the refusals, and the config-text reader on a config
written in mmdetection 2.0's early layout.
"""

import os
import re
import shlex

import mmdet_harness as H
import pytest
import torch
import yaml
from detectron2.engine import default_argument_parser
from utils import CONFIGS, REPO

from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.from_mmdet import (
    UnsupportedCheckpoint,
    config_mismatches,
    mmdet_settings,
    read_layout,
)
from nonlocal_det.tools.convert_mmdet import convert_checkpoint, parser, settings_yaml
from nonlocal_det.utils import read_config_text

# Built with random weights below; converted through the command in tests/test_convert_mmdet.py.
RANDOM_WEIGHTS = ("mask_rcnn_R101_GC_r16.yaml", "mask_rcnn_X101_32x4d_syncbn_GC_r4.yaml")
CONVERTED = {"mask_rcnn_R50_GC_r16.yaml", "mask_rcnn_R50.yaml", "faster_rcnn_R50.yaml"}
CONVERTED |= {"faster_rcnn_R50_GA_1111.yaml", "faster_rcnn_R50_GA_0010.yaml"}
META = sorted(set(H.PUBLISHED) - CONVERTED - set(RANDOM_WEIGHTS))


def _config(name: str) -> str:
    return os.path.join(CONFIGS, "mmdet", name)


def test_every_config_is_a_published_checkpoint_beside_its_baseline():
    from test_convert_mmdet import EQUIVALENT

    assert set(EQUIVALENT) == CONVERTED
    leaves = {f for f in os.listdir(os.path.join(CONFIGS, "mmdet")) if not f.startswith("Base")}
    assert leaves == set(H.PUBLISHED)
    for leaf in leaves:  # the same recipe but the blocks
        a = get_nonlocal_cfg(_config(leaf))
        b = get_nonlocal_cfg(_config(re.sub(r"_(GC_r\d+|GA_\d+)\.yaml$", ".yaml", leaf)))
        assert a.MODEL.RESNETS == b.MODEL.RESNETS and a.INPUT == b.INPUT and a.SOLVER == b.SOLVER
        assert a.MODEL.MASK_ON == b.MODEL.MASK_ON and a.MODEL.ROI_HEADS == b.MODEL.ROI_HEADS


@pytest.mark.parametrize("ours", META)
def test_config_holds_what_the_checkpoint_needs(ours):
    cfg = H.load_config(H.PUBLISHED[ours])
    state = H.build(cfg, "meta").state_dict()
    converted, settings, notes = convert_checkpoint(state, {"cfg": cfg.pretty_text}, _config(ours))
    assert len(converted) == sum(not k.endswith("num_batches_tracked") for k in state)
    assert notes == []


@pytest.mark.parametrize("ours", RANDOM_WEIGHTS)
def test_every_tensor_of_r101_and_x101_gc_checkpoints_is_mapped(ours):
    """Built by mmdetection with random weights: every tensor lands once in our model, none is
    left over or missing, shapes equal (the model is built from our config on the meta
    device), and each is the very tensor mmdetection had."""
    cfg = H.load_config(H.PUBLISHED[ours])
    torch.manual_seed(0)
    state = H.build(cfg).state_dict()
    converted, settings, _ = convert_checkpoint(state, {"cfg": cfg.pretty_text}, _config(ours))
    ours_ptrs = {v.data_ptr() for v in converted.values()}
    theirs = {v.data_ptr() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert ours_ptrs == theirs and len(converted) == len(theirs)
    gc = [k for k in converted if ".nonlocal_block." in k]
    assert len(gc) == 8 * (4 + 23 + 3) and settings["MODEL.NONLOCAL.POSITION"] == "after_conv3"


@pytest.mark.parametrize(
    "theirs, reason",
    [
        ("empirical_attention/faster-rcnn_r50-attn1111-dcn_fpn_1x_coco.py", "deformable conv"),
        ("gcnet/cascade-mask-rcnn_x101-32x4d-syncbn-r16-gcb-c3-c5_fpn_1x_coco.py", "cascade heads"),
    ],
)
def test_unmappable_checkpoints_stop_with_the_reason(theirs, reason):
    cfg = H.load_config(theirs)
    state = H.build(cfg, "meta").state_dict()
    with pytest.raises(UnsupportedCheckpoint, match=reason) as e:
        convert_checkpoint(state, {"cfg": cfg.pretty_text})
    print(f"{theirs}: {e.value}")


def test_other_settings_are_refused_or_mapped():
    cfg = H.load_config("empirical_attention/faster-rcnn_r50-attn1111_fpn_1x_coco.py")
    layout = read_layout(H.build(cfg, "meta").state_dict())
    config = cfg.to_dict()
    plugin = config["model"]["backbone"]["plugins"][0]
    plugin["cfg"]["attention_type"] = "1110"  # mmcv's query-position branch without [4]
    with pytest.raises(UnsupportedCheckpoint, match="attention_type='1110'"):
        mmdet_settings(layout, config)
    plugin["cfg"].update(attention_type="1111", spatial_range=5)
    with pytest.raises(UnsupportedCheckpoint, match="spatial_range=5"):
        mmdet_settings(layout, config)
    plugin["cfg"].update(spatial_range=-1, num_heads=9)  # the weights have 8 x 32 channels
    with pytest.raises(UnsupportedCheckpoint, match="num_heads=9"):
        mmdet_settings(layout, config)
    plugin["cfg"].pop("num_heads")  # mmcv's default: 9
    with pytest.raises(UnsupportedCheckpoint, match="num_heads=9"):
        mmdet_settings(layout, config)
    plugin["position"] = "after_conv3"
    with pytest.raises(UnsupportedCheckpoint, match="position"):
        mmdet_settings(layout, config)
    with pytest.raises(UnsupportedCheckpoint, match="--assume-defaults"):
        mmdet_settings(layout, None)
    settings, notes = mmdet_settings(layout, None, assume_defaults=True)
    assert settings["MODEL.NONLOCAL.GA.NUM_HEADS"] == 8 and len(notes) == 3
    roi = config["model"]["roi_head"]["bbox_roi_extractor"]["roi_layer"]
    plugin.update(position="after_conv2", cfg=dict(plugin["cfg"], num_heads=8))
    roi.update(sampling_ratio=2)
    assert mmdet_settings(layout, config)[0]["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"] == 2


# The older layouts of mmdetection's configs (1.x and early 2.0; the generalized-attention
# checkpoints are of January 2020): the plugin as backbone keys, the anchors and box coder as
# head keys, the RoI heads at the model's top level with RoIAlign's old argument names, test_cfg
# and the normalisation at the top level, the test scale in MultiScaleFlipAug. Written here.
EARLY_CONFIG = """
model = dict(
    type='FasterRCNN',
    backbone=dict(
        type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch',
        gen_attention=dict(spatial_range=-1, num_heads=8, attention_type='1111', kv_stride=2),
        stage_with_gen_attention=[[], [], [0, 1, 2, 3, 4, 5], [0, 1, 2]]),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(type='RPNHead', anchor_scales=[8], anchor_ratios=[0.5, 1.0, 2.0],
                  anchor_strides=[4, 8, 16, 32, 64], target_stds=[1.0, 1.0, 1.0, 1.0]),
    bbox_roi_extractor=dict(type='SingleRoIExtractor',
                            roi_layer=dict(type='RoIAlign', out_size=7, sample_num=2)),
    bbox_head=dict(type='Shared2FCBBoxHead', num_classes=80, target_stds=[0.1, 0.1, 0.2, 0.2]))
test_cfg = dict(
    rpn=dict(nms_across_levels=False, nms_pre=1000, nms_post=1000, max_num=1000, nms_thr=0.7,
             min_bbox_size=0),
    rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_thr=0.5), max_per_img=100))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False,
         transforms=[dict(type='Resize', keep_ratio=True), dict(type='Normalize', **img_norm_cfg),
                     dict(type='Pad', size_divisor=32)])]
data_root = 'data/coco/'
ann_file = data_root + 'annotations/instances_val2017.json'
work_dir = os.path.join('./work_dirs', 'x')
"""


def test_early_mmdetection2_config_text():
    config = read_config_text(EARLY_CONFIG)
    assert config["ann_file"] == "data/coco/annotations/instances_val2017.json"
    assert "work_dir" not in config  # a call: not evaluated
    cfg = H.load_config("empirical_attention/faster-rcnn_r50-attn1111_fpn_1x_coco.py")
    layout = read_layout(H.build(cfg, "meta").state_dict())
    settings, notes = mmdet_settings(layout, config, version="1.0.0+unknown")
    assert settings["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"] == 2
    assert settings["MODEL.NONLOCAL.POSITION"] == "after_conv2"
    assert settings["MODEL.NONLOCAL.GA.NUM_HEADS"] == 8
    assert settings["MODEL.NONLOCAL.PLACEMENT"] == "all_res4_res5"
    assert settings["MODEL.RPN.POST_NMS_TOPK_TEST"] == 1000
    assert settings["MODEL.ROI_HEADS.NMS_THRESH_TEST"] == 0.5
    assert settings["INPUT.FORMAT"] == "RGB" and settings["INPUT.MAX_SIZE_TEST"] == 1333
    assert "legacy +1 box geometry" in notes[0]
    published = get_nonlocal_cfg(_config("faster_rcnn_R50_GA_1111.yaml"))
    assert config_mismatches(published, settings) == [
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO: the config has 0, the checkpoint needs 2"
    ]
    text = settings_yaml(settings, "early.pth")
    assert "POOLER_SAMPLING_RATIO: 2" in text and text.endswith("VERSION: 2\n")
    with pytest.raises(ValueError, match="not Python"):
        read_config_text("model = dict(")


def _metafile_results() -> dict:
    """mmdetection's model zoo (its metafile.yml files): checkpoint URL -> (box AP, mask AP)."""
    out = {}
    for folder in ("gcnet", "empirical_attention", "mask_rcnn", "faster_rcnn"):
        with open(os.path.join(H.MMDET_CONFIGS, folder, "metafile.yml")) as f:
            models = yaml.safe_load(f)["Models"]
        for model in models:
            metrics = {k: v for r in model.get("Results", []) for k, v in r["Metrics"].items()}
            out[model.get("Weights")] = (metrics.get("box AP"), metrics.get("mask AP"))
    return out


def test_published_models_page_cites_mmdetection_and_its_commands_parse():
    """Each row of docs/published_models.md: the checkpoint's link and AP as mmdetection's
    metafile has them, the same file named in our config, and the row's two commands parse
    with that checkpoint, config and output."""
    with open(os.path.join(REPO, "docs", "published_models.md")) as f:
        text = f.read()
    row = r"^\| \[(\w+)\]\(\.\./configs/mmdet/\1\.yaml\) \| \[(\S+)\]\((\S+)\) \| ([\d.]+)"
    row += r"(?: / ([\d.]+))? \| `([^`]+)` \| `([^`]+)` \|$"
    rows = re.findall(row, text, flags=re.M)
    assert sorted(r[0] + ".yaml" for r in rows) == sorted(H.PUBLISHED)
    zoo = _metafile_results()
    for name, file, url, box, mask, convert, evaluate in rows:
        assert zoo[url] == (float(box), float(mask) if mask else None), name
        config = f"configs/mmdet/{name}.yaml"
        assert url.endswith("/" + file) and file in open(os.path.join(REPO, config)).read()
        words = shlex.split(convert)
        assert words[:3] == [".venv/bin/python", "-m", "nonlocal_det.tools.convert_mmdet"]
        args = parser().parse_args(words[3:])
        assert (args.input, args.config_file) == (file, config)
        words = shlex.split(evaluate)
        assert words[:2] == [".venv/bin/python", "train_net.py"]
        ev = default_argument_parser().parse_args(words[2:])
        assert ev.eval_only and ev.config_file == config
        assert ev.opts == ["MODEL.WEIGHTS", args.output]
