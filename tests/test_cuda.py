"""On a GPU (skipped without CUDA): the attention of every block runs on a fused SDPA kernel at the
res3 / res4 sizes of an 800x1333 image, never on the math path that builds the N x M matrix, in
fp32 and under fp16 / bf16 autocast; and every block type computes on CUDA what it computes on
the CPU."""

import pytest
import torch

from nonlocal_det.layers import (
    CrissCrossAttention,
    DisentangledNonLocalBlock,
    GeneralizedAttention,
    GlobalContextBlock,
    NonLocalBlock,
    SimplifiedNonLocalBlock,
)

pytestmark = pytest.mark.cuda

# (name, block, input shape): the placements of the configs at 800x1333, batch 2
FUSED = [
    ("nl_res3", lambda: NonLocalBlock(512), (2, 512, 100, 168)),
    ("nl_res4", lambda: NonLocalBlock(1024), (2, 1024, 50, 84)),
    ("dnl_res4", lambda: DisentangledNonLocalBlock(1024), (2, 1024, 50, 84)),
    ("ga_1000_res4", lambda: GeneralizedAttention(256, attention_type="1000"), (2, 256, 50, 84)),
]
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("amp", sorted(DTYPES))
@pytest.mark.parametrize("name,make,shape", FUSED, ids=[f[0] for f in FUSED])
def test_attention_runs_on_a_fused_kernel(name, make, shape, amp):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 not supported on this GPU")
    block = make().cuda()
    x = torch.randn(shape, device="cuda", requires_grad=True)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    # With the math backend excluded, SDPA raises "No available kernel" rather than fall back.
    with sdpa_kernel(fused), torch.autocast("cuda", dtype=DTYPES[amp], enabled=amp != "fp32"):
        out = block(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


BLOCKS = [
    NonLocalBlock(32),
    SimplifiedNonLocalBlock(32),
    GlobalContextBlock(32, ratio=0.25, fusion_types=("add", "mul")),
    DisentangledNonLocalBlock(32),
    CrissCrossAttention(32),
    GeneralizedAttention(32, attention_type="1111"),
]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: type(b).__name__)
def test_block_on_cuda_matches_cpu(block):
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 11, 13)
    expected = block(x)
    got = block.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
