"""Criss-cross attention of Huang et al., "CCNet: Criss-Cross Attention for Semantic
Segmentation" (ICCV 2019; TPAMI 2020), as the authors' code computes it (speedinghzl/CCNet
``cc_attention``, ``networks/ccnet.py``; mmcv ``mmcv/ops/cc_attention.py``):

    e_{(h,w),(i,w)} = q_{hw} . k_{iw}   (i != h: its column)
    e_{(h,w),(h,j)} = q_{hw} . k_{hj}   (its row)
    A = softmax over the H + W - 1 positions of the row and column (one softmax, the position
        itself counted once: the column's diagonal is masked with -inf, as in the authors' code)
    z_{hw} = x_{hw} + gamma * sum_{p in row + column} A_{hw,p} v_p

applied R times with shared weights (R = 2: every pair of positions is then connected). The
attention weights take H W (H + W) entries per image, never an (H W) x (H W) tensor.
"""

from typing import Optional, Tuple

import torch
from detectron2.layers import CNNBlockBase
from torch import nn

from ._common import (
    check_block_args,
    check_input,
    check_int,
    check_value,
    conv1x1_fp32,
    flat_query_indices,
    matmul_fp32,
)

__all__ = ["CrissCrossAttention"]


class CrissCrossAttention(CNNBlockBase):
    """Recurrent criss-cross attention (RCCA): ``x <- x + gamma * CCA(x)``, ``recurrence`` times.

    Sub-modules as in CCNet and mmcv: ``query_conv``, ``key_conv`` (1x1 convs C -> C // 8, with
    bias), ``value_conv`` (1x1 conv C -> C, with bias) and the scalar ``gamma`` (mmcv wraps it in
    a ``Scale`` module: its key is ``gamma.scale``). No scaling of q . k (as the authors). The
    weights are shared by the ``recurrence`` passes. Initialisation as the authors: PyTorch's
    default conv init, gamma 0, so the block starts as the identity.

    The query, key, energies and their softmax are computed in float32 (autocast off): the
    un-scaled q . k overflows float16 with large activations.

    A Detectron2 ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``); in CCNet it sits
    in the segmentation head (``RCCAModule``), after a 3x3 conv 2048 -> 512.

    Args:
        in_channels (int): C, channels of the input and of the output.
        inner_channels (int or None): width of the query and key; default C // 8 (the authors').
        recurrence (int): R, the number of passes with shared weights. Default 2.
    """

    def __init__(self, in_channels: int, inner_channels: Optional[int] = None, recurrence: int = 2):
        check_block_args(CrissCrossAttention, locals())
        inner_channels = in_channels // 8 if inner_channels is None else inner_channels
        super().__init__(in_channels, in_channels, stride=1)
        self.inner_channels = inner_channels
        self.recurrence = recurrence
        self.query_conv = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def check_args(args, owner: str, key) -> None:
        """The checks of :func:`check_block_args` particular to this block."""
        c, inner = args["in_channels"], args["inner_channels"]
        if inner is None:
            allowed = f"an int >= 1; None (in_channels // 8) if in_channels >= 8 (in_channels={c})"
            check_value(owner, key("inner_channels"), inner, c >= 8, allowed)
        else:
            check_int(owner, key("inner_channels"), inner, 1)
        check_int(owner, key("recurrence"), args["recurrence"], 1)

    def extra_repr(self) -> str:
        return f"inner_channels={self.inner_channels}, recurrence={self.recurrence}"

    # ----------------------------------------------------------------------------------------
    def _query_key(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """q and k (N, C', H, W) in float32 at least: their products are the energies."""
        q = conv1x1_fp32(x, self.query_conv.weight, self.query_conv.bias)
        k = conv1x1_fp32(x, self.key_conv.weight, self.key_conv.bias)
        return q, k

    def _energies(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Softmax-normalised weights of the column (N, W, H, H') and of the row (N, H, W, W'),
        float32 at least: a_col[n, w, h, i] weighs v[:, i, w], a_row[n, h, w, j] weighs v[:, h, j]
        for the query (h, w); a_col[n, w, h, h] = 0 (the position itself is in its row)."""
        h = x.shape[2]
        q, k = self._query_key(x)
        # column: batch (n, w), queries h, keys i
        e_col = matmul_fp32(q.permute(0, 3, 2, 1), k.permute(0, 3, 1, 2))  # (N, W, H, H)
        diagonal = torch.eye(h, dtype=torch.bool, device=x.device)
        e_col = e_col.masked_fill(diagonal, float("-inf"))
        # row: batch (n, h), queries w, keys j
        e_row = matmul_fp32(q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3))  # (N, H, W, W)
        # one softmax over the H + W entries of each query
        e = torch.cat([e_col.permute(0, 2, 1, 3), e_row], dim=3)  # (N, H, W, H + W)
        a = torch.softmax(e, dim=3)
        a_col = a[:, :, :, :h].permute(0, 2, 1, 3)  # (N, W, H, H)
        a_row = a[:, :, :, h:]  # (N, H, W, W)
        return a_col, a_row

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        a_col, a_row = self._energies(x)
        v = self.value_conv(x)
        a_col = a_col.to(v.dtype)
        a_row = a_row.to(v.dtype)
        # out[n, c, h, w] = sum_i a_col[n, w, h, i] v[n, c, i, w]
        #                  + sum_j a_row[n, h, w, j] v[n, c, h, j]
        out_col = torch.matmul(v.permute(0, 3, 1, 2), a_col.transpose(2, 3))  # (N, W, C, H)
        out_row = torch.matmul(v.permute(0, 2, 1, 3), a_row.transpose(2, 3))  # (N, H, C, W)
        out = out_col.permute(0, 2, 3, 1) + out_row.permute(0, 2, 1, 3)
        return x + self.gamma * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("CrissCrossAttention", x, self.in_channels)
        for _ in range(self.recurrence):
            x = self._pass(x)
        return x

    @torch.jit.unused
    def attention_for_queries(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """First-pass attention weights of chosen queries on the whole H x W grid.

        Only the Q queries' rows and columns are computed.

        Args:
            x: input of the block, (N, C, H, W).
            queries: int64 tensor, (Q,) flat indices into the H x W positions or (Q, 2) (y, x)
                coordinates.

        Returns:
            Tensor (N, Q, H, W): the weights on the query's row and column (summing to 1), zero
            elsewhere.
        """
        check_input("CrissCrossAttention", x, self.in_channels)
        n, _, h, w = x.shape
        flat = flat_query_indices("CrissCrossAttention", queries, [h, w], x.device)
        ys, xs = flat // w, flat % w
        q, k = self._query_key(x)
        q = q[:, :, ys, xs]  # (N, C', Q)
        qt = q.permute(0, 2, 1).unsqueeze(2)  # (N, Q, 1, C')
        k_col = k[:, :, :, xs].permute(0, 3, 1, 2)  # (N, Q, C', H): column of each query
        k_row = k[:, :, ys, :].permute(0, 2, 1, 3)  # (N, Q, C', W): row of each query
        e_col = matmul_fp32(qt, k_col).squeeze(2)  # (N, Q, H)
        e_row = matmul_fp32(qt, k_row).squeeze(2)  # (N, Q, W)
        own = torch.arange(h, device=x.device).unsqueeze(0) == ys.unsqueeze(1)  # (Q, H)
        e_col = e_col.masked_fill(own, float("-inf"))
        a = torch.softmax(torch.cat([e_col, e_row], dim=2), dim=2)
        num_q = len(flat)
        grid = a.new_zeros(n, num_q, h, w)
        # column: grid[n, q, i, xs[q]] = a_col[n, q, i] (its own entry is 0);
        # row: grid[n, q, ys[q], j] += a_row[n, q, j]
        col_index = xs.view(1, num_q, 1, 1).expand(n, num_q, h, 1)
        grid = grid.scatter(3, col_index, a[:, :, :h].unsqueeze(3))
        row_index = ys.view(1, num_q, 1, 1).expand(n, num_q, 1, w)
        grid = grid.scatter_add(2, row_index, a[:, :, h:].unsqueeze(2))
        return grid.to(x.dtype)
