"""Argument handling shared by the RoI operators' Python face.

Boxes come either as one `Tensor[K, 5]` of rows (batch_index, x1, y1, x2, y2) or as a
list of per-image `Tensor[L_i, 4]` of (x1, y1, x2, y2), as in torchvision.ops. Problems
raise ValueError (shapes, sizes, devices) or TypeError (dtypes) naming the argument; boxes
of the wrong shape raise `BoxesShapeError`, which is also an AssertionError, the error
torchvision.ops raises for them.

Everything here compiles with `torch.jit.script`; the checks that only make sense in
Python (arguments that are not tensors at all, autocast) run in eager mode only.
"""

import math

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair


class BoxesShapeError(ValueError, AssertionError):
    """Boxes of the wrong shape.

    A ValueError like detframe's other argument errors, and an AssertionError, which is what
    torchvision.ops raises here (`torch._assert`), so that code written for either catches it.
    """


def as_rois(op: str, input: Tensor, boxes: Tensor | list[Tensor]) -> Tensor:
    """Checks `input` [N, C, H, W] and `boxes`, and returns rois [K, 5]."""
    if not torch.jit.is_scripting():
        _check_python_types(op, input, boxes)
    if input.dim() != 4:
        raise ValueError(
            f"{op}: input must be a 4-D tensor [N, C, H, W], got shape {list(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise BoxesShapeError(
                f"{op}: boxes given as one tensor must have shape [K, 5] "
                f"(batch_index, x1, y1, x2, y2), got {list(boxes.shape)}"
            )
        rois = boxes
    else:
        rois = _list_to_rois(op, boxes, input)
    if rois.device != input.device:
        raise ValueError(
            f"{op}: boxes and input must be on the same device, got {rois.device} "
            f"and {input.device}"
        )
    # Under autocast the compiled ops cast both to float32; scripted code leaves the dtype
    # check to the compiled ops, which know whether autocast is on. (The ifs stay nested:
    # TorchScript skips the body of `if not torch.jit.is_scripting()`, not its condition.)
    if not torch.jit.is_scripting():  # noqa: SIM102
        if rois.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(
                f"{op}: boxes and input must have the same dtype, got {rois.dtype} "
                f"and {input.dtype}"
            )
    return rois


def _check_python_types(op: str, input: Tensor, boxes: Tensor | list[Tensor]) -> None:
    """Eager mode only: `input` is a tensor, `boxes` a tensor or a list or tuple of them."""
    if not isinstance(input, Tensor):
        raise ValueError(
            f"{op}: input must be a 4-D tensor [N, C, H, W], got {type(input).__name__}"
        )
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor):
                raise BoxesShapeError(
                    f"{op}: boxes[{i}] must be a tensor of shape [L, 4] (x1, y1, x2, y2), "
                    f"got {type(b).__name__}"
                )
    elif not isinstance(boxes, Tensor):
        raise TypeError(
            f"{op}: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], "
            f"got {type(boxes).__name__}"
        )


def _list_to_rois(op: str, boxes: list[Tensor], input: Tensor) -> Tensor:
    """Per-image boxes [L_i, 4] -> rois [sum L_i, 5], image i's boxes with batch index i."""
    if len(boxes) > input.size(0):
        raise ValueError(f"{op}: got boxes for {len(boxes)} images but input has {input.size(0)}")
    if len(boxes) == 0:
        return input.new_zeros((0, 5))
    images: list[Tensor] = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != 4:
            raise BoxesShapeError(
                f"{op}: boxes[{i}] must be a tensor of shape [L, 4] (x1, y1, x2, y2), "
                f"got {list(b.shape)}"
            )
        images.append(torch.full_like(b[:, :1], i))
    return torch.cat([torch.cat(images), torch.cat(boxes)], dim=1)


def output_hw(op: str, output_size: BroadcastingList2[int]) -> tuple[int, int]:
    """`output_size` as (height, width): an int or a pair of positive ints."""
    size = _pair(output_size)
    if len(size) != 2 or not (_positive_int(size[0]) and _positive_int(size[1])):
        raise ValueError(
            f"{op}: output_size must be a positive int or (height, width), got {output_size}"
        )
    return size[0], size[1]


def _positive_int(value: int) -> bool:
    return isinstance(value, int) and value > 0


def check_scale(op: str, spatial_scale: float) -> float:
    """`spatial_scale` must be a finite positive number."""
    valid = isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale)
    if not (valid and spatial_scale > 0):
        raise ValueError(
            f"{op}: spatial_scale must be a finite positive number, got {spatial_scale}"
        )
    return float(spatial_scale)
