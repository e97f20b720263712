"""Tests of ``GlobalContextBlock`` against the GC block's formula (mmcv ``ContextBlock``):

c = sum_j softmax_j(w_k . x_j + b) x_j,   T(c) = W_2 ReLU(LN(W_1 c + b_1)) + b_2
z = x * sigmoid(T_mul(c)) + T_add(c)        (per the chosen fusions, mul first)
"""

import math

import pytest
import torch
from family_helpers import single_thread  # noqa: F401 (autouse fixture)
from family_helpers import (
    FILTERS,
    assert_autocast_finite,
    assert_close,
    assert_cnn_block_freezes,
    assert_gradcheck,
    assert_identity_then_learns,
    assert_input_errors,
    assert_raises_with,
    assert_script_and_trace,
    conv1x1,
    largest_tensor_fwd_bwd,
    make_input,
    randomize_,
)

from nonlocal_det.layers import GlobalContextBlock

pytestmark = FILTERS
NAME = "GlobalContextBlock"
FUSIONS = [("add",), ("mul",), ("add", "mul")]


def _ref_transform(seq, c: torch.Tensor) -> torch.Tensor:
    """conv, LayerNorm over all rC channels (biased variance), ReLU, conv on (N, C) vectors."""
    conv1, norm, _, conv2 = seq
    h = c @ conv1.weight.double().flatten(1).T + conv1.bias.double()
    mean = h.mean(dim=1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
    h = (h - mean) / torch.sqrt(var + norm.eps)
    h = h * norm.weight.double().flatten() + norm.bias.double().flatten()
    h = torch.clamp(h, min=0)
    return h @ conv2.weight.double().flatten(1).T + conv2.bias.double()


def reference(block: GlobalContextBlock, x: torch.Tensor):
    """Returns (z, weights (N, HW)) in float64."""
    x = x.to(torch.float64)
    n, c, h, w = x.shape
    logits = conv1x1(block.conv_mask, x).reshape(n, h * w)
    weights = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    weights = weights / weights.sum(dim=1, keepdim=True)
    context = torch.zeros(n, c, dtype=torch.float64)
    for j in range(h * w):
        context = context + weights[:, j : j + 1] * x.reshape(n, c, h * w)[:, :, j]
    z = x
    if block.channel_mul_conv is not None:
        z = z * torch.sigmoid(_ref_transform(block.channel_mul_conv, context)).reshape(n, c, 1, 1)
    if block.channel_add_conv is not None:
        z = z + _ref_transform(block.channel_add_conv, context).reshape(n, c, 1, 1)
    return z, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [1.0 / 4, 1.0 / 8])
@pytest.mark.parametrize("fusions", FUSIONS)
def test_forward_matches_reference(fusions, ratio, dtype):
    block = randomize_(GlobalContextBlock(8, ratio=ratio, fusion_types=fusions)).to(dtype)
    x = make_input((2, 8, 5, 6), dtype)
    out = block(x)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(block, x)[0], dtype)


def test_context_weights_match_reference():
    block = randomize_(GlobalContextBlock(8, ratio=0.25)).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    with torch.no_grad():
        w = block.context_weights(x)
    assert w.shape == (2, 5, 6)
    assert_close(w.reshape(2, 30), reference(block, x)[1], torch.float64)
    torch.testing.assert_close(w.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_mmcv_names_and_defaults():
    block = GlobalContextBlock(64, fusion_types=("channel_add", "channel_mul"))
    assert block.planes == 4 and block.fusion_types == ("add", "mul")
    assert sorted(block.state_dict()) == sorted(
        f"{t}.{i}.{p}"
        for t in ("channel_add_conv", "channel_mul_conv")
        for i in (0, 1, 3)
        for p in ("weight", "bias")
    ) + ["conv_mask.bias", "conv_mask.weight"]
    assert GlobalContextBlock(64).channel_mul_conv is None
    assert GlobalContextBlock(64).planes == 4 and GlobalContextBlock(64, ratio=0.25).planes == 16


def test_init_as_mmcv():
    torch.manual_seed(0)
    block = GlobalContextBlock(256, ratio=0.25, fusion_types=("add", "mul"))
    # Kaiming normal, fan_in, ReLU gain: std sqrt(2 / C)
    assert abs(block.conv_mask.weight.std().item() - math.sqrt(2 / 256)) < 0.02
    assert torch.count_nonzero(block.conv_mask.bias) == 0
    for transform in (block.channel_add_conv, block.channel_mul_conv):
        assert torch.count_nonzero(transform[3].weight) == 0
        assert torch.count_nonzero(transform[3].bias) == 0
        assert torch.count_nonzero(transform[0].weight) > 0


def test_add_identity_at_init_then_learns():
    torch.manual_seed(0)
    block = GlobalContextBlock(8, ratio=0.25)
    assert_identity_then_learns(block, make_input((2, 8, 5, 6)), "channel_add_conv.3.weight")


@pytest.mark.parametrize("fusions", [("mul",), ("add", "mul")])
def test_mul_halves_at_init_then_learns(fusions):
    torch.manual_seed(0)
    block = GlobalContextBlock(8, ratio=0.25, fusion_types=fusions)
    x = make_input((2, 8, 5, 6))
    with torch.no_grad():
        assert torch.equal(block(x), x * 0.5)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    ((block(x) - make_input(x.shape, seed=3)) ** 2).sum().backward()
    assert block.channel_mul_conv[3].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(block(x), x * 0.5)


def test_cnn_block_base_freeze():
    assert_cnn_block_freezes(
        randomize_(GlobalContextBlock(8, ratio=0.25, fusion_types=("add", "mul"))),
        make_input((2, 8, 5, 6)),
    )


@pytest.mark.parametrize("fusions", FUSIONS)
def test_gradcheck(fusions):
    block = randomize_(GlobalContextBlock(4, ratio=0.5, fusion_types=fusions))
    assert_gradcheck(block, make_input((2, 4, 3, 5)))


@pytest.mark.parametrize("fusions", FUSIONS)
def test_jit_script_and_trace(fusions):
    block = randomize_(GlobalContextBlock(8, ratio=0.25, fusion_types=fusions))
    assert_script_and_trace(block, make_input((2, 8, 5, 6)), make_input((1, 8, 7, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fusions", [("add",), ("add", "mul")])
def test_autocast_large_activations(fusions, dtype):
    torch.manual_seed(0)
    block = GlobalContextBlock(64, ratio=0.25, fusion_types=fusions)
    with torch.no_grad():  # the zero-initialised last convs would hide the transform
        for t in (block.channel_add_conv, block.channel_mul_conv):
            if t is not None:
                torch.nn.init.normal_(t[3].weight, std=0.1)
    assert_autocast_finite(block, make_input((2, 64, 6, 7), scale=100.0), dtype)


def test_linear_memory():
    block = randomize_(GlobalContextBlock(16, ratio=0.25, fusion_types=("add", "mul")))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 64, 64)))
    assert rec.largest <= 16 * 64 * 64, rec.op


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(in_channels=-1), ["in_channels", "-1", "int >= 1"]),
        (dict(ratio=0), ["ratio", "0", "int(in_channels * ratio) >= 1"]),
        (dict(ratio=1 / 16), ["ratio", "0.0625", "in_channels=8", ">= 1/8"]),
        (dict(ratio="1/4"), ["ratio", "'1/4'", "a number >= 1/8"]),
        (dict(fusion_types=()), ["fusion_types", "()", "'add'", "'mul'"]),
        (dict(fusion_types="add"), ["fusion_types", "'add'", "non-empty tuple"]),
        (dict(fusion_types=("add", "sum")), ["fusion_types", "'sum'", "'channel_add'"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, "ratio": 0.25, **kwargs}
    assert_raises_with(lambda: GlobalContextBlock(**kwargs), [NAME] + substrings)


def test_input_errors():
    block = GlobalContextBlock(8, ratio=0.25)
    assert_input_errors(block, NAME, 8)
    assert_raises_with(lambda: block.context_weights(torch.zeros(2, 8, 5)), [NAME, "rank 4"])
