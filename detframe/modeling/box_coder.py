"""Box regression deltas: the (dx, dy, dw, dh) parametrisation of R-CNN (Girshick et al. 2014).

Shapes:

    R   boxes (anchors or proposals)
    k   boxes predicted per source box (k classes for class-specific regression, else 1)

    src_boxes, target_boxes   [R, 4]      XYXY
    deltas                    [R, k * 4]  (dx, dy, dw, dh) per predicted box

Conventions (shared by torchvision's BoxCoder and detectron2's Box2BoxTransform): a box's
width is x2 - x1 (no +1), its centre x1 + 0.5 * width; with weights (wx, wy, ww, wh),

    dx = wx * (tx - sx) / sw      dw = ww * log(tw / sw)      (likewise y, h)

where s is the source box and t the target. Decoding clamps dw, dh to `scale_clamp` before
exp so that a huge predicted delta cannot overflow. Usual weights: (1, 1, 1, 1) for the RPN,
(10, 10, 5, 5) for the ROI box head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Box2BoxTransform"]

_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Encodes target boxes relative to source boxes as deltas, and decodes them back."""

    #: Numbers per box and per box delta: XYXY boxes, (dx, dy, dw, dh) deltas. Heads size
    #: their regression outputs by it (k * box_dim channels for k boxes).
    box_dim = 4

    def __init__(
        self,
        weights: Sequence[float],
        scale_clamp: float = _DEFAULT_SCALE_CLAMP,
    ) -> None:
        """
        Args:
            weights: (wx, wy, ww, wh), the scale each delta component is multiplied by.
            scale_clamp: upper bound of dw and dh when decoding (default log(1000 / 16)).

        Raises:
            ValueError: `weights` does not have 4 positive entries, or `scale_clamp` is NaN.
        """
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or not all(w > 0 for w in weights):
            raise ValueError(f"Box2BoxTransform: weights must be 4 positive numbers, got {weights}")
        if math.isnan(scale_clamp):
            raise ValueError(f"Box2BoxTransform: scale_clamp must not be NaN, got {scale_clamp}")
        self.weights: tuple[float, float, float, float] = weights  # type: ignore[assignment]
        self.scale_clamp = float(scale_clamp)

    def __repr__(self) -> str:
        return f"Box2BoxTransform(weights={self.weights}, scale_clamp={self.scale_clamp})"

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """The deltas that turn `src_boxes` into `target_boxes`.

        Args:
            src_boxes: [R, 4] XYXY source boxes (anchors or proposals), positive size.
            target_boxes: [R, 4] XYXY target boxes (usually matched ground truth).

        Returns:
            [R, 4] deltas (dx, dy, dw, dh), in the dtype of `src_boxes`.

        Raises:
            ValueError: the shapes are not both [R, 4].
        """
        _check_boxes("src_boxes", src_boxes)
        _check_boxes("target_boxes", target_boxes)
        if src_boxes.shape != target_boxes.shape:
            raise ValueError(
                f"get_deltas: src_boxes {tuple(src_boxes.shape)} and target_boxes "
                f"{tuple(target_boxes.shape)} must have the same shape"
            )
        target_boxes = target_boxes.to(src_boxes.dtype)
        src_widths = src_boxes[:, 2] - src_boxes[:, 0]
        src_heights = src_boxes[:, 3] - src_boxes[:, 1]
        src_ctr_x = src_boxes[:, 0] + 0.5 * src_widths
        src_ctr_y = src_boxes[:, 1] + 0.5 * src_heights

        target_widths = target_boxes[:, 2] - target_boxes[:, 0]
        target_heights = target_boxes[:, 3] - target_boxes[:, 1]
        target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
        target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights

        wx, wy, ww, wh = self.weights
        dx = wx * (target_ctr_x - src_ctr_x) / src_widths
        dy = wy * (target_ctr_y - src_ctr_y) / src_heights
        dw = ww * torch.log(target_widths / src_widths)
        dh = wh * torch.log(target_heights / src_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Decodes `deltas` relative to `boxes`.

        Args:
            deltas: [R, k * 4] deltas, k boxes per source box (e.g. one per class).
            boxes: [R, 4] XYXY source boxes; converted to the dtype of `deltas`.

        Returns:
            [R, k * 4] decoded XYXY boxes, in the dtype of `deltas`.

        Raises:
            ValueError: `boxes` is not [R, 4] or `deltas` is not [R, k * 4].
        """
        _check_boxes("boxes", boxes)
        if deltas.dim() != 2 or deltas.size(1) % 4 != 0 or deltas.size(0) != boxes.size(0):
            raise ValueError(
                f"apply_deltas: deltas must have shape [R, k * 4] with R = {boxes.size(0)} "
                f"(the number of boxes), got {tuple(deltas.shape)}"
            )
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]

        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        pred = torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
            dim=2,
        )
        return pred.reshape(deltas.shape)


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.size(1) != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"Box2BoxTransform: {name} must have shape [R, 4], got {shape}")
