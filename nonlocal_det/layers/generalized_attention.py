"""Generalized attention of Zhu et al., "An Empirical Study of Spatial Attention Mechanisms in
Deep Networks" (ICCV 2019, arXiv:1904.05873), as mmcv computes it
(``mmcv/cnn/bricks/generalized_attention.py``, ``GeneralizedAttention``).

Per head m, query position i (on the query grid, stride ``q_stride``) and key position j (on the
key/value grid, stride ``kv_stride``), the energy is the sum of the terms selected by
``attention_type`` (a string of four 0/1 characters):

    E_ij = [1] q_i . k_j                      query and key content
         + [2] q_i . (R^x_ij + R^y_ij)        query content and relative position
         + [3] u . k_j                        key content only (a learned vector u per head)
         + [4] w . (R^x_ij + R^y_ij)          relative position only (a learned vector w per head)

with q = W_q x, k = W_k x (1x1 convs, no bias, C // heads channels per head), no 1/sqrt(d)
scale, R^x_ij = W_x emb(dx_ij) / sqrt(2) and R^y_ij = W_y emb(dy_ij) / sqrt(2) where emb is the
sinusoidal embedding (wave length 1000) of the pixel offset between query and key. Then

    z = x + gamma * up(W_proj concat_m(sum_j softmax_j(E_ij) v_j))

(up: bilinear upsampling when ``q_stride`` > 1). Terms [1] and [3] alone or together never build
the N x M matrix (N queries, M keys): they go through ``scaled_dot_product_attention``, or, for
[3] alone, one softmax over the keys shared by every query. Terms [2] and [4], and a
``spatial_range`` >= 0, need the N x M energy of every head (as in mmcv).
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import nn

from . import _common

__all__ = ["GeneralizedAttention"]


def _flags(attention_type):
    """Four 0/1 numbers (a YAML config's list) as the string of four '0'/'1' characters."""
    if isinstance(attention_type, (list, tuple)) and all(v in (0, 1) for v in attention_type):
        return "".join(str(int(v)) for v in attention_type)
    return attention_type


def _kaiming_uniform_(weight: torch.Tensor) -> None:
    """mmcv's ``kaiming_init(mode='fan_in', nonlinearity='leaky_relu', a=1,
    distribution='uniform')``: uniform(-sqrt(3 / fan_in), sqrt(3 / fan_in))."""
    nn.init.kaiming_uniform_(weight, a=1, mode="fan_in", nonlinearity="leaky_relu")


class GeneralizedAttention(CNNBlockBase):
    """Generalized attention block (mmcv ``GeneralizedAttention``), residual, identity at init; a
    Detectron2 ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``).

    Sub-modules and parameters are named as in mmcv: ``query_conv`` (terms 1, 2), ``key_conv``
    (terms 1, 3), ``value_conv``, ``appr_geom_fc_x`` / ``appr_geom_fc_y`` (linear D/2 -> heads *
    d, terms 2, 4), ``appr_bias`` (u, term 3), ``geom_bias`` (w, term 4), ``proj_conv`` (1x1 conv
    heads * d -> C, with bias) and ``gamma``. d = C // num_heads (mmcv's rounding). mmcv
    stores its ``spatial_range`` mask as a (non-trainable) parameter ``local_constraint_map``;
    this block computes it on the fly, so that key is absent here.

    Initialisation as mmcv: convs and linears Kaiming uniform (fan_in, a=1: bound
    sqrt(3 / fan_in)), ``proj_conv`` bias 0, u and w uniform(-s, s) with s = 1 / sqrt(2 d), gamma
    0 (so the block starts as the identity).

    Published settings (mmdetection ``configs/empirical_attention``): after conv2 (after its norm
    and ReLU) of every block of res4 and res5, ``attention_type`` '1111' or '0010', 8 heads,
    ``kv_stride`` 2, ``spatial_range`` -1. mmcv's own default for ``num_heads`` is 9; here 8.

    Differences from mmcv (identical results where mmcv works): ``spatial_range`` is applied
    for any input size and channel count (mmcv only for C = 256 / 512 and sides <= 84), measures
    offsets in input pixels (mmcv uses the query-grid index, the same for ``q_stride`` = 1), and
    with '0010' keeps a window per query (mmcv applies the first query's window to all).

    Args:
        in_channels (int): C, channels of the input and of the output.
        spatial_range (int): keys farther than this (in input pixels, per axis) are ignored;
            -1: no limit (default).
        num_heads (int): number of heads. Default 8.
        position_embedding_dim (int): D, length of the sinusoidal embedding of an offset
            (a multiple of 4); -1: D = C (mmcv's default).
        position_magnitude (float): factor on the pixel offsets before the embedding. Default 1.
        kv_stride (int): keys and values are taken every ``kv_stride`` pixels. Default 2.
        q_stride (int): queries are taken every ``q_stride`` pixels, the output upsampled
            bilinearly. Default 1.
        attention_type (str): four '0'/'1' characters selecting the terms [1]..[4], at least one
            '1'. Default '1111'. Four 0/1 numbers are accepted too ([0, 0, 1, 0]: a YAML config
            turns the string "1111" into a number, so its key is a list).
    """

    def __init__(
        self,
        in_channels: int,
        spatial_range: int = -1,
        num_heads: int = 8,
        position_embedding_dim: int = -1,
        position_magnitude: float = 1,
        kv_stride: int = 2,
        q_stride: int = 1,
        attention_type: Union[str, Sequence[int]] = "1111",
    ):
        _common.check_block_args(GeneralizedAttention, locals())
        attention_type = _flags(attention_type)
        terms = [c == "1" for c in attention_type]
        uses_position = terms[1] or terms[3]
        dim = position_embedding_dim if position_embedding_dim > 0 else in_channels
        super().__init__(in_channels, in_channels, stride=1)
        self.spatial_range = spatial_range
        self.num_heads = num_heads
        self.position_embedding_dim = dim
        self.position_magnitude = float(position_magnitude)
        self.kv_stride = kv_stride
        self.q_stride = q_stride
        self.attention_type = attention_type
        self.qk_content = terms[0]
        self.q_position = terms[1]
        self.k_content = terms[2]
        self.position_only = terms[3]
        self.qk_embed_dim = in_channels // num_heads
        self.v_dim = in_channels // num_heads
        # '1000', '0010', '1010' without a window: linear-memory paths
        self.uses_energy_matrix = uses_position or spatial_range >= 0
        inner = self.qk_embed_dim * num_heads

        self.query_conv: Optional[nn.Module] = None
        self.key_conv: Optional[nn.Module] = None
        self.appr_geom_fc_x: Optional[nn.Module] = None
        self.appr_geom_fc_y: Optional[nn.Module] = None
        if terms[0] or terms[1]:
            self.query_conv = nn.Conv2d(in_channels, inner, kernel_size=1, bias=False)
        if terms[0] or terms[2]:
            self.key_conv = nn.Conv2d(in_channels, inner, kernel_size=1, bias=False)
        self.value_conv = nn.Conv2d(in_channels, self.v_dim * num_heads, kernel_size=1, bias=False)
        if uses_position:
            self.appr_geom_fc_x = nn.Linear(dim // 2, inner, bias=False)
            self.appr_geom_fc_y = nn.Linear(dim // 2, inner, bias=False)
        self.appr_bias: Optional[nn.Parameter] = None
        self.geom_bias: Optional[nn.Parameter] = None
        if terms[2]:
            self.appr_bias = nn.Parameter(torch.zeros(inner))
        if terms[3]:
            self.geom_bias = nn.Parameter(torch.zeros(inner))
        self.proj_conv = nn.Conv2d(self.v_dim * num_heads, in_channels, kernel_size=1, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @staticmethod
    def check_args(args, owner: str, key) -> None:
        """The checks of :func:`check_block_args` particular to this block."""
        c, heads = args["in_channels"], args["num_heads"]
        for name in ("spatial_range", "num_heads", "kv_stride", "q_stride"):
            _common.check_int(owner, key(name), args[name], -1 if name == "spatial_range" else 1)
        allowed = f"1 <= num_heads <= in_channels={c}"
        _common.check_value(owner, key("num_heads"), heads, heads <= c, allowed)
        t = _flags(args["attention_type"])
        ok = isinstance(t, str) and len(t) == 4 and set(t) <= set("01") and "1" in t
        allowed = "four '0'/'1' characters with at least one '1', e.g. '1111', '0010', '1000'"
        _common.check_value(owner, key("attention_type"), t, ok, allowed)
        d = args["position_embedding_dim"]
        _common.check_int(owner, key("position_embedding_dim"), d, -1)
        dim = d if d > 0 else c
        ok = d != 0 and (dim % 4 == 0 or (t[1], t[3]) == ("0", "0"))
        allowed = f"-1 (D = in_channels) or D > 0, a multiple of 4 with position terms (D = {dim})"
        _common.check_value(owner, key("position_embedding_dim"), d, ok, allowed)
        _common.check_positive(owner, key("position_magnitude"), args["position_magnitude"])

    def reset_parameters(self) -> None:
        """mmcv's initialisation (see the class docstring); gamma 0."""
        for m in (
            self.query_conv,
            self.key_conv,
            self.value_conv,
            self.appr_geom_fc_x,
            self.appr_geom_fc_y,
            self.proj_conv,
        ):
            if m is not None:
                _kaiming_uniform_(m.weight)
        nn.init.zeros_(self.proj_conv.bias)
        bound = 1.0 / math.sqrt(self.qk_embed_dim * 2)
        for p in (self.appr_bias, self.geom_bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return (
            f"attention_type={self.attention_type!r}, num_heads={self.num_heads}, "
            f"kv_stride={self.kv_stride}, q_stride={self.q_stride}, "
            f"spatial_range={self.spatial_range}, "
            f"position_embedding_dim={self.position_embedding_dim}"
        )

    # ----------------------------------------------------------------------------------------
    def _grids(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The query grid (every q_stride-th pixel) and key/value grid (every kv_stride-th)."""
        x_q = x if self.q_stride == 1 else x[:, :, :: self.q_stride, :: self.q_stride]
        x_kv = x if self.kv_stride == 1 else x[:, :, :: self.kv_stride, :: self.kv_stride]
        return x_q, x_kv

    def _query_key(
        self, x_q: torch.Tensor, x_kv: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """q (N, heads, L, d) when ``query_conv`` exists (terms 1, 2), k (N, heads, d, M) when
        ``key_conv`` exists (terms 1, 3); None otherwise. In float32 at least: their products
        are the energies (see ``conv1x1_fp32``)."""
        q: Optional[torch.Tensor] = None
        k: Optional[torch.Tensor] = None
        query_conv = self.query_conv
        if query_conv is not None:
            q = _common.conv1x1_fp32(x_q, query_conv.weight, None)
            q = q.reshape(x_q.shape[0], self.num_heads, self.qk_embed_dim, -1).transpose(2, 3)
        key_conv = self.key_conv
        if key_conv is not None:
            k = _common.conv1x1_fp32(x_kv, key_conv.weight, None)
            k = k.reshape(x_kv.shape[0], self.num_heads, self.qk_embed_dim, -1)
        return q, k

    def _head_vector(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """u or w as (heads, 1, d), to broadcast against (.., heads, L, d)."""
        return p.reshape(self.num_heads, 1, self.qk_embed_dim).to(dtype)

    def _offsets(self, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype):
        """Pixel offsets (query - key) * magnitude along one axis: (n_q, n_k)."""
        pos_q = torch.arange(n_q, device=device, dtype=dtype) * self.q_stride
        pos_k = torch.arange(n_k, device=device, dtype=dtype) * self.kv_stride
        return (pos_q.unsqueeze(1) - pos_k.unsqueeze(0)) * self.position_magnitude

    def _position_features(
        self, n_q: int, n_k: int, weight: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """R = W emb(offset) / sqrt(2) along one axis: (n_q, n_k, heads, d), in ``dtype``."""
        dim = self.position_embedding_dim
        offsets = self._offsets(n_q, n_k, device, dtype).unsqueeze(2)  # (n_q, n_k, 1)
        # wave length 1000, as mmcv
        exponent = torch.arange(dim // 4, device=device, dtype=dtype) * (4.0 / dim)
        angles = offsets / torch.pow(torch.full_like(exponent, 1000.0), exponent)
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=2)  # (n_q, n_k, D/2)
        feats = F.linear(emb, weight.to(dtype)) / math.sqrt(2.0)
        return feats.reshape(n_q, n_k, self.num_heads, self.qk_embed_dim)

    def _window(self, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
        """Allowed keys along one axis for ``spatial_range`` r (mmcv's window): key index j with
        floor((p - r) / s) <= j <= floor((p + r + 1) / s), p = query pixel, s = kv_stride."""
        p = torch.arange(n_q, device=device) * self.q_stride
        r = self.spatial_range
        lo = torch.div(p - r, self.kv_stride, rounding_mode="floor")
        hi = torch.div(p + r + 1, self.kv_stride, rounding_mode="floor")
        j = torch.arange(n_k, device=device)
        return (j.unsqueeze(0) >= lo.unsqueeze(1)) & (j.unsqueeze(0) <= hi.unsqueeze(1))

    def _attention(
        self,
        q: Optional[torch.Tensor],
        k: Optional[torch.Tensor],
        ys: Optional[torch.Tensor],
        xs: Optional[torch.Tensor],
        grid_q: List[int],
        grid_kv: List[int],
        like: torch.Tensor,
    ) -> torch.Tensor:
        """softmax_j(E_ij) for the queries in ``q`` (all of the query grid when ``ys`` and ``xs``
        are None, else the rows (ys, xs) of it), float32 at least: (N or 1, heads, Q, M).

        q: (N, heads, Q, d) or None; k: (N, heads, d, M) or None; grid_q = [hq, wq] and
        grid_kv = [hk, wk]: the query and key/value grids; like: the input (device, dtype).

        The energy is one matrix product of augmented vectors, so that no (Q, M) tensor but the
        product itself and its softmax is made: [q + u | ex_i | ey_i] . [k_j | onehot(x_j) |
        onehot(y_j)] = (q_i + u) . k_j + ex_i[x_j] + ey_i[y_j], with ex_i[x'] = (q_i + w) .
        R^x(x_i - x') and ey_i[y'] the same along y (a ones column against u . k_j when u comes
        without term 1).
        """
        hq, wq = grid_q[0], grid_q[1]
        hk, wk = grid_kv[0], grid_kv[1]
        heads, d, num_k = self.num_heads, self.qk_embed_dim, hk * wk
        num_q = hq * wq
        if ys is not None:
            num_q = ys.shape[0]
        device = like.device
        dt = torch.promote_types(like.dtype, torch.float32)
        with torch.autocast(device_type="cpu", enabled=False):
            with torch.autocast(device_type="cuda", enabled=False):
                q_parts: List[torch.Tensor] = []
                k_parts: List[torch.Tensor] = []
                u = self.appr_bias
                if self.qk_content and q is not None and k is not None:
                    qc = q.to(dt)
                    if u is not None:  # (q + u) . k
                        qc = qc + self._head_vector(u, dt)
                    q_parts.append(qc)
                    k_parts.append(k.to(dt))
                elif u is not None and k is not None:  # 1 . (u . k_j)
                    q_parts.append(torch.ones(1, heads, num_q, 1, device=device, dtype=dt))
                    k_parts.append(torch.matmul(self._head_vector(u, dt), k.to(dt)))
                fc_x = self.appr_geom_fc_x
                fc_y = self.appr_geom_fc_y
                if fc_x is not None and fc_y is not None:
                    px = self._position_features(wq, wk, fc_x.weight, device, dt)
                    py = self._position_features(hq, hk, fc_y.weight, device, dt)
                    w = self.geom_bias
                    if self.q_position and q is not None:  # (q + w) . R, or q . R
                        qg = q.to(dt)
                        if w is not None:
                            qg = qg + self._head_vector(w, dt)
                        if ys is not None and xs is not None:
                            ex = torch.einsum("nhqd,qkhd->nhqk", [qg, px[xs]])
                            ey = torch.einsum("nhqd,qkhd->nhqk", [qg, py[ys]])
                        else:
                            qg = qg.reshape(qg.shape[0], heads, hq, wq, d)
                            ex = torch.einsum("nhyxd,xkhd->nhyxk", [qg, px])
                            ey = torch.einsum("nhyxd,ykhd->nhyxk", [qg, py])
                            ex = ex.reshape(qg.shape[0], heads, num_q, wk)
                            ey = ey.reshape(qg.shape[0], heads, num_q, hk)
                    elif w is not None:  # w . R, the same for every image
                        wh = w.reshape(heads, d).to(dt)
                        ex = torch.einsum("hd,xkhd->hxk", [wh, px])  # (heads, wq, wk)
                        ey = torch.einsum("hd,ykhd->hyk", [wh, py])  # (heads, hq, hk)
                        if ys is not None and xs is not None:
                            ex = ex[:, xs]
                            ey = ey[:, ys]
                        else:
                            ex = ex.unsqueeze(1).expand(heads, hq, wq, wk)
                            ey = ey.unsqueeze(2).expand(heads, hq, wq, hk)
                        ex = ex.reshape(1, heads, num_q, wk)
                        ey = ey.reshape(1, heads, num_q, hk)
                    else:
                        raise RuntimeError("GeneralizedAttention: position terms without q or w")
                    q_parts.append(ex)
                    q_parts.append(ey)
                    j = torch.arange(num_k, device=device)
                    one_x = j.unsqueeze(0) % wk == torch.arange(wk, device=device).unsqueeze(1)
                    one_y = j.unsqueeze(0) // wk == torch.arange(hk, device=device).unsqueeze(1)
                    k_parts.append(one_x.to(dt).unsqueeze(0).unsqueeze(0))  # (1, 1, wk, M)
                    k_parts.append(one_y.to(dt).unsqueeze(0).unsqueeze(0))  # (1, 1, hk, M)
                batch_q = 1
                for t in q_parts:
                    batch_q = max(batch_q, t.shape[0])
                batch_k = 1
                for t in k_parts:
                    batch_k = max(batch_k, t.shape[0])
                qa = torch.cat(
                    [t.expand(batch_q, heads, num_q, t.shape[3]) for t in q_parts], dim=3
                )
                ka = torch.cat(
                    [t.expand(batch_k, heads, t.shape[2], num_k) for t in k_parts], dim=2
                )
                energy = torch.matmul(qa, ka)  # (N or 1, heads, Q, M)
                if self.spatial_range >= 0:
                    allowed_y = self._window(hq, hk, device)  # (hq, hk)
                    allowed_x = self._window(wq, wk, device)  # (wq, wk)
                    if ys is not None and xs is not None:
                        allowed = allowed_y[ys].unsqueeze(2) & allowed_x[xs].unsqueeze(1)
                    else:
                        allowed = allowed_y.reshape(hq, 1, hk, 1) & allowed_x.reshape(1, wq, 1, wk)
                    energy = energy.masked_fill_(~allowed.reshape(num_q, num_k), float("-inf"))
                return torch.softmax(energy, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _common.check_input("GeneralizedAttention", x, self.in_channels)
        x_q, x_kv = self._grids(x)
        n = x.shape[0]
        hq, wq = x_q.shape[2], x_q.shape[3]
        heads = self.num_heads
        v = self.value_conv(x_kv)
        v = v.reshape(n, heads, self.v_dim, -1).transpose(2, 3)  # (N, heads, M, dv)
        q, k = self._query_key(x_q, x_kv)
        u = self.appr_bias
        if self.uses_energy_matrix:
            grid_kv = [x_kv.shape[2], x_kv.shape[3]]
            a = self._attention(q, k, None, None, [hq, wq], grid_kv, x)  # (N or 1, h, L, M)
            y = torch.matmul(a.to(v.dtype), v)  # (N, heads, L, dv)
        elif q is not None and k is not None:
            # '1000' / '1010': softmax_j(q_i . k_j) (+ u . k_j) without the N x M matrix
            if u is not None:
                q = q + self._head_vector(u, q.dtype)
            # float32 at least (sdpa_fp32): q . k is not scaled; back in v's dtype
            kt = k.transpose(2, 3).contiguous()
            y = _common.sdpa_fp32(q.contiguous(), kt, v.contiguous(), 1.0)
        elif u is not None and k is not None:
            # '0010': one softmax over the keys, shared by every query
            head = self._head_vector(u, k.dtype)
            a = _common.softmax_fp32(_common.matmul_fp32(head, k), 3)  # (N, h, 1, M)
            y = torch.matmul(a.to(v.dtype), v)  # (N, heads, 1, dv)
            hq, wq = 1, 1
        else:
            raise RuntimeError("GeneralizedAttention: no attention term")  # excluded in __init__
        y = y.transpose(2, 3).reshape(n, heads * self.v_dim, hq, wq)
        out = self.proj_conv(y)
        if self.q_stride > 1 and hq * wq > 1:
            out = F.interpolate(
                out, size=[x.shape[2], x.shape[3]], mode="bilinear", align_corners=False
            )
        return x + self.gamma * out

    # ----------------------------------------------------------------------------------------
    @torch.jit.unused
    def attention_for_queries(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Attention weights of chosen queries, averaged over the heads, on the key grid.

        Builds (heads, Q, M) energies for the Q chosen queries only.

        Args:
            x: input of the block, (N, C, H, W).
            queries: int64 tensor, (Q,) flat indices or (Q, 2) (y, x) coordinates on the query
                grid (the input grid when ``q_stride`` = 1; else every q_stride-th pixel).

        Returns:
            Tensor (N, Q, H_kv, W_kv): the mean over heads of softmax_j(E_ij), summing to 1 over
            the keys (the key/value grid, every kv_stride-th pixel).
        """
        _common.check_input("GeneralizedAttention", x, self.in_channels)
        x_q, x_kv = self._grids(x)
        hq, wq = x_q.shape[2], x_q.shape[3]
        hk, wk = x_kv.shape[2], x_kv.shape[3]
        flat = _common.flat_query_indices("GeneralizedAttention", queries, [hq, wq], x.device)
        ys, xs = flat // wq, flat % wq
        n = x.shape[0]
        q, k = self._query_key(x_q, x_kv)
        if q is not None:
            q = q[:, :, flat]
        a = self._attention(q, k, ys, xs, [hq, wq], [hk, wk], x)  # (N or 1, heads, Q, M)
        w = a.mean(dim=1).expand(n, len(flat), hk * wk)
        return w.reshape(n, len(flat), hk, wk).to(x.dtype)
