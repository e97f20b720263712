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
    check_bool,
    check_input,
    check_int,
    check_positive,
    check_ratio,
    conv1x1_fp32,
    flat_query_indices,
    matmul_fp32,
    sdpa_fp32,
    softmax_fp32,
)

__all__ = ["DisentangledNonLocalBlock"]

_NAME = "DisentangledNonLocalBlock"


class DisentangledNonLocalBlock(CNNBlockBase):
    """Disentangled non-local block: whitened pairwise term plus unary term, residual.

    Sub-modules and parameters are named as in the authors' code: ``conv_query``, ``conv_key``
    (1x1 convs C -> C' = int(C * ratio), with bias), ``conv_value`` (1x1 conv C -> C, no bias; no
    output conv: their ``use_out=False``), ``conv_mask`` (1x1 conv C -> 1, with bias: the unary
    term) and ``gamma`` (a scalar on the pairwise term only, not on the unary term). Their
    detection configs use ratio 1/4, temperature 0.05, 'channel' whitening (the query and key
    minus their mean over positions; this also cancels the biases of ``conv_query`` and
    ``conv_key``, kept for checkpoint compatibility), no ``downsample``, no output norm.

    Code versus paper: the temperature T, the 1/sqrt(C') scale, gamma on the pairwise term
    only and the absence of an output transform W_z (their ``use_out=False``, ``out_bn=False``)
    are read from the authors' code and configs; the paper's equations were not re-checked
    against them. This block follows the code.

    Initialisation as the authors: every conv normal(0, 0.01), biases 0, gamma 0. The pairwise
    term therefore starts at zero but the unary term does not (W_v is random): **the authors'
    block is not the identity at initialisation.** With ``zero_init=True`` ``conv_value.weight``
    starts at zero, which zeroes both terms (identity at initialisation); W_v then gets its
    gradient through the unary term and gamma after the first step.

    The defaults are their detection configs' values (their class ``NonLocal2dGc`` itself
    defaults to ``downsample=True``, ``temp=1.0``, ``with_gc=False``). Placement in their configs
    (``configs/dnlnet``): inside the second-to-last bottleneck of res4 (``[-2]``), after the
    residual add and before the block's final ReLU; the "c4+c5" variant adds one in each of the
    three res5 bottlenecks, at the same place.

    A Detectron2 ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``).

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
        check_int(_NAME, "in_channels", in_channels, 1)
        planes = check_ratio(_NAME, "ratio", ratio, in_channels)
        check_positive(_NAME, "temperature", temperature)
        check_bool(_NAME, "downsample", downsample)
        check_bool(_NAME, "zero_init", zero_init)
        super().__init__(in_channels, in_channels, stride=1)
        self.ratio = float(ratio)
        self.planes = planes
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
        returns (N, C, L) in v's dtype, computed in float32 at least (``sdpa_fp32``; on CUDA
        the memory-efficient kernel then runs it, flash takes only 16-bit inputs).

        SDPA's fused kernels need equal query and value widths (else it falls back to the math
        path, which builds the N x M matrix). The value is split into ceil(C / C') heads of width
        C' (zero-padded when C' does not divide C), each attending with the same query and key
        (expanded views). QK^T is thus computed once per head: L M C multiply-adds instead of
        L M C', the same as zero-padding q and k to width C. The explicit N x M product would
        take fewer multiply-adds but N x M memory (67 MiB per image and per copy at res4 of an
        800 x 1333 image, 1.04 GiB at res3). The heads' width C' (128 / 256 / 512 at res3 /
        res4 / res5) stays within the CUDA flash kernel's limit of 256 at res3 and res4, the
        padded width C does not. CPU timings of the three ways: docs/family.md.
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
        flat = flat_query_indices(_NAME, queries, [x.shape[2], x.shape[3]], x.device)
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
