"""Float16 for every block of the family, with activations at the scale of a trained network.

Each block is given weights as after training (output convs and gammas non-zero, attention
logits of 1e4-1e5: the query / key embeddings tied or scaled so that q . k reaches that size,
DNL at its temperature 0.05) and an input of std 20-30, and is run in float16 two ways:

* ``autocast``: float32 module and input under ``torch.autocast(device, dtype=torch.float16)``
  (mixed-precision training, ``SOLVER.AMP.ENABLED``);
* ``half``: ``module.half()`` with a half input (CPU autocast's op lists differ from CUDA's; this
  runs every op of the block in float16).

Output, input gradient and parameter gradients (of ``sum(out * r)``, r a fixed random tensor of
std 0.1) are compared with the float64 computation of the same weights and input (the
float16-rounded ones for ``half``), relative to their own scale: ``max |fp16 - fp64| / max
|fp64|`` below ``TOLERANCE`` for the output (``BRANCH_TOLERANCE`` for the attention branch
alone, ``out - x``, against that branch's scale), below ``GRAD_TOLERANCE`` for the input
gradient and, against the largest parameter gradient, for every parameter's. Everything must be
finite (a float16 parameter's gradient where its true value fits in float16).
``test_examples_have_trained_scale_logits`` checks that the examples reach those logits. The
CUDA variants (marked ``cuda``) run the same checks on a GPU.

Run as a script (``python tests/test_fp16_blocks.py [cpu|cuda]``) it prints the table of these
errors (docs/reliability.md).
"""

import copy
import math
import sys
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn

from nonlocal_det.layers import (
    CrissCrossAttention,
    DisentangledNonLocalBlock,
    GeneralizedAttention,
    GlobalContextBlock,
    NonLocalBlock,
    SimplifiedNonLocalBlock,
)

# max |fp16 - fp64| / max |fp64| of the output. float16 has a unit roundoff of 2^-11 = 4.9e-4;
# a residual block's output carries the rounding of x, of the values and of the
# attention-weighted sum, a few of these units.
TOLERANCE = 1e-2
# the same for the attention branch alone (out - x, relative to its own scale)
BRANCH_TOLERANCE = 3e-2
# the input gradient (relative to its largest entry) and the parameter gradients (relative to
# the largest parameter gradient of the block): the backward rounds the upstream gradient and
# the saved activations to float16 once more
GRAD_TOLERANCE = 2e-2
CHANNELS = 64
SIZE = (8, 8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=_gen(seed), dtype=torch.float64) * std)


def _input(scale: float, seed: int = 1) -> torch.Tensor:
    shape = (2, CHANNELS) + SIZE
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).float()


def _nonlocal(pairwise: str) -> Tuple[nn.Module, float]:
    torch.manual_seed(0)
    block = NonLocalBlock(CHANNELS, pairwise=pairwise, subsample=False)
    c = CHANNELS
    if pairwise == "embedded_gaussian":
        # phi = theta: |theta_i|^2 ~ 5e4 (beyond fp16's 65504 at the largest positions)
        _normal_(block.theta.weight, 0.25, 10)
        block.phi.weight.data.copy_(block.theta.weight)
        _normal_(block.g.weight, 1 / math.sqrt(c), 11)
        _normal_(block.out.weight, 1 / math.sqrt(c // 2), 12)
        return block, 20.0
    if pairwise == "gaussian":  # x_i . x_j with |x_i|^2 ~ 64 * 30^2 = 5.8e4
        _normal_(block.g.weight, 1 / math.sqrt(c), 11)
        _normal_(block.out.weight, 1 / math.sqrt(c // 2), 12)
        return block, 30.0
    if pairwise == "dot_product":
        # theta_i . phi_j up to ~5e4; sum_j phi_j g_j over M = 64 positions
        _normal_(block.theta.weight, 0.25, 10)
        block.phi.weight.data.copy_(block.theta.weight)
        _normal_(block.g.weight, 0.002, 11)
        _normal_(block.out.weight, 0.005, 12)
        return block, 20.0
    # concatenation: a_i + b_j ~ 1e4, prefix sums over the keys of (a_i + b_j) g_j
    _normal_(block.theta.weight, 0.25, 10)
    _normal_(block.phi.weight, 0.25, 13)
    _normal_(block.concat_project.weight, 10.0, 14)
    _normal_(block.g.weight, 0.02, 11)
    _normal_(block.out.weight, 0.002, 12)
    return block, 20.0


def _snl() -> Tuple[nn.Module, float]:
    torch.manual_seed(0)
    block = SimplifiedNonLocalBlock(CHANNELS)
    _normal_(block.conv_mask.weight, 2.0, 10)  # mask logits ~ 2 * 20 * 8 = 320 (exp overflows)
    _normal_(block.conv_value.weight, 1 / math.sqrt(CHANNELS), 11)
    return block, 20.0


def _gc(fusions) -> Callable[[], Tuple[nn.Module, float]]:
    def make():
        torch.manual_seed(0)  # PyTorch's default init of the transforms' first convs
        block = GlobalContextBlock(CHANNELS, ratio=0.25, fusion_types=fusions)
        _normal_(block.conv_mask.weight, 2.0, 10)
        for i, t in enumerate((block.channel_add_conv, block.channel_mul_conv)):
            if t is not None:
                _normal_(t[3].weight, 10.0, 20 + i)  # the zero-initialised last convs, trained
        return block, 20.0

    return make


def _dnl() -> Tuple[nn.Module, float]:
    torch.manual_seed(0)
    block = DisentangledNonLocalBlock(CHANNELS)  # ratio 1/4 (C' = 16), temperature 0.05
    # key = query: whitened q_i . q_i ~ 3e4, times 1 / (sqrt(16) * 0.05) = 5 in the softmax
    _normal_(block.conv_query.weight, 0.2, 10)
    block.conv_key.weight.data.copy_(block.conv_query.weight)
    _normal_(block.conv_value.weight, 1 / math.sqrt(CHANNELS), 11)
    _normal_(block.conv_mask.weight, 2.0, 12)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    return block, 20.0


def _cc() -> Tuple[nn.Module, float]:
    """Energies of 1e5 from a large shared bias of q and k (b . b = 1e5), varying over the keys
    by a few units (b . W_k x_j): a softmax that is not saturated. (Two passes over energies
    that vary by 1e4 would leave some queries of the second pass with near ties, which the
    rounding of the first pass's output to float16 decides either way.)"""
    torch.manual_seed(0)  # PyTorch's default init of the value bias
    block = CrissCrossAttention(CHANNELS)  # C' = 8
    _normal_(block.query_conv.weight, 0.002, 10)
    _normal_(block.key_conv.weight, 0.002, 11)
    with torch.no_grad():
        b = torch.randn(8, generator=_gen(12), dtype=torch.float64)
        block.query_conv.bias.copy_(b / b.norm() * math.sqrt(1e5))
        block.key_conv.bias.copy_(block.query_conv.bias)
    _normal_(block.value_conv.weight, 1 / math.sqrt(CHANNELS), 13)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    return block, 20.0


def _ga(attention_type: str) -> Callable[[], Tuple[nn.Module, float]]:
    def make():
        torch.manual_seed(0)
        block = GeneralizedAttention(CHANNELS, attention_type=attention_type)  # 8 heads, d = 8
        if block.query_conv is not None:
            _normal_(block.query_conv.weight, 0.5, 10)  # q . q ~ 8 * (20 * 0.5 * 8)^2 = 5e4
        if block.key_conv is not None:
            if block.query_conv is not None:
                block.key_conv.weight.data.copy_(block.query_conv.weight)
            else:
                _normal_(block.key_conv.weight, 0.5, 10)
        if block.appr_bias is not None:
            _normal_(block.appr_bias, 30.0, 13)  # u . k ~ 1e4
        if block.geom_bias is not None:
            _normal_(block.geom_bias, 30.0, 14)
        _normal_(block.proj_conv.weight, 1 / math.sqrt(CHANNELS), 15)
        with torch.no_grad():
            block.gamma.fill_(1.0)
        return block, 20.0

    return make


BLOCKS: Dict[str, Callable[[], Tuple[nn.Module, float]]] = {
    "nl_embedded_gaussian": lambda: _nonlocal("embedded_gaussian"),
    "nl_gaussian": lambda: _nonlocal("gaussian"),
    "nl_dot_product": lambda: _nonlocal("dot_product"),
    "nl_concatenation": lambda: _nonlocal("concatenation"),
    "snl": _snl,
    "gc_add": _gc(("add",)),
    "gc_add_mul": _gc(("add", "mul")),
    "dnl": _dnl,
    "cc": _cc,
    "ga_1111": _ga("1111"),
    "ga_1000": _ga("1000"),
    "ga_0010": _ga("0010"),
    "ga_0101": _ga("0101"),
}
MODES = ("autocast", "half")
# the table also shows float32 (no autocast) against float64: the conditioning of the example
TABLE_MODES = ("fp32",) + MODES


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def measure(name: str, mode: str, device: str = "cpu") -> Dict[str, float]:
    """Runs block ``name`` in float16 (``mode``: 'autocast' or 'half') and in float64 on the
    same weights and input; returns the relative errors, the largest |logit|-scale quantity
    (the float64 output scale) and whether everything was finite."""
    block, scale = BLOCKS[name]()
    block.train()
    x = _input(scale)
    # upstream gradient: std 0.1 (the dot-product form's g.weight gradient, 1e4 at this size,
    # would otherwise exceed float16's range by itself)
    r = torch.randn(x.shape, generator=_gen(7), dtype=torch.float64) * 0.1
    if mode == "half":
        block, x = block.half(), x.half()
    ref_block = copy.deepcopy(block).double()

    xr = x.double().requires_grad_()
    ref = ref_block(xr)
    (ref * r).sum().backward()
    ref = ref.detach()

    block = block.to(device)
    xd = x.to(device).requires_grad_()
    if mode == "autocast":
        with torch.autocast(device, dtype=torch.float16):
            out = block(xd)
    else:
        out = block(xd)
    (out.float() * r.float().to(device)).sum().backward()
    out, grad = out.detach().cpu(), xd.grad.cpu()
    x = x.cpu()
    finite = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
    # parameter gradients: the largest error relative to the largest parameter gradient (a
    # saturated softmax leaves some, e.g. the key bias's, at exactly or nearly zero)
    ref_params = dict(ref_block.named_parameters())
    param_scale = max(float(p.grad.abs().max()) for p in ref_params.values() if p.grad is not None)
    param_err = 0.0
    for pname, p in block.named_parameters():
        if p.grad is None:
            continue
        # a float16 parameter's gradient is float16: compared where its true value fits, with
        # a margin for rounding (a key weight's gradient reaches 1e6 in the criss-cross example)
        expected = ref_params[pname].grad
        fits = expected.abs() < torch.finfo(p.grad.dtype).max / 2
        got = p.grad.cpu()[fits]
        finite = finite and bool(torch.isfinite(got).all())
        if fits.any():
            diff = (got.double() - expected[fits]).abs().max()
            param_err = max(param_err, float(diff) / param_scale)
    branch_ref = ref - x.double()
    return {
        "out": _rel(out, ref),
        "branch": _rel(out.double() - x.double(), branch_ref),
        "grad": _rel(grad, xr.grad),
        "param_grad": param_err,
        "finite": finite,
        "out_dtype": str(out.dtype),
    }


def largest_logit(name: str) -> float:
    """The largest |logit| of the example in float64: theta_i . phi_j (not yet scaled) or
    a_i + b_j for the non-local forms, x_i . x_j for ``gaussian``, the mask logits of SNL and
    GC, q_i . k_j / (sqrt(C') T) for DNL, q_i . k_j for criss-cross and generalized attention
    (u . k_j for '0010'; '0101' has no key embedding: NaN)."""
    block, scale = BLOCKS[name]()
    block = block.double()
    x = _input(scale).double()
    with torch.no_grad():
        if isinstance(block, NonLocalBlock):
            q, k = block._embed(x)[:2]
            if block.pairwise == "concatenation":
                a, b = block._concat_terms(q, k)
                return float((a.unsqueeze(2) + b.unsqueeze(1)).abs().max())
            return float(torch.einsum("ncl,ncm->nlm", q, k).abs().max())
        if isinstance(block, (SimplifiedNonLocalBlock, GlobalContextBlock)):
            return float(block.conv_mask(x).abs().max())
        if isinstance(block, DisentangledNonLocalBlock):
            q, k = block._embed(x)[:2]
            return float(torch.einsum("ncl,ncm->nlm", q, k).abs().max() * block.scale)
        if isinstance(block, CrissCrossAttention):
            q, k = block._query_key(x)
            return float(torch.einsum("nchw,ncij->nhwij", q, k).abs().max())
        q, k = block._query_key(*block._grids(x))
        if q is not None and k is not None:
            return float(torch.matmul(q, k).abs().max())
        if k is not None:
            return float(torch.matmul(block._head_vector(block.appr_bias, k.dtype), k).abs().max())
        return math.nan


@pytest.mark.parametrize("name", list(BLOCKS))
def test_examples_have_trained_scale_logits(name):
    """What the fp16 tests rely on: logits beyond float16's range (65504) or at least 1e4 for
    the pairwise terms, and mask logits whose exp overflows float16 (beyond 11) for SNL / GC."""
    logit = largest_logit(name)
    if name.startswith(("snl", "gc")):
        assert logit > 100, logit
    elif not math.isnan(logit):
        assert logit > 1e4, logit


def _check(name: str, mode: str, device: str) -> None:
    m = measure(name, mode, device)
    assert m["finite"], f"{name} {mode} on {device}: non-finite output or gradient: {m}"
    assert m["out"] < TOLERANCE, f"{name} {mode}: output relative error {m['out']:.3g}"
    assert m["branch"] < BRANCH_TOLERANCE, f"{name} {mode}: branch error {m['branch']:.3g}"
    assert m["grad"] < GRAD_TOLERANCE, f"{name} {mode}: input-gradient error {m['grad']:.3g}"
    assert m["param_grad"] < GRAD_TOLERANCE, f"{name} {mode}: parameter-gradient error {m}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fp16_trained_scale_cpu(name, mode):
    _check(name, mode, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fp16_trained_scale_cuda(name, mode):
    _check(name, mode, "cuda")


def _table(device: str) -> None:
    print(
        "| block | largest logit | mode | out rel. err | branch rel. err | input-grad rel. err | "
        "param-grad rel. err | finite |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in BLOCKS:
        try:
            logit = largest_logit(name)
        except AttributeError:  # a version of the blocks without these internals
            logit = math.nan
        for mode in TABLE_MODES:
            try:
                m = measure(name, mode, device)
                print(
                    f"| {name} | {logit:.2g} | {mode} | {m['out']:.2g} | {m['branch']:.2g} "
                    f"| {m['grad']:.2g} | {m['param_grad']:.2g} | {'yes' if m['finite'] else 'no'} |"
                )
            except Exception as e:  # noqa: BLE001 (a table row, not a test)
                print(
                    f"| {name} | {logit:.2g} | {mode} | error: {type(e).__name__}: {str(e)[:80]} |"
                )


if __name__ == "__main__":
    torch.set_num_threads(1)
    _table(sys.argv[1] if len(sys.argv) > 1 else "cpu")
