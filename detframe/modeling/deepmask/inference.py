"""DeepMask on a whole image: geometry of the windows, top-k across scales, masks into the image.

Shorthand: S pyramid scales; at one scale the image is h_s x w_s, padded by p = W / 2 pixels
on each side (W = the window side in pixels, 160 in the release), its trunk map at stride t
(16) gives h' x w' window positions; R selected windows; m x m masks (56); an output image of
H x W pixels.

Geometry. Training sees a patch whose trunk map is cropped to the central f x f features
(f = W / t); its label covers the central W x W pixels, which start (f_patch - f) / 2
features, i.e. that many strides, into the patch. Applied to the padded image, window position
(r, c) reads the features [r, r + f) x [c, c + f), the crop of a patch that starts a whole
number of strides before them, so its window starts at pixel t r of the padded image:

    window(r, c) = [t c - p, t c - p + W) x [t r - p, t r - p + W)   at scale s (x, then y)

and in the unscaled image each coordinate is divided by the scale of its axis (the actual
ratio of the resized size to the original, sx = w_s / w and sy = h_s / h). Padding by half a
window (InferDeepMask.lua) lets windows centre on every part of the image.

Release decode (`release_positions`). InferDeepMask.lua's `getTopScores` sorts each score map
flattened row-major and turns the 1-based index `i1 = r w' + c + 1` of a top score back into a
position with `x = floor(i1 / w')`, `y = i1 % w' + 1`, then `x = max(1, x)`: the correct
1-based decode is `x = floor((i1 - 1) / w') + 1`, `y = (i1 - 1) % w' + 1`. So for every
column but the last, the mask is read from, and pasted at, position (max(r - 1, 0), c + 1):
one stride up and one to the right of the score that chose it (the last column wraps to
(r, 0)). Its masks are thus shifted by a stride (16 / s pixels, 28 at the smallest scale) and
belong to a neighbour of the window that scored. `MODEL.DEEPMASK.RELEASE_DECODE` reproduces
it (to compare with the released numbers); the default decodes the position that scored.

Pasting. Each window's mask probabilities (sigmoid of the logits) are pasted into the output
image with `paste_masks_in_image` (bilinear, as detframe's Mask R-CNN masks) and binarised at
probability >= MASK_THRESHOLD (0.2, the release's `getTopProps(.2, ...)`, which compared the
bilinearly resized logits with the logit of 0.2). A proposal's box is the tight box of its
binary mask; a proposal whose mask is empty (no pixel above the threshold, or a window wholly
outside the image) is dropped, so an image can get fewer than TOPK proposals: it can match no
object, and a zero box would be a degenerate region for a second stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from detframe.structures import BitMasks, Boxes, Instances

from ..postprocessing import paste_masks_in_image

__all__ = [
    "PyramidSettings",
    "paste_proposals",
    "release_positions",
    "resize_for_scale",
    "top_windows",
    "window_boxes",
]


@dataclass(frozen=True)
class PyramidSettings:
    """How DeepMask runs on a whole image (MODEL.DEEPMASK.*; see the module docstring).

    Attributes:
        scales: image scales of the pyramid (release: 2^-2.5 .. 2^0.5 in steps of 2^0.5).
        topk: windows kept across all scales, by score (release: np = 500).
        mask_threshold: probability at which a pasted mask pixel is in (release: 0.2).
        nms_thresh: box IoU above which a lower-scored proposal is suppressed; >= 1: no NMS
            (release).
        release_decode: decode the top positions as the release does (shifted by a stride).
    """

    scales: tuple[float, ...]
    topk: int
    mask_threshold: float = 0.2
    nms_thresh: float = 1.0
    release_decode: bool = False

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"MODEL.DEEPMASK.SCALES must be positive, got {list(self.scales)}")
        if self.topk < 1:
            raise ValueError(f"MODEL.DEEPMASK.TOPK must be >= 1, got {self.topk}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(
                f"MODEL.DEEPMASK.MASK_THRESHOLD must be in (0, 1), got {self.mask_threshold}"
            )


def resize_for_scale(image: Tensor, scale: float) -> tuple[Tensor, float, float]:
    """One pyramid level: image [3, h, w] -> (image [3, h_s, w_s], sy, sx).

    h_s = max(round(h * scale), 1) (likewise w_s), resized bilinearly without antialiasing (as
    the release's `SpatialReSamplingEx`); sy = h_s / h and sx = w_s / w are the actual scales.
    """
    height, width = image.shape[-2:]
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    if size != (height, width):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return image, size[0] / height, size[1] / width


def window_boxes(
    rows: Tensor, cols: Tensor, sy: float, sx: float, *, stride: int, window: int
) -> Tensor:
    """Windows of positions (rows [R], cols [R]) of a level padded by window / 2, in the
    unscaled image's pixels: [R, 4] XYXY (see the module docstring)."""
    pad = window / 2
    x0 = (cols.to(torch.float64) * stride - pad) / sx
    y0 = (rows.to(torch.float64) * stride - pad) / sy
    return torch.stack([x0, y0, x0 + window / sx, y0 + window / sy], dim=1)


def release_positions(flat: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The positions InferDeepMask.lua decodes from 0-based row-major indices `flat` [R] of a
    score map `width` columns wide: (rows [R], cols [R]), a stride up and right of the
    correct `(flat // width, flat % width)` (see the module docstring)."""
    one_based = flat + 1
    return (one_based // width).clamp(min=1) - 1, one_based % width


def top_windows(score_maps: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k highest scores over all levels' score maps [h'_s, w'_s].

    Returns:
        (scores [R], level [R], flat [R]) with R = min(k, all positions), highest first:
        each score, the index of its level and its row-major index in that level's map.
    """
    flat_maps = [scores.flatten() for scores in score_maps]
    sizes = torch.tensor([s.numel() for s in flat_maps], device=flat_maps[0].device)
    scores, index = torch.cat(flat_maps).topk(min(k, int(sizes.sum())))
    ends = sizes.cumsum(0)
    level = torch.searchsorted(ends, index, right=True)
    return scores, level, index - (ends - sizes)[level]


def paste_proposals(
    windows: Tensor,
    mask_logits: Tensor,
    objectness_logits: Tensor,
    image_size: tuple[int, int],
    *,
    mask_threshold: float,
    nms_thresh: float = 1.0,
) -> Instances:
    """Windows with their masks -> proposals of one image of `image_size` (H, W).

    Args:
        windows: [R, 4] XYXY in the output image's pixels.
        mask_logits: [R, m, m].
        objectness_logits: [R], highest first.
        mask_threshold: pasted probabilities >= this are in a mask.
        nms_thresh: box IoU for NMS over the proposals' boxes; >= 1 for none.

    Returns:
        Instances(image_size, proposal_boxes Boxes [R'], objectness_logits [R'],
        proposal_masks BitMasks [R', H, W]): the proposals with a non-empty mask (after NMS),
        in the given order, their boxes tight around their masks.
    """
    masks = paste_masks_in_image(
        mask_logits.sigmoid(), windows.to(mask_logits.dtype), image_size, mask_threshold
    )
    bitmasks = BitMasks(masks)
    keep = torch.nonzero(bitmasks.nonempty()).flatten()
    boxes = bitmasks[keep].get_bounding_boxes()
    if nms_thresh < 1.0:
        kept = nms(boxes.tensor, objectness_logits[keep].float(), nms_thresh)
        keep, boxes = keep[kept], Boxes(boxes.tensor[kept])
    return Instances(
        image_size,
        proposal_boxes=boxes,
        objectness_logits=objectness_logits[keep],
        proposal_masks=bitmasks[keep],
    )
