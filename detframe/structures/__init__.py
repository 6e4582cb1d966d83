"""detframe's structures: the vocabulary that datasets, models and evaluators share.

`Boxes` (XYXY boxes) with `pairwise_iou`, `Instances` (per-image fields indexed together),
`ImageList` (a padded image batch), `BitMasks` / `PolygonMasks` (instance masks and their
mask-head targets), and conversions to and from COCO's box, polygon and RLE formats.
"""

from .boxes import Boxes, pairwise_intersection, pairwise_iou
from .coco_format import (
    bitmask_to_rle,
    polygons_to_bitmask,
    rle_to_bitmask,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from .image_list import ImageList
from .instances import Instances
from .masks import BitMasks, PolygonMasks

__all__ = [
    "BitMasks",
    "Boxes",
    "ImageList",
    "Instances",
    "PolygonMasks",
    "bitmask_to_rle",
    "pairwise_intersection",
    "pairwise_iou",
    "polygons_to_bitmask",
    "rle_to_bitmask",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
