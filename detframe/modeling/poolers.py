"""Pooling ROIs from a pyramid of feature maps into fixed-size features (FPN, Lin et al. 2017).

Shapes:

    N        images
    L        feature levels, finest first (e.g. p2..p5: strides 4, 8, 16, 32)
    R        boxes of all images together (R_i for image i)
    C        channels (the same at every level)
    S        output size (S x S)

    features   list of L tensors [N, C, H_l, W_l]
    boxes      list of N Boxes (R_i boxes each), XYXY in input-image pixels
    rois       [R, 5] rows (image index, x1, y1, x2, y2), boxes of image 0 first
    output     [R, C, S, S] in the order of `rois`

Level assignment (FPN eq. 1, torchvision's LevelMapper formula): a box of area a goes to

    k = floor(canonical_level + log2(sqrt(a) / canonical_box_size) + 1e-6)

clamped to [min_level, max_level], where min_level = -log2(scales[0]) and max_level =
-log2(scales[-1]); it is pooled from level k - min_level. Degenerate boxes (area 0) go to
the finest level.

Pooler types: "ROIAlignV2" is RoIAlign with aligned=True (detectron2), "ROIAlign" with
aligned=False (torchvision's detection models), "ROIPool" is Fast R-CNN's max pooling
(no sampling ratio). All use detframe's own operators (`detframe.layers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from detframe.layers import RoIAlign, RoIPool
from detframe.registry import POOLER_REGISTRY
from detframe.structures import Boxes

__all__ = ["ROIPooler", "assign_boxes_to_levels", "convert_boxes_to_pooler_format"]

# pooler_type -> per-level pooling module from (output_size, scale, sampling_ratio).
_POOLER_TYPES: dict[str, Callable[[int, float, int], nn.Module]] = {
    "ROIAlign": lambda size, scale, ratio: RoIAlign(size, scale, ratio, aligned=False),
    "ROIAlignV2": lambda size, scale, ratio: RoIAlign(size, scale, ratio, aligned=True),
    "ROIPool": lambda size, scale, ratio: RoIPool(size, scale),
}


def convert_boxes_to_pooler_format(boxes: Sequence[Boxes]) -> Tensor:
    """Concatenates per-image boxes into rois with their image index.

    Args:
        boxes: N Boxes, R_i boxes for image i.

    Returns:
        [R, 5] rows (image index, x1, y1, x2, y2), image 0's boxes first, in the dtype and
        on the device of the boxes (float32 on CPU when there are no images).
    """
    if len(boxes) == 0:
        return torch.zeros(0, 5)
    tensors = [b.tensor for b in boxes]
    indices = [
        torch.full((len(t), 1), i, dtype=t.dtype, device=t.device) for i, t in enumerate(tensors)
    ]
    return torch.cat([torch.cat(indices), torch.cat(tensors)], dim=1)


def assign_boxes_to_levels(
    boxes: Sequence[Boxes],
    min_level: int,
    max_level: int,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """The pyramid level each box is pooled from (see the module docstring).

    Args:
        boxes: N Boxes, R_i boxes for image i.
        min_level: the level (log2 of the stride) of the finest feature map.
        max_level: the level of the coarsest feature map.
        canonical_box_size: the box size (sqrt of area) that maps to `canonical_level`.
        canonical_level: the level of a box of `canonical_box_size`.

    Returns:
        [R] int64 level indices in [0, max_level - min_level], 0 = finest, in the order of
        the concatenated boxes.
    """
    sizes = torch.sqrt(torch.cat([b.area() for b in boxes])) if boxes else torch.zeros(0)
    eps = torch.tensor(1e-6, dtype=sizes.dtype, device=sizes.device)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size) + eps)
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def _level_of_scale(scale: float) -> int:
    """-log2(scale) for a scale that is a power of 2; ValueError otherwise."""
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"ROIPooler: scales must be positive powers of 2, got {scale}")
    level = -math.log2(scale)
    if not math.isclose(level, round(level), abs_tol=1e-6):
        raise ValueError(f"ROIPooler: scales must be powers of 2 (e.g. 1/16), got {scale}")
    return round(level)


@POOLER_REGISTRY.register()
class ROIPooler(nn.Module):
    """Pools each box from the pyramid level its size maps to, into a C x S x S feature.

    No `from_config`: its settings belong to the head that owns it (e.g.
    MODEL.ROI_BOX_HEAD.POOLER_*), which constructs it with keyword arguments.
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        """
        Args:
            output_size: S, the side of the pooled features.
            scales: L scales (1 / stride) of the feature maps, finest first; powers of 2
                forming consecutive levels (e.g. 1/4, 1/8, 1/16, 1/32).
            sampling_ratio: sampling points per bin side for RoIAlign (<= 0: adaptive);
                ignored by "ROIPool".
            pooler_type: "ROIAlignV2", "ROIAlign" or "ROIPool".
            canonical_box_size: the box size (sqrt of area) that maps to `canonical_level`.
            canonical_level: the level of a box of `canonical_box_size` (FPN: 4).

        Raises:
            ValueError: an unknown `pooler_type`, `output_size` < 1, no scales, a scale that
                is not a power of 2, or scales that are not consecutive levels.
        """
        super().__init__()
        if pooler_type not in _POOLER_TYPES:
            raise ValueError(
                f"ROIPooler: pooler_type must be one of {sorted(_POOLER_TYPES)}, got "
                f"{pooler_type!r}"
            )
        if int(output_size) < 1:
            raise ValueError(f"ROIPooler: output_size must be >= 1, got {output_size}")
        if len(scales) == 0:
            raise ValueError("ROIPooler: scales must name at least one feature level, got []")
        levels = [_level_of_scale(float(s)) for s in scales]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(
                f"ROIPooler: scales must be consecutive pyramid levels, finest first "
                f"(e.g. [1/4, 1/8, 1/16]), got {list(scales)}"
            )
        if canonical_box_size <= 0:
            raise ValueError(
                f"ROIPooler: canonical_box_size must be positive, got {canonical_box_size}"
            )
        self.output_size = int(output_size)
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.min_level = levels[0]
        self.max_level = levels[-1]
        make = _POOLER_TYPES[pooler_type]
        self.level_poolers = nn.ModuleList(
            make(self.output_size, scale, sampling_ratio) for scale in self.scales
        )

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Boxes]) -> Tensor:
        """Pools every box of every image.

        Args:
            features: L feature maps [N, C, H_l, W_l], in the order of `scales`.
            boxes: N Boxes (one per image, possibly empty), XYXY in input-image pixels.

        Returns:
            [R, C, S, S] pooled features in the order of the concatenated boxes (image 0's
            first); [0, C, S, S] when there are no boxes.

        Raises:
            ValueError: the number of feature maps is not L, or the number of Boxes is not N.
        """
        if len(features) != len(self.level_poolers):
            raise ValueError(
                f"ROIPooler: expected {len(self.level_poolers)} feature maps (scales "
                f"{self.scales}), got {len(features)}"
            )
        num_images = features[0].size(0)
        if len(boxes) != num_images:
            raise ValueError(
                f"ROIPooler: got boxes for {len(boxes)} images but features hold {num_images}"
            )
        x0 = features[0]
        rois = convert_boxes_to_pooler_format(boxes).to(x0.device)
        if not torch.is_autocast_enabled(x0.device.type):
            # The operators want one dtype; under autocast they run in float32 themselves.
            rois = rois.to(x0.dtype)
        if len(self.level_poolers) == 1:
            return self.level_poolers[0](x0, rois)

        levels = assign_boxes_to_levels(
            boxes, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        ).to(x0.device)
        size = self.output_size
        output = x0.new_zeros((rois.size(0), x0.size(1), size, size))
        for level, (feature, pooler) in enumerate(zip(features, self.level_poolers, strict=True)):
            inds = torch.where(levels == level)[0]
            output[inds] = pooler(feature, rois[inds]).to(output.dtype)
        return output

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}, pooler_type={self.pooler_type!r}, "
            f"canonical_box_size={self.canonical_box_size}, "
            f"canonical_level={self.canonical_level}"
        )
