"""Axis-aligned boxes and their pairwise overlaps.

Shapes: N, M boxes.

    Boxes.tensor  [N, 4]  rows (x1, y1, x2, y2) in absolute pixel coordinates (XYXY), float

A box covers [x1, x2) x [y1, y2): its width is x2 - x1 and a box with x2 <= x1 or
y2 <= y1 is degenerate (empty, area 0). Image sizes are (height, width), as in
`Instances.image_size`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._indexing import Index, as_tensor_index


class Boxes:
    """N boxes as one Tensor[N, 4] of (x1, y1, x2, y2); indexing gives Boxes again."""

    def __init__(self, tensor: Tensor) -> None:
        """
        Args:
            tensor: [N, 4] XYXY boxes. An empty tensor of any shape means zero boxes
                (becomes [0, 4]); integer dtypes are converted to float32.

        Raises:
            ValueError: `tensor` is not empty and its shape is not [N, 4].
        """
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Boxes expects a Tensor[N, 4], got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            tensor = tensor.float()
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.dim() != 2 or tensor.size(1) != 4:
            raise ValueError(f"Boxes expects a tensor of shape [N, 4], got {tuple(tensor.shape)}")
        self.tensor = tensor

    def __len__(self) -> int:
        return self.tensor.size(0)

    def __getitem__(self, item: Index) -> Boxes:
        """int -> 1 box, slice / bool mask [N] / index tensor [K] -> the selected boxes."""
        return Boxes(self.tensor[as_tensor_index(item, len(self))])

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, device: torch.device | str) -> Boxes:
        return Boxes(self.tensor.to(device))

    def clone(self) -> Boxes:
        return Boxes(self.tensor.clone())

    def area(self) -> Tensor:
        """[N] areas; degenerate boxes have area 0."""
        wh = (self.tensor[:, 2:] - self.tensor[:, :2]).clamp(min=0)
        return wh[:, 0] * wh[:, 1]

    def clip(self, image_size: tuple[int, int]) -> None:
        """Clips the boxes, in place, to an image of size (height, width)."""
        h, w = image_size
        self.tensor[:, 0::2] = self.tensor[:, 0::2].clamp(min=0, max=w)
        self.tensor[:, 1::2] = self.tensor[:, 1::2].clamp(min=0, max=h)

    def nonempty(self, threshold: float = 0.0) -> Tensor:
        """[N] bool: True where both width and height are greater than `threshold`."""
        wh = self.tensor[:, 2:] - self.tensor[:, :2]
        return (wh > threshold).all(dim=1)

    def scale(self, scale_x: float, scale_y: float) -> None:
        """Scales the coordinates in place: x by `scale_x`, y by `scale_y`."""
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y

    def get_centers(self) -> Tensor:
        """[N, 2] box centres (x, y)."""
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    @classmethod
    def cat(cls, boxes_list: Sequence[Boxes]) -> Boxes:
        """Concatenates a non-empty list of Boxes into one."""
        if len(boxes_list) == 0:
            raise ValueError("Boxes.cat needs at least one Boxes")
        if not all(isinstance(b, Boxes) for b in boxes_list):
            raise TypeError("Boxes.cat expects a list of Boxes")
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))


def pairwise_intersection(boxes1: Boxes, boxes2: Boxes) -> Tensor:
    """[N, M] intersection areas between every box of `boxes1` [N] and of `boxes2` [M]."""
    a, b = boxes1.tensor, boxes2.tensor
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes1: Boxes, boxes2: Boxes) -> Tensor:
    """[N, M] intersection over union between `boxes1` [N] and `boxes2` [M].

    Pairs that do not intersect have IoU 0, also when both boxes are degenerate
    (torchvision's `box_iou` gives NaN there).
    """
    inter = pairwise_intersection(boxes1, boxes2)
    union = boxes1.area()[:, None] + boxes2.area()[None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))
