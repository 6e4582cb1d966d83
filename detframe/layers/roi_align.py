"""RoIAlign (He et al., Mask R-CNN, 2017): the Python face of `torch.ops.detframe.roi_align`.

Shapes: input [N, C, H, W] (N images, C channels); boxes [K, 5] or a list of N tensors
[L_i, 4]; output [K, C, PH, PW] (K RoIs, PH x PW bins). Same signature and results as
`torchvision.ops.roi_align`, and usable the same ways: `torch.jit.script` compiles
`roi_align` and `RoIAlign`, and `torch.fx.symbolic_trace` keeps `roi_align` as one leaf
call (`torch.fx.wrap`).
"""

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from ._compiled import use_compiled
from ._rois import as_rois, check_scale, output_hw
from .reference import roi_align_reference


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pools each box of a feature map into a fixed PH x PW grid by bilinear sampling.

    Args:
        input: feature map [N, C, H, W] (any memory format; float64, float32, float16 or
            bfloat16; reduced precision is accumulated in float32). A per-tensor quantized
            map (qint8, quint8, qint32; N = 1) gives a result quantized like it.
        boxes: [K, 5] rows (batch_index, x1, y1, x2, y2), or a list of N tensors [L_i, 4]
            of (x1, y1, x2, y2), in the coordinates of the image the map was computed from.
            Same dtype and device as `input` (under autocast both run in float32).
        output_size: PH x PW, an int or (PH, PW).
        spatial_scale: maps box coordinates onto the map, e.g. 1/16 for a stride-16 map.
        sampling_ratio: sampling points per bin side; <= 0 takes ceil(bin size) per box.
            Either way only the samples that can reach the map are visited, so time and
            memory are bounded whatever the size of a box.
        aligned: shift boxes by -0.5 so that pixel centres align (detectron2's choice);
            False keeps the original formulation (torchvision's detection models).

    Returns:
        [K, C, PH, PW]. Gradients flow to `input` (twice differentiable), not to `boxes`.

    Raises:
        ValueError: a shape, output size, spatial scale or device is wrong (boxes of the
            wrong shape: `BoxesShapeError`, also an AssertionError as in torchvision).
        TypeError: dtypes are not floating point or differ between input and boxes.
        IndexError: (CPU) a batch index is not an integer in [0, N).
        RuntimeError: a quantized input holds more than one image.

    A box with a non-finite coordinate gives all zeros and no gradient. On CUDA a batch
    index outside [0, N) also gives zeros: checking it would synchronise the device.
    """
    # Quantized input in eager mode only, as in torchvision.
    if not torch.jit.is_scripting() and isinstance(input, Tensor) and input.is_quantized:
        return _quantized_roi_align(
            input, boxes, output_size, spatial_scale, sampling_ratio, aligned
        )
    op = "roi_align"
    rois = as_rois(op, input, boxes)
    pooled_h, pooled_w = output_hw(op, output_size)
    scale = check_scale(op, spatial_scale)
    # Scripted code needs the compiled ops. (The ifs stay nested: TorchScript skips the
    # body of `if not torch.jit.is_scripting()`, not its condition.)
    if not torch.jit.is_scripting():  # noqa: SIM102
        if not use_compiled(input.device):
            return _roi_align_reference(
                input, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned
            )
    return torch.ops.detframe.roi_align(
        input, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned
    )


def _roi_align_reference(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_h: int,
    pooled_w: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The pure-PyTorch fallback, in float32 under autocast as the compiled ops."""
    if torch.is_autocast_enabled(input.device.type):
        return roi_align_reference(
            input.float(), rois.float(), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
        ).to(input.dtype)
    return roi_align_reference(
        input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
    )


def _quantized_roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of a per-tensor quantized map [1, C, H, W]: computed on the dequantized map
    and boxes (boxes may be quantized or float), then quantized with the input's scale, zero
    point and dtype. One image only, as in torchvision: a quantized batch index other than
    0 need not be representable (with scale 2, index 1 becomes 0 or 2)."""
    if input.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise TypeError(
            f"roi_align: a quantized input must be quantized per tensor, got {input.qscheme()}"
        )
    if input.dim() == 4 and input.size(0) != 1:
        raise RuntimeError(
            f"roi_align: Only one image per batch is allowed for a quantized input, got "
            f"{input.size(0)} (a quantized batch index is not exact)"
        )
    if isinstance(boxes, Tensor):
        boxes = boxes.dequantize() if boxes.is_quantized else boxes
    else:
        boxes = [b.dequantize() if b.is_quantized else b for b in boxes]
    output = roi_align(
        input.dequantize(), boxes, output_size, spatial_scale, sampling_ratio, aligned
    )
    return torch.quantize_per_tensor(output, input.q_scale(), input.q_zero_point(), input.dtype)


class RoIAlign(nn.Module):
    """`roi_align` as a module; see `roi_align` for shapes and arguments."""

    def __init__(
        self,
        output_size: BroadcastingList2[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_hw("RoIAlign", output_size)
        self.spatial_scale = check_scale("RoIAlign", spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        """input [N, C, H, W], rois [K, 5] or list of [L_i, 4] -> [K, C, PH, PW]."""
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
