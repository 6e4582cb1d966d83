"""Box regression losses: smooth L1 (Fast R-CNN), generalized IoU (Rezatofighi et al. 2019),
and the dense box-regression loss of anchor-based heads (RPN, RetinaNet) built on them; the
sigmoid focal loss of RetinaNet's classification (Lin et al. 2017).

Shapes:

    R   boxes (or rows of deltas)
    N   images
    A   anchors (of all levels together)
    B   numbers per box and per box delta (4: XYXY boxes, (dx, dy, dw, dh) deltas)

    smooth_l1_loss              input, target [*] (any shape, equal) -> same shape, or a scalar
    giou_loss                   boxes1, boxes2 [R, 4] XYXY           -> [R], or a scalar
    sigmoid_focal_loss          logits, targets [*] (any shape, equal) -> same shape, or a scalar
    dense_box_regression_loss   anchors [A, B], deltas [N, A, B], matched gt boxes [N, A, B],
                                foreground mask [N, A]               -> a scalar (sum)

Reductions: "none" keeps the elementwise loss, "sum" adds it up, "mean" averages it; the
mean of an empty input is 0 (not NaN) and keeps the graph (0 * sum), so an image or batch
without foreground still backpropagates.

Dense box-regression loss types (`BOX_REGRESSION_LOSS_TYPES`, detectron2's
`_dense_box_regression_loss`): "smooth_l1" between predicted and target deltas (beta
`smooth_l1_beta`; 0 is L1), "l1" between the deltas whatever the beta, "giou" between the
boxes the predicted deltas decode to and the matched gt boxes. This module knows nothing of
models: the box transform is anything with `get_deltas` and `apply_deltas` (`BoxTransform`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BOX_REGRESSION_LOSS_TYPES",
    "BoxTransform",
    "dense_box_regression_loss",
    "giou_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
]

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


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss: FL = -alpha_t * (1 - p_t)**gamma * log(p_t), elementwise.

    p = sigmoid(inputs), p_t = p * t + (1 - p) * (1 - t) and alpha_t = alpha * t +
    (1 - alpha) * (1 - t) for targets t (0 or 1, or soft targets in between). The log term is
    `binary_cross_entropy_with_logits`, finite for any logit; (1 - p_t) is formed as
    p + t - 2 * p * t, which is p itself where t = 0 and 1 - p where t = 1. No logit (+-100
    included) makes a value or a gradient infinite or NaN, for gamma = 0 or >= 1 (for
    0 < gamma < 1 the derivative of (1 - p_t)**gamma is infinite where 1 - p_t rounds to 0,
    and the gradient there NaN, as torchvision's).

    Args:
        inputs: logits, any shape.
        targets: float targets in [0, 1], the shape (and dtype) of `inputs`.
        alpha: weight of the positives in [0, 1] (the negatives get 1 - alpha); a negative
            value (torchvision's -1) weighs every element 1.
        gamma: exponent >= 0 of the modulating factor (1 - p_t); 0 gives the (alpha-weighted)
            binary cross-entropy.
        reduction: "none", "sum" or "mean" (0 for an empty input).

    Returns:
        The elementwise loss (shape of `inputs`) for "none", else a scalar. The values of
        `torchvision.ops.sigmoid_focal_loss` (up to rounding), with fewer temporaries.

    Raises:
        ValueError: alpha > 1, gamma < 0, an unknown `reduction`, or shapes differ.
    """
    _check_reduction("sigmoid_focal_loss", reduction)
    if not alpha <= 1:
        raise ValueError(f"sigmoid_focal_loss: alpha must be <= 1 (< 0 disables it), got {alpha}")
    if not gamma >= 0:
        raise ValueError(f"sigmoid_focal_loss: gamma must be >= 0, got {gamma}")
    if inputs.shape != targets.shape:
        raise ValueError(
            f"sigmoid_focal_loss: inputs {tuple(inputs.shape)} and targets "
            f"{tuple(targets.shape)} must have the same shape"
        )
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if gamma != 0:
        p = torch.sigmoid(inputs)
        # 1 - p_t = p + t - 2 p t; add_ on addcmul's fresh output is safe for autograd.
        loss = loss * torch.addcmul(p, p, targets, value=-2.0).add_(targets).pow(gamma)
    if alpha >= 0:
        # alpha_t = (1 - alpha) + (2 alpha - 1) t
        loss = loss * targets.mul(2 * alpha - 1).add_(1 - alpha)
    return _reduce(loss, reduction)


class BoxTransform(Protocol):
    """Encodes boxes as deltas relative to source boxes and decodes them back (e.g.
    `detframe.modeling.box_coder.Box2BoxTransform`)."""

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """[R, B] source and target boxes -> [R, B] deltas."""
        ...

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """[R, B] deltas and source boxes -> [R, B] decoded boxes."""
        ...


# The dense losses: (box transform, foreground anchors [F, B], their predicted deltas
# [F, B], their matched gt boxes [F, B], smooth L1 beta) -> the loss summed over the F anchors.


def _smooth_l1_of_deltas(
    transform: BoxTransform, anchors: Tensor, deltas: Tensor, gt_boxes: Tensor, beta: float
) -> Tensor:
    return smooth_l1_loss(deltas, transform.get_deltas(anchors, gt_boxes), beta, "sum")


def _l1_of_deltas(
    transform: BoxTransform, anchors: Tensor, deltas: Tensor, gt_boxes: Tensor, beta: float
) -> Tensor:
    del beta
    return smooth_l1_loss(deltas, transform.get_deltas(anchors, gt_boxes), 0.0, "sum")


def _giou_of_decoded_boxes(
    transform: BoxTransform, anchors: Tensor, deltas: Tensor, gt_boxes: Tensor, beta: float
) -> Tensor:
    del beta
    return giou_loss(transform.apply_deltas(deltas, anchors), gt_boxes, "sum")


_DENSE_BOX_LOSSES: dict[str, Callable[[BoxTransform, Tensor, Tensor, Tensor, float], Tensor]] = {
    "smooth_l1": _smooth_l1_of_deltas,
    "l1": _l1_of_deltas,
    "giou": _giou_of_decoded_boxes,
}
BOX_REGRESSION_LOSS_TYPES = tuple(_DENSE_BOX_LOSSES)


def dense_box_regression_loss(
    anchors: Tensor,
    box2box_transform: BoxTransform,
    pred_anchor_deltas: Tensor,
    gt_boxes: Tensor,
    fg_mask: Tensor,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> Tensor:
    """The box-regression loss of a dense (per-anchor) head, summed over foreground anchors.

    Args:
        anchors: [A, B] anchors of all levels, shared by the N images.
        box2box_transform: encodes gt boxes as deltas ("smooth_l1", "l1") or decodes the
            predicted deltas ("giou"), relative to the anchors.
        pred_anchor_deltas: [N, A, B] predicted deltas.
        gt_boxes: [N, A, B] the gt box matched to each anchor (any value where `fg_mask` is
            False).
        fg_mask: [N, A] bool, the anchors whose box is regressed.
        loss_type: one of `BOX_REGRESSION_LOSS_TYPES` (see the module docstring).
        smooth_l1_beta: beta of "smooth_l1" (0 gives L1).

    Returns:
        A scalar, the sum over foreground anchors (0 with a graph when there are none); the
        caller normalises it.

    Raises:
        ValueError: an unknown `loss_type`, or shapes that do not match.
    """
    loss = _DENSE_BOX_LOSSES.get(loss_type)
    if loss is None:
        raise ValueError(
            f"dense_box_regression_loss: loss_type must be one of {BOX_REGRESSION_LOSS_TYPES}, "
            f"got {loss_type!r}"
        )
    num_images = pred_anchor_deltas.size(0)
    if (
        pred_anchor_deltas.dim() != 3
        or gt_boxes.shape != pred_anchor_deltas.shape
        or anchors.shape != pred_anchor_deltas.shape[1:]
        or fg_mask.shape != pred_anchor_deltas.shape[:2]
    ):
        raise ValueError(
            "dense_box_regression_loss: expected anchors [A, B], pred_anchor_deltas and "
            "gt_boxes [N, A, B], fg_mask [N, A]; got "
            f"{tuple(anchors.shape)}, {tuple(pred_anchor_deltas.shape)}, "
            f"{tuple(gt_boxes.shape)}, {tuple(fg_mask.shape)}"
        )
    fg_anchors = anchors.expand(num_images, -1, -1)[fg_mask]
    return loss(
        box2box_transform,
        fg_anchors,
        pred_anchor_deltas[fg_mask],
        gt_boxes[fg_mask],
        smooth_l1_beta,
    )
