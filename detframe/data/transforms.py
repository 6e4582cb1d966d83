"""Geometric data augmentation: random choices made once, applied alike to every target.

Shapes and types: an H x W image, N instances.

    image      np.ndarray [H, W, C] uint8 (any channel order; C may be 1)
    boxes      np.ndarray [N, 4] float XYXY, absolute pixels
    polygons   list [N] of lists of flat float arrays [x0, y0, x1, y1, ...]
    bitmasks   np.ndarray [N, H, W] bool or uint8

Coordinates are continuous: pixel (i, j) covers [j, j + 1) x [i, i + 1), so resizing a
W-wide image to W' pixels maps x to x * W' / W, and flipping it maps x to W - x.

An *augmentation* (`ResizeShortestEdge`, `RandomFlip`) looks at an image, draws its random
choices from a `numpy.random.Generator` and returns a deterministic *transform*
(`ResizeTransform`, `FlipTransform`, `NoOpTransform`); `apply_transforms` runs a list of
augmentations over an image and returns the image and a `TransformList`, which replays the
same geometry on boxes, polygons and bitmasks. The same generator state gives the same
choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "Augmentation",
    "FlipTransform",
    "NoOpTransform",
    "RandomFlip",
    "ResizeShortestEdge",
    "ResizeTransform",
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
        """Reads an image [H, W, C] (or [H, W]) uint8; returns the transformed image."""
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
    that max(H, W) * s <= max_size.
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
        scale = length / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        new_height = max(1, int(height * scale + 0.5))
        new_width = max(1, int(width * scale + 0.5))
        return ResizeTransform(height, width, new_height, new_width)


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
    """Runs `augmentations` in order over `image` [H, W, C] uint8, drawing from `rng`.

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
