"""Fast R-CNN outputs: class scores and box deltas per ROI, their losses, and detections.

Shapes: R ROIs (all images together), R_i of image i, D box-head features, K foreground
classes, B = K (class-specific regression) or 1 (class-agnostic), N detections of an image.

    features         [R, D] (or [R, C, S, S], flattened)
    scores           [R, K + 1]   logits; column K is the background (detectron2's layout)
    proposal_deltas  [R, B * 4]   (dx, dy, dw, dh) per class, encoded by Box2BoxTransform

Training targets come as per-image `Instances` with `proposal_boxes` (Boxes [R_i]),
`gt_classes` (int64 [R_i], K = background) and `gt_boxes` (Boxes [R_i], the matched gt box;
anything for background). Detections are per-image `Instances` with `pred_boxes` (Boxes [N]),
`scores` [N] and `pred_classes` (int64 [N], in [0, K)).

Against torchvision's `RoIHeads` (labels 0 = background, 1..K): detframe class c is its label
c + 1, its `fastrcnn_loss` is this loss with SMOOTH_L1_BETA 1/9, and its
`postprocess_detections` is `inference` with MIN_SIZE_TEST 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detframe.config import declare
from detframe.layers.losses import giou_loss, smooth_l1_loss
from detframe.registry import BOX_PREDICTOR_REGISTRY
from detframe.structures import Boxes, Instances
from detframe.utils.comm import average_over_ranks

from ..box_coder import Box2BoxTransform

__all__ = ["FastRCNNOutputLayers", "foreground_mask"]

declare(
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
    list[float],
    [10.0, 10.0, 5.0, 5.0],
    "weights (wx, wy, ww, wh) of the ROI box deltas",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA",
    float,
    0.0,
    "beta of the ROI box smooth-L1 loss; 0 is L1 (torchvision: 1/9)",
    min=0,
)
declare(
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
    str,
    "smooth_l1",
    "ROI box regression loss: smooth L1 on deltas, or generalized IoU on decoded boxes",
    choices=("smooth_l1", "giou"),
)
declare(
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
    bool,
    False,
    "predict one box per ROI instead of one per class",
)
declare(
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    float,
    0.05,
    "detections need a class score > this",
    min=0,
    max=1,
)
declare(
    "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    float,
    0.5,
    "IoU threshold of the per-class NMS of detections",
    min=0,
    max=1,
)
declare(
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", int, 100, "detections kept per image, by score", min=0
)
declare(
    "MODEL.ROI_HEADS.MIN_SIZE_TEST",
    float,
    0.0,
    "detections need width and height >= this (after clipping); 0 keeps all (torchvision: 0.01)",
    min=0,
)


def foreground_mask(gt_classes: Tensor, num_classes: int) -> Tensor:
    """[R] bool: which ROIs are labelled with a foreground class, in [0, K) (K is the
    background, -1 ignored)."""
    return (gt_classes >= 0) & (gt_classes < num_classes)


@BOX_PREDICTOR_REGISTRY.register()
class FastRCNNOutputLayers(nn.Module):
    """Two linear layers: `cls_score` (K + 1 logits, background last) and `bbox_pred`.

    Args:
        input_size: D, features per ROI from the box head.
        num_classes: K, foreground classes.
        box2box_transform: encodes and decodes the deltas (weights (10, 10, 5, 5) usually).
        cls_agnostic_bbox_reg: one box (4 deltas) per ROI instead of K.
        smooth_l1_beta: beta of the smooth-L1 box loss; < 1e-5 is L1.
        box_reg_loss_type: "smooth_l1" on deltas or "giou" on decoded boxes.
        test_score_thresh: detections need a score > this.
        test_nms_thresh: IoU threshold of the per-class NMS.
        test_topk_per_image: detections kept per image (highest scores).
        test_min_size: detections need width and height >= this; 0 disables the filter.

    Initialisation as detectron2: cls_score normal std 0.01, bbox_pred normal std 0.001,
    biases 0.
    """

    def __init__(
        self,
        *,
        input_size: int,
        num_classes: int,
        box2box_transform: Box2BoxTransform,
        cls_agnostic_bbox_reg: bool = False,
        smooth_l1_beta: float = 0.0,
        box_reg_loss_type: str = "smooth_l1",
        test_score_thresh: float = 0.05,
        test_nms_thresh: float = 0.5,
        test_topk_per_image: int = 100,
        test_min_size: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if box_reg_loss_type not in ("smooth_l1", "giou"):
            raise ValueError(
                f"box_reg_loss_type must be 'smooth_l1' or 'giou', got {box_reg_loss_type!r}"
            )
        if test_topk_per_image < 0:
            raise ValueError(f"test_topk_per_image must be >= 0, got {test_topk_per_image}")
        self.num_classes = num_classes
        self.cls_agnostic_bbox_reg = cls_agnostic_bbox_reg
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        num_boxes = 1 if cls_agnostic_bbox_reg else num_classes
        self.bbox_pred = nn.Linear(input_size, num_boxes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box2box_transform = box2box_transform
        self.smooth_l1_beta = smooth_l1_beta
        self.box_reg_loss_type = box_reg_loss_type
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.test_topk_per_image = test_topk_per_image
        self.test_min_size = test_min_size

    @classmethod
    def from_config(cls, cfg: DictConfig, input_size: int) -> dict[str, Any]:
        """`input_size`: D, the box head's `output_size`."""
        box, heads = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_HEADS
        return {
            "input_size": input_size,
            "num_classes": heads.NUM_CLASSES,
            "box2box_transform": Box2BoxTransform(weights=tuple(box.BBOX_REG_WEIGHTS)),
            "cls_agnostic_bbox_reg": box.CLS_AGNOSTIC_BBOX_REG,
            "smooth_l1_beta": box.SMOOTH_L1_BETA,
            "box_reg_loss_type": box.BBOX_REG_LOSS_TYPE,
            "test_score_thresh": heads.SCORE_THRESH_TEST,
            "test_nms_thresh": heads.NMS_THRESH_TEST,
            "test_topk_per_image": heads.DETECTIONS_PER_IMAGE,
            "test_min_size": heads.MIN_SIZE_TEST,
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Box features [R, D] (or [R, C, S, S]) -> (scores [R, K + 1], deltas [R, B * 4])."""
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)

    def losses(
        self, predictions: tuple[Tensor, Tensor], proposals: Sequence[Instances]
    ) -> dict[str, Tensor]:
        """Classification and box-regression losses of sampled ROIs.

        Args:
            predictions: (scores [R, K + 1], deltas [R, B * 4]) of `forward`.
            proposals: per image, the sampled ROIs in the order of `predictions`, with
                `proposal_boxes`, `gt_classes` and `gt_boxes` (see the module docstring).

        Returns:
            {"loss_cls": cross-entropy averaged over the R ROIs, "loss_box_reg": the box loss
            summed over foreground ROIs (deltas of their gt class) and divided by R}; both 0
            (with gradients) when R is 0. In training mode R is averaged over the ranks of a
            distributed run (`average_over_ranks`), so that data-parallel training computes
            the gradients of the whole batch.
        """
        scores, deltas = predictions
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        proposal_boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
        gt_boxes = torch.cat([p.gt_boxes.tensor for p in proposals])
        count = torch.tensor(gt_classes.numel(), device=scores.device)
        normalizer = average_over_ranks(count) if self.training else count.clamp(min=1)
        loss_cls = F.cross_entropy(scores, gt_classes, reduction="sum") / normalizer

        fg = torch.nonzero(foreground_mask(gt_classes, self.num_classes)).squeeze(1)
        if self.cls_agnostic_bbox_reg:
            fg_deltas = deltas[fg]
        else:
            fg_deltas = deltas.view(-1, self.num_classes, 4)[fg, gt_classes[fg]]
        fg_proposals = proposal_boxes[fg].to(deltas.dtype)
        fg_gt_boxes = gt_boxes[fg].to(deltas.dtype)
        if self.box_reg_loss_type == "smooth_l1":
            targets = self.box2box_transform.get_deltas(fg_proposals, fg_gt_boxes)
            loss_box = smooth_l1_loss(fg_deltas, targets, self.smooth_l1_beta, reduction="sum")
        else:
            fg_pred_boxes = self.box2box_transform.apply_deltas(fg_deltas, fg_proposals)
            loss_box = giou_loss(fg_pred_boxes, fg_gt_boxes, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / normalizer}

    def predict_boxes(
        self, predictions: tuple[Tensor, Tensor], proposals: Sequence[Instances]
    ) -> list[Tensor]:
        """Decoded boxes per image: [R_i, B * 4] from `proposal_boxes` and the deltas."""
        _, deltas = predictions
        boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
        decoded = self.box2box_transform.apply_deltas(deltas, boxes.to(deltas.dtype))
        return list(decoded.split([len(p) for p in proposals]))

    def predict_probs(
        self, predictions: tuple[Tensor, Tensor], proposals: Sequence[Instances]
    ) -> list[Tensor]:
        """Class probabilities per image: softmax [R_i, K + 1] (background last)."""
        scores, _ = predictions
        return list(F.softmax(scores, dim=-1).split([len(p) for p in proposals]))

    def inference(
        self, predictions: tuple[Tensor, Tensor], proposals: Sequence[Instances]
    ) -> list[Instances]:
        """Detections per image (see the module docstring).

        Per image: decode every class's box, clip to the image, keep (ROI, class) pairs with
        score > test_score_thresh (and width, height >= test_min_size when it is > 0),
        class-wise NMS, then the test_topk_per_image best, sorted by score (descending).

        Args:
            predictions: (scores, deltas) of `forward` for the ROIs of `proposals`.
            proposals: per image, ROIs with `proposal_boxes`, in the order of
                `predictions`; their `image_size` is the size to clip to.
        """
        boxes = self.predict_boxes(predictions, proposals)
        probs = self.predict_probs(predictions, proposals)
        return [
            self._inference_single(b, s, p.image_size)
            for b, s, p in zip(boxes, probs, proposals, strict=True)
        ]

    def _inference_single(
        self, boxes: Tensor, probs: Tensor, image_size: tuple[int, int]
    ) -> Instances:
        """boxes [R, B * 4], probs [R, K + 1] -> Instances of N detections."""
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        if not valid.all():
            boxes, probs = boxes[valid], probs[valid]
        probs = probs[:, :-1]  # [R, K], background dropped
        num_boxes = boxes.size(1) // 4
        boxes = _clip(boxes.view(-1, num_boxes, 4), image_size)  # [R, B, 4]

        keep_mask = probs > self.test_score_thresh  # [R, K], (ROI, class) pairs
        pairs = keep_mask.nonzero()  # [P, 2] in row-major order
        boxes = boxes[pairs[:, 0], 0] if num_boxes == 1 else boxes[keep_mask]
        scores = probs[keep_mask]
        classes = pairs[:, 1]
        if self.test_min_size > 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            large = (wh >= self.test_min_size).all(dim=1)
            boxes, scores, classes = boxes[large], scores[large], classes[large]
        keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)
        keep = keep[: self.test_topk_per_image]
        return Instances(
            image_size,
            pred_boxes=Boxes(boxes[keep]),
            scores=scores[keep],
            pred_classes=classes[keep],
        )


def _clip(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Boxes [..., 4] clipped to an image of (height, width), out of place."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
