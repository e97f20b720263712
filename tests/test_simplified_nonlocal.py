"""Tests of ``SimplifiedNonLocalBlock`` against the formula of the GCNet paper, written as the DNL
authors' code evaluates it (W_v applied at every position, then the weighted sum):

    z_i = x_i + sum_j [exp(w_k . x_j + b) / sum_m exp(w_k . x_m + b)] W_v x_j
"""

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

from nonlocal_det.layers import SimplifiedNonLocalBlock

pytestmark = FILTERS
NAME = "SimplifiedNonLocalBlock"


def reference(block: SimplifiedNonLocalBlock, x: torch.Tensor):
    """Returns (z, weights (N, HW)) in float64, every position's contribution summed in a loop."""
    x = x.to(torch.float64)
    n, c, h, w = x.shape
    logits = conv1x1(block.conv_mask, x).reshape(n, h * w)
    weights = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    weights = weights / weights.sum(dim=1, keepdim=True)
    values = conv1x1(block.conv_value, x).reshape(n, c, h * w)  # W_v x_j at every j
    context = torch.zeros(n, c, dtype=torch.float64)
    for j in range(h * w):
        context = context + weights[:, j : j + 1] * values[:, :, j]
    return x + context.reshape(n, c, 1, 1), weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 8, 1, 7), (3, 8, 4, 1)])
def test_forward_matches_reference(shape, dtype):
    block = randomize_(SimplifiedNonLocalBlock(8)).to(dtype)
    x = make_input(shape, dtype)
    out = block(x)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(block, x)[0], dtype)


def test_context_weights_match_reference():
    block = randomize_(SimplifiedNonLocalBlock(8)).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    with torch.no_grad():
        w = block.context_weights(x)
    assert w.shape == (2, 5, 6)
    assert_close(w.reshape(2, 30), reference(block, x)[1], torch.float64)
    torch.testing.assert_close(w.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_authors_init_is_not_the_identity():
    torch.manual_seed(0)
    block = SimplifiedNonLocalBlock(64)
    assert torch.count_nonzero(block.conv_mask.bias) == 0
    assert abs(block.conv_value.weight.std().item() - 0.01) < 1e-3
    assert abs(block.conv_mask.weight.std().item() - 0.01) < 3e-3
    x = make_input((1, 64, 5, 6))
    with torch.no_grad():
        assert not torch.equal(block(x), x)


def test_zero_init_identity_then_learns():
    torch.manual_seed(0)
    block = SimplifiedNonLocalBlock(8, zero_init=True)
    assert torch.count_nonzero(block.conv_value.weight) == 0
    assert_identity_then_learns(block, make_input((2, 8, 5, 6)), zeroed="conv_value.weight")


def test_cnn_block_base_freeze():
    assert_cnn_block_freezes(randomize_(SimplifiedNonLocalBlock(8)), make_input((2, 8, 5, 6)))


def test_gradcheck():
    block = randomize_(SimplifiedNonLocalBlock(4))
    assert_gradcheck(block, make_input((2, 4, 3, 5)))


def test_jit_script_and_trace():
    block = randomize_(SimplifiedNonLocalBlock(8))
    assert_script_and_trace(block, make_input((2, 8, 5, 6)), make_input((1, 8, 7, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_large_activations(dtype):
    torch.manual_seed(0)
    block = SimplifiedNonLocalBlock(64)  # the authors' init: not the identity
    assert_autocast_finite(block, make_input((2, 64, 6, 7), scale=100.0), dtype)


def test_linear_memory():
    block = randomize_(SimplifiedNonLocalBlock(16))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 64, 64)))
    assert rec.largest <= 16 * 64 * 64, rec.op


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(in_channels=0), ["in_channels", "0", "int >= 1"]),
        (dict(in_channels=2.5), ["in_channels", "2.5", "int >= 1"]),
        (dict(zero_init=1), ["zero_init", "1", "True or False"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, **kwargs}
    assert_raises_with(lambda: SimplifiedNonLocalBlock(**kwargs), [NAME] + substrings)


def test_input_errors():
    block = SimplifiedNonLocalBlock(8)
    assert_input_errors(block, NAME, 8)
    assert_raises_with(lambda: block.context_weights(torch.zeros(2, 5, 5, 7)), [NAME, "5 channels"])
