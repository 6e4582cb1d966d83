"""Anchors: reference boxes tiled over every cell of every feature level (Faster R-CNN, FPN).

Shapes:

    L        feature levels
    A        anchors per cell (one per aspect ratio; one size per level)
    H_l W_l  height and width of level l's feature map

    features        list of L tensors [N, C, H_l, W_l]
    anchors         list of L tensors [H_l * W_l * A, 4], XYXY in input-image pixels
    cell_anchors    [L, A, 4] the base anchors of each level, centred on (0, 0)

Order: location-major (row by row, cell by cell), then anchor, the order of torchvision's
`AnchorGenerator` and detectron2's `DefaultAnchorGenerator`, so that anchors line up with the
RPN head's outputs flattened as [N, H, W, A].

A base anchor of size s and aspect ratio r (height / width) has w = s / sqrt(r),
h = s * sqrt(r), centred on (0, 0). With `round_base` (torchvision), the base anchors are
computed as torchvision does (in float32) and rounded to integers. The anchors of cell
(y, x) of a level with stride t are the base anchors shifted by ((x + offset) * t,
(y + offset) * t).

Strides: detectron2 uses the declared stride of each level. torchvision derives them from
the padded batch as image_size // feature_size per axis, which differs at a level whose size
was rounded up (P6 = max_pool(P5, 1, 2) of an odd P5: an 800-pixel side gives a 13-cell P6
and stride 61, not 64); `strides_from_image_size` reproduces that, given `image_size`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import ANCHOR_GENERATOR_REGISTRY

__all__ = ["DefaultAnchorGenerator"]

declare(
    "MODEL.ANCHOR_GENERATOR.NAME",
    str,
    "DefaultAnchorGenerator",
    "name in ANCHOR_GENERATOR_REGISTRY",
)
declare(
    "MODEL.ANCHOR_GENERATOR.SIZES",
    list[float],
    [32.0, 64.0, 128.0, 256.0, 512.0],
    "anchor size (sqrt of area, input pixels), one per feature level",
)
declare(
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    list[float],
    [0.5, 1.0, 2.0],
    "anchor aspect ratios (height / width), the same at every level",
)
declare(
    "MODEL.ANCHOR_GENERATOR.OFFSET",
    float,
    0.0,
    "anchor centres at (cell index + OFFSET) * stride; 0.0 torchvision, 0.5 pixel centres",
)
declare(
    "MODEL.ANCHOR_GENERATOR.ROUND",
    bool,
    False,
    "round base anchors to integers as torchvision does",
)
declare(
    "MODEL.ANCHOR_GENERATOR.STRIDES_FROM_IMAGE_SIZE",
    bool,
    False,
    "torchvision: stride per axis = padded image size // feature size, not the level's stride",
)

# Grid anchors kept per (level, H, W, device, dtype, inference mode); cleared past this.
_MAX_CACHED_GRIDS = 256


@ANCHOR_GENERATOR_REGISTRY.register()
class DefaultAnchorGenerator(nn.Module):
    """Tiles A anchors (one size per level, several aspect ratios) over each level's grid."""

    cell_anchors: Tensor

    def __init__(
        self,
        sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        strides: Sequence[int],
        offset: float = 0.0,
        round_base: bool = False,
        strides_from_image_size: bool = False,
    ) -> None:
        """
        Args:
            sizes: L anchor sizes (sqrt of the area, in input pixels), one per level.
            aspect_ratios: A aspect ratios (height / width), used at every level.
            strides: L strides (input pixels per feature cell), one per level.
            offset: anchor centres at (cell index + offset) * stride, in [0, 1).
            round_base: compute and round the base anchors as torchvision does.
            strides_from_image_size: derive each level's strides from the `image_size`
                given to `forward` as torchvision does (see the module docstring).

        Raises:
            ValueError: sizes, ratios or strides are not positive, `sizes` and `strides`
                differ in length, or `offset` is not in [0, 1).
        """
        super().__init__()
        sizes = [float(s) for s in sizes]
        aspect_ratios = [float(r) for r in aspect_ratios]
        strides = [int(s) for s in strides]
        if not sizes or not all(s > 0 for s in sizes):
            raise ValueError(f"DefaultAnchorGenerator: sizes must be positive, got {sizes}")
        if not aspect_ratios or not all(r > 0 for r in aspect_ratios):
            raise ValueError(
                f"DefaultAnchorGenerator: aspect_ratios must be positive, got {aspect_ratios}"
            )
        if len(strides) != len(sizes) or not all(s > 0 for s in strides):
            raise ValueError(
                f"DefaultAnchorGenerator: need one positive stride per size ({len(sizes)}), "
                f"got strides {strides}"
            )
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"DefaultAnchorGenerator: offset must be in [0, 1), got {offset}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.strides = strides
        self.offset = float(offset)
        self.round_base = round_base
        self.strides_from_image_size = strides_from_image_size
        cell_anchors = torch.stack([self._base_anchors(s) for s in sizes])
        self.register_buffer("cell_anchors", cell_anchors, persistent=False)
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> dict[str, Any]:
        """Keyword arguments from MODEL.ANCHOR_GENERATOR.* and the levels' strides."""
        return {
            "sizes": list(cfg.MODEL.ANCHOR_GENERATOR.SIZES),
            "aspect_ratios": list(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS),
            "strides": [shape.stride for shape in input_shape],
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
            "round_base": cfg.MODEL.ANCHOR_GENERATOR.ROUND,
            "strides_from_image_size": cfg.MODEL.ANCHOR_GENERATOR.STRIDES_FROM_IMAGE_SIZE,
        }

    @property
    def num_anchors(self) -> int:
        """A, the number of anchors per cell (the same at every level)."""
        return len(self.aspect_ratios)

    @property
    def box_dim(self) -> int:
        """4: anchors are XYXY boxes."""
        return 4

    def _base_anchors(self, size: float) -> Tensor:
        """[A, 4] anchors of one size centred on (0, 0), float32."""
        if self.round_base:
            # torchvision's AnchorGenerator.generate_anchors, operation by operation.
            scales = torch.tensor([size], dtype=torch.float32)
            ratios = torch.tensor(self.aspect_ratios, dtype=torch.float32)
            h_ratios = torch.sqrt(ratios)
            w_ratios = 1 / h_ratios
            ws = (w_ratios[:, None] * scales[None, :]).view(-1)
            hs = (h_ratios[:, None] * scales[None, :]).view(-1)
            return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
        anchors = []
        for ratio in self.aspect_ratios:
            w = size / math.sqrt(ratio)
            h = size * math.sqrt(ratio)
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(anchors, dtype=torch.float64).float()

    def _grid_anchors(
        self,
        level: int,
        height: int,
        width: int,
        strides: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """[height * width * A, 4] anchors of one level with (stride_y, stride_x) `strides`.

        Cached per grid, strides, device and dtype.

        Anchors made under `torch.inference_mode` are cached apart: inference tensors
        cannot be saved for backward in training.
        """
        key = (level, height, width, strides, device, dtype, torch.is_inference_mode_enabled())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        stride_y, stride_x = strides
        arange = {"dtype": dtype, "device": device}
        shifts_x = torch.arange(width, **arange) * stride_x + self.offset * stride_x
        shifts_y = torch.arange(height, **arange) * stride_y + self.offset * stride_y
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x = shift_x.reshape(-1)
        shift_y = shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        base = self.cell_anchors[level].to(device=device, dtype=dtype)
        anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
        if len(self._cache) >= _MAX_CACHED_GRIDS:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(
        self, features: Sequence[Tensor], image_size: tuple[int, int] | None = None
    ) -> list[Tensor]:
        """Anchors for each level's feature map.

        Args:
            features: L feature maps [N, C, H_l, W_l], in the order of `strides`; only their
                sizes, device and dtype are used.
            image_size: (height, width) of the padded batch the features were computed
                from (`ImageList.tensor.shape[-2:]`); required with
                `strides_from_image_size`, otherwise unused.

        Returns:
            L tensors [H_l * W_l * A, 4] of XYXY anchors (shared by all N images), on the
            features' device, in their dtype (float32 for non-floating features). The
            tensors are cached: do not modify them in place.

        Raises:
            ValueError: the number of feature maps is not L, one is not 4-D, or
                `image_size` is missing with `strides_from_image_size`.
        """
        if len(features) != len(self.strides):
            raise ValueError(
                f"DefaultAnchorGenerator: expected {len(self.strides)} feature maps (one per "
                f"stride {self.strides}), got {len(features)}"
            )
        if self.strides_from_image_size and image_size is None:
            raise ValueError(
                "DefaultAnchorGenerator: strides_from_image_size needs the padded batch's "
                "image_size (height, width) in forward, got None"
            )
        anchors = []
        for level, feature in enumerate(features):
            if feature.dim() != 4:
                raise ValueError(
                    f"DefaultAnchorGenerator: features[{level}] must be [N, C, H, W], got "
                    f"{tuple(feature.shape)}"
                )
            dtype = feature.dtype if feature.is_floating_point() else torch.float32
            height, width = (int(n) for n in feature.shape[-2:])
            if self.strides_from_image_size:
                strides = (
                    int(image_size[0]) // max(height, 1),
                    int(image_size[1]) // max(width, 1),
                )
            else:
                strides = (self.strides[level], self.strides[level])
            anchors.append(self._grid_anchors(level, height, width, strides, feature.device, dtype))
        return anchors

    def extra_repr(self) -> str:
        return (
            f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
            f"offset={self.offset}, round_base={self.round_base}, "
            f"strides_from_image_size={self.strides_from_image_size}"
        )
