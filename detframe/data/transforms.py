"""Geometric data augmentation: random choices made once, applied alike to every target.

Shapes and types: an H x W image, N instances.

    image      np.ndarray [H, W, C] uint8 (any channel order; C may be 1), or float32 /
               float64 in 0..255 after a `TorchvisionResizeTransform`
    boxes      np.ndarray [N, 4] float XYXY, absolute pixels
    polygons   list [N] of lists of flat float arrays [x0, y0, x1, y1, ...]
    bitmasks   np.ndarray [N, H, W] bool or uint8

Coordinates are continuous: pixel (i, j) covers [j, j + 1) x [i, i + 1), so resizing a
W-wide image to W' pixels maps x to x * W' / W, and flipping it maps x to W - x.

An *augmentation* (`ResizeShortestEdge`, `TorchvisionResizeShortestEdge`, `RandomFlip`)
looks at an image, draws its random choices from a `numpy.random.Generator` and returns a
deterministic *transform* (`ResizeTransform`, `TorchvisionResizeTransform`, `FlipTransform`,
`NoOpTransform`); `apply_transforms` runs a list of augmentations over an image and returns
the image and a `TransformList`, which replays the same geometry on boxes, polygons and
bitmasks. The same generator state gives the same choices.

Two ways to resize (INPUT.RESIZE_METHOD in the mapper):

- "opencv" (detectron2's): the uint8 image with cv2.INTER_LINEAR to round(side * scale)
  pixels; the image stays uint8.
- "torchvision": as torchvision's `GeneralizedRCNNTransform` resizes inside its detectors
  (`_resize_image_and_masks`), so that its checkpoints see the same pixels: the float image
  with `F.interpolate(scale_factor=scale, mode="bilinear", align_corners=False,
  recompute_scale_factor=True)` to floor(side * scale) pixels, bitmasks with the same call in
  "nearest" mode. torchvision normalises before it resizes and detframe's model after; the two
  agree up to rounding, because bilinear interpolation (weights summing to 1) commutes with
  the per-channel affine normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Augmentation",
    "FlipTransform",
    "NoOpTransform",
    "RandomFlip",
    "ResizeShortestEdge",
    "ResizeTransform",
    "TorchvisionResizeShortestEdge",
    "TorchvisionResizeTransform",
    "Transform",
    "TransformList",
    "apply_transforms",
]


class Transform:
    """A deterministic geometric transform of one image and its targets.

    Subclasses override the `apply_*` methods that change their input; the defaults
    return the input unchanged. Each method returns a new array or list.
    """

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Reads an image [H, W, C] (or [H, W]); returns the transformed image."""
        return image

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Reads boxes [N, 4] XYXY; returns the transformed boxes [N, 4] float32."""
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def apply_polygons(self, polygons: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Reads polygons (list [N] of lists of flat arrays); returns transformed copies."""
        return [[self.apply_coords(np.asarray(p, np.float64)) for p in inst] for inst in polygons]

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Reads one flat array [x0, y0, x1, y1, ...]; returns the transformed copy."""
        return coords.copy()

    def apply_bitmasks(self, masks: np.ndarray) -> np.ndarray:
        """Reads bitmasks [N, H, W]; returns the transformed bitmasks [N, H', W']."""
        return masks


class NoOpTransform(Transform):
    """Changes nothing."""

    def __repr__(self) -> str:
        return "NoOpTransform()"


class ResizeTransform(Transform):
    """Resizes an `height` x `width` image to `new_height` x `new_width`.

    The image is resized with cv2.INTER_LINEAR; bitmasks with cv2.INTER_NEAREST_EXACT,
    OpenCV's pixel-centre-aligned nearest neighbour, which keeps masks on the same grid as
    the image and the boxes (plain INTER_NEAREST shifts them by up to half a source pixel).
    Coordinates are scaled by new_width / width and new_height / height.
    """

    def __init__(self, height: int, width: int, new_height: int, new_width: int) -> None:
        self.height, self.width = height, width
        self.new_height, self.new_width = new_height, new_width

    def __repr__(self) -> str:
        return f"ResizeTransform({self.height}x{self.width} -> {self.new_height}x{self.new_width})"

    def _resize(self, array: np.ndarray, interpolation: int) -> np.ndarray:
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"{self!r} got an array of size {array.shape[0]}x{array.shape[1]}, expected "
                f"{self.height}x{self.width}"
            )
        out = cv2.resize(array, (self.new_width, self.new_height), interpolation=interpolation)
        return out[:, :, None] if array.ndim == 3 and out.ndim == 2 else out

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return self._resize(image, cv2.INTER_LINEAR)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        scale = np.array(
            [self.new_width / self.width, self.new_height / self.height] * 2, dtype=np.float32
        )
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        out = coords.astype(np.float64, copy=True)
        out[0::2] *= self.new_width / self.width
        out[1::2] *= self.new_height / self.height
        return out

    def apply_bitmasks(self, masks: np.ndarray) -> np.ndarray:
        resized = [
            self._resize(m.astype(np.uint8), cv2.INTER_NEAREST_EXACT).astype(masks.dtype)
            for m in masks
        ]
        if not resized:
            return np.zeros((0, self.new_height, self.new_width), dtype=masks.dtype)
        return np.stack(resized)


def _check_float_dtype(dtype: type[np.floating]) -> None:
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be np.float32 or np.float64, got {dtype}")


class TorchvisionResizeTransform(ResizeTransform):
    """Resizes by `scale` as torchvision's detectors do (see the module docstring).

    The output is floor(height * scale) x floor(width * scale) pixels, as `F.interpolate`
    computes it with recompute_scale_factor=True, which then samples the input at the
    ratio of the two sizes. The image comes out as float `dtype` in the input's units (0..255
    for a uint8 image), interpolated in that dtype; bitmasks keep their dtype; coordinates are
    scaled by new_width / width and new_height / height, as torchvision's `resize_boxes` does.

    Args:
        height, width: the input size.
        scale: torchvision's scale_factor, min(min_size / min(H, W), max_size / max(H, W)).
        dtype: np.float32 or np.float64, the output image's dtype.
    """

    def __init__(
        self, height: int, width: int, scale: float, dtype: type[np.floating] = np.float32
    ) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        _check_float_dtype(dtype)
        # F.interpolate's output size for recompute_scale_factor=True (int() truncates).
        super().__init__(height, width, int(height * scale), int(width * scale))
        self.scale, self.dtype = scale, dtype

    def __repr__(self) -> str:
        return (
            f"TorchvisionResizeTransform({self.height}x{self.width} -> "
            f"{self.new_height}x{self.new_width}, scale={self.scale})"
        )

    def _interpolate(self, planes: torch.Tensor, mode: str) -> torch.Tensor:
        """planes [P, H, W] float (P > 0) -> [P, H', W'] by torchvision's interpolate call, on
        a contiguous input as torchvision's (a channels-last one could take another kernel)."""
        if planes.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"{self!r} got an array of size {planes.shape[-2]}x{planes.shape[-1]}, "
                f"expected {self.height}x{self.width}"
            )
        options = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(
            planes.contiguous()[None],
            scale_factor=self.scale,
            mode=mode,
            recompute_scale_factor=True,
            **options,
        )[0]

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Reads an image [H, W, C] or [H, W]; returns it resized, [H', W', C] or [H', W'],
        as `dtype`."""
        planes = torch.from_numpy(np.asarray(image, dtype=self.dtype))
        planes = planes.permute(2, 0, 1) if image.ndim == 3 else planes[None]
        out = self._interpolate(planes, "bilinear")
        return (out.permute(1, 2, 0) if image.ndim == 3 else out[0]).numpy()

    def apply_bitmasks(self, masks: np.ndarray) -> np.ndarray:
        if len(masks) == 0:
            return np.zeros((0, self.new_height, self.new_width), dtype=masks.dtype)
        planes = torch.from_numpy(np.asarray(masks, dtype=np.float32))
        return self._interpolate(planes, "nearest").numpy().astype(masks.dtype)


class FlipTransform(Transform):
    """Mirrors an image of `height` x `width`: left-right if `horizontal`, else top-bottom.

    A horizontal flip maps x to width - x (a box (x1, y1, x2, y2) to (W - x2, y1, W - x1,
    y2)); a vertical flip maps y to height - y.
    """

    def __init__(self, height: int, width: int, horizontal: bool = True) -> None:
        self.height, self.width, self.horizontal = height, width, horizontal

    def __repr__(self) -> str:
        kind = "horizontal" if self.horizontal else "vertical"
        return f"FlipTransform({kind}, {self.height}x{self.width})"

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image[:, ::-1] if self.horizontal else image[::-1])

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        if self.horizontal:
            out[:, [0, 2]] = self.width - out[:, [2, 0]]
        else:
            out[:, [1, 3]] = self.height - out[:, [3, 1]]
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        out = coords.astype(np.float64, copy=True)
        if self.horizontal:
            out[0::2] = self.width - out[0::2]
        else:
            out[1::2] = self.height - out[1::2]
        return out

    def apply_bitmasks(self, masks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(masks[:, :, ::-1] if self.horizontal else masks[:, ::-1])


class TransformList(Transform):
    """Transforms applied in order; every `apply_*` method chains its members'."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __repr__(self) -> str:
        return f"TransformList({self.transforms})"

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        for t in self.transforms:
            image = t.apply_image(image)
        return image

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        for t in self.transforms:
            out = t.apply_boxes(out)
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        out = np.asarray(coords, dtype=np.float64)
        for t in self.transforms:
            out = t.apply_coords(out)
        return out

    def apply_bitmasks(self, masks: np.ndarray) -> np.ndarray:
        for t in self.transforms:
            masks = t.apply_bitmasks(masks)
        return masks


class Augmentation:
    """Draws random choices for one image and returns the `Transform` that realises them."""

    def get_transform(self, image: np.ndarray, rng: np.random.Generator) -> Transform:
        """Reads the image [H, W, C] (its size); returns a deterministic Transform."""
        raise NotImplementedError


class ResizeShortestEdge(Augmentation):
    """Resizes so the shorter side is a chosen length and the longer side at most `max_size`.

    Args:
        short_edge_lengths: with sample_style "choice", the lengths to pick from (one value
            gives a deterministic resize, as at test time); with "range", (low, high) for a
            length drawn uniformly from the integers low..high.
        max_size: the longer side after resizing is at most this; the scale is reduced to
            honour it.
        sample_style: "choice" or "range".

    The output size is (round(H * s), round(W * s)) with s = length / min(H, W), capped so
    that max(H, W) * s <= max_size (a `ResizeTransform`, OpenCV).
    """

    def __init__(
        self,
        short_edge_lengths: Sequence[int],
        max_size: int,
        sample_style: Literal["choice", "range"] = "choice",
    ) -> None:
        lengths = tuple(int(v) for v in short_edge_lengths)
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if not lengths or min(lengths) < 1:
            raise ValueError(f"short_edge_lengths must be positive ints, got {lengths}")
        if sample_style == "range" and (len(lengths) != 2 or lengths[0] > lengths[1]):
            raise ValueError(
                f"sample_style 'range' needs (low, high) with low <= high, got {lengths}"
            )
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.short_edge_lengths, self.max_size, self.sample_style = lengths, max_size, sample_style

    def __repr__(self) -> str:
        return (
            f"ResizeShortestEdge({self.short_edge_lengths}, max_size={self.max_size}, "
            f"sample_style={self.sample_style!r})"
        )

    def get_transform(self, image: np.ndarray, rng: np.random.Generator) -> Transform:
        height, width = image.shape[:2]
        if self.sample_style == "choice":
            length = self.short_edge_lengths[int(rng.integers(len(self.short_edge_lengths)))]
        else:
            length = int(rng.integers(self.short_edge_lengths[0], self.short_edge_lengths[1] + 1))
        return self._transform(height, width, length)

    def _transform(self, height: int, width: int, length: int) -> Transform:
        """The resize of an image of height x width for a shorter side of `length`."""
        scale = length / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        new_height = max(1, int(height * scale + 0.5))
        new_width = max(1, int(width * scale + 0.5))
        return ResizeTransform(height, width, new_height, new_width)


class TorchvisionResizeShortestEdge(ResizeShortestEdge):
    """`ResizeShortestEdge` as torchvision's detectors resize (a `TorchvisionResizeTransform`).

    Args:
        short_edge_lengths, max_size, sample_style: as for ResizeShortestEdge (torchvision:
            "choice" among min_size at training, its last min_size at test time).
        dtype: np.float32 or np.float64, the resized image's dtype.

    The scale is torchvision's, min(length / min(H, W), max_size / max(H, W)), and the
    output size is (floor(H * scale), floor(W * scale)).
    """

    def __init__(
        self,
        short_edge_lengths: Sequence[int],
        max_size: int,
        sample_style: Literal["choice", "range"] = "choice",
        dtype: type[np.floating] = np.float32,
    ) -> None:
        super().__init__(short_edge_lengths, max_size, sample_style)
        _check_float_dtype(dtype)
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"TorchvisionResizeShortestEdge({self.short_edge_lengths}, max_size="
            f"{self.max_size}, sample_style={self.sample_style!r}, "
            f"dtype={np.dtype(self.dtype).name})"
        )

    def _transform(self, height: int, width: int, length: int) -> Transform:
        scale = min(length / min(height, width), self.max_size / max(height, width))
        return TorchvisionResizeTransform(height, width, scale, self.dtype)


class RandomFlip(Augmentation):
    """Flips with probability `prob`: left-right if `horizontal`, else top-bottom."""

    def __init__(self, prob: float = 0.5, horizontal: bool = True) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob, self.horizontal = prob, horizontal

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob}, horizontal={self.horizontal})"

    def get_transform(self, image: np.ndarray, rng: np.random.Generator) -> Transform:
        height, width = image.shape[:2]
        if rng.random() < self.prob:
            return FlipTransform(height, width, self.horizontal)
        return NoOpTransform()


def apply_transforms(
    augmentations: Sequence[Augmentation], image: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, TransformList]:
    """Runs `augmentations` in order over `image` [H, W, C], drawing from `rng`.

    Returns:
        The transformed image and the TransformList that replays the same geometry on
        boxes, polygons and bitmasks of the original image.
    """
    applied = []
    for augmentation in augmentations:
        transform = augmentation.get_transform(image, rng)
        image = transform.apply_image(image)
        applied.append(transform)
    return image, TransformList(applied)
