"""The disentangled non-local block (DNL) of Yin et al., "Disentangled Non-Local Neural Networks"
(ECCV 2020, arXiv:2006.06668), as the authors' code computes it (Howal/DNL-Object-Detection
``mmdet/ops/nl_gc_block.py``, ``_NonLocalNd_bn`` / ``NonLocal2dGc``, with the settings of
``configs/dnlnet/mask_rcnn_r50_r4_nlgcb_c4_fpn_syncabn_4conv1fc_1x_4nodes.py``):

    q = W_q x + b_q - mean_i(.),   k = W_k x' + b_k - mean_j(.)     (whitening, C' = r C channels)
    v = W_v x'                                                       (C channels, no bias)
    pairwise_i = gamma * sum_j softmax_j(q_i . k_j / (sqrt(C') T)) v_j
    unary = sum_j softmax_j(w_m . x'_j + b_m) v_j                     (the same for every i)
    z_i = x_i + pairwise_i + unary

with x' = x, or x max-pooled 2x2 with ``downsample``. The pairwise term goes through
``scaled_dot_product_attention`` and never builds the N x M matrix (N query and M key positions).
In float16 (autocast or a half module) the query, key, mask logits, both softmaxes and the
attention run in float32 (at T = 0.05 large activations give logits beyond float16's 65504) and
are cast back; the value and the residual stay in the input's precision.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import nn

from ._common import (
    check_block_args,
    check_input,
    check_positive,
    check_ratio,
    conv1x1_fp32,
    flat_query_indices,
    matmul_fp32,
    sdpa_fp32,
    softmax_fp32,
)

__all__ = ["DisentangledNonLocalBlock"]


class DisentangledNonLocalBlock(CNNBlockBase):
    """Disentangled non-local block: whitened pairwise term plus unary term, residual; a
    Detectron2 ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``). It follows the
    authors' code and detection configs (ratio 1/4, temperature 0.05, channel whitening, no
    output conv or norm).

    Sub-modules and parameters as in the authors' code: ``conv_query``, ``conv_key`` (1x1 convs
    C -> C' = int(C * ratio), with bias), ``conv_value`` (1x1 conv C -> C, no bias),
    ``conv_mask`` (1x1 conv C -> 1, with bias: the unary term) and ``gamma`` (a scalar on the
    pairwise term only).

    Initialisation as the authors: convs normal(0, 0.01), biases 0, gamma 0; the unary term is
    then not zero (W_v is random), so the block is not the identity unless ``zero_init``.

    Placement in the authors' configs: inside the second-to-last bottleneck of res4, after the
    residual add (``after_add``); "c4+c5" adds one in each res5 bottleneck.

    Args:
        in_channels (int): C, channels of the input and of the output.
        ratio (float): C' = int(C * ratio), width of the query and key. Default 1/4.
        temperature (float): T in the softmax of the pairwise term. Default 0.05.
        downsample (bool): max-pool (2x2, stride 2, floor; a size-1 axis is left alone) the
            input of the key, value and unary mask convs. Default False (their configs).
        zero_init (bool): start ``conv_value.weight`` at zero (identity at initialisation).
            Default False, as the authors.
    """

    def __init__(
        self,
        in_channels: int,
        ratio: float = 0.25,
        temperature: float = 0.05,
        downsample: bool = False,
        zero_init: bool = False,
    ):
        check_block_args(DisentangledNonLocalBlock, locals())
        super().__init__(in_channels, in_channels, stride=1)
        self.ratio = float(ratio)
        self.planes = planes = int(in_channels * ratio)
        self.temperature = float(temperature)
        self.downsample = downsample
        self.zero_init = zero_init
        # the softmax argument q_i . k_j / sqrt(C') / T as one factor
        self.scale = 1.0 / (math.sqrt(planes) * self.temperature)
        self.conv_query = nn.Conv2d(in_channels, planes, kernel_size=1)
        self.conv_key = nn.Conv2d(in_channels, planes, kernel_size=1)
        self.conv_value = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @staticmethod
    def check_args(args, owner: str, key) -> None:
        """The checks of :func:`check_block_args` particular to this block."""
        check_ratio(owner, key("ratio"), args["ratio"], args["in_channels"])
        check_positive(owner, key("temperature"), args["temperature"])

    def reset_parameters(self) -> None:
        """The authors' initialisation: convs normal(0, 0.01), biases 0, gamma 0; W_v zero with
        ``zero_init``."""
        for conv in (self.conv_query, self.conv_key, self.conv_value, self.conv_mask):
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.gamma)
        if self.zero_init:
            nn.init.zeros_(self.conv_value.weight)

    def extra_repr(self) -> str:
        return (
            f"planes={self.planes}, temperature={self.temperature:g}, "
            f"downsample={self.downsample}, zero_init={self.zero_init}"
        )

    # ----------------------------------------------------------------------------------------
    def _key_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.max_pool2d(x, kernel_size=[min(2, x.shape[2]), min(2, x.shape[3])])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whitened query (N, C', L) and key (N, C', M), in float32 at least (their products are
        the logits, see ``conv1x1_fp32``), and the value (N, C, M)."""
        xk = self._key_input(x)
        q = conv1x1_fp32(x, self.conv_query.weight, self.conv_query.bias).flatten(2)
        k = conv1x1_fp32(xk, self.conv_key.weight, self.conv_key.bias).flatten(2)
        v = self.conv_value(xk).flatten(2)
        q = q - q.mean(dim=2, keepdim=True)
        k = k - k.mean(dim=2, keepdim=True)
        return q, k, v

    def _unary_weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over the key positions of conv_mask(x'), float32 at least (the logits
        too): (N, 1, M)."""
        logits = conv1x1_fp32(self._key_input(x), self.conv_mask.weight, self.conv_mask.bias)
        return softmax_fp32(logits.flatten(2), 2)

    def _pairwise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sum_j softmax_j(q_i . k_j * scale) v_j for q (N, C', L), k (N, C', M), v (N, C, M);
        returns (N, C, L) in v's dtype, computed in float32 at least (``sdpa_fp32``).

        SDPA's fused kernels need equal query and value widths (else its math path builds the
        N x M matrix): the value is split into ceil(C / C') heads of width C' (zero-padded), each
        attending with the same query and key (expanded views).
        """
        n, cq, length = q.shape
        cv = v.shape[1]
        heads = (cv + cq - 1) // cq
        vt = v
        if heads * cq != cv:
            vt = F.pad(vt, [0, 0, 0, heads * cq - cv])
        # the fused kernels want unit stride along the feature axis (else: the math path)
        vt = vt.reshape(n, heads, cq, -1).transpose(2, 3).contiguous()  # (N, h, M, C')
        qt = q.transpose(1, 2).contiguous().unsqueeze(1).expand(n, heads, length, cq)
        kt = k.transpose(1, 2).contiguous().unsqueeze(1).expand(n, heads, k.shape[2], cq)
        # float32 at least (sdpa_fp32): the logits reach 1e4 - 1e5 at T = 0.05; back in v's dtype
        y = sdpa_fp32(qt, kt, vt, self.scale)  # (N, h, L, C')
        y = y.transpose(2, 3).reshape(n, heads * cq, length)
        return y[:, :cv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("DisentangledNonLocalBlock", x, self.in_channels)
        q, k, v = self._embed(x)
        pairwise = self._pairwise(q, k, v)  # (N, C, L)
        unary = torch.matmul(v, self._unary_weights(x).to(v.dtype).transpose(1, 2))  # (N, C, 1)
        out = self.gamma * pairwise + unary
        return x + out.reshape(x.shape)

    # ----------------------------------------------------------------------------------------
    def _key_shape(self, x: torch.Tensor) -> List[int]:
        if not self.downsample:
            return [x.shape[2], x.shape[3]]
        return [x.shape[2] // min(2, x.shape[2]), x.shape[3] // min(2, x.shape[3])]

    @torch.jit.unused
    def attention_for_queries(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Pairwise weights softmax_j(q_i . k_j / (sqrt(C') T)) for chosen queries only.

        Builds a (Q, M) matrix for the Q chosen queries, never the (H W, M) one. The unary
        term is :meth:`context_weights`.

        Args:
            x: input of the block, (N, C, H, W).
            queries: int64 tensor, (Q,) flat indices into the H x W positions or (Q, 2) (y, x)
                coordinates.

        Returns:
            Tensor (N, Q, H', W'), H' x W' the key grid (H x W, or pooled with ``downsample``),
            summing to 1 over the keys.
        """
        check_input("DisentangledNonLocalBlock", x, self.in_channels)
        flat = flat_query_indices("DisentangledNonLocalBlock", queries, list(x.shape[2:]), x.device)
        q, k, _ = self._embed(x)
        logits = matmul_fp32(q[:, :, flat].transpose(1, 2), k) * self.scale  # (N, Q, M)
        w = softmax_fp32(logits, 2)
        return w.reshape([x.shape[0], len(flat)] + self._key_shape(x)).to(x.dtype)

    @torch.jit.unused
    def context_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The unary term's weights softmax_j(conv_mask(x')_j), shared by every query.

        Args:
            x: input of the block, (N, C, H, W).

        Returns:
            Tensor (N, H', W') on the key grid, summing to 1.
        """
        check_input("DisentangledNonLocalBlock", x, self.in_channels)
        return self._unary_weights(x).reshape([x.shape[0]] + self._key_shape(x)).to(x.dtype)
