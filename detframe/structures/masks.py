"""Instance masks, as dense bitmaps or as polygons, and their mask-head training targets.

Shapes: N instances, an H x W image, M x M mask-head output.

    BitMasks.tensor        [N, H, W] bool
    PolygonMasks.polygons  list [N] of lists of flat float64 arrays [x0, y0, x1, y1, ...]
                           (one instance may have several parts; at least 3 points each)
    crop_and_resize        boxes [N, 4] XYXY -> targets [N, M, M] float32 of 0 / 1

Pixel (i, j) of a bitmap covers [j, j + 1) x [i, i + 1) in the continuous coordinates of
boxes and polygons, so a mask made of pixel j only has the box (j, ., j + 1, .).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from detframe.layers import roi_align

from ._indexing import Index, as_tensor_index, index_list
from .boxes import Boxes
from .coco_format import polygons_to_bitmask


def _check_boxes(name: str, boxes: Tensor, count: int) -> None:
    if boxes.dim() != 2 or boxes.size(1) != 4 or boxes.size(0) != count:
        raise ValueError(
            f"{name}.crop_and_resize expects boxes of shape [{count}, 4], got {tuple(boxes.shape)}"
        )


class BitMasks:
    """N instance masks of one H x W image as a bool Tensor[N, H, W]."""

    def __init__(self, tensor: Tensor) -> None:
        """
        Args:
            tensor: [N, H, W]; any dtype, nonzero means inside (stored as bool).

        Raises:
            ValueError: `tensor` is not 3-D.
        """
        if not isinstance(tensor, Tensor):
            raise TypeError(f"BitMasks expects a Tensor[N, H, W], got {type(tensor).__name__}")
        if tensor.dim() != 3:
            raise ValueError(f"BitMasks expects a tensor of shape [N, H, W], got {tensor.shape}")
        self.tensor = tensor.bool()

    @classmethod
    def from_polygon_masks(cls, polygon_masks: PolygonMasks, height: int, width: int) -> BitMasks:
        """Rasterises every instance of `polygon_masks` into a [N, height, width] bitmap."""
        masks = [polygons_to_bitmask(p, height, width) for p in polygon_masks.polygons]
        if not masks:
            return cls(torch.zeros((0, height, width), dtype=torch.bool))
        return cls(torch.from_numpy(np.stack(masks)))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.tensor.size(1), self.tensor.size(2))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def __len__(self) -> int:
        return self.tensor.size(0)

    def __getitem__(self, item: Index) -> BitMasks:
        """int -> 1 mask, slice / bool mask [N] / index tensor [K] -> the selected masks."""
        return BitMasks(self.tensor[as_tensor_index(item, len(self))])

    def __repr__(self) -> str:
        return f"BitMasks(num_instances={len(self)}, image_size={self.image_size})"

    def to(self, device: torch.device | str) -> BitMasks:
        return BitMasks(self.tensor.to(device))

    def area(self) -> Tensor:
        """[N] int64 numbers of pixels inside each mask."""
        return self.tensor.sum(dim=(1, 2))

    def nonempty(self) -> Tensor:
        """[N] bool: True where the mask has at least one pixel."""
        return self.tensor.flatten(1).any(dim=1)

    def get_bounding_boxes(self) -> Boxes:
        """Tight boxes [N, 4] around each mask; an empty mask gives (0, 0, 0, 0)."""
        height, width = self.image_size
        if len(self) == 0 or height == 0 or width == 0:
            return Boxes(torch.zeros((len(self), 4), device=self.device))
        x_any = self.tensor.any(dim=1)  # [N, W]
        y_any = self.tensor.any(dim=2)  # [N, H]
        xs = torch.arange(width, device=self.device)
        ys = torch.arange(height, device=self.device)
        corners = [
            torch.where(x_any, xs, width).amin(dim=1),
            torch.where(y_any, ys, height).amin(dim=1),
            torch.where(x_any, xs + 1, 0).amax(dim=1),
            torch.where(y_any, ys + 1, 0).amax(dim=1),
        ]
        boxes = torch.stack(corners, dim=1).float()
        boxes[~self.nonempty()] = 0
        return Boxes(boxes)

    @classmethod
    def cat(cls, masks_list: Sequence[BitMasks]) -> BitMasks:
        """Concatenates a non-empty list of BitMasks of one image size."""
        if len(masks_list) == 0:
            raise ValueError("BitMasks.cat needs at least one BitMasks")
        sizes = {m.image_size for m in masks_list}
        if len(sizes) > 1:
            raise ValueError(f"BitMasks.cat needs one image size, got {sorted(sizes)}")
        return cls(torch.cat([m.tensor for m in masks_list], dim=0))

    def crop_and_resize(self, boxes: Tensor, mask_size: int) -> Tensor:
        """Crops mask i to boxes[i] and resizes it to M x M: the mask head's targets.

        Bilinear RoIAlign (aligned=True, adaptive sampling) of the mask as a 0 / 1 map,
        thresholded at 0.5, as in detectron2.

        Args:
            boxes: [N, 4] XYXY, one per mask.
            mask_size: M.

        Returns:
            [N, M, M] float32 of 0 and 1, on the device of the masks.
        """
        _check_boxes("BitMasks", boxes, len(self))
        if len(self) == 0:
            return torch.zeros((0, mask_size, mask_size), device=self.device)
        boxes = boxes.to(device=self.device, dtype=torch.float32)
        index = torch.arange(len(self), device=self.device, dtype=torch.float32)
        rois = torch.cat([index[:, None], boxes], dim=1)
        maps = self.tensor.float()[:, None]  # [N, 1, H, W]
        crops = roi_align(maps, rois, mask_size, 1.0, sampling_ratio=0, aligned=True)
        return (crops.squeeze(1) >= 0.5).float()


class PolygonMasks:
    """N instance masks, each a list of polygons (flat arrays [x0, y0, x1, y1, ...]).

    Polygons are kept on the CPU as float64 numpy arrays; `to` is a no-op that lets
    `Instances.to` move everything else.
    """

    def __init__(self, polygons: Sequence[Sequence[np.ndarray | Sequence[float]]]) -> None:
        """
        Args:
            polygons: for each of the N instances, a list of its polygons, each a flat
                sequence of 2 * P coordinates with P >= 3 points.

        Raises:
            ValueError: a polygon is not flat, has an odd number of coordinates or fewer
                than 3 points; the message names the instance and polygon indices.
        """
        if not isinstance(polygons, (list, tuple)):
            raise TypeError(
                f"PolygonMasks expects a list of lists of polygons, got {type(polygons).__name__}"
            )
        self.polygons: list[list[np.ndarray]] = []
        for i, instance in enumerate(polygons):
            if not isinstance(instance, (list, tuple)):
                raise ValueError(
                    f"PolygonMasks: instance {i} must be a list of polygons, "
                    f"got {type(instance).__name__}"
                )
            parts = []
            for j, polygon in enumerate(instance):
                array = np.asarray(polygon, dtype=np.float64)
                if array.ndim != 1 or array.size % 2 != 0 or array.size < 6:
                    raise ValueError(
                        f"PolygonMasks: polygon {j} of instance {i} must be a flat array of "
                        f"at least 3 (x, y) points, got shape {array.shape}"
                    )
                parts.append(array)
            self.polygons.append(parts)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> PolygonMasks:
        return self

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, item: Index) -> PolygonMasks:
        """int -> 1 instance, slice / bool mask [N] / index tensor [K] -> the selection."""
        return PolygonMasks(index_list(self.polygons, item))

    def __repr__(self) -> str:
        return f"PolygonMasks(num_instances={len(self)})"

    def area(self) -> Tensor:
        """[N] float32 geometric areas (shoelace), summed over the parts of each instance.

        Overlapping parts are counted twice. The rasterised pixel count, as COCO's
        `area` field, is `BitMasks.from_polygon_masks(...).area()`.
        """
        areas = []
        for parts in self.polygons:
            total = 0.0
            for p in parts:
                x, y = p[0::2], p[1::2]
                total += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            areas.append(total)
        return torch.tensor(areas, dtype=torch.float32)

    def nonempty(self) -> Tensor:
        """[N] bool: True where the instance has at least one polygon."""
        return torch.tensor([len(p) > 0 for p in self.polygons], dtype=torch.bool)

    def get_bounding_boxes(self) -> Boxes:
        """[N, 4] boxes spanning all points of each instance; no polygon gives zeros."""
        boxes = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, parts in enumerate(self.polygons):
            if parts:
                points = np.concatenate(parts).reshape(-1, 2)
                boxes[i] = torch.from_numpy(np.concatenate([points.min(0), points.max(0)]))
        return Boxes(boxes)

    @classmethod
    def cat(cls, masks_list: Sequence[PolygonMasks]) -> PolygonMasks:
        """Concatenates a non-empty list of PolygonMasks."""
        if len(masks_list) == 0:
            raise ValueError("PolygonMasks.cat needs at least one PolygonMasks")
        return cls([p for m in masks_list for p in m.polygons])

    def crop_and_resize(self, boxes: Tensor, mask_size: int) -> Tensor:
        """Rasterises instance i inside boxes[i] at M x M: the mask head's targets.

        Each polygon is shifted by the box's top-left corner and scaled by M / box size
        (a side shorter than 0.1 pixel counts as 0.1), then rasterised at M x M only.

        Args:
            boxes: [N, 4] XYXY, one per instance.
            mask_size: M.

        Returns:
            [N, M, M] float32 of 0 and 1, on the device of `boxes`.
        """
        _check_boxes("PolygonMasks", boxes, len(self))
        boxes_np = boxes.detach().cpu().double().numpy()
        targets = torch.zeros((len(self), mask_size, mask_size), dtype=torch.float32)
        for i, (parts, box) in enumerate(zip(self.polygons, boxes_np, strict=True)):
            ratio = mask_size / np.maximum(box[2:] - box[:2], 0.1)  # (x, y)
            local = [((p.reshape(-1, 2) - box[:2]) * ratio).reshape(-1) for p in parts]
            targets[i] = torch.from_numpy(polygons_to_bitmask(local, mask_size, mask_size))
        return targets.to(boxes.device)
