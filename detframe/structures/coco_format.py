"""Conversions between detframe's structures and the COCO formats, with pycocotools.

Shapes: N boxes, an H x W image.

    box XYXY      (x1, y1, x2, y2)  detframe's convention (see boxes.py)
    box XYWH      (x, y, w, h)      COCO's "bbox" field: top-left corner, width, height
    polygon       flat float array [x0, y0, x1, y1, ...], at least 3 points, in pixels
    bitmask       np.ndarray[H, W] bool
    RLE           {"size": [H, W], "counts": str}: COCO's compressed run-length encoding;
                  the counts are a str so that the dict can be written to a results json

Polygons are rasterised the way COCO annotations are: `pycocotools.mask.frPyObjects`,
with the parts of one instance merged (union) by `pycocotools.mask.merge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] boxes (x1, y1, x2, y2) -> [..., 4] boxes (x, y, w, h); a new tensor."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] boxes (x, y, w, h) -> [..., 4] boxes (x1, y1, x2, y2); a new tensor."""
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def polygons_to_bitmask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterises the polygons of one instance into a [height, width] bool mask (their union).

    Args:
        polygons: flat float arrays [x0, y0, x1, y1, ...] of at least 3 points each; an
            empty list gives an all-False mask.
    """
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    polygons = [np.asarray(p, dtype=np.float64) for p in polygons]
    rles = mask_util.frPyObjects(polygons, int(height), int(width))
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def bitmask_to_rle(mask: Tensor | np.ndarray) -> dict[str, Any]:
    """Encodes a [H, W] mask (nonzero = inside) as a compressed COCO RLE with str counts."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    if mask.ndim != 2:
        raise ValueError(f"bitmask_to_rle expects a mask of shape [H, W], got {mask.shape}")
    rle = mask_util.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_bitmask(rle: dict[str, Any]) -> np.ndarray:
    """Decodes a COCO RLE into a [H, W] bool mask.

    Args:
        rle: {"size": [H, W], "counts": ...} with compressed counts (str or bytes, as in
            results files) or uncompressed counts (a list of ints, as in `iscrowd`
            annotations).
    """
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_util.frPyObjects(rle, height, width)
    elif isinstance(counts, str):
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    return mask_util.decode(rle).astype(bool)
