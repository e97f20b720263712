"""FLOP counting of models with blocks: fvcore (through Detectron2's ``FlopCountAnalysis``, one
multiply-add = one flop) with handles for the blocks' ops that fvcore skips, counts as zero or
estimates: ``scaled_dot_product_attention`` (L*M*(E + E_v) per head), ``cumsum`` (the
concatenation form's prefix sums) and two-operand ``einsum`` (exactly). ``nonlocal_det.modeling``
does not import this module: ``import nonlocal_det`` loads no FLOP analysis."""

from typing import Dict, List

import numpy as np
import torch
from detectron2.utils.analysis import FlopCountAnalysis

__all__ = ["count_flops", "nonlocal_flop_handles"]


def _shape(value) -> List[int]:
    return value.type().sizes()


def _sdpa_flop_jit(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: (.., L, E) x (.., M, E) -> (.., L, M) x (.., M, E_v)."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = int(np.prod(q[:-2]))
    length, e, m, e_v = q[-2], q[-1], k[-2], v[-1]
    return batch * length * m * (e + e_v)


def _einsum_flop_jit(inputs, outputs) -> int:
    """aten::einsum of two operands: one multiply-add per combination of all its indices (fvcore's
    own handle estimates with numpy's einsum_path, which halves outer products)."""
    equation = inputs[0].toIValue().replace(" ", "")
    shapes = [_shape(v) for v in inputs[1].node().inputs()]
    letters = {}
    for term, shape in zip(equation.split("->")[0].split(","), shapes):
        letters.update(zip(term, shape))
    return int(np.prod(list(letters.values())))


def _cumsum_flop_jit(inputs, outputs) -> int:
    """aten::cumsum: one addition per element."""
    return int(np.prod(_shape(outputs[0])))


def nonlocal_flop_handles() -> Dict[str, object]:
    """fvcore op handles for the blocks' ops that fvcore does not count (or counts roughly)."""
    return {
        "aten::scaled_dot_product_attention": _sdpa_flop_jit,
        "aten::einsum": _einsum_flop_jit,
        "aten::cumsum": _cumsum_flop_jit,
        # Comparisons, index look-ups and pooling: no multiply-adds.
        "aten::sort": None,
        "aten::searchsorted": None,
        "aten::gather": None,
        "aten::max_pool1d": None,
        "aten::max_pool2d": None,
        "aten::max_pool3d": None,
        "aten::constant_pad_nd": None,
        "aten::pad": None,
    }


def count_flops(model: torch.nn.Module, inputs) -> FlopCountAnalysis:
    """A Detectron2/fvcore ``FlopCountAnalysis`` with :func:`nonlocal_flop_handles` registered."""
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**nonlocal_flop_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis
