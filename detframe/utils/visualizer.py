"""Drawing detections on an image with OpenCV: masks, outlines, boxes and labels.

Shapes: R detections of one H x W image.

    image                  np.ndarray [H, W, 3] uint8, BGR (OpenCV's order)
    instances.pred_boxes   Boxes[R], XYXY in the image's pixels
    instances.scores       Tensor[R] float
    instances.pred_classes Tensor[R] int64, contiguous class ids 0..K-1
    instances.pred_masks   optional: bool Tensor[R, H, W] or BitMasks[R] at the image's size

Conventions:

- Coordinates are continuous: pixel (i, j) covers [j, j + 1) x [i, i + 1), so a box
  (x1, y1, x2, y2) covers columns round(x1)..round(x2) - 1; its outline is drawn on its
  outermost pixels (and inwards and outwards for lines thicker than one pixel).
- Colours are BGR tuples from a fixed palette indexed by class id (`class_color`): hues
  spread by the golden ratio, so neighbouring ids differ strongly, with saturation and
  brightness cycling. Label text is black on light colours and white on dark ones.
- A detection is drawn as: its mask filled with the class colour blended at `alpha`
  (out = (1 - alpha) * image + alpha * colour, rounded), the mask's outline, the box, and a
  label "name 0.93" in a box filled with the class colour, just above the box's top-left
  corner, moved down (over the box) or left as far as needed to stay inside the image.
- Lines (outlines, boxes, text) are 1 + min(H, W) // 1000 pixels thick and the font scale
  is max(0.4, min(H, W) / 1000), so labels stay readable on large images.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from detframe.structures import BitMasks, Instances

__all__ = ["check_image", "class_color", "draw_instances"]

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
# Saturation and brightness cycle with periods 3 and 2, so ids with similar hues (i and
# i + 13, i + 21, ...) still differ in them.
_SATURATIONS = (1.0, 0.6, 0.85)
_VALUES = (0.95, 0.75)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_REQUIRED_FIELDS = ("pred_boxes", "scores", "pred_classes")


def class_color(class_id: int) -> tuple[int, int, int]:
    """The BGR colour of class `class_id` (any int >= 0); the same id always gives the same
    colour."""
    hue = (class_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = _SATURATIONS[class_id % len(_SATURATIONS)]
    value = _VALUES[class_id % len(_VALUES)]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(b * 255), round(g * 255), round(r * 255))


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with the BGR `color` (by its luma)."""
    b, g, r = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 127.5 else (255, 255, 255)


def check_image(image: np.ndarray) -> None:
    """Raises ValueError unless `image` is an [H, W, 3] uint8 array (BGR by convention)."""
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
    ):
        described = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"image must be a [H, W, 3] uint8 BGR array, got a {described}")


def _masks_of(instances: Instances, image_size: tuple[int, int]) -> Tensor | None:
    """The instances' masks as a bool Tensor[R, H, W] on the CPU, or None without masks."""
    if not instances.has("pred_masks"):
        return None
    masks = instances.pred_masks
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(
            f"pred_masks must be a bool Tensor[R, H, W] or BitMasks, got {type(masks).__name__}"
            + (f" of shape {tuple(masks.shape)}" if isinstance(masks, Tensor) else "")
        )
    if tuple(masks.shape[1:]) != image_size:
        raise ValueError(
            f"pred_masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
            f"{image_size[0]}x{image_size[1]} (H x W): masks must be at the image's size"
        )
    return masks.detach().cpu().bool()


def _draw_label(
    image: np.ndarray,
    text: str,
    corner: tuple[int, int],
    color: tuple[int, int, int],
    font_scale: float,
    thickness: int,
) -> None:
    """Draws `text` in a box filled with `color`, its bottom-left just above `corner` (x, y),
    shifted as little as possible to lie inside the image."""
    height, width = image.shape[:2]
    (text_width, text_height), baseline = cv2.getTextSize(text, _FONT, font_scale, thickness)
    label_width, label_height = text_width + 2, text_height + baseline + 2
    x, y = corner
    left = min(max(x, 0), max(width - label_width, 0))
    top = min(max(y - label_height, 0), max(height - label_height, 0))
    cv2.rectangle(image, (left, top), (left + label_width - 1, top + label_height - 1), color, -1)
    origin = (left + 1, top + 1 + text_height)
    cv2.putText(image, text, origin, _FONT, font_scale, _text_color(color), thickness, cv2.LINE_AA)


def draw_instances(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draws the detections with score >= `score_threshold` on a copy of `image`.

    Args:
        image: [H, W, 3] uint8 BGR; not modified.
        instances: R detections with pred_boxes (Boxes, XYXY pixels), scores [R],
            pred_classes [R] (contiguous ids) and optionally pred_masks (bool Tensor[R, H, W]
            or BitMasks) at the image's size; on any device.
        class_names: the name of each class id; a class id without a name (class_names is
            None or too short) is labelled with the id itself.
        score_threshold: detections with a lower score are not drawn.
        alpha: opacity of the mask fill, in [0, 1].

    Returns:
        A new [H, W, 3] uint8 BGR image with the detections drawn lowest score first, so the
        best one is on top.

    Raises:
        ValueError: `image` is not [H, W, 3] uint8, `alpha` is outside [0, 1], a required
            field is missing, or the masks are not at the image's size.
    """
    check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    missing = [name for name in _REQUIRED_FIELDS if not instances.has(name)]
    if missing:
        raise ValueError(
            f"instances lack the field(s) {missing} needed for drawing "
            f"(fields: {sorted(instances.fields())})"
        )
    height, width = image.shape[:2]
    masks = _masks_of(instances, (height, width))
    out = image.copy()
    scores = instances.scores.detach().cpu().float()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[torch.argsort(scores[keep], stable=True)]
    if len(keep) == 0:
        return out

    boxes = instances.pred_boxes.tensor.detach().cpu().double()[keep].round()
    boxes = boxes.clamp(min=-1.0, max=float(max(height, width) + 1)).long().tolist()
    classes = instances.pred_classes.detach().cpu()[keep].tolist()
    thickness = 1 + min(height, width) // 1000
    font_scale = max(0.4, min(height, width) / 1000)
    for index, class_id, (x1, y1, x2, y2) in zip(keep.tolist(), classes, boxes, strict=True):
        color = class_color(class_id)
        if masks is not None:
            mask = masks[index].numpy()
            blended = (1.0 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float64)
            out[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
            contours, _ = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
            )
            cv2.drawContours(out, contours, -1, color, thickness)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, thickness)
        name = (
            class_names[class_id]
            if class_names is not None and 0 <= class_id < len(class_names)
            else str(class_id)
        )
        _draw_label(
            out, f"{name} {scores[index].item():.2f}", (x1, y1), color, font_scale, thickness
        )
    return out
