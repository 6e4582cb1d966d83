"""RoIPool (Girshick, Fast R-CNN, 2015): the Python face of `torch.ops.detframe.roi_pool`.

Shapes: input [N, C, H, W] (N images, C channels); boxes [K, 5] or a list of N tensors
[L_i, 4]; output [K, C, PH, PW] (K RoIs, PH x PW bins). Same signature and results as
`torchvision.ops.roi_pool`, and usable the same ways: `torch.jit.script` compiles
`roi_pool` and `RoIPool`, and `torch.fx.symbolic_trace` keeps `roi_pool` as one leaf call
(`torch.fx.wrap`).
"""

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from ._compiled import use_compiled
from ._rois import as_rois, check_scale, output_hw
from .reference import roi_pool_reference


@torch.fx.wrap
def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Max-pools each box of a feature map into a fixed PH x PW grid of cell windows.

    Each box is rounded to whole cells of the map and split into PH x PW windows; each
    output is the maximum of its window (0 for a window that lies outside the map).

    Args:
        input: feature map [N, C, H, W] (any memory format; float64, float32, float16 or
            bfloat16).
        boxes: [K, 5] rows (batch_index, x1, y1, x2, y2), or a list of N tensors [L_i, 4]
            of (x1, y1, x2, y2), in the coordinates of the image the map was computed from.
            Same dtype and device as `input` (under autocast both run in float32).
        output_size: PH x PW, an int or (PH, PW).
        spatial_scale: maps box coordinates onto the map, e.g. 1/16 for a stride-16 map.

    Returns:
        [K, C, PH, PW]. Gradients flow to `input` through the maximal cell of each window
        (the first in row-major order on ties); not to `boxes`.

    Raises:
        ValueError: a shape, output size, spatial scale or device is wrong (boxes of the
            wrong shape: `BoxesShapeError`, also an AssertionError as in torchvision).
        TypeError: dtypes are not floating point or differ between input and boxes.
        IndexError: (CPU) a batch index is not an integer in [0, N).

    A box with a non-finite coordinate gives all zeros and no gradient. On CUDA a batch
    index outside [0, N) also gives zeros: checking it would synchronise the device.
    """
    op = "roi_pool"
    rois = as_rois(op, input, boxes)
    pooled_h, pooled_w = output_hw(op, output_size)
    scale = check_scale(op, spatial_scale)
    # Scripted code needs the compiled ops. (The ifs stay nested: TorchScript skips the
    # body of `if not torch.jit.is_scripting()`, not its condition.)
    if not torch.jit.is_scripting():  # noqa: SIM102
        if not use_compiled(input.device):
            if torch.is_autocast_enabled(input.device.type):  # float32, as the compiled ops
                output, _ = roi_pool_reference(
                    input.float(), rois.float(), scale, pooled_h, pooled_w
                )
                return output.to(input.dtype)
            return roi_pool_reference(input, rois, scale, pooled_h, pooled_w)[0]
    return torch.ops.detframe.roi_pool(input, rois, scale, pooled_h, pooled_w)[0]


class RoIPool(nn.Module):
    """`roi_pool` as a module; see `roi_pool` for shapes and arguments."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_hw("RoIPool", output_size)
        self.spatial_scale = check_scale("RoIPool", spatial_scale)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        """input [N, C, H, W], rois [K, 5] or list of [L_i, 4] -> [K, C, PH, PW]."""
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
