"""Tests of ``DisentangledNonLocalBlock`` against the DNL formula as the authors' code computes it,
with the N x M matrix built explicitly:

    q_i = W_q x_i + b_q - mean(q),  k_j = W_k x'_j + b_k - mean(k),  v_j = W_v x'_j
    z_i = x_i + gamma * sum_j softmax_j(q_i . k_j / (sqrt(C') T)) v_j + sum_j softmax_j(m_j) v_j
    m_j = w_m . x'_j + b_m,   x' = x or x max-pooled 2x2 (``downsample``)
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

from nonlocal_det.layers import DisentangledNonLocalBlock

pytestmark = FILTERS
NAME = "DisentangledNonLocalBlock"


def _ref_pool(x: torch.Tensor) -> torch.Tensor:
    """Max over non-overlapping 2x2 windows (floor); an axis of size 1 is left alone."""
    for ax in (2, 3):
        if x.shape[ax] < 2:
            continue
        half = x.shape[ax] // 2
        x = x.narrow(ax, 0, 2 * half)
        shape = list(x.shape)
        shape[ax : ax + 1] = [half, 2]
        x = x.reshape(shape).amax(dim=ax + 1)
    return x


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def reference(block: DisentangledNonLocalBlock, x: torch.Tensor):
    """Returns (z, pairwise weights (N, L, M), unary weights (N, M), key grid shape), float64."""
    x = x.to(torch.float64)
    n, c, h, w = x.shape
    xk = _ref_pool(x) if block.downsample else x
    key_shape = list(xk.shape[2:])
    q = conv1x1(block.conv_query, x).flatten(2)  # (N, C', L)
    k = conv1x1(block.conv_key, xk).flatten(2)  # (N, C', M)
    v = conv1x1(block.conv_value, xk).flatten(2)  # (N, C, M)
    q = q - q.mean(dim=2, keepdim=True)
    k = k - k.mean(dim=2, keepdim=True)
    logits = torch.einsum("nci,ncj->nij", q, k) / math.sqrt(block.planes) / block.temperature
    sim = _softmax_rows(logits)  # the explicit N x M matrix
    pairwise = torch.einsum("nij,ncj->nci", sim, v)
    mask = _softmax_rows(conv1x1(block.conv_mask, xk).flatten(2).squeeze(1))  # (N, M)
    unary = torch.einsum("nj,ncj->nc", mask, v).unsqueeze(2)
    z = x + (block.gamma.double() * pairwise + unary).reshape(n, c, h, w)
    return z, sim, mask, key_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("downsample", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 8, 5, 7), (2, 8, 1, 5)])
def test_forward_matches_reference(shape, downsample, dtype):
    block = randomize_(DisentangledNonLocalBlock(8, downsample=downsample)).to(dtype)
    x = make_input(shape, dtype)
    out = block(x)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(block, x)[0], dtype)


@pytest.mark.parametrize("ratio,temperature", [(0.5, 1.0), (0.375, 0.1), (1.0, 0.05)])
def test_forward_matches_reference_other_widths(ratio, temperature):
    """C' = 4, 3 (does not divide C: the value is zero-padded to 3 heads) and C' = C."""
    block = DisentangledNonLocalBlock(8, ratio=ratio, temperature=temperature)
    randomize_(block).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    assert_close(block(x), reference(block, x)[0], torch.float64)


@pytest.mark.parametrize("downsample", [False, True])
def test_attention_for_queries_and_context_weights(downsample):
    block = randomize_(DisentangledNonLocalBlock(8, downsample=downsample)).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    _, sim, mask, key_shape = reference(block, x)
    flat = torch.tensor([0, 29, 14, 3])
    coords = torch.stack(torch.unravel_index(flat, (5, 6)), dim=1)
    for queries in (flat, coords):
        with torch.no_grad():
            w = block.attention_for_queries(x, queries)
        assert list(w.shape) == [2, 4] + key_shape
        assert_close(w, sim[:, flat].reshape(w.shape), torch.float64)
    with torch.no_grad():
        u = block.context_weights(x)
    assert list(u.shape) == [2] + key_shape
    assert_close(u.reshape(2, -1), mask, torch.float64)
    torch.testing.assert_close(u.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_authors_init_is_not_the_identity():
    torch.manual_seed(0)
    block = DisentangledNonLocalBlock(64)
    assert block.planes == 16 and block.gamma.item() == 0 and block.conv_value.bias is None
    for conv in (block.conv_query, block.conv_key, block.conv_value, block.conv_mask):
        assert abs(conv.weight.std().item() - 0.01) < 3e-3
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0
    x = make_input((1, 64, 5, 6))
    with torch.no_grad():
        out = block(x)
    assert not torch.equal(out, x)  # the unary term
    # ... which is all there is: the pairwise term is gamma * (...) = 0
    v = block.conv_value(x).flatten(2)
    unary = v @ block.context_weights(x).reshape(1, -1, 1)
    torch.testing.assert_close(out, x + unary.reshape(1, 64, 1, 1))


def test_zero_init_identity_then_learns():
    torch.manual_seed(0)
    block = DisentangledNonLocalBlock(8, zero_init=True)
    assert torch.count_nonzero(block.conv_value.weight) == 0
    assert_identity_then_learns(block, make_input((2, 8, 5, 6)), zeroed="conv_value.weight")


def test_cnn_block_base_freeze():
    assert_cnn_block_freezes(
        randomize_(DisentangledNonLocalBlock(8, downsample=True)), make_input((2, 8, 5, 6))
    )


@pytest.mark.parametrize("downsample", [False, True])
def test_gradcheck(downsample):
    block = randomize_(DisentangledNonLocalBlock(4, ratio=0.5, downsample=downsample))
    assert_gradcheck(block, make_input((2, 4, 3, 5)))


@pytest.mark.parametrize("downsample", [False, True])
def test_jit_script_and_trace(downsample):
    block = randomize_(DisentangledNonLocalBlock(8, downsample=downsample))
    assert_script_and_trace(block, make_input((2, 8, 5, 6)), make_input((1, 8, 7, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_large_activations(dtype):
    torch.manual_seed(0)
    block = DisentangledNonLocalBlock(64)
    with torch.no_grad():
        block.gamma.fill_(1.0)
        for conv in (block.conv_query, block.conv_key):
            torch.nn.init.normal_(conv.weight, std=0.1)
    assert_autocast_finite(block, make_input((2, 64, 6, 7), scale=100.0), dtype)


def test_no_n_by_m_matrix():
    block = randomize_(DisentangledNonLocalBlock(16))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 64, 64)))
    n_times_m = 4096 * 4096
    assert rec.largest < n_times_m / 16, rec.op
    assert any("flash_attention" in op for op in rec.ops), sorted(rec.ops)


def test_no_n_by_m_detector_catches_math_fallback():
    """The check above would see SDPA's matrix-building fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = randomize_(DisentangledNonLocalBlock(16))
    with sdpa_kernel(SDPBackend.MATH):
        rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 32, 32)))
    assert rec.largest >= 1024 * 1024, rec.op


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(in_channels=0), ["in_channels", "0", "int >= 1"]),
        (dict(ratio=0.1), ["ratio", "0.1", "in_channels=8", ">= 1/8"]),
        (dict(ratio=-0.25), ["ratio", "-0.25", ">= 1"]),
        (dict(temperature=0), ["temperature", "0", "a number > 0"]),
        (dict(temperature=float("nan")), ["temperature", "nan", "a number > 0"]),
        (dict(downsample="yes"), ["downsample", "'yes'", "True or False"]),
        (dict(zero_init=None), ["zero_init", "None", "True or False"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, **kwargs}
    assert_raises_with(lambda: DisentangledNonLocalBlock(**kwargs), [NAME] + substrings)


def test_input_errors():
    block = DisentangledNonLocalBlock(8)
    assert_input_errors(block, NAME, 8)
    x = make_input((1, 8, 5, 6))
    assert_raises_with(
        lambda: block.attention_for_queries(x, torch.tensor([30])), [NAME, "[30]", "[0, 30)"]
    )
    assert_raises_with(
        lambda: block.attention_for_queries(x, torch.tensor([[5, 0]])), [NAME, "[[5, 0]]"]
    )
    assert_raises_with(
        lambda: block.attention_for_queries(x, torch.zeros(2, 3, dtype=torch.long)),
        [NAME, "queries has shape [2, 3]", "(Q, 2)"],
    )
