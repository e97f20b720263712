"""Helpers shared by the blocks of the non-local family: argument and input checks, query
indices for the attention maps, and products kept in float32 under autocast."""

import functools
import inspect
import math
from numbers import Real
from typing import List, Mapping, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import nn

__all__ = [
    "AttentionPooling",
    "check_block_args",
    "key_name",
    "is_int",
    "is_number",
    "check_choice",
    "check_int",
    "check_value",
    "check_bool",
    "check_positive",
    "check_ratio",
    "check_input",
    "conv1x1_fp32",
    "flat_query_indices",
    "matmul_fp32",
    "sdpa_fp32",
    "softmax_fp32",
]


def is_int(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_value(owner: str, name: str, value, ok: bool, allowed: str) -> None:
    """The value check the others go through: unless ``ok``, a ValueError
    ``"{owner}: {name}={value!r} is not supported; allowed: {allowed}"``; an empty ``owner``
    (``name`` a config key such as ``SOLVER.MAX_ITER``) starts the message at ``name``."""
    if not ok:
        where = f"{owner}: {name}" if owner else name
        raise ValueError(f"{where}={value!r} is not supported; allowed: {allowed}")


def check_choice(owner: str, name: str, value, allowed) -> None:
    """Unless ``value`` is one of ``allowed``: the ValueError of :func:`check_value`."""
    check_value(owner, name, value, value in allowed, str(list(allowed)))


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """Unless ``value`` is an int >= ``minimum`` (bools refused): the ValueError of
    :func:`check_value`."""
    ok = is_int(value) and value >= minimum
    check_value(owner, name, value, ok, f"an int >= {minimum}")


def check_bool(owner: str, name: str, value) -> None:
    check_value(owner, name, value, isinstance(value, bool), "True or False")


def check_positive(owner: str, name: str, value, minimum: float = 0.0, *, inclusive=False):
    """Unless ``value`` is a finite number (bools refused) > ``minimum`` (>= it with
    ``inclusive``): the ValueError of :func:`check_value`."""
    ok = is_number(value) and (value >= minimum if inclusive else value > minimum)
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    check_value(owner, name, value, ok, f"a number {bound}")


def check_ratio(owner: str, name: str, value, in_channels: int) -> int:
    """Checks a channel ratio r and returns the bottleneck width int(in_channels * r) (the
    authors' rounding), which must be at least 1."""
    planes = int(in_channels * value) if is_number(value) else 0
    at = f"int(in_channels * ratio) >= 1 at in_channels={in_channels}"
    check_value(owner, name, value, planes >= 1, f"a number >= 1/{in_channels} ({at})")
    return planes


def key_name(keys: Optional[Mapping[str, str]], arg: str) -> str:
    """The name errors give argument ``arg``: its entry in ``keys`` (a config key), else ``arg``."""
    return keys.get(arg, arg) if keys else arg


def check_block_args(
    cls: type, args: Mapping, owner: Optional[str] = None, keys: Optional[Mapping] = None
) -> None:
    """Check the constructor arguments of a block class: ``in_channels``, a bool for each argument
    whose default is one, then the class's own ``check_args(args, owner, key)``.

    Args:
        cls (type): the block class.
        args (dict): every argument by name, defaults included (extra names ignored).
        owner (str): starts the errors, default the class name; "" with config keys.
        keys (dict): argument -> the name errors give it (a config key); default the argument.
    """
    owner = cls.__name__ if owner is None else owner
    key = functools.partial(key_name, keys)
    check_int(owner, "in_channels", args["in_channels"], 1)
    for p in inspect.signature(cls).parameters.values():
        if isinstance(p.default, bool):
            check_bool(owner, key(p.name), args[p.name])
    if hasattr(cls, "check_args"):
        cls.check_args(args, owner, key)


def check_input(owner: str, x: torch.Tensor, channels: int, dim: int = 2) -> None:
    """A ValueError naming the shape and what is allowed unless ``x`` is (N, C, *spatial) with
    ``dim`` spatial axes and C == ``channels`` (TorchScript-compatible)."""
    if x.dim() != dim + 2:
        raise ValueError(
            f"{owner}: input x has shape {list(x.shape)}; allowed: a tensor of rank {dim + 2} "
            f"(N, C, {dim} spatial axes)"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{owner}(in_channels={channels}): input x has {x.shape[1]} channels "
            f"(shape {list(x.shape)}); allowed: {channels}"
        )


def flat_query_indices(owner: str, queries, spatial: List[int], device) -> torch.Tensor:
    """Query positions given as (Q,) flat indices or (Q, 2) (y, x) coordinates -> (Q,) flat
    indices into the ``spatial`` grid, with a ValueError for anything else."""
    queries = torch.as_tensor(queries, dtype=torch.long, device=device)
    if queries.dim() == 2:
        if queries.shape[1] != len(spatial):
            raise ValueError(
                f"{owner}.attention_for_queries: queries has shape {list(queries.shape)}; "
                f"allowed: (Q,) flat indices or (Q, {len(spatial)}) coordinates"
            )
        inside = (queries >= 0) & (queries < torch.tensor(spatial, device=device))
        if not bool(inside.all()):
            raise ValueError(
                f"{owner}.attention_for_queries: queries {queries.tolist()} outside the "
                f"{spatial} grid; allowed: coordinates in [0, {spatial})"
            )
        flat = torch.zeros_like(queries[:, 0])
        for axis, size in enumerate(spatial):
            flat = flat * size + queries[:, axis]
        queries = flat
    n_pos = math.prod(spatial)
    if queries.dim() != 1 or bool(((queries < 0) | (queries >= n_pos)).any()):
        raise ValueError(
            f"{owner}.attention_for_queries: queries {queries.tolist()} outside the "
            f"{spatial} grid; allowed: flat indices in [0, {n_pos}) or (Q, 2) coordinates"
        )
    return queries


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 at least (float64 stays float64), autocast off: dot products of
    un-scaled embeddings overflow float16 (max 65504) with large activations."""
    dt = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(device_type="cpu", enabled=False):
        with torch.autocast(device_type="cuda", enabled=False):
            return torch.matmul(a.to(dt), b.to(dt))


def softmax_fp32(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax computed in float32 at least (float64 stays float64)."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    return torch.softmax(logits.to(dt), dim=dim)


def conv1x1_fp32(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """A 1x1 convolution (stride 1, no padding) of a (N, C, *spatial) input, computed and
    returned in float32 at least (float64 stays float64), autocast off: for the embeddings whose
    products are attention logits, which float16 rounding would reorder.

    On the CPU the convolution itself (what ``nn.Conv2d`` computes, bit for bit); on CUDA a matrix
    product, which runs in TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` asks for it
    (cuDNN's float32 convolutions do by default).
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    shape = [x.shape[0], weight.shape[0]]
    shape.extend(x.shape[2:])
    with torch.autocast(device_type="cpu", enabled=False):
        with torch.autocast(device_type="cuda", enabled=False):
            if not x.is_cuda:  # (no return inside the with blocks: TorchScript)
                xd, wd = x.to(dt), weight.to(dt)
                b = bias.to(dt) if bias is not None else None
                if x.dim() == 3:
                    y = F.conv1d(xd, wd, b)
                elif x.dim() == 5:
                    y = F.conv3d(xd, wd, b)
                else:
                    y = F.conv2d(xd, wd, b)
            else:
                w = weight.to(dt).reshape(1, weight.shape[0], -1)  # (1, C_out, C)
                # bmm, not matmul: matmul folds the batch into one product only when no gradient
                # is needed, which changes the rounding (frozen and trainable blocks would differ)
                y = torch.bmm(w.expand(x.shape[0], -1, -1), x.to(dt).flatten(2))  # (N, C_out, L)
                if bias is not None:
                    y = y + bias.to(dt).unsqueeze(1)
    return y.reshape(shape)


def sdpa_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, scale=scale)`` computed in float32 at least
    (float64 stays float64), autocast off, returned in v's dtype: in float16 the logits can
    overflow and a saturated softmax's backward is rounding noise. The fused kernels (linear
    memory) take float32 too.
    """
    dt = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    with torch.autocast(device_type="cpu", enabled=False):
        with torch.autocast(device_type="cuda", enabled=False):
            y = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), scale=scale)
    return y.to(v.dtype)


class AttentionPooling(CNNBlockBase):
    """The context modelling of SNL and GC (Cao et al.): one attention map over the positions,
    softmax_j(conv_mask(x)_j) shared by every query, and the context sum_j w_j x_j. A
    ``CNNBlockBase`` (stride 1, in == out channels) with the 1x1 conv ``conv_mask`` (C -> 1)."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, in_channels, stride=1)
        self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over positions of conv_mask(x), computed in float32 at least (the mask logits
        too): (N, 1, H*W)."""
        conv = self.conv_mask
        logits = conv1x1_fp32(x, conv.weight, conv.bias)
        return softmax_fp32(logits.flatten(2), 2).to(x.dtype)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """sum_j w_j x_j: (N, C, 1, 1)."""
        return torch.matmul(x.flatten(2), self._weights(x).transpose(1, 2)).unsqueeze(3)

    @torch.jit.unused
    def context_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map shared by every query, softmax_j(conv_mask(x)): (N, H, W), summing
        to 1 over the positions, for an input x (N, C, H, W) of the block."""
        check_input(type(self).__name__, x, self.in_channels)
        return self._weights(x).reshape(x.shape[0], x.shape[2], x.shape[3])
