"""The non-local ResNet(-FPN) backbone: placement, checkpoint compatibility, freezing, errors."""

import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from utils import load_cfg, small_opts

from nonlocal_det import NonLocalBlock
from nonlocal_det.layers import BLOCK_TYPES
from nonlocal_det.modeling import check_model_config
from nonlocal_det.modeling.insertion import PLACEMENTS


def build_backbone(cfg):
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))


def _block_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]


def placement(backbone):
    """{stage: [indices]} read off the built model."""
    out = {}
    for name in _block_names(backbone):
        m = re.fullmatch(r"(?:bottom_up\.)?(res\d)\.nonlocal(\d+)", name)
        assert m, name
        out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


def test_r50_default_is_one_block_before_last_res4_block():
    bb = build_backbone(load_cfg("mask_rcnn_R50_NL.yaml"))
    assert _block_names(bb) == ["bottom_up.res4.nonlocal4"]
    res4 = [n for n, _ in bb.bottom_up.res4.named_children()]
    assert res4 == ["0", "1", "2", "3", "4", "nonlocal4", "5"]
    block = bb.bottom_up.res4.nonlocal4
    assert isinstance(block, NonLocalBlock)
    assert (block.in_channels, block.inner_channels) == (1024, 512)
    assert (block.pairwise, block.subsample, block.use_scale) == ("embedded_gaussian", True, True)


# Where each placement puts the blocks of a ResNet-50 (res3: 4 residual blocks, res4: 6, res5: 3),
# as docs/coco.md says: paper_1 before the last res4 block, paper_5 every other block of res3 and
# res4, paper_10 every block of res3 and res4, all_* every block of those stages, paper_1_all_res5
# paper_1 and every res5 block (custom: test_custom_placement_negative_indices_and_channels).
R50_PLACEMENTS = {
    "none": {},
    "paper_1": {"res4": [4]},
    "paper_5": {"res3": [1, 3], "res4": [1, 3, 5]},
    "paper_10": {"res3": [0, 1, 2, 3], "res4": [0, 1, 2, 3, 4, 5]},
    "all_res3_res5": {"res3": [0, 1, 2, 3], "res4": [0, 1, 2, 3, 4, 5], "res5": [0, 1, 2]},
    "all_res4_res5": {"res4": [0, 1, 2, 3, 4, 5], "res5": [0, 1, 2]},
    "paper_1_all_res5": {"res4": [4], "res5": [0, 1, 2]},
}


@pytest.mark.parametrize(
    "depth,preset,expected",
    [(50, p, R50_PLACEMENTS[p]) for p in PLACEMENTS if p != "custom"]
    + [
        (101, "paper_1", {"res4": [21]}),
        (152, "paper_1", {"res4": [34]}),
        (18, "paper_1", {"res4": [0]}),
        (101, "paper_5", {"res3": [1, 3], "res4": [6, 13, 20]}),
    ],
)
def test_presets(depth, preset, expected):
    opts = ["MODEL.RESNETS.DEPTH", depth, "MODEL.NONLOCAL.PLACEMENT", preset]
    if depth == 18:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    with torch.device("meta"):  # names only: no weights drawn
        bb = build_backbone(load_cfg("mask_rcnn_R50_NL.yaml", opts))
    assert placement(bb) == expected


def test_custom_placement_negative_indices_and_channels():
    cfg = load_cfg(
        "mask_rcnn_R50_NL.yaml",
        [
            "MODEL.NONLOCAL.PLACEMENT",
            "custom",
            "MODEL.NONLOCAL.RES2_BLOCKS",
            [0],
            "MODEL.NONLOCAL.RES4_BLOCKS",
            [-1],
            "MODEL.NONLOCAL.RES5_BLOCKS",
            [-3, 1],
            "MODEL.NONLOCAL.PAIRWISE",
            "dot_product",
            "MODEL.NONLOCAL.INNER_RATIO",
            0.25,
        ],
    )
    bb = build_backbone(cfg)
    assert placement(bb) == {"res2": [0], "res4": [5], "res5": [0, 1]}
    ch = {
        n: (m.in_channels, m.inner_channels, m.pairwise)
        for n, m in bb.named_modules()
        if isinstance(m, NonLocalBlock)
    }
    assert ch["bottom_up.res2.nonlocal0"] == (256, 64, "dot_product")
    assert ch["bottom_up.res5.nonlocal1"] == (2048, 512, "dot_product")
    out = bb(torch.randn(1, 3, 64, 64))
    assert out["p2"].shape == (1, 256, 16, 16)


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["MODEL.RESNETS.DEPTH", 101],
        ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64],
        [
            "MODEL.RESNETS.NUM_GROUPS",
            32,
            "MODEL.RESNETS.WIDTH_PER_GROUP",
            8,
            "MODEL.RESNETS.STRIDE_IN_1X1",
            False,
        ],
    ],
)
def test_same_outputs_and_names_as_detectron2_backbone(opts):
    cfg_nl = load_cfg("mask_rcnn_R50_NL.yaml", opts)
    cfg_base = load_cfg("mask_rcnn_R50.yaml", opts)
    torch.manual_seed(0)
    nl = build_backbone(cfg_nl).eval()
    torch.manual_seed(0)
    base = build_backbone(cfg_base).eval()
    assert nl.output_shape() == base.output_shape()
    nl_sd, base_sd = nl.state_dict(), base.state_dict()
    assert set(base_sd) <= set(nl_sd)
    extra = set(nl_sd) - set(base_sd)
    assert extra and all(".nonlocal" in k for k in extra)
    # The blocks do not disturb the RNG: same seed, same weights everywhere else.
    for k, v in base_sd.items():
        assert torch.equal(v, nl_sd[k]), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = nl(x), base(x)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Every config with backbone blocks and its baseline (the keypoint configs: test_keypoint_head).
WITH_BASELINE = [
    ("mask_rcnn_R50_NL.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_GC_r16.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_GC_r4.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_SNL.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_DNL.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_DNL_c4c5.yaml", "mask_rcnn_R50.yaml"),
    ("mask_rcnn_R50_CC.yaml", "mask_rcnn_R50.yaml"),
    ("faster_rcnn_R50_GA_0010.yaml", "faster_rcnn_R50.yaml"),
    ("faster_rcnn_R50_GA_1111.yaml", "faster_rcnn_R50.yaml"),
]


@pytest.mark.parametrize("config,baseline", WITH_BASELINE)
def test_baseline_checkpoint_loads_and_predicts_identically(tmp_path, config, baseline):
    opts = small_opts(depth=50)
    torch.manual_seed(1)
    base = build_model(load_cfg(baseline, opts)).eval()
    DetectionCheckpointer(base, save_dir=str(tmp_path)).save("baseline")
    torch.manual_seed(2)  # a different init everywhere: only the checkpoint can make them equal
    nl = build_model(load_cfg(config, opts)).eval()
    result = DetectionCheckpointer(nl)._load_model(
        torch.load(tmp_path / "baseline.pth", weights_only=False)
    )
    blocks = tuple(BLOCK_TYPES.values())
    block_names = [n for n, m in nl.named_modules() if isinstance(m, blocks)]
    new_keys = {k for k in nl.state_dict() if any(k.startswith(n + ".") for n in block_names)}
    assert block_names and set(result.missing_keys) == new_keys
    assert all(".nonlocal" in k for k in new_keys) and not result.unexpected_keys
    torch.manual_seed(3)
    image = (torch.rand(3, 96, 128) * 255).round()
    # Make the untrained detector fire: a very low score threshold keeps many detections.
    for m in (base, nl):
        m.roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        out_b = base([{"image": image}])[0]["instances"]
        out_n = nl([{"image": image}])[0]["instances"]
    assert len(out_b) > 0
    assert torch.equal(out_b.pred_boxes.tensor, out_n.pred_boxes.tensor)
    assert torch.equal(out_b.scores, out_n.scores)
    if base.roi_heads.mask_on:
        assert torch.equal(out_b.pred_masks, out_n.pred_masks)


def _to_c2_name(key):
    """Detectron2 ResNet name -> the Caffe2 name of an ImageNet ``.pkl`` (inverse of Detectron2's
    ``convert_basic_c2_names``)."""
    key = key.replace("stem.conv1.norm.", "res_conv1.norm.").replace("stem.conv1.", "conv1.")
    for d2, c2 in (
        ("conv1", "branch2a"),
        ("conv2", "branch2b"),
        ("conv3", "branch2c"),
        ("shortcut", "branch1"),
    ):
        key = key.replace(f".{d2}.", f".{c2}.")
    suffix = {
        "norm.weight": "bn_s",
        "norm.bias": "bn_b",
        "norm.running_mean": "bn_rm",
        "norm.running_var": "bn_riv",
        "weight": "w",
        "bias": "b",
    }
    for d2, c2 in suffix.items():
        if key.endswith("." + d2):
            return key[: -len(d2)].replace(".", "_") + c2
    raise AssertionError(key)


@pytest.mark.parametrize("config", ["mask_rcnn_R50_NL.yaml", "mask_rcnn_R50_GC_r16.yaml"])
def test_imagenet_pkl_name_conversion_maps_every_resnet_weight(config):
    cfg = load_cfg(config)
    torch.manual_seed(0)
    resnet = BACKBONE_REGISTRY.get("build_resnet_backbone")(cfg, ShapeSpec(channels=3))
    c2 = {_to_c2_name(k): v.numpy() for k, v in resnet.state_dict().items()}
    c2["fc1000_w"] = torch.zeros(1000, 2048).numpy()  # ImageNet classifier, unused
    model_sd = build_model(cfg).state_dict()
    loaded = align_and_update_state_dicts(model_sd, c2, c2_conversion=True)
    bottom_up = {k for k in model_sd if k.startswith("backbone.bottom_up.")}
    expected = {k for k in bottom_up if ".nonlocal" not in k}
    matched = {k for k in loaded if k.startswith("backbone.")}
    assert matched == expected, matched ^ expected
    assert set(loaded) - matched == {"fc1000.weight"}  # the classifier stays unused
    for k in expected:
        src = resnet.state_dict()[k[len("backbone.bottom_up.") :]]
        assert torch.equal(torch.as_tensor(loaded[k]), src), k


@pytest.mark.parametrize("freeze_at,frozen", [(2, False), (4, True), (5, True)])
def test_blocks_in_frozen_stages_are_frozen(freeze_at, frozen):
    cfg = load_cfg(
        "mask_rcnn_R50_NL.yaml",
        ["MODEL.BACKBONE.FREEZE_AT", freeze_at, "MODEL.NONLOCAL.NORM", "BN"],
    )
    bb = build_backbone(cfg)
    block = bb.bottom_up.res4.nonlocal4
    assert all(p.requires_grad != frozen for p in block.parameters())
    assert isinstance(block.norm, FrozenBatchNorm2d) == frozen
    # The residual blocks around it follow the same rule (Detectron2's own freezing).
    assert all(p.requires_grad != frozen for p in bb.bottom_up.res4[0].parameters())
    assert all(not p.requires_grad for p in bb.bottom_up.res2.parameters())


def test_scripted_backbone_matches_eager():
    from detectron2.export import scripting_with_instances  # noqa: F401  (scripting patches)

    cfg = load_cfg(
        "mask_rcnn_R50_NL.yaml", ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    )
    bb = build_backbone(cfg).eval()
    torch.nn.init.normal_(bb.bottom_up.res4.nonlocal0.out.weight, std=0.1)
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(bb)
    traced = torch.jit.trace(bb, x, strict=False, check_trace=False)
    with torch.no_grad():
        ref = bb(x)
        for out in (scripted(x), traced(x)):
            for k in ref:
                torch.testing.assert_close(out[k], ref[k])


BAD = [
    (
        ["MODEL.NONLOCAL.PLACEMENT", "everywhere"],
        ["MODEL.NONLOCAL.PLACEMENT", "'everywhere'", "paper_1", "custom"],
    ),
    (
        ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES4_BLOCKS", [6]],
        ["MODEL.NONLOCAL.RES4_BLOCKS", "res4", "6", "-6..5"],
    ),
    (
        ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES3_BLOCKS", [-5]],
        ["MODEL.NONLOCAL.RES3_BLOCKS", "res3", "-5", "-4..3"],
    ),
    (
        ["MODEL.NONLOCAL.RES4_BLOCKS", [1]],
        ["MODEL.NONLOCAL.RES4_BLOCKS", "PLACEMENT='paper_1'", "custom"],
    ),
    (
        ["MODEL.NONLOCAL.PLACEMENT", "custom", "MODEL.NONLOCAL.RES4_BLOCKS", [1, -5]],
        ["MODEL.NONLOCAL.RES4_BLOCKS", "twice"],
    ),
    (
        [
            "MODEL.NONLOCAL.PLACEMENT",
            "custom",
            "MODEL.NONLOCAL.RES5_BLOCKS",
            [0],
            "MODEL.RESNETS.OUT_FEATURES",
            ["res2", "res3", "res4"],
            "MODEL.FPN.IN_FEATURES",
            ["res2", "res3", "res4"],
        ],
        ["MODEL.NONLOCAL.RES5_BLOCKS", "res5", "['res2', 'res3', 'res4']"],
    ),
    (
        [
            "MODEL.NONLOCAL.PLACEMENT",
            "paper_5",
            "MODEL.RESNETS.DEPTH",
            18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            64,
        ],
        ["MODEL.NONLOCAL.PLACEMENT='paper_5'", "res4", "has 2"],
    ),
    (
        ["MODEL.NONLOCAL.PAIRWISE", "cosine"],
        ["MODEL.NONLOCAL.PAIRWISE", "'cosine'", "embedded_gaussian", "concatenation"],
    ),
    (["MODEL.NONLOCAL.NORM", "FrozenBN"], ["MODEL.NONLOCAL.NORM", "'FrozenBN'", "SyncBN"]),
    (["MODEL.NONLOCAL.INNER_RATIO", 0.0], ["MODEL.NONLOCAL.INNER_RATIO", "0.0", "(0, 1]"]),
    (["MODEL.RESNETS.DEPTH", 42], ["MODEL.RESNETS.DEPTH", "42", "50", "101"]),
]


@pytest.mark.parametrize("opts,needles", BAD, ids=[str(b[0][:4]) for b in BAD])
def test_bad_config_errors_name_key_value_and_allowed(opts, needles):
    cfg = load_cfg("mask_rcnn_R50_NL.yaml", opts)
    with pytest.raises(ValueError) as err:
        build_backbone(cfg)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_missing_add_nonlocal_config_is_explained():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_nonlocal_fpn_backbone"
    with pytest.raises(KeyError, match="add_nonlocal_config"):
        build_backbone(cfg)


class _Probe(torch.nn.Module):
    """A stand-in block: records its input, returns 2x + 1 (not the identity)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return 2 * x + 1


POSITIONS = ["after_conv1", "after_conv2", "after_conv3", "after_add"]


@pytest.mark.parametrize(  # a BasicBlock (depth 18) has no conv3
    "depth,position", [(50, p) for p in POSITIONS] + [(18, p) for p in POSITIONS if p[-1] != "3"]
)
def test_block_inside_a_residual_block_sits_where_its_position_says(depth, position):
    from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

    from nonlocal_det.modeling.insertion import ResidualWithBlock

    F = torch.nn.functional
    torch.manual_seed(0)
    if depth == 18:
        residual = BasicBlock(16, 32, stride=2, norm="BN").eval()
    else:
        residual = BottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm="BN").eval()
    for p in residual.parameters():
        torch.nn.init.normal_(p, std=0.3)
    probe = _Probe()
    wrapped = ResidualWithBlock(residual, position, probe).eval()
    assert [n for n, _ in wrapped.named_children()] == [n for n, _ in residual.named_children()] + [
        "nonlocal_block"
    ]
    x = torch.randn(2, 16, 12, 10)
    convs = [residual.conv1, residual.conv2] + ([residual.conv3] if depth == 50 else [])
    last = len(convs)
    k = {"after_conv1": 1, "after_conv2": 2, "after_conv3": 3, "after_add": 4}[position]
    out = x
    for i, conv in enumerate(convs, 1):
        out = conv(out)
        if i < last:
            out = F.relu(out)
        if i == k or (i == last and k == 3):
            out = 2 * out + 1
    out = out + residual.shortcut(x)
    if k == 4:
        out = 2 * out + 1
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), F.relu(out))
    assert len(probe.seen) == 1


def test_inside_positions_refused_where_they_do_not_exist():
    cfg = load_cfg(
        "mask_rcnn_R50_GC_r16.yaml",
        ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64],
    )
    with pytest.raises(ValueError, match="MODEL.NONLOCAL.POSITION='after_conv3'.*2 convs"):
        build_backbone(cfg)


@pytest.mark.parametrize("freeze_at,frozen", [(2, False), (3, True)])
def test_blocks_inside_frozen_stages_are_frozen(freeze_at, frozen):
    bb = build_backbone(
        load_cfg("mask_rcnn_R50_GC_r16.yaml", ["MODEL.BACKBONE.FREEZE_AT", freeze_at])
    )
    for i in range(4):
        block = bb.bottom_up.res3[i].nonlocal_block
        assert all(p.requires_grad != frozen for p in block.parameters())
    assert all(p.requires_grad for p in bb.bottom_up.res4[0].nonlocal_block.parameters())


@pytest.mark.parametrize("config", ["mask_rcnn_R50_GC_r16.yaml", "faster_rcnn_R50_GA_0010.yaml"])
def test_scripted_backbone_with_blocks_inside_matches_eager(config):
    from detectron2.export import scripting_with_instances  # noqa: F401  (scripting patches)

    cfg = load_cfg(config, ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64])
    cfg.MODEL.NONLOCAL.POSITION = "after_conv2"
    bb = build_backbone(cfg).eval()
    torch.manual_seed(0)
    for name, p in bb.named_parameters():
        if ".nonlocal_block." in name:
            torch.nn.init.normal_(p, std=0.1)  # not the identity
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(bb)
    with torch.no_grad():
        ref = bb(x)
        out = scripted(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])


@pytest.mark.parametrize("position", POSITIONS)
def test_block_inside_a_regnet_block_sits_where_its_position_says(position):
    """RegNet's ResBottleneckBlock (RegNetY: with squeeze-excitation): f = a, a_bn, a_af, b, b_bn,
    b_af, se, c, c_bn; the block after a_af, b_af (before se), c_bn, or after the add."""
    from detectron2.modeling.backbone.regnet import ResBottleneckBlock

    from nonlocal_det.modeling.insertion import RegNetResidualWithBlock

    torch.manual_seed(0)
    params = {"bot_mul": 1.0, "group_w": 8, "se_r": 0.25}
    residual = ResBottleneckBlock(16, 32, 2, "BN", torch.nn.ReLU, params).eval()
    for p in residual.parameters():
        torch.nn.init.normal_(p, std=0.3)
    probe = _Probe()
    wrapped = RegNetResidualWithBlock(residual, position, probe).eval()
    assert [n for n, _ in wrapped.named_children()] == ["proj", "bn", "f", "af", "nonlocal_block"]
    x = torch.randn(2, 16, 12, 10)
    after = {"after_conv1": "a_af", "after_conv2": "b_af", "after_conv3": "c_bn"}.get(position)
    out = x
    for name, layer in residual.f.named_children():
        out = layer(out)
        out = 2 * out + 1 if name == after else out
    out = residual.bn(residual.proj(x)) + out
    out = 2 * out + 1 if position == "after_add" else out
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), residual.af(out))
    assert len(probe.seen) == 1


class _StandInDeformConv(torch.nn.Module):
    """Detectron2's DeformConv / ModulatedDeformConv need detectron2._C, which this install lacks:
    the same arguments and parameters (``weight``, ``norm``), no deformation."""

    def __init__(self, in_channels, out_channels, kernel_size, *, norm=None, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.register_parameter("bias", None)
        self.norm = norm


def test_deformable_stages_get_blocks_between_their_residual_blocks(monkeypatch):
    """Detectron2's Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml (deformable res3-res5), built on
    the meta device: blocks between or after its residual blocks, the same names, the baseline's
    keys; a position inside a deformable block is refused with a message."""
    from detectron2 import model_zoo
    from detectron2.modeling.backbone import resnet

    monkeypatch.setattr(resnet, "DeformConv", _StandInDeformConv)
    monkeypatch.setattr(resnet, "ModulatedDeformConv", _StandInDeformConv)
    cfg = load_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml"))
    base_keys = None
    with torch.device("meta"):
        base_keys = set(build_backbone(cfg).state_dict())
        cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_nonlocal_backbone"])
        cfg.merge_from_list(["MODEL.NONLOCAL.PLACEMENT", "paper_1_all_res5"])
        bb = build_backbone(cfg)
    assert type(bb.bottom_up.res4[0]) is resnet.DeformBottleneckBlock
    assert _block_names(bb) == ["bottom_up.res4.nonlocal4"] + [
        f"bottom_up.res5.nonlocal{i}" for i in range(3)
    ]
    new = set(bb.state_dict()) - base_keys
    assert base_keys < set(bb.state_dict()) and all(".nonlocal" in k for k in new)
    cfg.merge_from_list(["MODEL.NONLOCAL.POSITION", "after_conv2"])
    with pytest.raises(ValueError) as e, torch.device("meta"):
        check_model_config(cfg)
    assert str(e.value) == (
        "MODEL.NONLOCAL.POSITION='after_conv2' puts a block inside res4.4, a "
        "DeformBottleneckBlock; allowed there: 'after_block' (inside positions: BottleneckBlock "
        "/ BasicBlock (ResNet), ResBottleneckBlock (RegNet), not deformable convs)"
    )


def test_a_new_block_argument_is_an_option_with_nothing_but_a_config_key(monkeypatch):
    """The non-local type's options are NonLocalBlock's keyword arguments: one more (as a new
    initialisation switch would be) reaches the blocks from a YAML key of the same name, from a
    LazyConfig spec and in the keypoint head, without any other change."""
    import inspect

    from nonlocal_det.layers import BLOCK_TYPES
    from nonlocal_det.modeling import insert_blocks

    class WithSwitch(NonLocalBlock):
        def __init__(self, *args, w_z_std=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.w_z_std = w_z_std

    params = list(inspect.signature(NonLocalBlock).parameters.values())
    switch = inspect.Parameter("w_z_std", inspect.Parameter.KEYWORD_ONLY, default=0.0)
    WithSwitch.__signature__ = inspect.Signature(params + [switch])
    monkeypatch.setitem(BLOCK_TYPES, "nonlocal", WithSwitch)
    cfg = load_cfg("keypoint_rcnn_R50_NL.yaml", ["MODEL.RESNETS.DEPTH", 18])
    cfg.merge_from_list(["MODEL.RESNETS.RES2_OUT_CHANNELS", 64])
    cfg.MODEL.NONLOCAL.W_Z_STD = 0.5  # the new key, as add_nonlocal_config would add it
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
        bb = build_backbone(load_cfg(opts=["MODEL.BACKBONE.NAME", "build_resnet_backbone"]))
        insert_blocks(bb, nonlocal_spec={"type": "nonlocal", "options": {"w_z_std": 0.25}})
    blocks = [m for m in model.modules() if isinstance(m, WithSwitch)]
    assert len(blocks) == 5 and {b.w_z_std for b in blocks} == {0.5}  # res4 + 4 in the head
    assert bb.res4.nonlocal4.w_z_std == 0.25


def test_detectron2_retinanet_with_the_old_builder_name_keeps_p6_p7():
    """Issue 19's reproduction: Detectron2's COCO-Detection/retinanet_R_50_FPN_1x.yaml with
    MODEL.BACKBONE.NAME build_resnet_nonlocal_fpn_backbone stopped with KeyError 'p7' (an FPN with a
    max-pooled P6 only); the name now goes over RetinaNet's own builder."""
    from detectron2 import model_zoo
    from detectron2.modeling.backbone.fpn import LastLevelP6P7

    cfg = load_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnet_nonlocal_fpn_backbone"])
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model.backbone.top_block, LastLevelP6P7)
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert _block_names(model) == ["backbone.bottom_up.res4.nonlocal4"]


# ------------------------------------------------------------------------------------------------
# ResNet-18/34 at other widths: the demo project's builder (Detectron2's assert RES2_OUT_CHANNELS 64)
# ------------------------------------------------------------------------------------------------

_BASIC = ["MODEL.BACKBONE.NAME", "build_nonlocal_backbone", "MODEL.RESNETS.DEPTH", 18]


def test_demo_basic_backbone_at_width_64_builds_detectron2s_network():
    """nonlocal_demo's builder at width 64 under build_nonlocal_backbone builds exactly what
    Detectron2's ResNet-18 FPN builds with the blocks: names, weights from one seed, outputs."""
    opts = _BASIC + ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    built = {}
    for base in ("build_resnet_fpn_backbone", "build_basic_resnet_fpn_backbone"):
        torch.manual_seed(0)
        cfg = load_cfg("mask_rcnn_R50_NL.yaml", opts + ["MODEL.NONLOCAL.BASE_BACKBONE", base])
        built[base] = build_backbone(cfg).eval()
    d2, ours = built.values()
    assert ours.output_shape() == d2.output_shape()
    a, b = d2.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        oa, ob = d2(x), ours(x)
    assert list(oa) == list(ob)
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k


@pytest.mark.parametrize("width", [32, 16])
def test_narrow_resnet18_keeps_the_names_and_scales_every_stage(width):
    opts = _BASIC + ["MODEL.NONLOCAL.BASE_BACKBONE", "build_basic_resnet_fpn_backbone"]
    wide = build_backbone(
        load_cfg("mask_rcnn_R50_NL.yaml", opts + ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64])
    )
    opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", width, "MODEL.RESNETS.STEM_OUT_CHANNELS", width]
    narrow = build_backbone(load_cfg("mask_rcnn_R50_NL.yaml", opts))
    # Detectron2's parameter names, each weight scaled to the width (the FPN's outputs unchanged).
    assert list(narrow.state_dict()) == list(wide.state_dict())
    shapes = {k: v.shape for k, v in narrow.bottom_up.named_parameters()}
    assert shapes["stem.conv1.weight"] == (width, 3, 7, 7)
    assert shapes["res2.0.conv1.weight"] == (width, width, 3, 3)
    assert shapes["res5.1.conv2.weight"] == (8 * width, 8 * width, 3, 3)
    channels = [s.channels for s in narrow.bottom_up.output_shape().values()]
    assert channels == [width, 2 * width, 4 * width, 8 * width]
    block = dict(narrow.named_modules())["bottom_up.res4.nonlocal0"]
    assert block.in_channels == 4 * width
    out = narrow(torch.randn(2, 3, 64, 64))
    assert out["p2"].shape == (2, 256, 16, 16) and out["p6"].shape == (2, 256, 1, 1)
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in narrow.parameters() if p.requires_grad)


@pytest.mark.parametrize("width", [60, 32, 256, 0])
def test_basic_block_widths_detectron2s_builders_refuse(width):
    """256 is the RES2_OUT_CHANNELS default: a ResNet-18 config that forgot to set it stops; other
    widths than 64 are the demo project's builder's (named in its own check)."""
    opts = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", width]
    with pytest.raises(ValueError) as err:
        build_backbone(load_cfg("mask_rcnn_R50_NL.yaml", opts))
    for needle in (f"MODEL.RESNETS.RES2_OUT_CHANNELS={width}", "DEPTH=18", "allowed: 64"):
        assert needle in str(err.value), (needle, str(err.value))
    if width in (60, 0):
        opts += _BASIC[:2] + ["MODEL.NONLOCAL.BASE_BACKBONE", "build_basic_resnet_fpn_backbone"]
        with pytest.raises(ValueError, match=f"MODEL.RESNETS.RES2_OUT_CHANNELS={width} .*8"):
            build_backbone(load_cfg("mask_rcnn_R50_NL.yaml", opts))


def test_basic_resnet_stages_at_64_are_detectron2s_default_stages():
    from detectron2.modeling.backbone.resnet import ResNet

    from nonlocal_demo import basic_resnet_stages

    for depth in (18, 34):
        torch.manual_seed(0)
        ours = torch.nn.ModuleList(torch.nn.Sequential(*s) for s in basic_resnet_stages(depth))
        torch.manual_seed(0)
        d2 = ResNet.make_default_stages(depth, norm="BN")
        d2 = torch.nn.ModuleList(torch.nn.Sequential(*s) for s in d2)
        a, b = ours.state_dict(), d2.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"depth=50 is not supported; allowed: \[18, 34\]"):
        basic_resnet_stages(50)
