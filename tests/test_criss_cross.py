"""Tests of ``CrissCrossAttention`` against the CCNet formula with the N x M matrix built
explicitly: a query (h, w) attends to the keys (i, j) with i == h or j == w (its row and column,
itself once), one softmax over them, applied R times with the same weights:

    x <- x + gamma * sum_{(i, j) in row + column of (h, w)} softmax(q_hw . k_ij) v_ij
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

from nonlocal_det.layers import CrissCrossAttention

pytestmark = FILTERS
NAME = "CrissCrossAttention"


def _criss_cross_mask(h: int, w: int) -> torch.Tensor:
    """(HW, HW) bool: key (i, j) is in the row or the column of query (y, x)."""
    mask = torch.zeros(h * w, h * w, dtype=torch.bool)
    for y in range(h):
        for x in range(w):
            for i in range(h):
                for j in range(w):
                    mask[y * w + x, i * w + j] = i == y or j == x
    return mask


def _one_pass(block: CrissCrossAttention, x: torch.Tensor):
    n, c, h, w = x.shape
    q = conv1x1(block.query_conv, x).flatten(2)
    k = conv1x1(block.key_conv, x).flatten(2)
    v = conv1x1(block.value_conv, x).flatten(2)
    logits = torch.einsum("nci,ncj->nij", q, k)  # (N, HW, HW)
    logits = logits.masked_fill(~_criss_cross_mask(h, w), float("-inf"))
    e = torch.exp(logits - logits.amax(dim=2, keepdim=True))
    attention = e / e.sum(dim=2, keepdim=True)
    out = torch.einsum("nij,ncj->nci", attention, v).reshape(n, c, h, w)
    return x + block.gamma.double() * out, attention


def reference(block: CrissCrossAttention, x: torch.Tensor):
    """Returns (z, first-pass attention (N, HW, HW)) in float64."""
    x = x.to(torch.float64)
    first = None
    for _ in range(block.recurrence):
        x, attention = _one_pass(block, x)
        first = attention if first is None else first
    return x, first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("recurrence", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 8, 1, 7), (2, 8, 4, 1)])
def test_forward_matches_reference(shape, recurrence, dtype):
    block = randomize_(CrissCrossAttention(8, recurrence=recurrence)).to(dtype)
    x = make_input(shape, dtype)
    out = block(x)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(block, x)[0], dtype)


def test_inner_channels():
    block = randomize_(CrissCrossAttention(8, inner_channels=3)).double()
    assert block.query_conv.out_channels == 3
    x = make_input((2, 8, 5, 6), torch.float64)
    assert_close(block(x), reference(block, x)[0], torch.float64)


def test_attention_for_queries():
    block = randomize_(CrissCrossAttention(8)).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    _, attention = reference(block, x)
    flat = torch.tensor([0, 29, 14, 3, 8])
    coords = torch.stack(torch.unravel_index(flat, (5, 6)), dim=1)
    expected = attention[:, flat].reshape(2, 5, 5, 6)
    for queries in (flat, coords):
        with torch.no_grad():
            w = block.attention_for_queries(x, queries)
        assert w.shape == (2, 5, 5, 6)
        assert_close(w, expected, torch.float64)
    # zero off the row and column, H + W - 1 non-zero weights summing to 1
    for qi, (y, xx) in enumerate(coords.tolist()):
        off = torch.ones(5, 6, dtype=torch.bool)
        off[y, :] = False
        off[:, xx] = False
        assert (w[:, qi][:, off] == 0).all()
        assert (w[:, qi][:, ~off] > 0).all() and int((~off).sum()) == 5 + 6 - 1
    torch.testing.assert_close(w.sum(dim=(2, 3)), torch.ones(2, 5, dtype=torch.float64))


def test_identity_at_init_then_learns():
    torch.manual_seed(0)
    block = CrissCrossAttention(8)
    assert block.gamma.item() == 0 and block.recurrence == 2 and block.inner_channels == 1
    assert_identity_then_learns(block, make_input((2, 8, 5, 6)), zeroed="gamma")


def test_cnn_block_base_freeze():
    assert_cnn_block_freezes(randomize_(CrissCrossAttention(8)), make_input((2, 8, 5, 6)))


def test_gradcheck():
    block = randomize_(CrissCrossAttention(4, inner_channels=2))
    assert_gradcheck(block, make_input((2, 4, 3, 5)))


def test_jit_script_and_trace():
    block = randomize_(CrissCrossAttention(8))
    assert_script_and_trace(block, make_input((2, 8, 5, 6)), make_input((1, 8, 7, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_large_activations(dtype):
    torch.manual_seed(0)
    block = CrissCrossAttention(64)  # PyTorch's default conv init, as the authors
    with torch.no_grad():
        block.gamma.fill_(1.0)
    assert_autocast_finite(block, make_input((2, 64, 6, 7), scale=100.0), dtype)


def test_linear_memory():
    """Nothing bigger than N (H + W) (the energies) or C N; far from N x N."""
    h = w = 64
    block = randomize_(CrissCrossAttention(16))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, h, w)))
    assert rec.largest <= h * w * (h + w), rec.op
    assert rec.largest * 16 < (h * w) ** 2


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(in_channels=0), ["in_channels", "0", "int >= 1"]),
        (dict(in_channels=4), ["inner_channels=None", "in_channels=4", "in_channels >= 8"]),
        (dict(inner_channels=0), ["inner_channels", "0", "int >= 1"]),
        (dict(recurrence=0), ["recurrence", "0", "int >= 1"]),
        (dict(recurrence=True), ["recurrence", "True", "int >= 1"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, **kwargs}
    assert_raises_with(lambda: CrissCrossAttention(**kwargs), [NAME] + substrings)


def test_input_errors():
    block = CrissCrossAttention(8)
    assert_input_errors(block, NAME, 8)
    x = make_input((1, 8, 5, 6))
    assert_raises_with(lambda: block.attention_for_queries(x, torch.tensor([-1])), [NAME, "[-1]"])
