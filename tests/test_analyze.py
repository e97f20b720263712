"""FLOP counting of non-local blocks (fvcore handles) and the analyze command."""

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from utils import DEMO_LAZY, DEMO_YAML

from nonlocal_det import NonLocalBlock
from nonlocal_det.modeling.flops import nonlocal_flop_handles
from nonlocal_det.tools.analyze import main

# A block with C=8, C_inner=4 on a 4x6 input, subsampled keys: L=24 queries, M=2*3=6 keys.
C, CI, L, M = 8, 4, 24, 6
CONV = L * C * CI  # one 1x1 conv C->C_inner (or back) over L positions, bias not counted
HAND_COUNT = {
    # theta, phi, g, out convs + softmax(theta^T phi) g: L*M*C_inner twice
    "embedded_gaussian": 4 * CONV + L * M * (CI + CI),
    # g, out convs + x^T x_pooled (width C) and the weighted sum of g zero-padded to width C
    "gaussian": 2 * CONV + L * M * (C + C),
    # 4 convs + phi g^T (C_inner x M x C_inner) + theta (phi g^T) (L x C_inner x C_inner)
    "dot_product": 4 * CONV + CI * M * CI + L * CI * CI,
    # 4 convs + a_i = w.theta_i (L*C_inner), b_j = w.phi_j (M*C_inner), two prefix sums (M*C_inner)
    "concatenation": 4 * CONV + L * CI + M * CI + 2 * M * CI,
}


@pytest.mark.parametrize("pairwise", sorted(HAND_COUNT))
def test_block_flops_equal_hand_count(pairwise):
    block = NonLocalBlock(C, pairwise=pairwise).eval()
    x = torch.randn(1, C, 4, 6)
    analysis = FlopCountAnalysis(block, x).set_op_handle(**nonlocal_flop_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == HAND_COUNT[pairwise]
    # Only element-wise ops stay uncounted (fvcore's convention), nothing that multiplies matrices.
    assert set(analysis.unsupported_ops()) <= {
        "aten::add",
        "aten::sub",
        "aten::mul",
        "aten::div",
        "aten::neg",
    }


def test_analyze_command_difference_is_exactly_the_blocks(capsys):
    argv = ["--config-file", DEMO_YAML]
    argv += ["--height", "192", "--width", "192"]
    argv += ["MODEL.NONLOCAL.PLACEMENT", "custom"]
    argv += ["MODEL.NONLOCAL.RES3_BLOCKS", "[0]", "MODEL.NONLOCAL.RES4_BLOCKS", "[-2]"]
    model_rows, block_rows = main(argv)
    out = capsys.readouterr().out
    assert "with blocks" in out and "without" in out and "increase" in out
    with_nl, without, increase = model_rows
    assert [r["block"] for r in block_rows] == [
        "backbone.bottom_up.res3.nonlocal0",
        "backbone.bottom_up.res4.nonlocal0",
        "roi_heads.keypoint_head.nonlocal2",
        "roi_heads.keypoint_head.nonlocal4",
    ]
    blocks_gflops = sum(r["GFLOPs"] for r in block_rows)
    backbone_gflops = sum(r["GFLOPs"] for r in block_rows[:2])
    assert increase["GFLOPs"] == pytest.approx(blocks_gflops, rel=1e-9)
    assert increase["backbone GFLOPs"] == pytest.approx(backbone_gflops, rel=1e-9)
    assert with_nl["GFLOPs"] > without["GFLOPs"]
    # res4 of a 192x192 input: 12x12 = 144 queries over 6x6 = 36 keys, C=128 (the demo's
    # half-width ResNet-18), C_inner=64: theta, phi, g, W (4 N C C_inner), two products (2 N M C_inner)
    res4 = block_rows[1]
    assert res4["GFLOPs"] * 1e9 == pytest.approx(4 * 144 * 128 * 64 + 2 * 144 * 36 * 64)
    assert res4["params (M)"] * 1e6 == pytest.approx(4 * 128 * 64 + 3 * 64 + 128)


# The other block types on one (1, C, H, W) input: hand counts of their multiply-adds (1x1 convs
# C_in * C_out per position, products of the attention, fvcore's LayerNorm at 5 per element).
CF, H, W = 16, 4, 6
LF = H * W


def _family_cases():
    from nonlocal_det.layers import (
        CrissCrossAttention,
        DisentangledNonLocalBlock,
        GeneralizedAttention,
        GlobalContextBlock,
        SimplifiedNonLocalBlock,
    )

    r = int(CF * 0.25)  # GC transform width
    cq = int(CF * 0.25)  # DNL query/key width
    ci = CF // 8  # criss-cross query/key width
    d = CF // 8  # generalized attention: 8 heads of C/8 channels
    m = (H // 2) * (W // 2)  # keys pooled by kv_stride 2
    return {
        # mask conv + context sum + W_v on the 1x1 context
        "simplified": (SimplifiedNonLocalBlock(CF), 2 * CF * LF + CF * CF),
        # mask conv + context sum + conv C->rC, LayerNorm, conv rC->C
        "global_context": (GlobalContextBlock(CF, ratio=0.25), 2 * CF * LF + 2 * r * CF + 5 * r),
        # q, k, v convs + unary (mask conv, weighted sum) + SDPA (QK^T per value head, AV)
        "disentangled": (
            DisentangledNonLocalBlock(CF),
            2 * cq * CF * LF + CF * CF * LF + 2 * CF * LF + 2 * LF * LF * CF,
        ),
        # per pass: q, k, v convs + row and column energies (C') and aggregation (C)
        "criss_cross": (
            CrissCrossAttention(CF),
            2 * (2 * CF * ci * LF + CF * CF * LF + (ci + CF) * LF * (H + W)),
        ),
        # '1000': q conv (L), k and v convs (M), SDPA, projection back
        "generalized_attention_1000": (
            GeneralizedAttention(CF, attention_type="1000"),
            CF * 8 * d * (LF + 2 * m) + 2 * 8 * d * LF * m + 8 * d * CF * LF,
        ),
        # '0010': k and v convs (M), u.k (8 heads x d x M), attention-weighted v, projection of
        # the 1x1 result
        "generalized_attention_0010": (
            GeneralizedAttention(CF, attention_type="0010"),
            2 * CF * 8 * d * m + 2 * 8 * d * m + 8 * d * CF,
        ),
        # '1111': q (L), k and v (M) convs and projection; the x and y position embeddings
        # (D/2 = C/2 wide, per pair of query and key columns / rows) through their linear layers;
        # their product with the queries; the energy of the N x M matrix as one product of
        # [q + u | e_x | e_y] (d + wk + hk wide) per head; attention times values
        "generalized_attention_1111": (
            GeneralizedAttention(CF, attention_type="1111"),
            CF * 8 * d * (LF + 2 * m)
            + 8 * d * CF * LF
            + CF // 2 * 8 * d * (W * (W // 2) + H * (H // 2))
            + 8 * d * LF * (W // 2 + H // 2)
            + 8 * LF * m * (d + W // 2 + H // 2)
            + 8 * d * LF * m,
        ),
    }


@pytest.mark.parametrize("name", sorted(_family_cases()))
def test_family_flops_equal_hand_count(name):
    block, expected = _family_cases()[name]
    x = torch.randn(1, CF, H, W)
    analysis = FlopCountAnalysis(block.eval(), x).set_op_handle(**nonlocal_flop_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == expected


def test_analyze_command_reads_a_lazy_config(capsys):
    """A LazyConfig: the model without blocks is its remove_blocks copy; the difference is exactly
    the blocks (the backbone's and the keypoint head's)."""
    argv = ["--config-file", DEMO_LAZY]
    model_rows, block_rows = main(argv + ["--height", "128", "--width", "128"])
    with_blocks, without, increase = model_rows
    assert [r["block"] for r in block_rows] == [
        "backbone.bottom_up.res4.nonlocal0",
        "roi_heads.keypoint_head.nonlocal2",
        "roi_heads.keypoint_head.nonlocal4",
    ]
    blocks = sum(r["GFLOPs"] for r in block_rows)
    assert increase["GFLOPs"] == pytest.approx(blocks, rel=1e-9) and blocks > 0
    assert increase["params (M)"] == pytest.approx(sum(r["params (M)"] for r in block_rows))
    assert "configs/mask_rcnn_R18_NL_demo.py at 128x128" in capsys.readouterr().out
