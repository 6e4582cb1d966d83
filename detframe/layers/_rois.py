"""Argument handling shared by the RoI operators' Python face.

Boxes come either as one `Tensor[K, 5]` of rows (batch_index, x1, y1, x2, y2) or as a
list of per-image `Tensor[L_i, 4]` of (x1, y1, x2, y2), as in torchvision.ops. Problems
raise ValueError (shapes, sizes, devices) or TypeError (dtypes) naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def as_rois(op: str, input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
    """Checks `input` [N, C, H, W] and `boxes`, and returns rois [K, 5]."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{op}: input must be a 4-D tensor [N, C, H, W], got {shape}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(
                f"{op}: boxes given as one tensor must have shape [K, 5] "
                f"(batch_index, x1, y1, x2, y2), got {tuple(boxes.shape)}"
            )
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(
                    f"{op}: boxes[{i}] must be a tensor of shape [L, 4] (x1, y1, x2, y2), "
                    f"got {shape}"
                )
        rois = _list_to_rois(op, boxes, input)
    else:
        raise TypeError(
            f"{op}: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], "
            f"got {type(boxes).__name__}"
        )
    if rois.device != input.device:
        raise ValueError(
            f"{op}: boxes and input must be on the same device, got {rois.device} "
            f"and {input.device}"
        )
    if rois.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(
            f"{op}: boxes and input must have the same dtype, got {rois.dtype} and {input.dtype}"
        )
    return rois


def _list_to_rois(op: str, boxes: Sequence[Tensor], input: Tensor) -> Tensor:
    if len(boxes) > input.size(0):
        raise ValueError(f"{op}: got boxes for {len(boxes)} images but input has {input.size(0)}")
    if len(boxes) == 0:
        return input.new_zeros((0, 5))
    coords = torch.cat(list(boxes))
    counts = torch.tensor([len(b) for b in boxes], device=coords.device)
    images = torch.arange(len(boxes), device=coords.device, dtype=coords.dtype)
    return torch.cat([images.repeat_interleave(counts)[:, None], coords], dim=1)


def output_hw(op: str, output_size: int | Sequence[int]) -> tuple[int, int]:
    """`output_size` as (height, width): an int or a pair of positive ints."""
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (list, tuple)):
        size = tuple(output_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            f"{op}: output_size must be a positive int or (height, width), got {output_size!r}"
        )
    return size


def check_scale(op: str, spatial_scale: float) -> float:
    """`spatial_scale` must be a finite positive number."""
    valid = isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale)
    if not (valid and spatial_scale > 0):
        raise ValueError(
            f"{op}: spatial_scale must be a finite positive number, got {spatial_scale!r}"
        )
    return float(spatial_scale)
