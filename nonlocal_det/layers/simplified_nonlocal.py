"""The simplified non-local block (SNL) of Cao et al., "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond" (ICCVW 2019, arXiv:1904.11492), as the DNL authors'
code runs it (Howal/DNL-Object-Detection ``mmdet/ops/context_block.py``, ``ContextBlock`` with
``simple=True``, config ``configs/dnlnet/mask_rcnn_r50_r4_gcb-sym_c4_fpn_syncabn_4conv1fc_1x.py``):

    z_i = x_i + W_v sum_j softmax_j(w_k . x_j + b_k) x_j

One attention map over the positions, shared by every query.
"""

import torch
from torch import nn

from ._common import AttentionPooling, check_block_args, check_input

__all__ = ["SimplifiedNonLocalBlock"]


class SimplifiedNonLocalBlock(AttentionPooling):
    """Simplified non-local block: ``z = x + W_v sum_j softmax_j(conv_mask(x))_j x_j``.

    The authors' block (DNL repository, ``ContextBlock(simple=True)``), a Detectron2
    ``CNNBlockBase`` (stride 1, ``out_channels == in_channels``): ``conv_mask`` a 1x1 conv C -> 1
    (with bias), soft-maxed over the positions; ``conv_value`` W_v, a 1x1 conv C -> C without bias,
    applied to the pooled (N, C, 1, 1) context (the same function as the authors' W_v before
    pooling). Both convs start normal(0, 0.01), the bias 0: not the identity, unless
    ``zero_init``. The DNL authors place it inside the second-to-last bottleneck of res4, after
    the residual add.

    Args:
        in_channels (int): C, channels of the input and of the output.
        zero_init (bool): start ``conv_value.weight`` at zero (identity at initialisation).
            Default False, as the authors.
    """

    def __init__(self, in_channels: int, zero_init: bool = False):
        check_block_args(SimplifiedNonLocalBlock, locals())
        super().__init__(in_channels)
        self.zero_init = zero_init
        self.conv_value = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: normal(0, 0.01) weights, zero bias; W_v zero with
        ``zero_init``."""
        nn.init.normal_(self.conv_mask.weight, std=0.01)
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.normal_(self.conv_value.weight, std=0.01)
        if self.zero_init:
            nn.init.zeros_(self.conv_value.weight)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, zero_init={self.zero_init}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("SimplifiedNonLocalBlock", x, self.in_channels)
        return x + self.conv_value(self._context(x))
