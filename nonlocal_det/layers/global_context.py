"""The global context (GC) block of Cao et al., "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond" (ICCVW 2019, arXiv:1904.11492), as mmcv computes it
(``mmcv/cnn/bricks/context_block.py``, ``ContextBlock``; also xvjiarui/GCNet):

    c = sum_j softmax_j(w_k . x_j + b_k) x_j                       (context, C x 1 x 1)
    T(c) = W_2 ReLU(LayerNorm(W_1 c + b_1)) + b_2                  (W_1: C -> rC, W_2: rC -> C)
    z_i = x_i * sigmoid(T_mul(c)) + T_add(c)                       (per the chosen fusions)
"""

from typing import Optional, Sequence

import torch
from torch import nn

from ._common import AttentionPooling, check_block_args, check_input, check_ratio, check_value

__all__ = ["GlobalContextBlock", "FUSION_TYPES"]
FUSION_TYPES = ("add", "mul")
# mmcv's spellings, accepted so that its configs can be copied.
_ALIASES = {"add": "add", "mul": "mul", "channel_add": "add", "channel_mul": "mul"}


def _transform(in_channels: int, planes: int) -> nn.Sequential:
    """conv C -> rC, LayerNorm over (rC, 1, 1), ReLU, conv rC -> C (mmcv's indices 0..3)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, planes, kernel_size=1),
        nn.LayerNorm([planes, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, in_channels, kernel_size=1),
    )


class GlobalContextBlock(AttentionPooling):
    """Global context block (mmcv ``ContextBlock``, attention pooling).

    Context modelling: ``conv_mask`` (1x1 conv C -> 1, with bias), softmax over the H*W positions,
    weighted sum of the input features -> c, (N, C, 1, 1). Transform per fusion (mmcv's
    ``channel_add_conv`` / ``channel_mul_conv``, each ``Sequential(conv C -> rC, LayerNorm([rC, 1,
    1]), ReLU, conv rC -> C)``). Fusion: ``mul`` gives ``x * sigmoid(T_mul(c))``, ``add`` gives
    ``x + T_add(c)``; with both, the multiplication comes first, as in mmcv. The residual is the
    ``x`` in these expressions.

    Initialisation as mmcv: ``conv_mask`` Kaiming normal (fan_in, ReLU gain), bias 0; the last
    conv of each transform (weight and bias) zero; the other layers keep PyTorch's defaults. So
    ``("add",)`` starts as the identity, while ``("mul",)`` starts as ``x * sigmoid(0) = x / 2``
    (and both fusions as ``x / 2``): the mul fusion halves its input at initialisation.

    Published settings (mmdetection ``configs/gcnet``): ratio 1/16 or 1/4, ``("add",)``, after
    conv3 of every block of res3-res5. A Detectron2 ``CNNBlockBase`` (stride 1,
    ``out_channels == in_channels``).

    Args:
        in_channels (int): C, channels of the input and of the output.
        ratio (float): r, bottleneck width ``int(C * r)`` of the transforms (mmcv's rounding).
            Default 1/16; 1/4 is the other published value.
        fusion_types (tuple of str): any non-empty subset of ``("add", "mul")`` (mmcv's
            ``"channel_add"`` / ``"channel_mul"`` accepted). Default ``("add",)``.
    """

    def __init__(
        self,
        in_channels: int,
        ratio: float = 1.0 / 16,
        fusion_types: Sequence[str] = ("add",),
    ):
        check_block_args(GlobalContextBlock, locals())
        super().__init__(in_channels)
        self.ratio = float(ratio)
        self.planes = planes = int(in_channels * ratio)
        chosen = {_ALIASES[f] for f in fusion_types}
        fusions = tuple(f for f in FUSION_TYPES if f in chosen)
        self.fusion_types = fusions
        self.channel_add_conv: Optional[nn.Module] = None
        self.channel_mul_conv: Optional[nn.Module] = None
        if "add" in fusions:
            self.channel_add_conv = _transform(in_channels, planes)
        if "mul" in fusions:
            self.channel_mul_conv = _transform(in_channels, planes)
        self.reset_parameters()

    @staticmethod
    def check_args(args, owner: str, key) -> None:
        """The checks of :func:`check_block_args` particular to this block."""
        check_ratio(owner, key("ratio"), args["ratio"], args["in_channels"])
        f = args["fusion_types"]
        ok = not isinstance(f, str) and isinstance(f, Sequence) and len(f) > 0
        allowed = f"a non-empty tuple of {list(FUSION_TYPES)} (mmcv's 'channel_add', ... too)"
        check_value(owner, key("fusion_types"), f, ok and all(x in _ALIASES for x in f), allowed)

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Kaiming ``conv_mask``, last conv of each transform zero."""
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        for transform in (self.channel_add_conv, self.channel_mul_conv):
            if transform is not None:
                nn.init.zeros_(transform[-1].weight)
                nn.init.zeros_(transform[-1].bias)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:g}, planes={self.planes}, fusion_types={self.fusion_types}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("GlobalContextBlock", x, self.in_channels)
        context = self._context(x)  # (N, C, 1, 1)
        out = x
        mul = self.channel_mul_conv
        if mul is not None:
            out = out * torch.sigmoid(mul(context))
        add = self.channel_add_conv
        if add is not None:
            out = out + add(context)
        return out
