"""The non-local block of Wang et al., "Non-local Neural Networks" (CVPR 2018).

    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j),        z_i = W_z y_i + x_i

computed for every pairwise function of the paper without ever building the N x M affinity
matrix (N query positions, M key positions), neither in the forward nor in the backward pass:

* ``embedded_gaussian`` / ``gaussian``: f = exp(q_i . k_j * scale), C = sum_j f, i.e. a softmax
  over keys, which is exactly ``torch.nn.functional.scaled_dot_product_attention`` (flash /
  memory-efficient kernels, linear memory).
* ``dot_product``: f = theta_i . phi_j, C = M, so y = theta (phi^T g) / M, linear in N and M.
* ``concatenation``: f = ReLU(w_f^T [theta_i; phi_j]) = ReLU(a_i + b_j) with a_i = w_theta^T theta_i
  and b_j = w_phi^T phi_j, C = M. For fixed i the keys with a_i + b_j > 0 are those with
  b_j > -a_i: after sorting the keys by b_j (descending) they form a prefix, so
  sum_j ReLU(a_i + b_j) g_j = a_i * G[n_i] + BG[n_i] with G, BG prefix sums of g_j and b_j g_j and
  n_i found by binary search. Exact, O((N + M) log M) time and O((N + M) C) memory, and plain
  autograd gives the exact gradient (the ReLU kink has measure zero).

In float16 (autocast or a half module) theta, phi, their products and the softmax are computed
in float32 (with large activations theta_i . phi_j exceeds float16's 65504) and the result is
cast back; g, W_z and the residual stay in the input's precision.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import nn

from ._common import (
    check_block_args,
    check_choice,
    check_input,
    check_int,
    check_positive,
    check_value,
    conv1x1_fp32,
    flat_query_indices,
    matmul_fp32,
    sdpa_fp32,
)

__all__ = ["NonLocalBlock", "PAIRWISE_FUNCTIONS", "NORMS", "THETA_PHI_INITS"]

PAIRWISE_FUNCTIONS = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
NORMS = ("", "GN", "BN", "SyncBN")
# theta / phi weights at initialisation: normal(0, 0.01) (the authors'), or normal with a fan-in
# scale: He (std sqrt(2 / C), as GC's conv_mask) or LeCun (std sqrt(1 / C)).
THETA_PHI_INITS = ("normal", "he", "lecun")
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _make_norm(norm: str, channels: int, dim: int) -> Optional[nn.Module]:
    if norm == "":
        return None
    if norm == "GN":
        # Detectron2 uses 32 groups; fall back to a divisor of `channels` for small blocks.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "BN":
        return _BATCHNORMS[dim](channels)
    return nn.SyncBatchNorm(channels)  # "SyncBN"; plain BN when not distributed


class NonLocalBlock(CNNBlockBase):
    """A non-local block ``z = W_z y + x`` (residual), identity at initialisation: a Detectron2
    ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``), frozen with its stage.

    Sub-modules (the checkpoint format): ``theta``, ``phi``, ``g`` (1x1 convs), ``out`` (W_z),
    ``norm`` (after W_z, when used) and ``concat_project`` (w_f of the concatenation form, its
    first ``inner_channels`` weights act on theta). ``gaussian`` has no ``theta``/``phi``.

    Args:
        in_channels (int): C, channels of the input and of the output.
        inner_channels (int or None): C_inner, channels of theta, phi and g. Default C // 2.
        pairwise (str): f, one of ``gaussian``, ``embedded_gaussian`` (default), ``dot_product``,
            ``concatenation``.
        dim (int): 1, 2 or 3 for inputs (N, C, L), (N, C, H, W) or (N, C, T, H, W).
        subsample (bool): max-pool phi and g (and the keys of ``gaussian``) after their convs with
            window 2 / 2x2 / 1x2x2 (floor for odd sizes; a size-1 axis is left unpooled).
        use_scale (bool): multiply the dot product inside the exponential forms by 1/sqrt(d), d the
            length of the dotted vectors (the authors' code, not the paper).
        norm (str): normalisation after W_z: ``""`` (none; then W_z starts at zero), ``"GN"``,
            ``"BN"`` or ``"SyncBN"`` (then its gamma starts at zero).
        theta_phi_init (str): the initialisation of the theta and phi weights: ``"normal"``
            (normal(0, 0.01), the authors' and mmcv's; default), ``"he"`` (normal(0, 2 / C), the
            fan-in scale GC's ``conv_mask`` uses) or ``"lecun"`` (normal(0, 1 / C)). Ignored by
            ``gaussian``.
        out_init_std (float): W_z starts normal(0, out_init_std) instead of zero (theta, phi and
            g then get a gradient at the first step). Default 0 (the authors'); 0 with a norm.
        whiten (bool): DNL's whitening (Yin et al. 2020): theta and phi minus their means over
            the (query, key) positions. Default False (the paper).
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: Optional[int] = None,
        pairwise: str = "embedded_gaussian",
        dim: int = 2,
        subsample: bool = True,
        use_scale: bool = True,
        norm: str = "",
        theta_phi_init: str = "normal",
        out_init_std: float = 0.0,
        whiten: bool = False,
    ):
        check_block_args(NonLocalBlock, locals())
        if inner_channels is None:
            inner_channels = max(in_channels // 2, 1)
        super().__init__(in_channels, in_channels, stride=1)

        self.inner_channels = inner_channels
        self.pairwise = pairwise
        self.dim = dim
        self.subsample = bool(subsample)
        self.use_scale = bool(use_scale)
        self.norm_name = norm
        self.theta_phi_init = theta_phi_init
        self.out_init_std = float(out_init_std)
        self.whiten = whiten
        conv = _CONVS[dim]

        self.theta: Optional[nn.Module] = None
        self.phi: Optional[nn.Module] = None
        self.concat_project: Optional[nn.Module] = None
        if pairwise != "gaussian":
            self.theta = conv(in_channels, inner_channels, kernel_size=1)
            self.phi = conv(in_channels, inner_channels, kernel_size=1)
        self.g = conv(in_channels, inner_channels, kernel_size=1)
        if pairwise == "concatenation":
            self.concat_project = nn.Linear(2 * inner_channels, 1, bias=False)
        self.out = conv(inner_channels, in_channels, kernel_size=1, bias=(norm == ""))
        self.norm: Optional[nn.Module] = _make_norm(norm, in_channels, dim)
        # d in the 1/sqrt(d) scale: the length of the vectors whose dot product is exponentiated.
        self.scale = 1.0
        if use_scale and pairwise in ("gaussian", "embedded_gaussian"):
            dotted = in_channels if pairwise == "gaussian" else inner_channels
            self.scale = 1.0 / math.sqrt(dotted)
        self.reset_parameters()

    @staticmethod
    def check_args(args, owner: str, key) -> None:
        """The checks of :func:`check_block_args` particular to this block."""
        if args["inner_channels"] is not None:
            check_int(owner, key("inner_channels"), args["inner_channels"], 1)
        check_choice(owner, key("pairwise"), args["pairwise"], PAIRWISE_FUNCTIONS)
        check_choice(owner, key("dim"), args["dim"], (1, 2, 3))
        check_choice(owner, key("norm"), args["norm"], NORMS)
        check_choice(owner, key("theta_phi_init"), args["theta_phi_init"], THETA_PHI_INITS)
        std, norm = args["out_init_std"], args["norm"]
        check_positive(owner, key("out_init_std"), std, inclusive=True)
        with_norm = f"0 with {key('norm')}={norm!r} (its gamma starts at zero)"
        check_value(owner, key("out_init_std"), std, std == 0 or norm == "", with_norm)

    def reset_parameters(self) -> None:
        """Official initialisation: normal(0, 0.01) embeddings; W_z (or its norm's gamma) zero.
        ``theta_phi_init`` and ``out_init_std`` change theta / phi and W_z."""
        for m in (self.theta, self.phi, self.g):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.theta_phi_init != "normal":
            gain = "relu" if self.theta_phi_init == "he" else "linear"
            for m in (self.theta, self.phi):
                if m is not None:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain)
        if self.concat_project is not None:
            nn.init.normal_(self.concat_project.weight, std=0.01)
        if self.norm is None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
            if self.out_init_std > 0:
                nn.init.normal_(self.out.weight, std=self.out_init_std)
        else:
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def extra_repr(self) -> str:
        text = (
            f"pairwise={self.pairwise}, dim={self.dim}, inner_channels={self.inner_channels}, "
            f"subsample={self.subsample}, use_scale={self.use_scale}, norm={self.norm_name!r}"
        )
        if self.theta_phi_init != "normal":
            text += f", theta_phi_init={self.theta_phi_init!r}"
        if self.out_init_std > 0:
            text += f", out_init_std={self.out_init_std:g}"
        if self.whiten:
            text += ", whiten=True"
        return text

    # ----------------------------------------------------------------------------------------
    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        """Max-pool the spatial axes by 2 (not time in 3D); axes of size 1 are left alone."""
        if not self.subsample:
            return t
        sizes: List[int] = t.shape[2:]
        if self.dim == 1:
            return F.max_pool1d(t, kernel_size=[min(2, sizes[0])])
        if self.dim == 2:
            return F.max_pool2d(t, kernel_size=[min(2, sizes[0]), min(2, sizes[1])])
        return F.max_pool3d(t, kernel_size=[1, min(2, sizes[1]), min(2, sizes[2])])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
        """Returns theta(x) (N, C_q, L), pooled phi(x) (N, C_k, M) and pooled g(x) (N, C_inner, M),
        with the pooled spatial shape of the keys; with ``whiten``, theta and phi minus their
        means over the positions."""
        v = self._pool(self.g(x))
        theta = self.theta
        phi = self.phi
        if theta is not None and phi is not None:
            # float32 at least: their products are the logits (see conv1x1_fp32)
            q = conv1x1_fp32(x, theta.weight, theta.bias)
            k = self._pool(conv1x1_fp32(x, phi.weight, phi.bias))
        else:  # gaussian: the raw features are compared
            q = x
            k = self._pool(x)
        key_shape: List[int] = k.shape[2:]
        q, k = q.flatten(2), k.flatten(2)
        if self.whiten:
            q = q - q.mean(dim=2, keepdim=True)
            k = k - k.mean(dim=2, keepdim=True)
        return q, k, v.flatten(2), key_shape

    def _concat_terms(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """a_i = w_theta . theta_i (N, L) and b_j = w_phi . phi_j (N, M)."""
        proj = self.concat_project
        assert proj is not None
        w = proj.weight.reshape(-1, 1)
        c = self.inner_channels
        # float32 at least, autocast off (a_i + b_j reaches the size of theta_i . phi_j)
        a = matmul_fp32(q.transpose(1, 2), w[:c]).squeeze(2)
        b = matmul_fp32(k.transpose(1, 2), w[c:]).squeeze(2)
        return a, b

    def _aggregate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """y = (1/C) sum_j f(q_i, k_j) v_j for (N, C, L) / (N, C, M) inputs; returns (N, L, C_v)
        in v's dtype, computed in float32 at least."""
        m = k.shape[2]
        if self.pairwise == "dot_product":
            # theta (phi^T g) / M in float32 at least, autocast off: the C x C product sums M
            # terms, and theta_i . phi_j reaches 1e4 - 1e5.
            kv = matmul_fp32(k / m, v.transpose(1, 2))  # (N, C_inner, C_inner)
            return matmul_fp32(q.transpose(1, 2), kv).to(v.dtype)
        if self.pairwise == "concatenation":
            dt = torch.promote_types(q.dtype, torch.float32)
            a, b = self._concat_terms(q.to(dt), k.to(dt))
            # keys sorted by b descending: {j : b_j > -a_i} is then a prefix of length n_i.
            neg_b_sorted, order = torch.sort(-b, dim=1)
            vt = v.to(dt).transpose(1, 2)  # (N, M, C)
            v_sorted = torch.gather(vt, 1, order.unsqueeze(2).expand(-1, -1, vt.shape[2]))
            zero = v_sorted.new_zeros(v_sorted.shape[0], 1, v_sorted.shape[2])
            g_cum = torch.cat([zero, torch.cumsum(v_sorted, dim=1)], dim=1)
            bg_cum = torch.cat(
                [zero, torch.cumsum(v_sorted * (-neg_b_sorted).unsqueeze(2), dim=1)], dim=1
            )
            count = torch.searchsorted(neg_b_sorted.detach().contiguous(), a.detach().contiguous())
            idx = count.unsqueeze(2).expand(-1, -1, vt.shape[2])
            y = a.unsqueeze(2) * torch.gather(g_cum, 1, idx) + torch.gather(bg_cum, 1, idx)
            return (y / m).to(v.dtype)
        # (embedded) Gaussian: softmax over keys == scaled_dot_product_attention. Its fused CPU/CUDA
        # kernels need 4-D contiguous inputs with equal query/value widths; zero-padding the
        # narrower side changes neither the dot products nor the kept output columns.
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2)
        vt = v.transpose(1, 2)
        cq = qt.shape[2]
        cv = vt.shape[2]
        if cq > cv:
            vt = F.pad(vt, [0, cq - cv])
        elif cv > cq:
            qt = F.pad(qt, [0, cv - cq])
            kt = F.pad(kt, [0, cv - cq])
        # in float32 at least (sdpa_fp32), back in v's dtype
        y = sdpa_fp32(
            qt.unsqueeze(1).contiguous(),
            kt.unsqueeze(1).contiguous(),
            vt.unsqueeze(1).contiguous(),
            self.scale,
        )
        return y.squeeze(1)[:, :, :cv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("NonLocalBlock", x, self.in_channels, self.dim)
        q, k, v = self._embed(x)[:3]
        y = self._aggregate(q, k, v)  # (N, L, C_inner)
        norm = self.norm
        if norm is None:
            # W_z as a matmul in y's (position, channel) layout: no transposed copy of y, which the
            # conv would keep for its backward beside the attention's own output. x first in the
            # sum: the result takes x's (contiguous) layout, not the permuted view's.
            z = F.linear(y, self.out.weight.flatten(1), self.out.bias)  # (N, L, C)
            shape = [x.shape[0]]
            shape.extend(x.shape[2:])
            shape.append(self.in_channels)
            perm = [0, self.dim + 1]  # (N, *spatial, C) -> (N, C, *spatial), as ONNX allows
            for axis in range(1, self.dim + 1):
                perm.append(axis)
            return x + z.view(shape).permute(perm)
        shape = [x.shape[0], self.inner_channels]
        shape.extend(x.shape[2:])
        z = self.out(y.transpose(1, 2).contiguous().view(shape))
        return x + norm(z)

    @torch.jit.unused
    def attention_for_queries(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Normalised attention weights f(x_i, x_j) / C(x) for chosen query positions only.

        Builds a (Q, M) matrix for the Q chosen queries, never the full (N_pos, M) one.

        Args:
            x: input of the block, (N, C, *spatial).
            queries: int64 tensor, either (Q,) flat indices into the spatial positions or (Q, dim)
                coordinates (in the input's spatial axes, e.g. (y, x) for dim=2).

        Returns:
            Tensor (N, Q, *key_shape): the weights of every key position (the pooled grid when
            ``subsample``), summing to 1 over the keys for the Gaussian forms.
        """
        check_input("NonLocalBlock", x, self.in_channels, self.dim)
        queries = flat_query_indices("NonLocalBlock", queries, list(x.shape[2:]), x.device)
        q, k, _, key_shape = self._embed(x)
        # float32 at least: q . k overflows fp16 before the scale at C_inner = 512 (and autocast
        # off, or it would run the products in fp16 again).
        dt = torch.promote_types(q.dtype, torch.float32)
        q, k = q[:, :, queries].to(dt), k.to(dt)  # (N, C_q, Q), (N, C_q, M)
        m = k.shape[2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.pairwise == "dot_product":
                w = torch.einsum("ncq,ncm->nqm", q, k) / m
            elif self.pairwise == "concatenation":
                a, b = self._concat_terms(q, k)
                w = F.relu(a.unsqueeze(2) + b.unsqueeze(1)) / m
            else:
                w = torch.softmax(torch.einsum("ncq,ncm->nqm", q, k) * self.scale, dim=2)
        return w.reshape([x.shape[0], len(queries)] + list(key_shape)).to(x.dtype)
