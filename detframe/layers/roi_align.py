"""RoIAlign (He et al., Mask R-CNN, 2017): the Python face of `torch.ops.detframe.roi_align`.

Shapes: input [N, C, H, W] (N images, C channels); boxes [K, 5] or a list of N tensors
[L_i, 4]; output [K, C, PH, PW] (K RoIs, PH x PW bins). Same signature and results as
`torchvision.ops.roi_align`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._compiled import use_compiled
from ._rois import as_rois, check_scale, output_hw
from .reference import roi_align_reference


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pools each box of a feature map into a fixed PH x PW grid by bilinear sampling.

    Args:
        input: feature map [N, C, H, W] (any memory format; float64, float32, float16 or
            bfloat16; reduced precision is accumulated in float32).
        boxes: [K, 5] rows (batch_index, x1, y1, x2, y2), or a list of N tensors [L_i, 4]
            of (x1, y1, x2, y2), in the coordinates of the image the map was computed from.
            Same dtype and device as `input` (under autocast both run in float32).
        output_size: PH x PW, an int or (PH, PW).
        spatial_scale: maps box coordinates onto the map, e.g. 1/16 for a stride-16 map.
        sampling_ratio: sampling points per bin side; <= 0 takes ceil(bin size) per box.
        aligned: shift boxes by -0.5 so that pixel centres align (detectron2's choice);
            False keeps the original formulation (torchvision's detection models).

    Returns:
        [K, C, PH, PW]. Gradients flow to `input` (twice differentiable), not to `boxes`.

    Raises:
        ValueError: a shape, output size, spatial scale or device is wrong.
        TypeError: dtypes are not floating point or differ between input and boxes.
        IndexError: (CPU) a batch index is not an integer in [0, N).

    A box with a non-finite coordinate gives all zeros and no gradient. On CUDA a batch
    index outside [0, N) also gives zeros: checking it would synchronise the device.
    """
    op = "roi_align"
    rois = as_rois(op, input, boxes)
    pooled_h, pooled_w = output_hw(op, output_size)
    scale = check_scale(op, spatial_scale)
    if use_compiled(input.device):
        return torch.ops.detframe.roi_align(
            input, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned
        )
    if torch.is_autocast_enabled(input.device.type):
        return roi_align_reference(
            input.float(), rois.float(), scale, pooled_h, pooled_w, sampling_ratio, aligned
        ).to(input.dtype)
    return roi_align_reference(input, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """`roi_align` as a module; see `roi_align` for shapes and arguments."""

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_hw("RoIAlign", output_size)
        self.spatial_scale = check_scale("RoIAlign", spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        """input [N, C, H, W], rois [K, 5] or list of [L_i, 4] -> [K, C, PH, PW]."""
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
