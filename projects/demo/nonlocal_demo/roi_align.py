"""ROIAlign with a backward by gathers: the numbers of Detectron2's ``ROIAlign`` (torchvision's
``roi_align``) for a fixed number of samples per bin, with a backward that PyTorch runs on every
thread.

torchvision's CPU ``roi_align`` loops over the RoIs on one thread, forward and backward (its
backward scatters into the feature map with plain adds): with several cores, the poolers'
backward leaves all but one idle (docs/demo.md measures it). Every sample point of a bin is a
bilinear interpolation of four feature vectors: with the feature map laid out as rows of
channels, ``F.embedding`` gathers the four rows of each point and a weighted sum gives the
point, the mean of a bin's points the bin (:func:`roi_align_gather`). The transpose of those
gathers, ``embedding``'s backward, sums the gradients of each row over all the points that read
it on every thread: torchvision's scatter.
:class:`GatherROIAlign` keeps torchvision's forward (faster than four gathers) and takes the
gathers' backward (:func:`roi_align_fast_backward`); without a gradient to compute it is
torchvision's ``roi_align``.

The sampling is torchvision's: ``sampling_ratio`` x ``sampling_ratio`` points at the centres of a
regular grid in each bin; a point more than one pixel outside the map reads zeros, a point within
one pixel of the border reads the border. torchvision's adaptive sampling (``sampling_ratio`` 0:
``ceil(roi size / output size)`` points per bin, a different number per RoI) has no fixed-shape
gather and is not offered. Memory: the backward makes four ``(K, out_h * s, out_w * s, C)``
tensors, fine for the small heads of the demo, not for 512 RoIs of 256 channels at 14 x 14.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ROIAlign
from torchvision.ops import roi_align

__all__ = ["GatherROIAlign", "roi_align_fast_backward", "roi_align_gather"]


def _axis(coords: torch.Tensor, size: int):
    """torchvision's bilinear interpolation along one axis, for every sample coordinate: the lower
    and upper index, the lower and upper weight, and whether the point reads the map at all."""
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0.0)
    low = coords.floor().clamp(max=size - 1)
    at_end = low >= size - 1
    coords = torch.where(at_end, low, coords)
    high = torch.where(at_end, low, low + 1)
    frac = coords - low
    return low.long(), high.long(), 1.0 - frac, frac, inside


def _ratio_error(caller: str, sampling_ratio) -> ValueError:
    return ValueError(
        f"{caller}: sampling_ratio={sampling_ratio!r} is not supported; allowed: an integer "
        ">= 1 (torchvision's adaptive 0 has no fixed-shape gather)"
    )


def _check(caller: str, input: torch.Tensor, rois: torch.Tensor, sampling_ratio) -> None:
    if input.dim() != 4:
        raise ValueError(f"{caller}: input of shape {tuple(input.shape)}; allowed: (N, C, H, W)")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"{caller}: rois of shape {tuple(rois.shape)}; allowed: (K, 5)")
    if isinstance(sampling_ratio, bool) or int(sampling_ratio) < 1:
        raise _ratio_error(caller, sampling_ratio)


def _corners(
    shape, rois: torch.Tensor, output_size, spatial_scale: float, s: int, aligned: bool
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The four bilinear corners of every sample point: for each, the row of the ``(N * H * W,
    C)`` table it reads and its weight, both ``(K, out_h * s, out_w * s)`` (weight 0 for a point
    that reads nothing)."""
    n, _, h, w = shape
    out_h, out_w = int(output_size[0]), int(output_size[1])
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x0
    roi_h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # torchvision: legacy boxes are at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    # sample j of an axis: bin j // s, point j % s: start + (bin + (point + 0.5) / s) * bin size
    steps_x = (torch.arange(out_w * s, device=rois.device, dtype=rois.dtype) + 0.5) / s
    steps_y = (torch.arange(out_h * s, device=rois.device, dtype=rois.dtype) + 0.5) / s
    xs = x0[:, None] + steps_x[None, :] * bin_w[:, None]  # (K, out_w * s)
    ys = y0[:, None] + steps_y[None, :] * bin_h[:, None]  # (K, out_h * s)
    x_lo, x_hi, wx_lo, wx_hi, x_in = _axis(xs, w)
    y_lo, y_hi, wy_lo, wy_hi, y_in = _axis(ys, h)
    inside = (y_in[:, :, None] & x_in[:, None, :]).to(rois.dtype)  # (K, out_h * s, out_w * s)
    image = rois[:, 0].long()[:, None, None] * (h * w)
    corners = []
    for rows_y, weight_y in ((y_lo, wy_lo), (y_hi, wy_hi)):
        rows = image + (rows_y * w)[:, :, None]
        weight_y = weight_y[:, :, None] * inside
        for cols, weight_x in ((x_lo, wx_lo), (x_hi, wx_hi)):
            corners.append((rows + cols[:, None, :], weight_y * weight_x[:, None, :]))
    return corners


def roi_align_gather(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio,
    aligned)`` for ``sampling_ratio >= 1``, forward and backward by gathers (autograd through
    ``F.embedding``).

    Args:
        input: ``(N, C, H, W)`` features.
        rois: ``(K, 5)``: batch index, x0, y0, x1, y1 in input-image coordinates (no gradient
            flows into them, as in torchvision).
        output_size: ``(out_h, out_w)``.
        spatial_scale: feature-map pixels per input pixel.
        sampling_ratio: sample points per bin along each axis, ``>= 1``.
        aligned: shift the box by half a pixel (Detectron2's ``ROIAlignV2``).

    Returns:
        ``(K, C, out_h, out_w)``.
    """
    _check("roi_align_gather", input, rois, sampling_ratio)
    n, c, h, w = input.shape
    out_h, out_w, s = int(output_size[0]), int(output_size[1]), int(sampling_ratio)
    rois = rois.detach().to(input.dtype)
    table = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # the map as rows of channels
    out = None
    for index, weight in _corners(input.shape, rois, output_size, spatial_scale, s, aligned):
        term = F.embedding(index, table) * weight[..., None]
        out = term if out is None else out + term
    if s > 1:
        out = out.view(rois.shape[0], out_h, s, out_w, s, c).mean(dim=(2, 4))
    return out.permute(0, 3, 1, 2).contiguous()


class _ROIAlignGatherBackward(torch.autograd.Function):
    """torchvision's forward (fast on one thread), the gathers' backward (the transpose of the
    gathers: ``embedding``'s backward, which sums each row's gradients on every thread)."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, s, aligned = ctx.args
        n, c, h, w = shape
        grad = grad_out.permute(0, 2, 3, 1)  # (K, out_h, out_w, C)
        if s > 1:  # each of a bin's s x s points gets the bin's gradient / s^2
            grad = grad.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2) / (s * s)
        rois = rois.to(grad.dtype)
        table = None
        for index, weight in _corners(shape, rois, output_size, spatial_scale, s, aligned):
            part = torch.ops.aten.embedding_dense_backward(
                grad * weight[..., None], index, n * h * w, -1, False
            )
            table = part if table is None else table + part
        grad_input = table.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return grad_input, None, None, None, None, None


def roi_align_fast_backward(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align`` (``sampling_ratio >= 1``) whose backward is
    :func:`roi_align_gather`'s: torchvision's forward, gathers' backward (arguments as there)."""
    _check("roi_align_fast_backward", input, rois, sampling_ratio)
    output_size = (int(output_size[0]), int(output_size[1]))
    if rois.shape[0] == 0 or not (torch.is_grad_enabled() and input.requires_grad):
        return roi_align(input, rois, output_size, spatial_scale, int(sampling_ratio), aligned)
    return _ROIAlignGatherBackward.apply(
        input, rois.detach(), output_size, spatial_scale, int(sampling_ratio), aligned
    )


class GatherROIAlign(ROIAlign):
    """Detectron2's ``ROIAlign(output_size, spatial_scale, sampling_ratio, aligned)`` for
    ``sampling_ratio >= 1`` with the gathers' backward (:func:`roi_align_fast_backward`) when a
    gradient is computed: the same call, the same numbers, torchvision's forward.

    Scripted, traced or exported (ONNX) it is Detectron2's ``ROIAlign``: the gathers' backward is
    a Python ``autograd.Function``, which none of them can hold, and inference does not need it.
    So a model keeps its ``GatherROIAlign`` modules through ``torch.jit.script`` (no swap in
    ``__prepare_scriptable__``, whose new module objects TorchScript's memo, keyed by ``id``, can
    confuse with freed ones)."""

    def __init__(
        self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = True
    ):
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if (
            isinstance(sampling_ratio, bool)
            or not isinstance(sampling_ratio, int)
            or sampling_ratio < 1
        ):
            raise _ratio_error("GatherROIAlign", sampling_ratio)
        super().__init__(tuple(output_size), spatial_scale, sampling_ratio, aligned)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.jit.is_tracing() and torch.is_grad_enabled() and input.requires_grad:
                return self._gathers_backward(input, rois)
        # Detectron2's ROIAlign.forward (TorchScript has no super()): torchvision's roi_align
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"GatherROIAlign: rois of shape {rois.shape}; allowed: (K, 5)")
        return roi_align(
            input.dequantize() if input.is_quantized else input,
            rois.to(dtype=input.dtype),
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
        )

    @torch.jit.unused
    def _gathers_backward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align_fast_backward(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )
