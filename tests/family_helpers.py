"""Checks shared by the tests of the non-local family blocks (SNL, GC, DNL, CC, GA).

Each block's own test file holds the plain reference of its formula; this module holds what
every block must satisfy in the same way: the identity at initialisation (or not, as the
authors), learning after one step, gradcheck, TorchScript, half precision, the N x M detector.
"""

from typing import Callable, Iterable, Optional

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FILTERS = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit.script is deprecated
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids stalls when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_input(shape, dtype=torch.float32, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def randomize_(block: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Random values in every parameter (gamma and the zero-initialised convs included); the
    weights of LayerNorms around 1."""
    gen = torch.Generator().manual_seed(seed)
    norms = {n for n, m in block.named_modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
            if name.rsplit(".", 1)[0] in norms and name.endswith("weight"):
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
    return block


def tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def conv1x1(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a matrix product over channels, in float64: (N, C_in, H, W)."""
    w = conv.weight.to(torch.float64).reshape(conv.weight.shape[0], -1)
    out = torch.einsum("oc,nchw->nohw", w, t.to(torch.float64))
    if conv.bias is not None:
        out = out + conv.bias.to(torch.float64).reshape(1, -1, 1, 1)
    return out


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg=None):
    tol = tolerance(dtype)
    torch.testing.assert_close(
        got.to(torch.float64), expected.to(torch.float64), atol=tol, rtol=tol, msg=msg
    )


# ------------------------------------------------------------------------------------------------
# Identity at initialisation, learning
# ------------------------------------------------------------------------------------------------
def assert_identity_then_learns(block: nn.Module, x: torch.Tensor, zeroed: Optional[str] = None):
    """The block returns x exactly (train and eval), and one SGD step on a random loss changes
    the output. ``zeroed``: the name of the zero-initialised parameter, which must get a
    non-zero gradient."""
    for train in (True, False):
        block.train(train)
        with torch.no_grad():
            assert torch.equal(block(x), x), f"not the identity at init (train={train})"
    block.train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    target = make_input(x.shape, x.dtype, seed=3)
    loss = ((block(x) - target) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    if zeroed is not None:
        grad = dict(block.named_parameters())[zeroed].grad
        assert grad is not None and grad.abs().sum() > 0, f"{zeroed} gets no gradient"
    opt.step()
    with torch.no_grad():
        out = block(x)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, x), "the block did not learn"


def assert_cnn_block_freezes(block: nn.Module, x: torch.Tensor) -> None:
    """A Detectron2 ``CNNBlockBase`` with in == out channels and stride 1; ``freeze()`` stops every
    parameter and leaves the forward unchanged."""
    from detectron2.layers import CNNBlockBase

    assert isinstance(block, CNNBlockBase)
    assert block.in_channels == block.out_channels == x.shape[1] and block.stride == 1
    with torch.no_grad():
        before = block(x)
    assert block.freeze() is block
    assert not any(p.requires_grad for p in block.parameters())
    with torch.no_grad():
        torch.testing.assert_close(block(x), before, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Gradients, TorchScript, half precision
# ------------------------------------------------------------------------------------------------
def assert_gradcheck(block: nn.Module, x: torch.Tensor) -> None:
    """gradcheck w.r.t. the input and every parameter (float64)."""
    block = block.double()
    x = x.double().detach().requires_grad_()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def assert_script_and_trace(block: nn.Module, x: torch.Tensor, other: torch.Tensor) -> None:
    """torch.jit.script and torch.jit.trace give the eager output; the scripted module also on
    an input of another size."""
    block = block.eval()
    with torch.no_grad():
        eager = block(x)
        scripted = torch.jit.script(block)
        traced = torch.jit.trace(block, x)
        for _ in range(3):  # the profiling executor optimises the graph after a few runs
            torch.testing.assert_close(scripted(x), eager, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(traced(x), eager, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(scripted(other), block(other), atol=1e-6, rtol=1e-6)


def assert_autocast_finite(block: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    """CPU autocast: finite output and gradients (input and parameters)."""
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)  # an unsupported CPU kernel for this dtype would raise here: no skip
    assert out.shape == x.shape
    assert torch.isfinite(out).all(), f"{dtype}: non-finite output"
    out.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def assert_raises_with(fn: Callable, substrings: Iterable[str]) -> None:
    with pytest.raises(ValueError) as info:
        fn()
    for s in substrings:
        assert s in str(info.value), f"{s!r} not in {str(info.value)!r}"


def assert_input_errors(block: nn.Module, name: str, channels: int) -> None:
    """Wrong rank and wrong channel count: ValueErrors naming the class, the shape and what is
    allowed."""
    assert_raises_with(
        lambda: block(torch.zeros(2, channels, 5)),
        [name, "input x", f"[2, {channels}, 5]", "rank 4"],
    )
    assert_raises_with(
        lambda: block(torch.zeros(2, channels, 3, 5, 7)),
        [name, f"[2, {channels}, 3, 5, 7]", "rank 4"],
    )
    assert_raises_with(
        lambda: block(torch.zeros(2, channels - 3, 5, 7)),
        [name, f"{channels - 3} channels", f"in_channels={channels}", f"allowed: {channels}"],
    )


# ------------------------------------------------------------------------------------------------
# Never an N x M tensor
# ------------------------------------------------------------------------------------------------
class LargestOutput(TorchDispatchMode):
    """Records the op producing the largest tensor (by element count), forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = ""
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), f"{func} {list(t.shape)}"
        return out


def largest_tensor_fwd_bwd(block: nn.Module, x: torch.Tensor) -> LargestOutput:
    x = x.detach().requires_grad_()
    with LargestOutput() as rec:
        (block(x) ** 2).sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
    assert any("convolution_backward" in op for op in rec.ops), "backward not recorded"
    return rec
