"""LazyConfig files (configs/lazy/): they load and instantiate with Detectron2's own LazyConfig API,
run, save and reload, and equal their YAML twins (model, solver, schedule, data, weights)."""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage
from omegaconf import DictConfig, ListConfig, OmegaConf
from test_configs import _gt_instances
from torch import nn
from utils import CONFIGS, DEMO_LAZY, DEMO_YAML, load_cfg, shared_datasets_dir

from nonlocal_det import NonLocalBlock
from nonlocal_det.data import register_datasets_for_config
from nonlocal_det.engine import NonLocalTrainer, optimizer_with_gradient_clipping
from nonlocal_det.layers import BLOCK_TYPES
from nonlocal_det.modeling import add_blocks, remove_blocks

LAZY = sorted(glob.glob(os.path.join(CONFIGS, "lazy", "*.py"))) + [DEMO_LAZY]
TWINS = [
    ("mask_rcnn_R50_NL.yaml", "mask_rcnn_R50_NL.py"),
    ("keypoint_rcnn_R50_NL.yaml", "keypoint_rcnn_R50_NL.py"),
    (DEMO_YAML, "mask_rcnn_R18_NL_demo.py"),
    ("mask_rcnn_R50_GC_r16.yaml", "mask_rcnn_R50_GC_r16.py"),
]
EXPECTED_BLOCKS = {
    "mask_rcnn_R50_NL.py": ["backbone.bottom_up.res4.nonlocal4"],
    "mask_rcnn_R50_NL_100ep_LSJ.py": ["backbone.bottom_up.res4.nonlocal4"],
    "keypoint_rcnn_R50_NL.py": ["backbone.bottom_up.res4.nonlocal4"]
    + [f"roi_heads.keypoint_head.nonlocal{k}" for k in (2, 4, 6, 8)],
    "mask_rcnn_R18_NL_demo.py": [
        "backbone.bottom_up.res4.nonlocal0",
        "roi_heads.keypoint_head.nonlocal2",
        "roi_heads.keypoint_head.nonlocal4",
    ],
    "mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py": [
        f"backbone.bottom_up.{stage}.b{i}.nonlocal_block"
        for stage, n in (("s2", 6), ("s3", 12), ("s4", 2))  # RegNetY-4GF: 2, 6, 12, 2 blocks
        for i in range(1, n + 1)
    ],
    "mask_rcnn_R50_GC_r16.py": [
        f"backbone.bottom_up.{stage}.{i}.nonlocal_block"
        for stage, n in (("res3", 4), ("res4", 6), ("res5", 3))
        for i in range(n)
    ],
}
SMALLER = [
    "model.proposal_generator.post_nms_topk=[100,100]",
    "model.roi_heads.batch_size_per_image=64",
]


@pytest.fixture(autouse=True, scope="module")
def datasets(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NONLOCAL_DET_DATASETS", shared_datasets_dir(tmp_path_factory))
        yield


def load(name, overrides=()):
    path = next(p for p in LAZY if os.path.basename(p) == name)
    cfg = LazyConfig.load(path)
    return LazyConfig.apply_overrides(cfg, list(overrides))


# Trained in test_zoo_models.py (instantiated, 10 iterations).
TRAINED_ELSEWHERE = ("mask_rcnn_regnety_4gf_dds_FPN_GC_r16_100ep_LSJ.py",)


def test_every_lazy_config_has_its_blocks():
    """Every LazyConfig file has its entry of EXPECTED_BLOCKS; those trained elsewhere, built here
    on the meta device, have those blocks (the others: test_lazy_config_instantiates_and_runs)."""
    assert sorted(map(os.path.basename, LAZY)) == sorted(EXPECTED_BLOCKS)
    for name in TRAINED_ELSEWHERE:
        with torch.device("meta"):
            model = instantiate(load(name).model)
        names = [n for n, m in model.named_modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
        assert names == EXPECTED_BLOCKS[name], name


@pytest.mark.parametrize(
    "path", [p for p in LAZY if os.path.basename(p) not in TRAINED_ELSEWHERE], ids=os.path.basename
)
def test_lazy_config_instantiates_and_runs(path):
    cfg = load(os.path.basename(path), SMALLER)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    names = [n for n, m in model.named_modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
    assert names == EXPECTED_BLOCKS[os.path.basename(path)]
    image = torch.rand(3, 64, 80) * 255
    keypoint_on = model.roi_heads.keypoint_on
    with EventStorage():
        losses = model([{"image": image, "instances": _gt_instances(_kp_cfg(model))}])
    assert ("loss_keypoint" in losses) == keypoint_on
    assert ("loss_mask" in losses) == model.roi_heads.mask_on
    assert all(torch.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 80}])[0]["instances"]
    assert out.image_size == (64, 80) and out.has("pred_boxes")
    cfg.optimizer.params.model = model
    assert isinstance(instantiate(cfg.optimizer), torch.optim.Optimizer)
    assert 0 <= instantiate(cfg.lr_multiplier)(0.5) <= 1


def _kp_cfg(model):
    """The one config field _gt_instances reads (number of keypoints)."""
    k = (
        model.roi_heads.keypoint_head.score_lowres.out_channels
        if model.roi_heads.keypoint_on
        else 1
    )
    return load_cfg(opts=["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", k])


@pytest.mark.parametrize("path", LAZY, ids=os.path.basename)
def test_lazy_config_saves_and_reloads(path, tmp_path):
    """``default_setup`` (every Detectron2 tool) saves the config as YAML; it must load back."""
    cfg = load(os.path.basename(path))
    out = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, out)
    if path.endswith("_LSJ.py"):
        return  # Detectron2's own LSJ recipe holds a lambda: saved as a pickle, not a YAML
    again = LazyConfig.load(out)
    assert again.model.backbone._target_.endswith(".build_with_blocks")  # add_blocks' target
    assert set(instantiate(again.model).state_dict()) == set(instantiate(cfg.model).state_dict())


# ------------------------------------------------------------------------------------------------
# The LazyConfig twins equal the YAML configs
# ------------------------------------------------------------------------------------------------

_MODULE_INTERNALS = set(vars(nn.Module()))


def _plain(value, depth=0):
    """A comparable description of an attribute value (objects described by their fields)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, depth) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.flatten()[:16].tolist())
    if isinstance(value, np.ndarray):
        return ("array", value.tolist())
    if isinstance(value, nn.Module):
        return ("module", type(value).__name__)
    if callable(value) and not hasattr(value, "__dict__"):
        return ("callable", getattr(value, "__qualname__", repr(value)))
    if hasattr(value, "__dict__") and depth < 3:
        return (type(value).__name__, _plain(vars(value), depth + 1))
    return ("other", type(value).__name__)


def model_description(model):
    """Every module's type and plain attributes, every parameter and buffer's shape and, for
    small buffers (pixel mean/std), values."""
    out = {}
    for name, m in model.named_modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        if isinstance(m, FastRCNNOutputLayers):
            # from_config sets {"loss_box_reg": w}; the constructor's default is a weight of 1.0
            # for every loss; the losses read missing keys as 1.0: the same weights.
            attrs["loss_weight"] = {"loss_cls": 1.0, "loss_box_reg": 1.0, **m.loss_weight}
        out[name] = (type(m).__name__, m.extra_repr(), _plain(attrs))
    for name, t in model.named_parameters():
        out[name] = ("parameter", tuple(t.shape), t.requires_grad)  # frozen stages included
    for name, t in model.named_buffers():
        out[name] = _plain(t) if t.numel() <= 16 else ("tensor", tuple(t.shape))
    return out


def _yaml_and_lazy(yaml_name, lazy_name, overrides=()):
    yaml_cfg = load_cfg(yaml_name)
    yaml_cfg.merge_from_list(["MODEL.WEIGHTS", _yaml_weights(yaml_name)])
    register_datasets_for_config(yaml_cfg)
    return yaml_cfg, load(lazy_name, overrides)


def _yaml_weights(name):
    line = [l for l in open(os.path.join(CONFIGS, name)) if "WEIGHTS" in l]
    return line[0].split(":", 1)[1].split("#")[0].strip().strip('"') if line else ""


@pytest.mark.parametrize("yaml_name,lazy_name", TWINS, ids=[t[1] for t in TWINS])
def test_lazy_model_equals_yaml_model(yaml_name, lazy_name):
    yaml_cfg, lazy_cfg = _yaml_and_lazy(yaml_name, lazy_name)
    torch.manual_seed(0)
    a = build_model(yaml_cfg).eval()
    torch.manual_seed(0)
    b = instantiate(lazy_cfg.model).eval()
    da, db = model_description(a), model_description(b)
    assert da.keys() == db.keys(), set(da) ^ set(db)
    diff = {k: (da[k], db[k]) for k in da if da[k] != db[k]}
    assert not diff, diff
    # Same weights -> same detections from every head. The blocks are made non-trivial, and the
    # frozen BNs of the untrained ResNet-50 damped (identity BNs make its activations explode).
    for m in a.modules():
        if isinstance(m, NonLocalBlock):
            nn.init.normal_(m.out.weight, std=0.05)
        elif isinstance(m, tuple(BLOCK_TYPES.values())):  # its zero-initialised parameters
            for p in m.parameters():
                if not p.any():
                    nn.init.normal_(p, std=0.05)
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.mul_(0.5)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.roi_heads.box_predictor.test_score_thresh = 0.0
        m.roi_heads.box_predictor.test_topk_per_image = 5
        m.proposal_generator.post_nms_topk = (50, 50)
    torch.manual_seed(1)
    image = (torch.rand(3, 96, 128) * 255).round()
    with torch.no_grad():
        out_a = a([{"image": image}])[0]["instances"]
        out_b = b([{"image": image}])[0]["instances"]
    assert len(out_a) == 5 and out_a.get_fields().keys() == out_b.get_fields().keys()
    for key, value in out_a.get_fields().items():
        value = getattr(value, "tensor", value)
        assert torch.equal(value, getattr(out_b.get(key), "tensor", out_b.get(key))), key


@pytest.mark.parametrize("yaml_name,lazy_name", TWINS, ids=[t[1] for t in TWINS])
def test_lazy_training_setup_equals_yaml(yaml_name, lazy_name):
    """Optimizer (groups, LR, weight decay, clipping), LR schedule, length, batch, checkpoints,
    initial weights, datasets and data mappers."""
    yaml_cfg, lazy = _yaml_and_lazy(yaml_name, lazy_name)
    s = yaml_cfg.SOLVER
    model = build_model(load_cfg(DEMO_YAML))  # any model with norms
    opt_a = NonLocalTrainer.build_optimizer(yaml_cfg, model)  # as train_net.py builds it
    lazy.optimizer.params.model = model
    opt_b = instantiate(lazy.optimizer)
    assert type(opt_a).__name__ == type(opt_b).__name__
    assert len(opt_a.param_groups) == len(opt_b.param_groups)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]
        for k in ("lr", "weight_decay", "momentum", "nesterov", "dampening"):
            assert ga[k] == gb[k], k
    assert s.MAX_ITER == lazy.train.max_iter
    sched_a = build_lr_scheduler(yaml_cfg, opt_a)._multiplier
    sched_b = instantiate(lazy.lr_multiplier)
    for it in sorted({0, 1, s.WARMUP_ITERS - 1, s.WARMUP_ITERS, *s.STEPS, s.MAX_ITER - 1}):
        x = it / s.MAX_ITER
        assert sched_a(x) == pytest.approx(sched_b(x), rel=1e-12), it
    assert s.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size
    assert s.CHECKPOINT_PERIOD == lazy.train.checkpointer.period
    assert yaml_cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint
    for is_train, names, part in ((True, "TRAIN", "train"), (False, "TEST", "test")):
        dataset = lazy.dataloader[part].dataset.names
        lazy_names = instantiate(dataset) if not isinstance(dataset, str) else dataset
        assert list(yaml_cfg.DATASETS[names]) == [lazy_names], part
        ma = DatasetMapper(yaml_cfg, is_train=is_train)
        mb = instantiate(lazy.dataloader[part].mapper)
        augs_a, augs_b = ([_augmentation(t) for t in m.augmentations.augs] for m in (ma, mb))
        assert augs_a == augs_b, part
        assert (ma.is_train, ma.image_format) == (mb.is_train, mb.image_format)
        if not is_train:
            continue  # a test mapper drops the annotations: the options below are unused
        for k in ("use_instance_mask", "use_keypoint", "recompute_boxes", "instance_mask_format"):
            assert getattr(ma, k) == getattr(mb, k), (part, k)
        flip_a, flip_b = ma.keypoint_hflip_indices, mb.keypoint_hflip_indices
        assert (flip_a is None) == (flip_b is None) and np.array_equal(flip_a, flip_b)


def _augmentation(t):
    """A transform's type and fields; a resize by the sizes it can pick (YAML test configs say
    "choice of [800]", LazyConfigs "range [800, 800]")."""
    fields = _plain(vars(t))
    if isinstance(t, ResizeShortestEdge):
        lengths = fields.pop("short_edge_length")
        fields.pop("sample_style"), fields.pop("is_range")
        fields["sizes"] = (
            sorted(set(lengths))
            if t.is_range is False or len(set(lengths)) == 1
            else (
                "range",
                lengths,
            )
        )
    return type(t).__name__, fields


def test_optimizer_with_gradient_clipping_clips_each_parameter():
    w = nn.Parameter(torch.zeros(4))
    opt = optimizer_with_gradient_clipping(
        "torch.optim.SGD", clip_type="norm", clip_value=1.0, params=[w], lr=1.0
    )
    w.grad = torch.full((4,), 10.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), -0.5))  # the gradient, norm 20 -> 1
    with pytest.raises(ValueError, match="optimizer="):
        optimizer_with_gradient_clipping("torch.nn.Linear", params=[w], lr=1.0)


# ------------------------------------------------------------------------------------------------
# add_blocks on a ResNet node, and remove_blocks
# ------------------------------------------------------------------------------------------------


def _resnet_cfg(**nonlocal_args):
    cfg = load("mask_rcnn_R50_NL.py").model.backbone.bottom_up
    cfg.stages.depth = 18
    cfg.stages.pop("stride_in_1x1")
    return add_blocks(cfg, **nonlocal_args)


def test_add_blocks_to_a_resnet_node_custom_placement_and_options():
    spec = dict(type="nonlocal", options=dict(pairwise="dot_product", inner_ratio=0.25, norm="GN"))
    cfg = _resnet_cfg(
        nonlocal_spec=spec,
        nonlocal_placement="custom",
        nonlocal_blocks={"res3": [-1], "res4": [0, 1]},
    )
    resnet = instantiate(cfg)
    blocks = {n: m for n, m in resnet.named_modules() if isinstance(m, NonLocalBlock)}
    assert list(blocks) == ["res3.nonlocal1", "res4.nonlocal0", "res4.nonlocal1"]
    b = blocks["res4.nonlocal1"]
    assert (b.in_channels, b.inner_channels, b.pairwise, b.norm_name) == (
        256,
        64,
        "dot_product",
        "GN",
    )
    assert all(p.requires_grad for p in blocks["res3.nonlocal1"].parameters())  # freeze_at 2
    out = resnet(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 512, 2, 2)
    cfg.update(nonlocal_placement="none", nonlocal_blocks={})  # the node's keys stay overridable
    assert not any(isinstance(m, NonLocalBlock) for m in instantiate(cfg).modules())
    # remove_blocks of a custom-placement node: the plain ResNet (no nonlocal_* key left).
    cfg.update(nonlocal_placement="custom", nonlocal_blocks={"res3": [-1], "res4": [0, 1]})
    plain_cfg = remove_blocks(cfg)
    assert not [k for k in plain_cfg if k.startswith("nonlocal_")]
    assert cfg.nonlocal_blocks == {"res3": [-1], "res4": [0, 1]}  # a copy: cfg is unchanged
    plain = instantiate(plain_cfg)
    assert not any(isinstance(m, NonLocalBlock) for m in plain.modules())
    assert plain.state_dict().keys() == {k for k in resnet.state_dict() if ".nonlocal" not in k}


def test_remove_blocks_of_the_keypoint_config():
    model = load("keypoint_rcnn_R50_NL.py").model
    plain = remove_blocks(model)
    assert plain.roi_heads.keypoint_head.nonlocal_after == []
    assert list(model.roi_heads.keypoint_head.nonlocal_after) == [2, 4, 6, 8]  # a copy
    assert "nonlocal_base" not in plain.backbone
    head = instantiate(plain.roi_heads.keypoint_head)
    assert not [n for n, _ in head.named_children() if n.startswith("nonlocal")]


def test_add_blocks_blocks_in_frozen_stages_are_frozen():
    cfg = _resnet_cfg(nonlocal_placement="custom", nonlocal_blocks={"res2": [0], "res4": [0]})
    cfg.freeze_at = 2  # stem + res2
    resnet = instantiate(cfg)
    assert not any(p.requires_grad for p in resnet.res2.nonlocal0.parameters())
    assert all(p.requires_grad for p in resnet.res4.nonlocal0.parameters())


@pytest.mark.parametrize(
    "args,needles",
    [
        (dict(nonlocal_placement="everywhere"), ["nonlocal_placement='everywhere'", "paper_1"]),
        (
            dict(nonlocal_placement="custom", nonlocal_blocks={"res4": [2]}),
            ["nonlocal_blocks['res4']=[2]", "-2..1"],
        ),
        (dict(nonlocal_blocks={"res4": [0]}), ["nonlocal_blocks['res4']", "'custom'"]),
        (
            dict(nonlocal_placement="custom", nonlocal_blocks={"res6": [0]}),
            ["nonlocal_blocks", "res6", "res5"],
        ),
        (
            dict(nonlocal_spec=dict(type="nonlocal", options=dict(pairwise="cosine"))),
            ["NonLocalBlock: pairwise='cosine'", "dot_product"],
        ),
        (
            dict(nonlocal_spec=dict(type="nonlocal", options=dict(norm="FrozenBN"))),
            ["NonLocalBlock: norm='FrozenBN'", "SyncBN"],
        ),
        (
            dict(nonlocal_spec=dict(type="nonlocal", options=dict(pairwise_fn="dot"))),
            ["nonlocal_spec['options']", "['pairwise_fn']", "'pairwise'", "'inner_ratio'"],
        ),
    ],
)
def test_add_blocks_errors_name_the_argument(args, needles):
    with pytest.raises(ValueError) as err:
        instantiate(_resnet_cfg(**args))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
