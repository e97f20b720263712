"""ROIAlign computed by gathers: the numbers of Detectron2's ``ROIAlign`` (torchvision's
``roi_align``) for a fixed number of samples per bin, with a backward that PyTorch runs on every
thread.

torchvision's CPU ``roi_align`` loops over the RoIs on one thread, forward and backward (its
backward scatters into the feature map with plain adds). In the CPU demo the three poolers (box,
mask, keypoint) took 78 ms of a 0.42 s step on two threads (docs/demo.md). Here every sample point
of every bin is a bilinear interpolation of four feature vectors: the feature map is laid out as
rows of channels, ``F.embedding`` gathers the four rows of each point and a weighted sum gives the
point, the mean of a bin's points the bin. ``F.embedding``'s backward sums the gradients of each
row over all the points that read it (multi-threaded), which is the scatter of torchvision's
backward.

The sampling is torchvision's: ``sampling_ratio`` x ``sampling_ratio`` points at the centres of a
regular grid in each bin; a point more than one pixel outside the map reads zeros, a point within
one pixel of the border reads the border. torchvision's adaptive sampling (``sampling_ratio`` 0:
``ceil(roi size / output size)`` points per bin, a different number per RoI) has no fixed-shape
gather and is not offered. Memory: four gathers of ``(K, out_h * s, out_w * s, C)``, so this is for
the small heads of the demo, not for 512 RoIs of 256 channels at 14 x 14.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatherROIAlign", "roi_align_gather"]


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


def roi_align_gather(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio,
    aligned)`` for ``sampling_ratio >= 1``, by gathers.

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
    if input.dim() != 4:
        raise ValueError(
            f"roi_align_gather: input of shape {tuple(input.shape)}; allowed: (N, C, H, W)"
        )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align_gather: rois of shape {tuple(rois.shape)}; allowed: (K, 5)")
    if isinstance(sampling_ratio, bool) or int(sampling_ratio) < 1:
        raise ValueError(
            f"roi_align_gather: sampling_ratio={sampling_ratio!r} is not supported; allowed: an "
            "integer >= 1 (torchvision's adaptive 0 has no fixed-shape gather)"
        )
    n, c, h, w = input.shape
    out_h, out_w = int(output_size[0]), int(output_size[1])
    s = int(sampling_ratio)
    rois = rois.detach().to(input.dtype)
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x0
    roi_h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # torchvision: legacy boxes are at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    # sample j of an axis: bin j // s, point j % s: start + (bin + (point + 0.5) / s) * bin size
    steps_x = (torch.arange(out_w * s, device=input.device, dtype=input.dtype) + 0.5) / s
    steps_y = (torch.arange(out_h * s, device=input.device, dtype=input.dtype) + 0.5) / s
    xs = x0[:, None] + steps_x[None, :] * bin_w[:, None]  # (K, out_w * s)
    ys = y0[:, None] + steps_y[None, :] * bin_h[:, None]  # (K, out_h * s)
    x_lo, x_hi, wx_lo, wx_hi, x_in = _axis(xs, w)
    y_lo, y_hi, wy_lo, wy_hi, y_in = _axis(ys, h)
    inside = (y_in[:, :, None] & x_in[:, None, :]).to(input.dtype)  # (K, out_h * s, out_w * s)
    image = rois[:, 0].long()[:, None, None] * (h * w)
    rows = {"lo": image + (y_lo * w)[:, :, None], "hi": image + (y_hi * w)[:, :, None]}
    weights_y = {"lo": wy_lo[:, :, None] * inside, "hi": wy_hi[:, :, None] * inside}
    # the map as rows of channels: (N * H * W, C)
    table = input.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = None
    for ky in ("lo", "hi"):
        for cols, weight_x in ((x_lo, wx_lo), (x_hi, wx_hi)):
            index = rows[ky] + cols[:, None, :]  # (K, out_h * s, out_w * s)
            weight = weights_y[ky] * weight_x[:, None, :]
            term = F.embedding(index, table) * weight[..., None]
            out = term if out is None else out + term
    k = rois.shape[0]
    if s > 1:
        out = out.view(k, out_h, s, out_w, s, c).mean(dim=(2, 4))
    return out.permute(0, 3, 1, 2).contiguous()


class GatherROIAlign(nn.Module):
    """Detectron2's ``ROIAlign(output_size, spatial_scale, sampling_ratio, aligned)`` computed by
    :func:`roi_align_gather` (``sampling_ratio >= 1``): the same call, the same numbers."""

    def __init__(
        self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = True
    ):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if (
            isinstance(sampling_ratio, bool)
            or not isinstance(sampling_ratio, int)
            or sampling_ratio < 1
        ):
            raise ValueError(
                f"GatherROIAlign: sampling_ratio={sampling_ratio!r} is not supported; allowed: an "
                "integer >= 1 (torchvision's adaptive 0 has no fixed-shape gather)"
            )
        self.output_size = tuple(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align_gather(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def __repr__(self):
        return (
            f"{type(self).__name__}(output_size={self.output_size}, spatial_scale="
            f"{self.spatial_scale}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )
