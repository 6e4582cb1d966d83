"""Box regression losses: smooth L1 (Fast R-CNN) and generalized IoU (Rezatofighi et al. 2019).

Shapes:

    R   boxes (or rows of deltas)

    smooth_l1_loss   input, target [*] (any shape, equal)   -> same shape, or a scalar
    giou_loss        boxes1, boxes2 [R, 4] XYXY             -> [R], or a scalar

Reductions: "none" keeps the elementwise loss, "sum" adds it up, "mean" averages it; the
mean of an empty input is 0 (not NaN) and keeps the graph (0 * sum), so an image or batch
without foreground still backpropagates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["giou_loss", "smooth_l1_loss"]

_REDUCTIONS = ("none", "sum", "mean")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float, reduction: str = "none") -> Tensor:
    """Smooth L1 loss: 0.5 * d**2 / beta where |d| < beta, else |d| - 0.5 * beta.

    Args:
        input: predictions, any shape.
        target: targets, the shape of `input`.
        beta: the width of the quadratic zone; beta < 1e-5 gives the L1 loss |d|
            (detectron2's default 0.0); torchvision's detection models use 1/9.
        reduction: "none", "sum" or "mean" (0 for an empty input).

    Returns:
        The elementwise loss (shape of `input`) for "none", else a scalar. Same values as
        `torch.nn.functional.smooth_l1_loss` (beta >= 1e-5) and `l1_loss` (beta < 1e-5).

    Raises:
        ValueError: `beta` < 0, an unknown `reduction`, or shapes differ.
    """
    _check_reduction("smooth_l1_loss", reduction)
    if not beta >= 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    if input.shape != target.shape:
        raise ValueError(
            f"smooth_l1_loss: input {tuple(input.shape)} and target {tuple(target.shape)} "
            "must have the same shape"
        )
    if beta < 1e-5:
        loss = F.l1_loss(input, target, reduction="none")
    else:
        loss = F.smooth_l1_loss(input, target, reduction="none", beta=beta)
    return _reduce(loss, reduction)


def giou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - generalized IoU of corresponding boxes.

    GIoU = IoU - (area(C) - area(union)) / area(C), C the smallest box enclosing both;
    the loss is in [0, 2], 0 for identical boxes.

    Args:
        boxes1: [R, 4] XYXY boxes (e.g. predicted), x2 >= x1 and y2 >= y1.
        boxes2: [R, 4] XYXY boxes (e.g. ground truth), likewise.
        reduction: "none", "sum" or "mean" (0 for R == 0).
        eps: added to the denominators of IoU and of the enclosing term.

    Returns:
        [R] losses for "none", else a scalar. Same values as
        `torchvision.ops.generalized_box_iou_loss`.

    Raises:
        ValueError: shapes are not both [R, 4], an unknown `reduction`, or a box with
            x2 < x1 or y2 < y1.
    """
    _check_reduction("giou_loss", reduction)
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.size(1) != 4:
            raise ValueError(f"giou_loss: {name} must have shape [R, 4], got {tuple(boxes.shape)}")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"giou_loss: boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} must "
            "have the same shape"
        )
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    if not bool(((x2 >= x1) & (y2 >= y1) & (x2g >= x1g) & (y2g >= y1g)).all()):
        raise ValueError("giou_loss: every box must have x2 >= x1 and y2 >= y1")

    intersection_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    intersection_h = (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    intersection = intersection_w * intersection_h
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)

    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (
        torch.max(y2, y2g) - torch.min(y1, y1g)
    )
    giou = iou - ((enclosing - union) / (enclosing + eps))
    return _reduce(1 - giou, reduction)
