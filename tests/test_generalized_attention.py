"""Tests of ``GeneralizedAttention`` against the formula of Zhu et al. (mmcv's
``GeneralizedAttention``), the (query, key) pairs and their pixel offsets built explicitly:

    E_ij = [1] q_i . k_j + [2] q_i . (R^x_ij + R^y_ij) + [3] u . k_j + [4] w . (R^x_ij + R^y_ij)
    R^x_ij = W_x emb(x_i - x_j) / sqrt(2),  emb(t) = [sin(t / 1000^(4f/D)), cos(t / 1000^(4f/D))]_f
    z = x + gamma * up(W_proj concat_heads(sum_j softmax_j(E_ij) v_j))
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
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

from nonlocal_det.layers import GeneralizedAttention

pytestmark = FILTERS
NAME = "GeneralizedAttention"
ALL_TYPES = ["".join(t) for t in itertools.product("01", repeat=4)][1:]  # '0001' .. '1111'


def _embedding(offsets: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of pixel offsets (...,) -> (..., dim / 2): sines then cosines."""
    waves = [1000.0 ** (4.0 * f / dim) for f in range(dim // 4)]
    return torch.stack(
        [torch.sin(offsets / wv) for wv in waves] + [torch.cos(offsets / wv) for wv in waves], -1
    )


def _allowed(p: int, j: int, r: int, s: int) -> bool:
    """mmcv's window: key index j in [max((p - r) // s, 0), (p + r + 1) // s + 1)."""
    return max((p - r) // s, 0) <= j < (p + r + 1) // s + 1


def reference(block: GeneralizedAttention, x: torch.Tensor):
    """Returns (z, attention (N, heads, L, M)) in float64."""
    x = x.to(torch.float64)
    n, c, height, width = x.shape
    sq, skv = block.q_stride, block.kv_stride
    x_q, x_kv = x[:, :, ::sq, ::sq], x[:, :, ::skv, ::skv]
    hq, wq, hk, wk = x_q.shape[2], x_q.shape[3], x_kv.shape[2], x_kv.shape[3]
    heads, d, dim = block.num_heads, block.qk_embed_dim, block.position_embedding_dim
    terms = [t == "1" for t in block.attention_type]
    # pixel coordinates of every query i and key j
    qy = torch.tensor([y * sq for y in range(hq) for _ in range(wq)], dtype=torch.float64)
    qx = torch.tensor([xx * sq for _ in range(hq) for xx in range(wq)], dtype=torch.float64)
    ky = torch.tensor([y * skv for y in range(hk) for _ in range(wk)], dtype=torch.float64)
    kx = torch.tensor([xx * skv for _ in range(hk) for xx in range(wk)], dtype=torch.float64)
    num_q, num_k = hq * wq, hk * wk
    energy = torch.zeros(n, heads, num_q, num_k, dtype=torch.float64)
    if terms[0] or terms[1]:
        q = conv1x1(block.query_conv, x_q).reshape(n, heads, d, num_q)
    if terms[0] or terms[2]:
        k = conv1x1(block.key_conv, x_kv).reshape(n, heads, d, num_k)
    if terms[1] or terms[3]:
        mag = block.position_magnitude
        dx = (qx.unsqueeze(1) - kx.unsqueeze(0)) * mag  # (L, M)
        dy = (qy.unsqueeze(1) - ky.unsqueeze(0)) * mag
        wx = block.appr_geom_fc_x.weight.double()
        wy = block.appr_geom_fc_y.weight.double()
        rel = (_embedding(dx, dim) @ wx.T + _embedding(dy, dim) @ wy.T) / math.sqrt(2)
        rel = rel.reshape(num_q, num_k, heads, d)  # R^x_ij + R^y_ij
    if terms[0]:
        energy += torch.einsum("nhdi,nhdj->nhij", q, k)
    if terms[1]:
        energy += torch.einsum("nhdi,ijhd->nhij", q, rel)
    if terms[2]:
        u = block.appr_bias.double().reshape(heads, d)
        energy += torch.einsum("hd,nhdj->nhj", u, k).unsqueeze(2)
    if terms[3]:
        w = block.geom_bias.double().reshape(heads, d)
        energy += torch.einsum("hd,ijhd->hij", w, rel).unsqueeze(0)
    if block.spatial_range >= 0:
        r = block.spatial_range
        allowed = torch.zeros(num_q, num_k, dtype=torch.bool)
        for i in range(num_q):
            for j in range(num_k):
                allowed[i, j] = _allowed(int(qy[i]), j // wk, r, skv) and _allowed(
                    int(qx[i]), j % wk, r, skv
                )
        energy = energy.masked_fill(~allowed, float("-inf"))
    e = torch.exp(energy - energy.amax(dim=3, keepdim=True))
    attention = e / e.sum(dim=3, keepdim=True)
    v = conv1x1(block.value_conv, x_kv).reshape(n, heads, block.v_dim, num_k)
    out = torch.einsum("nhij,nhdj->nhdi", attention, v).reshape(n, heads * block.v_dim, hq, wq)
    out = conv1x1(block.proj_conv, out)
    if sq > 1:
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return x + block.gamma.double() * out, attention


def _block(attention_type="1111", **kwargs) -> GeneralizedAttention:
    kwargs = {"num_heads": 2, **kwargs}
    return randomize_(GeneralizedAttention(8, attention_type=attention_type, **kwargs))


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_forward_matches_reference_every_type(attention_type):
    block = _block(attention_type).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    out = block(x)
    assert out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference(block, x)[0], torch.float64)


@pytest.mark.parametrize("attention_type", ["1111", "1000", "1010", "0010", "0101"])
def test_forward_matches_reference_fp32(attention_type):
    block = _block(attention_type)
    x = make_input((2, 8, 5, 6))
    out = block(x)
    assert out.dtype == torch.float32
    assert_close(out, reference(block, x)[0], torch.float32)


@pytest.mark.parametrize("attention_type", ["1111", "1000", "0010", "0001"])
@pytest.mark.parametrize(
    "kv_stride,q_stride,spatial_range",
    [(1, 1, -1), (2, 2, -1), (3, 2, -1), (1, 1, 1), (2, 1, 2), (2, 2, 1), (3, 2, 0)],
)
def test_forward_matches_reference_strides_and_range(
    attention_type, kv_stride, q_stride, spatial_range
):
    block = _block(
        attention_type, kv_stride=kv_stride, q_stride=q_stride, spatial_range=spatial_range
    ).double()
    x = make_input((2, 8, 5, 7), torch.float64)
    assert_close(block(x), reference(block, x)[0], torch.float64)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_heads=3),  # d = 2, 6 of the 8 channels per projection (mmcv's rounding)
        dict(position_embedding_dim=4),
        dict(position_embedding_dim=12, position_magnitude=2.5),
        dict(num_heads=1, kv_stride=1),
    ],
    ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()),
)
def test_forward_matches_reference_other_settings(kwargs):
    block = _block("1111", **kwargs).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    assert_close(block(x), reference(block, x)[0], torch.float64)


@pytest.mark.parametrize(
    "attention_type,kwargs",
    [
        ("1111", {}),
        ("1000", {}),
        ("1010", {"kv_stride": 1}),
        ("0010", {}),
        ("0001", {}),
        ("0110", {}),
        ("1111", {"q_stride": 2, "spatial_range": 1}),
        ("0010", {"spatial_range": 2}),
    ],
)
def test_attention_for_queries(attention_type, kwargs):
    block = _block(attention_type, **kwargs).double()
    x = make_input((2, 8, 5, 6), torch.float64)
    _, attention = reference(block, x)
    hq, wq = x[:, :, :: block.q_stride, :: block.q_stride].shape[2:]
    hk, wk = x[:, :, :: block.kv_stride, :: block.kv_stride].shape[2:]
    flat = torch.tensor([0, hq * wq - 1, (hq * wq) // 2, 1])
    coords = torch.stack(torch.unravel_index(flat, (hq, wq)), dim=1)
    expected = attention[:, :, flat].mean(dim=1).reshape(2, 4, hk, wk)
    for queries in (flat, coords):
        with torch.no_grad():
            w = block.attention_for_queries(x, queries)
        assert w.shape == (2, 4, hk, wk)
        assert_close(w, expected, torch.float64)
    torch.testing.assert_close(w.sum(dim=(2, 3)), torch.ones(2, 4, dtype=torch.float64))


def test_mmcv_names_init_and_identity_then_learns():
    torch.manual_seed(0)
    block = GeneralizedAttention(64)
    assert block.num_heads == 8 and block.kv_stride == 2 and block.q_stride == 1
    assert block.position_embedding_dim == 64 and block.attention_type == "1111"
    assert sorted(block.state_dict()) == sorted(
        [f"{m}.weight" for m in ("query_conv", "key_conv", "value_conv", "proj_conv")]
        + ["appr_geom_fc_x.weight", "appr_geom_fc_y.weight", "appr_bias", "geom_bias"]
        + ["proj_conv.bias", "gamma"]
    )
    assert set(GeneralizedAttention(64, attention_type="0010").state_dict()) == {
        "key_conv.weight",
        "value_conv.weight",
        "appr_bias",
        "proj_conv.weight",
        "proj_conv.bias",
        "gamma",
    }
    # Kaiming uniform with a = 1: bound sqrt(3 / fan_in); u, w within 1 / sqrt(2 d)
    for m, fan_in in ((block.query_conv, 64), (block.proj_conv, 64), (block.appr_geom_fc_x, 32)):
        bound = math.sqrt(3 / fan_in)
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
    assert block.appr_bias.abs().max() <= 1 / math.sqrt(2 * 8)
    assert torch.count_nonzero(block.proj_conv.bias) == 0 and block.gamma.item() == 0
    assert_identity_then_learns(block, make_input((2, 64, 5, 6)), zeroed="gamma")


def test_cnn_block_base_freeze():
    assert_cnn_block_freezes(
        randomize_(GeneralizedAttention(8, num_heads=2)), make_input((2, 8, 5, 6))
    )


@pytest.mark.parametrize(
    "attention_type,kwargs",
    [("1111", {}), ("1000", {}), ("0010", {}), ("0101", {"q_stride": 2, "spatial_range": 1})],
)
def test_gradcheck(attention_type, kwargs):
    block = randomize_(
        GeneralizedAttention(4, num_heads=2, attention_type=attention_type, **kwargs)
    )
    assert_gradcheck(block, make_input((2, 4, 3, 5)))


@pytest.mark.parametrize(
    "attention_type,kwargs",
    [
        ("1111", {}),
        ("1000", {}),
        ("1010", {}),
        ("0010", {}),
        ("1111", {"q_stride": 2, "spatial_range": 1}),
    ],
)
def test_jit_script_and_trace(attention_type, kwargs):
    block = _block(attention_type, **kwargs)
    assert_script_and_trace(block, make_input((2, 8, 5, 6)), make_input((1, 8, 7, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention_type", ["1111", "1000", "0010", "0101"])
def test_autocast_large_activations(attention_type, dtype):
    torch.manual_seed(0)
    block = GeneralizedAttention(64, attention_type=attention_type)  # mmcv's init
    with torch.no_grad():
        block.gamma.fill_(1.0)
    assert_autocast_finite(block, make_input((2, 64, 6, 7), scale=100.0), dtype)


@pytest.mark.parametrize("attention_type", ["1000", "1010", "0010"])
def test_content_terms_never_build_n_by_m(attention_type):
    block = randomize_(
        GeneralizedAttention(16, num_heads=2, kv_stride=1, attention_type=attention_type)
    )
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 64, 64)))
    assert rec.largest * 16 < 4096 * 4096, rec.op
    if attention_type != "0010":
        assert any("flash_attention" in op for op in rec.ops), sorted(rec.ops)


def test_position_terms_build_n_by_m():
    """What the class docstring says: the position terms need the N x M energy per head."""
    block = randomize_(GeneralizedAttention(16, num_heads=2, kv_stride=1, attention_type="0100"))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 16, 16)))
    assert rec.largest >= 2 * 256 * 256, rec.op


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(in_channels=0), ["in_channels", "0", "int >= 1"]),
        (dict(num_heads=0), ["num_heads", "0", "int >= 1"]),
        (dict(num_heads=9), ["num_heads=9", "in_channels=8", "num_heads <= in_channels"]),
        (dict(kv_stride=0), ["kv_stride", "0", "int >= 1"]),
        (dict(q_stride=1.5), ["q_stride", "1.5", "int >= 1"]),
        (dict(spatial_range=-2), ["spatial_range", "-2", "int >= -1"]),
        (dict(attention_type="0000"), ["attention_type", "'0000'", "at least one '1'"]),
        (dict(attention_type="11"), ["attention_type", "'11'", "four '0'/'1'"]),
        (dict(attention_type="1112"), ["attention_type", "'1112'", "four '0'/'1'"]),
        (dict(attention_type=1111), ["attention_type", "1111", "four '0'/'1'"]),
        (dict(position_embedding_dim=6), ["position_embedding_dim", "6", "multiple of 4"]),
        (dict(position_embedding_dim=0), ["position_embedding_dim", "0", "-1"]),
        (dict(position_magnitude=0), ["position_magnitude", "0", "a number > 0"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, **kwargs}
    assert_raises_with(lambda: GeneralizedAttention(**kwargs), [NAME] + substrings)


def test_position_dim_only_checked_when_used():
    GeneralizedAttention(6, num_heads=2, attention_type="1010")  # D = 6 unused: fine
    assert_raises_with(
        lambda: GeneralizedAttention(6, num_heads=2, attention_type="0001"),
        [NAME, "position_embedding_dim=-1", "D = 6", "multiple of 4"],
    )


def test_input_errors():
    block = GeneralizedAttention(8, num_heads=2)
    assert_input_errors(block, NAME, 8)
    x = make_input((1, 8, 5, 6))
    assert_raises_with(lambda: block.attention_for_queries(x, torch.tensor([30])), [NAME, "[30]"])
