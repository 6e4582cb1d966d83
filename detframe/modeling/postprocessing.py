"""Detections in the model's input size -> detections in the original image size.

Shapes: R detections, an output image of H x W, M x M mask-head masks.

    pred_boxes  Boxes [R]            XYXY, rescaled and clipped to (H, W)
    pred_masks  [R, 1, M, M] probs -> [R, H, W] bool (pasted into the image)

`paste_masks_in_image` is torchvision's paste (`roi_heads.paste_masks_in_image`): the mask is
padded by one zero pixel on each side, its box scaled by (M + 2) / M about its centre and
truncated to integers (x0, y0, x1, y1); the padded mask is resized bilinearly
(align_corners=False) to h = max(y1 - y0 + 1, 1) by w = max(x1 - x0 + 1, 1) pixels and placed
with its top-left pixel at (x0, y0), clipped to the image.

Instead of one F.interpolate per mask it uses separable interpolation, batched: the resized,
placed mask of one instance is Wy @ mask @ Wx^T with Wy [h', M + 2] and Wx [w', M + 2] holding
the two bilinear weights of each image row and column of a window h' x w' that covers the
part of the box inside the image (zero rows outside the box). Masks are sorted by the size of
that part and batched in chunks whose windows (the largest of the chunk) hold at most
_PASTE_CHUNK_ELEMENTS values, so that the work follows the boxes' area, not the image's; each
thresholded window is then copied into its mask's plane (one strided copy per mask). A
pixel is in the mask when its probability is >= threshold (detectron2's rule; torchvision
returns the probabilities, which its users threshold, often with > 0.5). The probabilities
agree with torchvision's to float rounding (about 1e-6 in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from detframe.structures import Instances

__all__ = ["detector_postprocess", "paste_masks_in_image"]

# Largest number of pasted probabilities [chunk, h', w'] computed at once (float values).
_PASTE_CHUNK_ELEMENTS = 1 << 24


def detector_postprocess(
    instances: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5
) -> Instances:
    """Rescales one image's detections to the size it is reported at.

    Args:
        instances: detections in the input size `instances.image_size` with pred_boxes
            (Boxes [R]) and optionally pred_masks ([R, 1, M, M] probabilities); other
            fields are kept as they are.
        output_height, output_width: (H, W), usually the original image's size.
        mask_threshold: pasted pixels with probability >= this are in the mask.

    Returns:
        A new Instances of image_size (H, W): pred_boxes scaled by (W / input width,
        H / input height) and clipped to the image, pred_masks pasted into [R, H, W] bool
        (with the rescaled boxes). No detection is removed.

    Raises:
        ValueError: a non-positive output size.
    """
    if output_height <= 0 or output_width <= 0:
        raise ValueError(f"output size must be positive, got ({output_height}, {output_width})")
    input_height, input_width = instances.image_size
    result = Instances((int(output_height), int(output_width)), **instances.fields())
    boxes = instances.pred_boxes.clone()
    boxes.scale(output_width / input_width, output_height / input_height)
    boxes.clip(result.image_size)
    result.pred_boxes = boxes
    if instances.has("pred_masks"):
        result.pred_masks = paste_masks_in_image(
            instances.pred_masks[:, 0], boxes.tensor, result.image_size, mask_threshold
        )
    return result


def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], threshold: float = 0.5
) -> Tensor:
    """Pastes M x M mask probabilities into an image, each into its box, and thresholds them.

    Args:
        masks: [R, M, M] probabilities (float).
        boxes: [R, 4] XYXY boxes in the image's pixel coordinates.
        image_shape: (H, W).
        threshold: pixels with a pasted probability >= threshold are True; in (0, 1].

    Returns:
        [R, H, W] bool on the device of `masks` (see the module docstring for the paste).

    Raises:
        ValueError: wrong shapes, a non-positive image size or a threshold outside (0, 1].
    """
    if masks.dim() != 3 or masks.size(1) != masks.size(2):
        raise ValueError(f"masks must have shape [R, M, M], got {tuple(masks.shape)}")
    if boxes.shape != (masks.size(0), 4):
        raise ValueError(f"boxes must have shape [{masks.size(0)}, 4], got {tuple(boxes.shape)}")
    height, width = (int(s) for s in image_shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_shape must be positive (H, W), got {tuple(image_shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not masks.is_floating_point():
        raise TypeError(f"masks must be float probabilities, got {masks.dtype}")
    num, size = masks.size(0), masks.size(-1)
    out = torch.zeros((num, height, width), dtype=torch.bool, device=masks.device)
    if num == 0:
        return out
    padded = torch.nn.functional.pad(masks, (1, 1, 1, 1))  # [R, P, P], P = M + 2
    x0, y0, x1, y1 = _expanded_int_boxes(boxes.to(masks.device), (size + 2) / size).unbind(1)
    # The part of each pasted box inside the image: rows [top, top + rows), likewise columns.
    top, left = y0.clamp(0, height), x0.clamp(0, width)
    rows = ((y1 + 1).clamp(0, height) - top).clamp(min=0)
    cols = ((x1 + 1).clamp(0, width) - left).clamp(min=0)
    order = torch.argsort(rows * cols, descending=True).tolist()
    rows_list, cols_list = rows.tolist(), cols.tolist()
    start = 0
    while start < num:
        # A chunk of masks of similar size, each computed in one window of the largest size.
        first = order[start]
        count = max(1, _PASTE_CHUNK_ELEMENTS // max(1, rows_list[first] * cols_list[first]))
        while True:
            index = order[start : start + count]
            win_h = max(rows_list[i] for i in index)
            win_w = max(cols_list[i] for i in index)
            if len(index) == 1 or len(index) * win_h * win_w <= _PASTE_CHUNK_ELEMENTS:
                break
            count = len(index) // 2
        start += len(index)
        if win_h == 0 or win_w == 0:
            continue
        idx = torch.tensor(index, device=masks.device)
        # Window origins that keep the window inside the image and cover the visible box.
        win_top = top[idx].clamp(max=height - win_h)
        win_left = left[idx].clamp(max=width - win_w)
        ys = win_top[:, None] + torch.arange(win_h, device=idx.device)  # [n, win_h]
        xs = win_left[:, None] + torch.arange(win_w, device=idx.device)  # [n, win_w]
        wy = _interpolation_matrix(y0[idx], y1[idx], ys, size + 2, masks.dtype)
        wx = _interpolation_matrix(x0[idx], x1[idx], xs, size + 2, masks.dtype)
        # Columns first, then rows: the order of F.interpolate's arithmetic, so that values
        # on the threshold (0.5 between a saturated 1 and the zero padding) round alike.
        inside = torch.bmm(wy, torch.bmm(padded[idx], wx.mT)) >= threshold  # [n, win_h, win_w]
        # Copying each window into its own plane is a strided copy; far faster than an
        # advanced-index assignment of the whole chunk.
        for i, y, x, window in zip(index, win_top.tolist(), win_left.tolist(), inside, strict=True):
            out[i, y : y + win_h, x : x + win_w] = window
    return out


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """torchvision's expand_boxes then truncation to int64: [R, 4] (x0, y0, x1, y1)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return expanded.to(torch.int64)


def _interpolation_matrix(
    start: Tensor, end: Tensor, pixels: Tensor, size: int, dtype: torch.dtype
) -> Tensor:
    """Bilinear weights [n, L, size] that resize a `size` axis to end - start + 1 pixels (at
    least 1) placed at `start`, as F.interpolate(align_corners=False), sampled at `pixels`;
    pixels outside [start, end] get zero rows.

    Args:
        start, end: [n] int64 first and last pixel of each box along the axis.
        pixels: [n, L] int64 image pixels (rows or columns) to compute weights for.
        size: P, the padded mask's side.
    """
    out_size = (end - start + 1).clamp(min=1).to(dtype)  # [n]
    offset = pixels - start[:, None]  # [n, L]
    inside = (pixels >= start[:, None]) & (pixels <= end[:, None])
    ratio = size / out_size  # as PyTorch's (float) input_size / output_size
    src = ((offset.to(dtype) + 0.5) * ratio[:, None] - 0.5).clamp(min=0)
    low = src.floor().to(torch.int64).clamp(max=size - 1)
    lam = (src - low.to(dtype)).clamp(0, 1)
    high = (low + 1).clamp(max=size - 1)
    weights = torch.zeros((*pixels.shape, size), dtype=dtype, device=pixels.device)
    zero = torch.zeros((), dtype=dtype, device=pixels.device)
    weights.scatter_add_(2, low[..., None], torch.where(inside, 1 - lam, zero)[..., None])
    weights.scatter_add_(2, high[..., None], torch.where(inside, lam, zero)[..., None])
    return weights
