"""Anchors: reference boxes tiled over every cell of every feature level (Faster R-CNN, FPN).

Shapes:

    L        feature levels
    S_l R_l  anchor sizes and aspect ratios of level l
    A        anchors per cell, S_l * R_l (the same at every level: the RPN head is shared)
    H_l W_l  height and width of level l's feature map

    features        list of L tensors [N, C, H_l, W_l]
    anchors         list of L tensors [H_l * W_l * A, 4], XYXY in input-image pixels
    cell_anchors    [L, A, 4] the base anchors of each level, centred on (0, 0)

Sizes and aspect ratios are given per level as lists of lists, detectron2's form: sizes
[[32], [64], [128], [256], [512]] is one size per level (FPN), [[32, 40, 50]] three sizes at
every level (a single list is used at every level), likewise aspect ratios.

Order: location-major (row by row, cell by cell), then anchor, so that anchors line up with
the RPN head's outputs flattened as [N, H, W, A]. Within a cell the order is `order`:
"size_major" (detectron2's `DefaultAnchorGenerator`: for each size, every ratio) or
"ratio_major" (torchvision's `AnchorGenerator`: for each ratio, every size); with one size
per level both are the same.

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

_ORDERS = ("size_major", "ratio_major")

declare(
    "MODEL.ANCHOR_GENERATOR.NAME",
    str,
    "DefaultAnchorGenerator",
    "name in ANCHOR_GENERATOR_REGISTRY",
)
declare(
    "MODEL.ANCHOR_GENERATOR.SIZES",
    list[list[float]],
    [[32.0], [64.0], [128.0], [256.0], [512.0]],
    "anchor sizes (sqrt of area, input pixels): a list per feature level, or one for all",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    list[list[float]],
    [[0.5, 1.0, 2.0]],
    "anchor aspect ratios (height / width): a list per feature level, or one for all",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.ANCHOR_GENERATOR.ORDER",
    str,
    "size_major",
    "order of a cell's anchors: size_major (detectron2) or ratio_major (torchvision)",
    choices=_ORDERS,
)
declare(
    "MODEL.ANCHOR_GENERATOR.OFFSET",
    float,
    0.0,
    "anchor centres at (cell index + OFFSET) * stride; 0.0 torchvision, 0.5 pixel centres",
    min=0,
    max=1,
    max_exclusive=True,
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


def _per_level(values: Sequence[Sequence[float]], num_levels: int, name: str) -> list[list[float]]:
    """`values` as L lists: one list is used at every level (detectron2's broadcast).

    Raises:
        ValueError: `values` is not a list of non-empty lists of positive numbers, or has
            neither 1 nor L lists.
    """
    if not values or any(isinstance(v, int | float) or len(v) == 0 for v in values):
        raise ValueError(
            f"DefaultAnchorGenerator: {name} must be a list of non-empty lists, one per level "
            f"or one for all (e.g. [[32], [64]] or [[32, 40, 50]]), got {values}"
        )
    lists = [[float(x) for x in v] for v in values]
    if not all(x > 0 for v in lists for x in v):
        raise ValueError(f"DefaultAnchorGenerator: {name} must be positive, got {lists}")
    if len(lists) == 1:
        return lists * num_levels
    if len(lists) != num_levels:
        raise ValueError(
            f"DefaultAnchorGenerator: {name} has {len(lists)} lists for {num_levels} levels "
            f"(strides); give one list per level or one for all, got {lists}"
        )
    return lists


@ANCHOR_GENERATOR_REGISTRY.register()
class DefaultAnchorGenerator(nn.Module):
    """Tiles A anchors (every size with every aspect ratio of a level) over each level's grid."""

    cell_anchors: Tensor

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
        round_base: bool = False,
        strides_from_image_size: bool = False,
        order: str = "size_major",
    ) -> None:
        """
        Args:
            sizes: L lists of anchor sizes (sqrt of the area, in input pixels), one per
                level, or one list for every level.
            aspect_ratios: L lists of aspect ratios (height / width), or one for every level.
            strides: L strides (input pixels per feature cell), one per level.
            offset: anchor centres at (cell index + offset) * stride, in [0, 1).
            round_base: compute and round the base anchors as torchvision does.
            strides_from_image_size: derive each level's strides from the `image_size`
                given to `forward` as torchvision does (see the module docstring).
            order: "size_major" or "ratio_major", the order of a cell's anchors.

        Raises:
            ValueError: sizes, ratios or strides are not positive, sizes or ratios are not
                lists of lists, have neither one nor L lists, or give levels different
                numbers of anchors; an unknown `order`, or `offset` not in [0, 1).
        """
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides or not all(s > 0 for s in strides):
            raise ValueError(
                f"DefaultAnchorGenerator: strides must be positive, one per level, got {strides}"
            )
        sizes = _per_level(sizes, len(strides), "sizes")
        aspect_ratios = _per_level(aspect_ratios, len(strides), "aspect_ratios")
        counts = [len(s) * len(r) for s, r in zip(sizes, aspect_ratios, strict=True)]
        if len(set(counts)) != 1:
            raise ValueError(
                f"DefaultAnchorGenerator: every level needs the same number of anchors per "
                f"cell (sizes x aspect ratios; the RPN head is shared across levels), got "
                f"{counts} from sizes {sizes} and aspect_ratios {aspect_ratios}"
            )
        if order not in _ORDERS:
            raise ValueError(
                f"DefaultAnchorGenerator: order must be one of {_ORDERS}, got {order!r}"
            )
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"DefaultAnchorGenerator: offset must be in [0, 1), got {offset}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.strides = strides
        self.offset = float(offset)
        self.round_base = round_base
        self.strides_from_image_size = strides_from_image_size
        self.order = order
        cell_anchors = torch.stack(
            [self._base_anchors(s, r) for s, r in zip(sizes, aspect_ratios, strict=True)]
        )
        self.register_buffer("cell_anchors", cell_anchors, persistent=False)
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> dict[str, Any]:
        """Keyword arguments from MODEL.ANCHOR_GENERATOR.* and the levels' strides."""
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        return {
            "sizes": [list(s) for s in anchors.SIZES],
            "aspect_ratios": [list(r) for r in anchors.ASPECT_RATIOS],
            "strides": [shape.stride for shape in input_shape],
            "offset": anchors.OFFSET,
            "round_base": anchors.ROUND,
            "strides_from_image_size": anchors.STRIDES_FROM_IMAGE_SIZE,
            "order": anchors.ORDER,
        }

    @property
    def num_anchors(self) -> int:
        """A, the number of anchors per cell (the same at every level)."""
        return self.cell_anchors.shape[1]

    def _base_anchors(self, sizes: list[float], aspect_ratios: list[float]) -> Tensor:
        """[A, 4] anchors of one level centred on (0, 0) in `order`, float32."""
        if self.round_base:
            # torchvision's AnchorGenerator.generate_anchors, operation by operation.
            scales = torch.tensor(sizes, dtype=torch.float32)
            ratios = torch.tensor(aspect_ratios, dtype=torch.float32)
            h_ratios = torch.sqrt(ratios)
            w_ratios = 1 / h_ratios
            ws = w_ratios[:, None] * scales[None, :]
            hs = h_ratios[:, None] * scales[None, :]
            anchors = (torch.stack([-ws, -hs, ws, hs], dim=-1) / 2).round()
        else:
            rows = []
            for ratio in aspect_ratios:
                row = []
                for size in sizes:
                    w = size / math.sqrt(ratio)
                    h = size * math.sqrt(ratio)
                    row.append([-w / 2, -h / 2, w / 2, h / 2])
                rows.append(row)
            anchors = torch.tensor(rows, dtype=torch.float64).float()
        # anchors: [R_l, S_l, 4], ratio-major.
        if self.order == "size_major":
            anchors = anchors.transpose(0, 1)
        return anchors.reshape(-1, 4)

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
            f"strides_from_image_size={self.strides_from_image_size}, order={self.order!r}"
        )
