"""How ``DisentangledNonLocalBlock`` should call ``scaled_dot_product_attention``.

    python benchmarks/bench_dnl_sdpa.py                  # res4 (C=1024, 50 x 84), 1 thread
    python benchmarks/bench_dnl_sdpa.py --size res5 --repeat 5
    python benchmarks/bench_dnl_sdpa.py --quick          # tiny: a smoke test

The query/key width C' = C/4 differs from the value width C, and SDPA's fused CPU/CUDA kernels
need equal widths (otherwise it falls back to the math path, which builds the N x M matrix).
Variants of the pairwise aggregation, each timed as the whole block, forward + backward, float32:

* ``naive``: softmax(q^T k * s) v with the explicit N x M matrix (bmm, softmax, bmm).
* ``pad``: q and k zero-padded to width C, one SDPA head (the QK^T product costs 4x).
* ``heads``: v split into C/C' heads of width C' sharing q and k (expanded views), one SDPA
  call with C/C' heads (QK^T is recomputed per head: the same multiply-adds as ``pad``).
* ``heads_copy``: as ``heads`` with q and k copied per head (``.contiguous()``).

Also reports, per variant, the largest tensor any op produced (forward and backward) against
N x M, and the largest difference of the output and input gradient from ``naive``.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nonlocal_det.layers import DisentangledNonLocalBlock

SIZES = {"res5": (2048, 25, 42), "res4": (1024, 50, 84), "res3": (512, 100, 167)}


class Naive(DisentangledNonLocalBlock):
    def _pairwise(self, q, k, v):
        sim = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=2)  # (N, L, M)
        return torch.bmm(v, sim.transpose(1, 2))


class Pad(DisentangledNonLocalBlock):
    def _pairwise(self, q, k, v):
        cq, cv = q.shape[1], v.shape[1]
        width = max(cq, cv)
        qt = F.pad(q.transpose(1, 2), [0, width - cq]).unsqueeze(1).contiguous()
        kt = F.pad(k.transpose(1, 2), [0, width - cq]).unsqueeze(1).contiguous()
        vt = F.pad(v.transpose(1, 2), [0, width - cv]).unsqueeze(1).contiguous()
        y = F.scaled_dot_product_attention(qt, kt, vt, scale=self.scale)
        return y.squeeze(1)[:, :, :cv].transpose(1, 2)


class Heads(DisentangledNonLocalBlock):
    """The block's own implementation."""


class HeadsCopy(DisentangledNonLocalBlock):
    def _pairwise(self, q, k, v):
        n, cq, length = q.shape
        cv = v.shape[1]
        heads = (cv + cq - 1) // cq
        vt = F.pad(v, [0, 0, 0, heads * cq - cv]).reshape(n, heads, cq, -1).transpose(2, 3)
        qt = q.transpose(1, 2).unsqueeze(1).expand(n, heads, length, cq).contiguous()
        kt = k.transpose(1, 2).unsqueeze(1).expand(n, heads, k.shape[2], cq).contiguous()
        y = F.scaled_dot_product_attention(qt, kt, vt.contiguous(), scale=self.scale)
        return y.transpose(2, 3).reshape(n, heads * cq, length)[:, :cv]


VARIANTS = {"naive": Naive, "pad": Pad, "heads": Heads, "heads_copy": HeadsCopy}


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), f"{func} {list(t.shape)}"
        return out


def _step(block, x, grad):
    x.grad = None
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(grad)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="res4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny input (C=64, 12 x 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    c, h, w = (64, 12, 16) if args.quick else SIZES[args.size]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=gen).requires_grad_()
    grad = torch.randn(1, c, h, w, generator=gen)
    n_times_m = (h * w) ** 2
    print(
        f"DNL block, x (1, {c}, {h}, {w}), C' = {c // 4}, fp32, {args.threads} thread(s), "
        f"forward + backward, median of {args.repeat}; torch {torch.__version__}"
    )
    print(f"{'variant':<11} {'time (s)':>9} {'largest tensor / NM':>20} {'max |diff|':>11}")
    reference = None
    for name in args.variants:
        torch.manual_seed(0)
        block = VARIANTS[name](c)
        with torch.no_grad():  # non-trivial weights: gamma and the convs away from init
            block.gamma.fill_(0.7)
        with _Largest() as rec:
            out = _step(block, x, grad)
        result = (out.detach().clone(), x.grad.clone())
        if reference is None:
            reference = result
        diff = max((a - b).abs().max().item() for a, b in zip(result, reference))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            _step(block, x, grad)
            times.append(time.perf_counter() - start)
        ratio = rec.largest / n_times_m
        print(f"{name:<11} {statistics.median(times):>9.3f} {ratio:>20.3f} {diff:>11.2e}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
