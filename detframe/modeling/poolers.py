"""Pooling ROIs from feature maps into fixed-size features (Fast R-CNN, FPN, MultiPathNet).

Shapes:

    N        images
    L        feature levels, in the order of `scales` (e.g. p2..p5: strides 4, 8, 16, 32)
    R        boxes of all images together (R_i for image i)
    C_l      channels of level l
    S        output size (S x S)

    features   list of L tensors [N, C_l, H_l, W_l]
    boxes      list of N Boxes (R_i boxes each), XYXY in input-image pixels
    rois       [R, 5] rows (image index, x1, y1, x2, y2), boxes of image 0 first
    output     [R, C_out, S, S] in the order of `rois` (C_out = `output_channels`)

Poolers, all in POOLER_REGISTRY and all constructed with the same keyword arguments
(`output_size`, `scales`, `sampling_ratio`, `pooler_type`, `box_scale`):

- `ROIPooler` pools each box from one level. With several levels (consecutive powers of 2,
  FPN) the level comes from the box's size (below); with one level it is single-level
  pooling (ResNet-C4, VGG16 conv5, stride 16). All levels share one channel count C.
- `MultiLevelROIPooler` pools every box from every level and concatenates the results along
  channels, C_out = sum of C_l (MultiPathNet's skip connections: VGG16 conv3_3, conv4_3 and
  conv5_3, strides 4, 8, 16, channels 256, 512, 512).

Level assignment (FPN eq. 1, torchvision's LevelMapper formula): a box of area a goes to

    k = floor(canonical_level + log2(sqrt(a) / canonical_box_size) + 1e-6)

clamped to [min_level, max_level], where min_level = -log2(scales[0]) and max_level =
-log2(scales[-1]); it is pooled from level k - min_level. Degenerate boxes (area 0) go to
the finest level.

Context regions (MultiPathNet's foveal regions 1x, 1.5x, 2x, 4x): with `box_scale` s != 1,
every box is first scaled by s about its centre (width and height times s, no clipping), and
the scaled box is what is assigned to a level and pooled.

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

__all__ = [
    "BasePooler",
    "MultiLevelROIPooler",
    "ROIPooler",
    "assign_boxes_to_levels",
    "convert_boxes_to_pooler_format",
    "scale_boxes_about_centre",
]

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


def scale_boxes_about_centre(boxes: Tensor, factor: float) -> Tensor:
    """Boxes with the same centres and `factor` times the width and height.

    Args:
        boxes: [R, 4] XYXY boxes.
        factor: the scale of width and height (> 0); nothing is clipped.

    Returns:
        [R, 4] XYXY boxes, a new tensor in the dtype of `boxes`.
    """
    centres = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half_sizes = (boxes[:, 2:] - boxes[:, :2]) * (0.5 * factor)
    return torch.cat([centres - half_sizes, centres + half_sizes], dim=1)


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


class BasePooler(nn.Module):
    """What every registered pooler shares: the constructor's arguments and their checks, one
    pooling module per level (`level_poolers`), the context rescale and the rois.

    A subclass implements `forward(features, boxes) -> [R, C_out, S, S]` and
    `output_channels(in_channels) -> C_out`.
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str,
        box_scale: float = 1.0,
    ) -> None:
        """
        Args:
            output_size: S, the side of the pooled features.
            scales: L scales (1 / stride) of the feature maps the pooler reads.
            sampling_ratio: sampling points per bin side for RoIAlign (<= 0: adaptive);
                ignored by "ROIPool".
            pooler_type: "ROIAlignV2", "ROIAlign" or "ROIPool".
            box_scale: every box is scaled by this factor about its centre before pooling
                (1.0: the box itself).

        Raises:
            ValueError: an unknown `pooler_type`, `output_size` < 1, no scales, a scale or
                `box_scale` that is not positive and finite.
        """
        super().__init__()
        name = type(self).__name__
        if pooler_type not in _POOLER_TYPES:
            raise ValueError(
                f"{name}: pooler_type must be one of {sorted(_POOLER_TYPES)}, got {pooler_type!r}"
            )
        if int(output_size) < 1:
            raise ValueError(f"{name}: output_size must be >= 1, got {output_size}")
        if len(scales) == 0:
            raise ValueError(f"{name}: scales must name at least one feature level, got []")
        for value, what in [*((s, "scales") for s in scales), (box_scale, "box_scale")]:
            if not (float(value) > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: {what} must be positive and finite, got {value}")
        self.output_size = int(output_size)
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type
        self.box_scale = float(box_scale)
        make = _POOLER_TYPES[pooler_type]
        self.level_poolers = nn.ModuleList(
            make(self.output_size, scale, sampling_ratio) for scale in self.scales
        )

    def output_channels(self, in_channels: Sequence[int]) -> int:
        """C_out, the channels of the pooled features, given the L levels' channels."""
        raise NotImplementedError

    def _check_num_levels(self, num_levels: int, what: str) -> None:
        if num_levels != len(self.scales):
            raise ValueError(
                f"{type(self).__name__}: expected {len(self.scales)} {what} (one per scale "
                f"{self.scales}), got {num_levels}"
            )

    def _scaled_boxes(self, boxes: Sequence[Boxes]) -> list[Boxes]:
        """`boxes` scaled by `box_scale` about their centres (themselves at 1.0)."""
        if self.box_scale == 1.0:
            return list(boxes)
        return [Boxes(scale_boxes_about_centre(b.tensor, self.box_scale)) for b in boxes]

    def _rois(self, features: Sequence[Tensor], boxes: Sequence[Boxes]) -> Tensor:
        """[R, 5] rois of `boxes` (already scaled) on the features' device and in their dtype.

        Raises:
            ValueError: the number of feature maps is not L, or the number of Boxes is not N.
        """
        self._check_num_levels(len(features), "feature maps")
        x0 = features[0]
        if len(boxes) != x0.size(0):
            raise ValueError(
                f"{type(self).__name__}: got boxes for {len(boxes)} images but features hold "
                f"{x0.size(0)}"
            )
        rois = convert_boxes_to_pooler_format(boxes).to(x0.device)
        if not torch.is_autocast_enabled(x0.device.type):
            # The operators want one dtype; under autocast they run in float32 themselves.
            rois = rois.to(x0.dtype)
        return rois

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}, pooler_type={self.pooler_type!r}, "
            f"box_scale={self.box_scale}"
        )


def _level_of_scale(scale: float) -> int:
    """-log2(scale) for a scale that is a power of 2; ValueError otherwise."""
    level = -math.log2(scale)
    if not math.isclose(level, round(level), abs_tol=1e-6):
        raise ValueError(f"ROIPooler: scales must be powers of 2 (e.g. 1/16), got {scale}")
    return round(level)


@POOLER_REGISTRY.register()
class ROIPooler(BasePooler):
    """Pools each box from the one level its size maps to (a single level: from that level).

    No `from_config`: its settings belong to the head that owns it (e.g.
    MODEL.ROI_BOX_HEAD.POOLER_*), which builds it with keyword arguments.
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str,
        box_scale: float = 1.0,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        """
        Args:
            output_size, sampling_ratio, pooler_type, box_scale: as in `BasePooler`.
            scales: L scales (1 / stride) of the feature maps, finest first; powers of 2
                forming consecutive levels (e.g. 1/4, 1/8, 1/16, 1/32), or one scale.
            canonical_box_size: the box size (sqrt of area) that maps to `canonical_level`.
            canonical_level: the level of a box of `canonical_box_size` (FPN: 4).

        Raises:
            ValueError: as `BasePooler`, or a scale that is not a power of 2, scales that
                are not consecutive levels, or `canonical_box_size` <= 0.
        """
        super().__init__(output_size, scales, sampling_ratio, pooler_type, box_scale)
        levels = [_level_of_scale(s) for s in self.scales]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(
                f"ROIPooler: scales must be consecutive pyramid levels, finest first "
                f"(e.g. [1/4, 1/8, 1/16]), got {list(scales)}; MultiLevelROIPooler pools "
                "from levels that are not"
            )
        if canonical_box_size <= 0:
            raise ValueError(
                f"ROIPooler: canonical_box_size must be positive, got {canonical_box_size}"
            )
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.min_level = levels[0]
        self.max_level = levels[-1]

    def output_channels(self, in_channels: Sequence[int]) -> int:
        """C, the one channel count of all levels.

        Raises:
            ValueError: not L channel counts, or levels with different channel counts.
        """
        self._check_num_levels(len(in_channels), "channel counts")
        if len(set(in_channels)) != 1:
            raise ValueError(
                f"ROIPooler pools each box from one level, so all levels need one channel "
                f"count; got {list(in_channels)} for scales {self.scales} "
                "(MultiLevelROIPooler concatenates levels of different channel counts)"
            )
        return int(in_channels[0])

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
        boxes = self._scaled_boxes(boxes)
        rois = self._rois(features, boxes)
        x0 = features[0]
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
            f"{super().extra_repr()}, canonical_box_size={self.canonical_box_size}, "
            f"canonical_level={self.canonical_level}"
        )


@POOLER_REGISTRY.register()
class MultiLevelROIPooler(BasePooler):
    """Pools every box from every level and concatenates the levels along channels.

    The levels may have any scales (e.g. 1/4, 1/8, 1/16 of VGG16's conv3_3, conv4_3,
    conv5_3) and channel counts. Arguments as in `BasePooler`.
    """

    def output_channels(self, in_channels: Sequence[int]) -> int:
        """sum of C_l over the L levels.

        Raises:
            ValueError: not L channel counts.
        """
        self._check_num_levels(len(in_channels), "channel counts")
        return int(sum(in_channels))

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Boxes]) -> Tensor:
        """Pools every box of every image from every level.

        Args:
            features: L feature maps [N, C_l, H_l, W_l], in the order of `scales`.
            boxes: N Boxes (one per image, possibly empty), XYXY in input-image pixels.

        Returns:
            [R, sum C_l, S, S]: channels [sum_{j<l} C_j, sum_{j<=l} C_j) pooled from level l,
            rows in the order of the concatenated boxes (image 0's first).

        Raises:
            ValueError: the number of feature maps is not L, or the number of Boxes is not N.
        """
        rois = self._rois(features, self._scaled_boxes(boxes))
        pooled = [
            pooler(feature, rois)
            for feature, pooler in zip(features, self.level_poolers, strict=True)
        ]
        return torch.cat(pooled, dim=1)
