"""Tests of ``NonLocalBlock`` against an explicit, textbook implementation of the paper's formula.

    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j),        z_i = norm(W_z y_i) + x_i

The reference below builds the full N x M matrix of f explicitly from the block's own weights
(it never calls the operator's private helpers) and is evaluated in float64.
"""

import math
from typing import List, Optional, Tuple

import pytest
import torch
from family_helpers import single_thread  # noqa: F401 (autouse fixture)
from family_helpers import largest_tensor_fwd_bwd
from torch import nn

from nonlocal_det.layers import NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit.script is deprecated
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

GAUSSIAN_FORMS = ("gaussian", "embedded_gaussian")
SPATIAL = {1: (7,), 2: (5, 7), 3: (3, 5, 7)}  # odd sizes: floor pooling is exercised


# ------------------------------------------------------------------------------------------------
# Reference implementation
# ------------------------------------------------------------------------------------------------
def _ref_conv1x1(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 (x1) convolution written as a matrix product over channels: (N, C_in, *S)."""
    w = conv.weight.to(torch.float64).reshape(conv.weight.shape[0], -1)
    out = torch.einsum("oc,nc...->no...", w, t)
    if conv.bias is not None:
        b = conv.bias.to(torch.float64)
        out = out + b.reshape([1, -1] + [1] * (t.dim() - 2))
    return out


def _ref_pool(t: torch.Tensor, dim: int, subsample: bool) -> torch.Tensor:
    """Max over non-overlapping pairs of the spatial axes (not time in 3-D), floor for odd sizes.

    An axis of size 1 is left alone.
    """
    if not subsample:
        return t
    axes = [2] if dim == 1 else ([2, 3] if dim == 2 else [3, 4])
    for ax in axes:
        size = t.shape[ax]
        if size < 2:
            continue
        half = size // 2
        t = t.narrow(ax, 0, 2 * half)
        shape = list(t.shape)
        shape[ax : ax + 1] = [half, 2]
        t = t.reshape(shape).amax(dim=ax + 1)
    return t


def _ref_norm(norm: Optional[nn.Module], z: torch.Tensor) -> torch.Tensor:
    """GroupNorm / BatchNorm (batch statistics in training, running statistics in eval)."""
    if norm is None:
        return z
    n, c = z.shape[:2]
    w = norm.weight.to(torch.float64).reshape([1, c] + [1] * (z.dim() - 2))
    b = norm.bias.to(torch.float64).reshape([1, c] + [1] * (z.dim() - 2))
    if isinstance(norm, nn.GroupNorm):
        grouped = z.reshape(n, norm.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
        zn = ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(z.shape)
        return zn * w + b
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    axes = [0] + list(range(2, z.dim()))
    if norm.training:
        mean = z.mean(dim=axes, keepdim=True)
        var = ((z - mean) ** 2).mean(dim=axes, keepdim=True)
    else:
        shape = [1, c] + [1] * (z.dim() - 2)
        mean = norm.running_mean.to(torch.float64).reshape(shape)
        var = norm.running_var.to(torch.float64).reshape(shape)
    return (z - mean) / torch.sqrt(var + norm.eps) * w + b


def reference(
    block: NonLocalBlock, x: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """The paper's formula, with the N x M matrix built explicitly, in float64.

    Returns:
        (z, attention, key_shape): the block output (N, C, *S), the normalised weights
        f(x_i, x_j) / C(x) as (N, L, M) and the (pooled) spatial shape of the keys.

    It is differentiable (w.r.t. x and the block's parameters) through plain autograd.
    """
    x = x.to(torch.float64)
    n, c = x.shape[:2]
    spatial = list(x.shape[2:])
    dim, sub = block.dim, block.subsample
    g = _ref_pool(_ref_conv1x1(block.g, x), dim, sub)
    if block.pairwise == "gaussian":
        theta, phi = x, _ref_pool(x, dim, sub)
    else:
        theta = _ref_conv1x1(block.theta, x)
        phi = _ref_pool(_ref_conv1x1(block.phi, x), dim, sub)
    key_shape = list(phi.shape[2:])
    theta = theta.flatten(2).transpose(1, 2)  # (N, L, C_q)
    phi = phi.flatten(2).transpose(1, 2)  # (N, M, C_q)
    if block.whiten:  # DNL's whitening: minus the mean over the (query / key) positions
        theta = theta - theta.sum(dim=1, keepdim=True) / theta.shape[1]
        phi = phi - phi.sum(dim=1, keepdim=True) / phi.shape[1]
    g = g.flatten(2).transpose(1, 2)  # (N, M, C_inner)
    num_keys = phi.shape[1]

    if block.pairwise in GAUSSIAN_FORMS:
        logits = torch.einsum("nic,njc->nij", theta, phi)
        if block.use_scale:
            d = c if block.pairwise == "gaussian" else block.inner_channels
            logits = logits / math.sqrt(d)
        # exp(s_ij) / sum_j exp(s_ij); the common factor exp(-max_j s_ij) cancels (no overflow).
        f = torch.exp(logits - logits.amax(dim=2, keepdim=True))
        normaliser = f.sum(dim=2, keepdim=True)
    elif block.pairwise == "dot_product":
        f = torch.einsum("nic,njc->nij", theta, phi)
        normaliser = num_keys
    else:  # concatenation: f_ij = ReLU(w_f^T [theta_i; phi_j]), the pairs built explicitly
        w_f = block.concat_project.weight.to(torch.float64).reshape(-1)
        num_q = theta.shape[1]
        pairs = torch.cat(
            [
                theta.unsqueeze(2).expand(-1, -1, num_keys, -1),
                phi.unsqueeze(1).expand(-1, num_q, -1, -1),
            ],
            dim=3,
        )  # (N, L, M, 2 C_inner): [theta_i; phi_j]
        f = torch.relu(pairs @ w_f)
        normaliser = num_keys
    attention = f / normaliser
    y = attention @ g  # (N, L, C_inner)
    y = y.transpose(1, 2).reshape([n, block.inner_channels] + spatial)
    z = _ref_norm(block.norm, _ref_conv1x1(block.out, y))
    return z + x, attention, key_shape


def randomize_(block: NonLocalBlock, seed: int = 0, std: float = 0.5) -> NonLocalBlock:
    """Random weights everywhere (at init the block is the identity, which would test nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
            if name == "norm.weight":
                noise = noise + 1.0  # gamma away from zero
            p.copy_(noise.to(p.dtype))
        norm = block.norm
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=gen))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=gen) + 0.5)
    return block


def make_input(shape, dtype=torch.float32, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_close_dtype(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.to(torch.float64), expected, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------
# Forward equals the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "pairwise,use_scale",
    [(p, True) for p in PAIRWISE_FUNCTIONS] + [("gaussian", False), ("embedded_gaussian", False)],
)
def test_forward_matches_reference(pairwise, use_scale, dim, subsample, dtype):
    block = NonLocalBlock(8, pairwise=pairwise, dim=dim, subsample=subsample, use_scale=use_scale)
    randomize_(block).to(dtype)
    x = make_input((2, 8, *SPATIAL[dim]), dtype)
    expected, _, _ = reference(block, x)
    out = block(x)
    assert out.dtype == dtype and out.shape == x.shape
    tol = _tolerance(dtype)
    torch.testing.assert_close(out.to(torch.float64), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inner_channels", [3, 12])  # narrower and wider than C: SDPA padding
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_forward_matches_reference_inner_channels(pairwise, inner_channels, dtype):
    block = NonLocalBlock(8, inner_channels=inner_channels, pairwise=pairwise, dim=2)
    randomize_(block).to(dtype)
    x = make_input((2, 8, 5, 7), dtype)
    tol = _tolerance(dtype)
    torch.testing.assert_close(
        block(x).to(torch.float64), reference(block, x)[0], atol=tol, rtol=tol
    )


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("norm", ["GN", "BN", "SyncBN"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_forward_matches_reference_with_norm(norm, dim, train):
    block = randomize_(NonLocalBlock(8, pairwise="embedded_gaussian", dim=dim, norm=norm))
    block.double().train(train)
    x = make_input((2, 8, *SPATIAL[dim]), torch.float64)
    expected = reference(block, x)[0]  # before the forward: BN updates its running stats
    torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
@pytest.mark.parametrize(
    "spatial",
    [(1,), (2,), (1, 5), (5, 1), (1, 1), (1, 3, 4), (1, 1, 1), (3, 1, 1), (2, 1, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_inputs_smaller_than_pool_window(pairwise, spatial):
    dim = len(spatial)
    block = randomize_(NonLocalBlock(8, pairwise=pairwise, dim=dim, subsample=True)).double()
    x = make_input((2, 8, *spatial), torch.float64)
    expected, _, key_shape = reference(block, x)
    assert all(k >= 1 for k in key_shape)
    torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=1e-10)
    x32 = x.float()
    torch.testing.assert_close(
        block.float()(x32).double(), reference(block, x32)[0], atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_gradcheck(pairwise, subsample):
    torch.manual_seed(0)
    block = randomize_(NonLocalBlock(4, pairwise=pairwise, dim=2, subsample=subsample)).double()
    x = make_input((2, 4, 3, 5), torch.float64).requires_grad_()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("norm", ["GN", "BN"])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_gradcheck_3d_with_norm(pairwise, norm):
    block = randomize_(NonLocalBlock(4, pairwise=pairwise, dim=3, norm=norm)).double()
    x = make_input((2, 4, 2, 3, 4), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_backward_matches_reference(pairwise):
    """Autograd through the operator equals autograd through the explicit N x M formula."""
    block = randomize_(NonLocalBlock(6, pairwise=pairwise, dim=2)).double()
    target = make_input((2, 6, 5, 7), torch.float64, seed=7)
    grads = []
    for fn in (block, lambda inp: reference(block, inp)[0]):
        block.zero_grad()
        x = make_input((2, 6, 5, 7), torch.float64).requires_grad_()
        ((fn(x) - target) ** 2).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in block.parameters()])
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, got, expected in zip(names, *grads):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------------
# Identity at initialisation, and the block learns
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
@pytest.mark.parametrize("norm", NORMS)
def test_identity_at_init_then_learns(norm, pairwise):
    torch.manual_seed(0)
    block = NonLocalBlock(8, pairwise=pairwise, dim=2, norm=norm)
    x = make_input((2, 8, 5, 7))
    for train in (True, False):
        block.train(train)
        with torch.no_grad():
            assert torch.equal(block(x), x), f"not the identity at init (train={train})"

    block.train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    target = make_input((2, 8, 5, 7), seed=3)
    loss = ((block(x) - target) ** 2).sum()
    assert loss.item() > 0
    opt.zero_grad()
    loss.backward()
    zero_init = block.out if norm == "" else block.norm
    assert zero_init.weight.grad.abs().sum() > 0, "the zero-initialised weight gets no gradient"
    opt.step()
    for train in (True, False):
        block.train(train)
        with torch.no_grad():
            out = block(x)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, x), f"the block did not learn (train={train})"
    # and after that first step the embeddings receive gradients too
    opt.zero_grad()
    block.train()
    ((block(x) - target) ** 2).sum().backward()
    assert block.g.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# The initialisation options (issue 22): theta_phi_init, out_init_std, whiten
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_whiten_matches_reference(pairwise, dim, subsample, dtype):
    block = NonLocalBlock(8, pairwise=pairwise, dim=dim, subsample=subsample, whiten=True)
    randomize_(block).to(dtype)
    x = make_input((2, 8, *SPATIAL[dim]), dtype, scale=2.0) + 1.0  # means far from zero
    expected, attention, key_shape = reference(block, x)
    plain, _, _ = reference(NonLocalBlock(8, pairwise=pairwise, dim=dim, subsample=subsample), x)
    assert not torch.allclose(expected, plain)  # the whitening changes the block
    assert_close_dtype(block(x), expected, dtype)
    flat = torch.tensor([0, 3, math.prod(SPATIAL[dim]) - 1])
    with torch.no_grad():
        w = block.attention_for_queries(x, flat)
    assert_close_dtype(w, attention[:, flat].reshape([2, 3] + key_shape), dtype)


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_whiten_gradcheck(pairwise):
    block = randomize_(NonLocalBlock(4, pairwise=pairwise, dim=2, whiten=True)).double()
    x = (make_input((2, 4, 3, 5), torch.float64) + 1.0).requires_grad_()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_defaults_are_the_papers():
    """The options' defaults draw exactly the authors' initialisation, written plainly: the four
    1x1 convs made in order (theta, phi, g, W_z), then theta, phi, g normal(0, 0.01), W_z zero;
    no whitening."""
    torch.manual_seed(0)
    default = NonLocalBlock(256, subsample=False)
    torch.manual_seed(0)
    explicit = NonLocalBlock(
        256, subsample=False, theta_phi_init="normal", out_init_std=0.0, whiten=False
    )
    torch.manual_seed(0)
    convs = [nn.Conv2d(256, 128, 1) for _ in range(3)] + [nn.Conv2d(128, 256, 1)]
    plain = [nn.init.normal_(c.weight, std=0.01).reshape(128, 256) for c in convs[:3]]
    for name, expected in zip(("theta", "phi", "g"), plain):
        for block in (default, explicit):
            w = getattr(block, name).weight.reshape(128, 256)
            assert torch.equal(w, expected), name
    assert not default.out.weight.any() and not default.whiten
    assert "theta_phi_init" not in repr(default) and "whiten=True" in repr(
        NonLocalBlock(8, whiten=True)
    )


@pytest.mark.parametrize("init,std", [("he", math.sqrt(2 / 256)), ("lecun", math.sqrt(1 / 256))])
def test_theta_phi_fan_in_init(init, std):
    torch.manual_seed(0)
    block = NonLocalBlock(256, subsample=False, theta_phi_init=init)
    for name in ("theta", "phi"):
        conv = getattr(block, name)
        assert abs(conv.weight.std().item() / std - 1) < 0.02, name
        assert not conv.bias.any()
    assert abs(block.g.weight.std().item() / 0.01 - 1) < 0.02  # g keeps the authors' init
    assert not block.out.weight.any()
    gaussian = NonLocalBlock(8, pairwise="gaussian", theta_phi_init=init)  # no theta / phi
    assert gaussian.theta is None and not gaussian.out.weight.any()


def _post_relu_input(shape, seed=1):
    return make_input(shape, seed=seed).relu() * 2.0  # non-negative, like a ResNet stage's output


@pytest.mark.parametrize(
    "options,eps",
    [
        (dict(), 0.0),
        (dict(theta_phi_init="he"), 0.0),
        (dict(theta_phi_init="lecun"), 0.0),
        (dict(whiten=True), 0.0),
        (dict(use_scale=False), 0.0),
        (dict(out_init_std=0.01), 5e-3),
    ],
    ids=["paper", "he", "lecun", "whiten", "no_scale", "out_init_std"],
)
def test_options_identity_at_init_and_first_gradients(options, eps):
    """Identity at initialisation (exact with W_z = 0; with out_init_std 0.01, within 0.5% of
    the input's largest value, for a post-ReLU input of mean ~0.8); gradients at step 0 reach
    theta / phi / g only with a non-zero W_z; after one SGD step, theta's and phi's gradients
    grow with the other embedding's init std (the bilinear logits): fan-in inits give at least
    half the std ratio (He 17.7x, LeCun 12.5x at C = 64) over the paper's init."""
    x = _post_relu_input((2, 64, 6, 6))
    target = make_input((2, 64, 6, 6), seed=3)
    grads = {}
    for name, opts in (("paper", {}), ("option", options)):
        torch.manual_seed(0)
        block = NonLocalBlock(64, subsample=False, **opts)
        with torch.no_grad():
            err = (block(x) - x).abs().max().item()
        assert err <= eps * x.abs().max().item(), (name, err)
        opt = torch.optim.SGD(block.parameters(), lr=0.1)
        norms = []
        for _ in range(2):
            opt.zero_grad()
            ((block(x) - target) ** 2).mean().backward()
            norms.append(
                {
                    n: block.get_parameter(f"{n}.weight").grad.norm().item()
                    for n in ("theta", "phi", "g")
                }
            )
            opt.step()
        grads[name] = norms
    step0, step1 = grads["option"]
    if options.get("out_init_std", 0) > 0:
        assert min(step0.values()) > 0
        assert err > 0
    else:
        assert max(step0.values()) == 0  # W_z = 0: nothing reaches the embeddings at step 0
    assert min(step1.values()) > 0
    if options.get("theta_phi_init", "normal") != "normal":
        ratio = math.sqrt((2 if options["theta_phi_init"] == "he" else 1) / 64) / 0.01
        for n in ("theta", "phi"):
            paper = grads["paper"][1][n]
            assert step1[n] > 0.5 * ratio * paper, (n, step1[n], paper)


@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(theta_phi_init="xavier"), ["theta_phi_init", "'xavier'", "'he'", "'lecun'"]),
        (dict(whiten=1), ["whiten=1", "True or False"]),
        (dict(out_init_std=-0.1), ["out_init_std=-0.1", "a number >= 0"]),
        (dict(out_init_std=0.01, norm="GN"), ["out_init_std=0.01", "norm='GN'", "gamma"]),
    ],
)
def test_option_errors(kwargs, substrings):
    with pytest.raises(ValueError) as info:
        NonLocalBlock(8, **kwargs)
    for s in substrings:
        assert s in str(info.value), f"{s!r} not in {str(info.value)!r}"


# ------------------------------------------------------------------------------------------------
# attention_for_queries
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subsample", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_attention_for_queries(pairwise, dim, subsample):
    block = randomize_(NonLocalBlock(8, pairwise=pairwise, dim=dim, subsample=subsample)).double()
    spatial = SPATIAL[dim]
    x = make_input((2, 8, *spatial), torch.float64)
    _, attention, key_shape = reference(block, x)
    n_pos = math.prod(spatial)
    flat = torch.tensor([0, n_pos - 1, n_pos // 2, 3])
    coords = torch.stack(torch.unravel_index(flat, spatial), dim=1)  # (Q, dim)
    expected = attention[:, flat].reshape([2, len(flat)] + key_shape)
    for queries in (flat, coords):
        with torch.no_grad():
            w = block.attention_for_queries(x, queries)
        assert list(w.shape) == [2, len(flat)] + key_shape
        torch.testing.assert_close(w, expected, atol=1e-10, rtol=1e-10)
        if pairwise in GAUSSIAN_FORMS:
            sums = w.flatten(2).sum(dim=2)
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-12, rtol=0)


def test_attention_for_queries_rejects_bad_queries():
    block = NonLocalBlock(8, dim=2)
    x = make_input((1, 8, 5, 7))
    with pytest.raises(ValueError, match=r"queries.*allowed"):
        block.attention_for_queries(x, torch.tensor([35]))
    with pytest.raises(ValueError, match=r"queries has shape \[2, 3\].*allowed"):
        block.attention_for_queries(x, torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_jit_script_and_trace(pairwise, dim):
    block = randomize_(NonLocalBlock(8, pairwise=pairwise, dim=dim, norm="GN")).eval()
    x = make_input((2, 8, *SPATIAL[dim]))
    with torch.no_grad():
        eager = block(x)
        scripted = torch.jit.script(block)
        traced = torch.jit.trace(block, x)
        for _ in range(3):  # the profiling executor optimises the graph after a few runs
            torch.testing.assert_close(scripted(x), eager, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(traced(x), eager, atol=1e-6, rtol=1e-6)
    # the scripted module handles other spatial sizes (the pooling is not frozen)
    x2 = make_input((1, 8, *[s + 1 for s in SPATIAL[dim]]))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x2), block(x2), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Half precision with large activations
# ------------------------------------------------------------------------------------------------
def _large_activation_block(pairwise: str) -> NonLocalBlock:
    """C = 1024, C_inner = 512 and a non-zero W_z.

    For the Gaussian forms theta == phi (std 0.05), so that theta_i . phi_i = |theta_i|^2 ~ 1e5 is
    beyond the fp16 range (the raw x_i . x_i of ``gaussian`` is anyway). The dot-product and
    concatenation forms keep the default embeddings: they have no softmax to bound y, whose
    true value would itself exceed the fp16 range with such tied weights.
    """
    torch.manual_seed(0)
    block = NonLocalBlock(1024, pairwise=pairwise, dim=2, subsample=False)
    with torch.no_grad():
        if pairwise in GAUSSIAN_FORMS and block.theta is not None:
            nn.init.normal_(block.theta.weight, std=0.05)
            block.phi.weight.copy_(block.theta.weight)
        nn.init.normal_(block.out.weight, std=0.01)
    return block


def _large_input(dtype: torch.dtype) -> torch.Tensor:
    return make_input((1, 1024, 3, 4), seed=5, scale=10.0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_half_precision_large_activations(pairwise, dtype):
    block = _large_activation_block(pairwise)
    x = _large_input(dtype)
    if pairwise in GAUSSIAN_FORMS:  # theta_i . phi_i (= |theta_i|^2) is beyond fp16's range
        q = x.float() if pairwise == "gaussian" else block.theta(x.float())
        assert q.square().sum(1).max() > torch.finfo(torch.float16).max
    block = block.to(dtype)
    with torch.no_grad():
        out = block(x)  # an unsupported CPU kernel for this dtype would raise here: no skip
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{pairwise} in {dtype}: non-finite output"
    expected, attention, key_shape = reference(block, x)  # same rounded weights, in float64
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"

    # the inspection helper too (it used to compute q . k in fp16)
    with torch.no_grad():
        w = block.attention_for_queries(x, torch.tensor([0, 5, 11]))
    assert w.dtype == dtype and torch.isfinite(w).all()
    expected_w = attention[:, [0, 5, 11]].reshape(w.shape)
    err = (w.double() - expected_w).abs().max() / expected_w.abs().max()
    assert err < 2e-2, f"attention: relative error {err:.3g}"

    # and the backward pass
    x = x.detach().requires_grad_()
    block(x).float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,substrings",
    [
        (dict(pairwise="foo"), ["pairwise", "'foo'", "embedded_gaussian", "concatenation"]),
        (dict(norm="FrozenBN"), ["norm", "'FrozenBN'", "'GN'", "'SyncBN'"]),
        (dict(norm="LN"), ["norm", "'LN'", "'BN'"]),
        (dict(dim=4), ["dim", "4", "[1, 2, 3]"]),
        (dict(dim=0), ["dim", "0", "[1, 2, 3]"]),
        (dict(in_channels=0), ["in_channels", "0", "int >= 1"]),
        (dict(in_channels=-3), ["in_channels", "-3", "int >= 1"]),
        (dict(inner_channels=0), ["inner_channels", "0", "int >= 1"]),
        (dict(inner_channels=-1), ["inner_channels", "-1", "int >= 1"]),
    ],
)
def test_constructor_errors(kwargs, substrings):
    kwargs = {"in_channels": 8, **kwargs}
    with pytest.raises(ValueError) as info:
        NonLocalBlock(**kwargs)
    for s in substrings:
        assert s in str(info.value), f"{s!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(
    "shape,substrings",
    [
        ((2, 8, 5), ["input x", "[2, 8, 5]", "rank 4"]),
        ((2, 8, 3, 5, 7), ["input x", "[2, 8, 3, 5, 7]", "rank 4"]),
        ((2, 5, 5, 7), ["input x", "5 channels", "in_channels=8", "allowed: 8"]),
    ],
)
def test_input_errors(shape, substrings):
    block = NonLocalBlock(8, dim=2)
    with pytest.raises(ValueError) as info:
        block(torch.zeros(shape))
    for s in substrings:
        assert s in str(info.value), f"{s!r} not in {str(info.value)!r}"


# ------------------------------------------------------------------------------------------------
# Never an N x M tensor, forward or backward
# ------------------------------------------------------------------------------------------------
# LargestOutput and largest_tensor_fwd_bwd (tests/family_helpers.py) record the largest tensor
# any op makes, forward and backward.


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_no_n_by_m_matrix(pairwise, dim):
    spatial = (4096,) if dim == 1 else (64, 64)
    block = randomize_(NonLocalBlock(16, pairwise=pairwise, dim=dim, subsample=False))
    x = make_input((1, 16, *spatial))
    n_times_m = 4096 * 4096
    rec = largest_tensor_fwd_bwd(block, x)
    assert rec.largest < n_times_m, f"{pairwise}: {rec.op} has {rec.largest} >= N*M elements"
    # linear memory: nothing bigger than a few (positions x channels) tensors
    assert rec.largest <= 4 * 4096 * 16, rec.op


def test_no_n_by_m_detector_catches_math_fallback():
    """The detector above sees SDPA's matrix-building fallback, so it would catch a regression."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = randomize_(NonLocalBlock(16, pairwise="embedded_gaussian", dim=1, subsample=False))
    x = make_input((1, 16, 1024))
    with sdpa_kernel(SDPBackend.MATH):
        rec = largest_tensor_fwd_bwd(block, x)
    assert rec.largest >= 1024 * 1024, rec.op


def test_no_n_by_m_matrix_with_values_wider_than_queries():
    """The gaussian form's queries and keys are x (C wide), its values g(x) (C_inner wide): the
    operator pads the narrower side, as SDPA's fused kernels need equal widths (its fallback for
    unequal ones builds the N x M matrix). test_no_n_by_m_matrix: g narrower (C_inner = C / 2)."""
    block = randomize_(NonLocalBlock(16, 32, pairwise="gaussian", dim=1, subsample=False))
    rec = largest_tensor_fwd_bwd(block, make_input((1, 16, 4096)))
    assert rec.largest <= 4 * 4096 * 32, rec.op
