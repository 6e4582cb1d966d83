"""RetinaNet (Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object Detection", 2017):
a one-stage detector, ResNet-FPN P3-P7 with a classification and a box subnet shared by the
levels, trained with the focal loss.

Shorthand: N images, L levels, A anchors per cell, K foreground classes, H_l x W_l the size
of level l, R_l = H_l * W_l * A anchors of level l, R = sum of R_l, G gt boxes of an image.

    features      L maps [N, C, H_l, W_l] (MODEL.RETINANET.IN_FEATURES)
    head outputs  per level: logits [N, A*K, H_l, W_l], deltas [N, A*4, H_l, W_l]
    flattened     logits [N, R_l, K], deltas [N, R_l, 4], anchors [R_l, 4]; location-major,
                  then anchor (the anchor generator's order), as torchvision and detectron2
    detections    N Instances(pred_boxes [D], scores [D], pred_classes [D]), D <=
                  DETECTIONS_PER_IMAGE, in the coordinates of the (resized) input

Training: every anchor is matched to the gt box of highest IoU (`Matcher`, thresholds
0.4 / 0.5, low-quality matches kept): foreground at IoU >= 0.5 (target: its gt class),
background below 0.4 (target: all zeros), ignored in between. The classification loss is the
sigmoid focal loss summed over the anchors that are not ignored, the box loss
(`dense_box_regression_loss`: smooth L1, L1 or GIoU) summed over the foreground anchors; both
are divided by the normaliser (LOSS_NORMALIZER):

- "moving_average" (detectron2): a running mean of the batch's foreground count (averaged
  over ranks), momentum 0.9, starting at 100; the losses are of the whole batch;
- "per_image" (torchvision): each image's losses divided by its own foreground count (at
  least 1), then averaged over the images.

Inference per image and level (torchvision's and detectron2's): sigmoid of every (anchor,
class) logit, those > SCORE_THRESH_TEST kept, the TOPK_CANDIDATES_TEST highest of them
decoded and clipped to the image; then, over all levels, NMS per class (NMS_THRESH_TEST) and
the DETECTIONS_PER_IMAGE highest scores.

With torchvision's settings (configs/torchvision/retinanet_resnet50_fpn.yaml: P6 from P5,
rounded ratio-major anchors, L1 box loss, "per_image") and converted weights it computes what
torchvision's `retinanet_resnet50_fpn` computes; detframe's class c is torchvision's label
c + 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detframe.config import declare
from detframe.layers import ShapeSpec, get_norm
from detframe.layers.losses import (
    BOX_REGRESSION_LOSS_TYPES,
    dense_box_regression_loss,
    sigmoid_focal_loss,
)
from detframe.registry import ANCHOR_GENERATOR_REGISTRY, META_ARCH_REGISTRY, build
from detframe.structures import Boxes, ImageList, Instances, pairwise_iou
from detframe.utils.comm import average_over_ranks

from ..anchors import DefaultAnchorGenerator  # noqa: F401  (declares MODEL.ANCHOR_GENERATOR.*)
from ..backbone import Backbone, build_backbone
from ..box_coder import Box2BoxTransform
from ..matcher import Matcher
from .base import MetaArchitecture

__all__ = ["RetinaNet", "RetinaNetHead"]

declare("MODEL.RETINANET.NUM_CLASSES", int, 80, "number of foreground classes K", min=1)
declare(
    "MODEL.RETINANET.IN_FEATURES",
    list[str],
    ["p3", "p4", "p5", "p6", "p7"],
    "backbone features the heads read, finest first",
)
declare("MODEL.RETINANET.NUM_CONVS", int, 4, "3x3 conv + ReLU layers of each subnet", min=0)
declare(
    "MODEL.RETINANET.NORM",
    str,
    "",
    "normalisation after each subnet conv ('' none; GN as torchvision's v2)",
    choices=("", "GN"),
)
declare(
    "MODEL.RETINANET.PRIOR_PROB",
    float,
    0.01,
    "initial foreground probability of every classification logit",
    min=0.0,
    max=1.0,
    min_exclusive=True,
    max_exclusive=True,
)
declare(
    "MODEL.RETINANET.IOU_THRESHOLDS",
    list[float],
    [0.4, 0.5],
    "IoU thresholds between the anchor labels IOU_LABELS, increasing",
    min=0.0,
    max=1.0,
)
declare(
    "MODEL.RETINANET.IOU_LABELS",
    list[int],
    [0, -1, 1],
    "anchor label per IoU interval: 0 background, -1 ignored, 1 foreground",
    choices=(-1, 0, 1),
)
declare("MODEL.RETINANET.FOCAL_LOSS_ALPHA", float, 0.25, "focal loss alpha; < 0 disables it")
declare("MODEL.RETINANET.FOCAL_LOSS_GAMMA", float, 2.0, "focal loss gamma", min=0.0)
declare(
    "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    list[float],
    [1.0, 1.0, 1.0, 1.0],
    "weights (wx, wy, ww, wh) of the anchor box deltas",
    min=0.0,
    min_exclusive=True,
)
declare(
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    str,
    "smooth_l1",
    "box loss: smooth L1 or L1 on deltas, or generalized IoU on decoded boxes",
    choices=BOX_REGRESSION_LOSS_TYPES,
)
declare(
    "MODEL.RETINANET.SMOOTH_L1_BETA",
    float,
    0.1,
    "beta of the smooth L1 box loss; 0 is L1",
    min=0.0,
)
declare(
    "MODEL.RETINANET.LOSS_NORMALIZER",
    str,
    "moving_average",
    "losses divided by a running mean of the foreground count (detectron2) or per image "
    "by its own (torchvision)",
    choices=("moving_average", "per_image"),
)
declare(
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    float,
    0.05,
    "detections need a class probability > this",
    min=0.0,
    max=1.0,
)
declare(
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST",
    int,
    1000,
    "candidates kept per level (highest probabilities) before NMS",
    min=1,
)
declare(
    "MODEL.RETINANET.NMS_THRESH_TEST",
    float,
    0.5,
    "IoU threshold of the per-class NMS of detections",
    min=0.0,
    max=1.0,
)
declare(
    "MODEL.RETINANET.DETECTIONS_PER_IMAGE",
    int,
    100,
    "detections kept per image (torchvision: 300)",
    min=1,
)

# detectron2's moving-average loss normaliser: momentum and starting value.
_NORMALIZER_MOMENTUM = 0.9
_NORMALIZER_START = 100.0


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared by every level.

    Each subnet is `num_convs` x (3x3 conv, `norm`, ReLU) with `in_channels` channels, then a
    3x3 conv to A*K logits (`cls_score`) or A*4 deltas (`bbox_pred`). Weights are N(0, 0.01),
    biases 0, and the logits' bias -log((1 - prior_prob) / prior_prob), as in the paper.

    Args:
        in_channels: C, the same at every level.
        num_anchors: A.
        num_classes: K.
        num_convs: conv layers of each subnet.
        norm: "" or "GN" (32 groups; the convs then have no bias).
        prior_prob: the initial probability of every class.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_anchors", num_anchors)):
            if value < 1:
                raise ValueError(f"RetinaNetHead: {name} must be >= 1, got {value}")
        if num_classes < 1:
            raise ValueError(f"RetinaNetHead: num_classes must be >= 1, got {num_classes}")
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        for subnet in ("cls", "bbox"):
            convs = nn.ModuleList(
                nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=not norm)
                for _ in range(num_convs)
            )
            norms = nn.ModuleList(
                get_norm(norm, in_channels) or nn.Identity() for _ in range(num_convs)
            )
            setattr(self, f"{subnet}_convs", convs)
            setattr(self, f"{subnet}_norms", norms)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """L maps [N, C, H_l, W_l] -> (logits [N, A*K, H_l, W_l], deltas [N, A*4, H_l, W_l])
        per level."""
        logits, deltas = [], []
        for x in features:
            logits.append(self.cls_score(self._subnet(x, self.cls_convs, self.cls_norms)))
            deltas.append(self.bbox_pred(self._subnet(x, self.bbox_convs, self.bbox_norms)))
        return logits, deltas

    @staticmethod
    def _subnet(x: Tensor, convs: nn.ModuleList, norms: nn.ModuleList) -> Tensor:
        for conv, norm in zip(convs, norms, strict=True):
            x = torch.relu(norm(conv(x)))
        return x


def _flatten(x: Tensor, width: int) -> Tensor:
    """[N, A*width, H, W] -> [N, H*W*A, width] (location-major, then anchor)."""
    n, _, h, w = x.shape
    return x.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


@META_ARCH_REGISTRY.register()
class RetinaNet(MetaArchitecture):
    """A one-stage detector (see the module docstring).

    Args:
        backbone: images [N, 3, H', W'] -> named feature maps, including `in_features`.
        head: L maps -> per level logits [N, A*K, H_l, W_l] and deltas [N, A*4, H_l, W_l];
            has `num_classes` (e.g. `RetinaNetHead`).
        in_features: the backbone maps the head reads, finest first.
        anchor_generator: the maps -> anchors per level [R_l, 4]; has `num_anchors`.
        box2box_transform: encodes and decodes the anchor deltas.
        anchor_matcher: IoU [G, R] -> (matches [R], labels [R] in {1, 0, -1}).
        focal_loss_alpha, focal_loss_gamma: of the classification loss.
        box_reg_loss_type: "smooth_l1", "l1" or "giou".
        smooth_l1_beta: beta of "smooth_l1".
        loss_normalizer: "moving_average" or "per_image" (see the module docstring).
        test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
            inference (see the module docstring).
        pixel_mean, pixel_std: see `MetaArchitecture`.
    """

    NUM_CLASSES_KEY = "MODEL.RETINANET.NUM_CLASSES"

    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        in_features: Sequence[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.1,
        loss_normalizer: str = "moving_average",
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            size_divisibility=backbone.size_divisibility,
        )
        if loss_normalizer not in ("moving_average", "per_image"):
            raise ValueError(
                "RetinaNet: loss_normalizer must be 'moving_average' or 'per_image', got "
                f"{loss_normalizer!r}"
            )
        if box_reg_loss_type not in BOX_REGRESSION_LOSS_TYPES:
            raise ValueError(
                f"RetinaNet: box_reg_loss_type must be one of {BOX_REGRESSION_LOSS_TYPES}, got "
                f"{box_reg_loss_type!r}"
            )
        self.backbone = backbone
        self.head = head
        self.in_features = list(in_features)
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.num_classes = head.num_classes
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalizer = loss_normalizer
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        # The moving average of the foreground count ("moving_average"); a plain attribute,
        # as in detectron2: it restarts at its start value when a run resumes.
        self.normalizer_average = _NORMALIZER_START

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        """Reads MODEL.RETINANET.*; builds the backbone (MODEL.BACKBONE.NAME), the anchor
        generator (MODEL.ANCHOR_GENERATOR.NAME, on the IN_FEATURES levels) and the head.

        Raises:
            ValueError: an IN_FEATURES name the backbone does not produce, or levels of
                different channel counts.
        """
        section = cfg.MODEL.RETINANET
        backbone = build_backbone(cfg)
        shapes: Mapping[str, ShapeSpec] = backbone.output_shape()
        in_features = list(section.IN_FEATURES)
        missing = [f for f in in_features if f not in shapes]
        channels = {shapes[f].channels for f in in_features if f in shapes}
        if missing or len(channels) != 1:
            given = {name: shape.channels for name, shape in shapes.items()}
            raise ValueError(
                f"MODEL.RETINANET.IN_FEATURES: {in_features} must name backbone outputs of one "
                f"channel count; the backbone gives (name: channels) {given}"
            )
        levels = [shapes[f] for f in in_features]
        anchor_generator = build(
            ANCHOR_GENERATOR_REGISTRY, cfg.MODEL.ANCHOR_GENERATOR.NAME, cfg, levels
        )
        head = RetinaNetHead(
            in_channels=channels.pop(),
            num_anchors=anchor_generator.num_anchors,
            num_classes=section.NUM_CLASSES,
            num_convs=section.NUM_CONVS,
            norm=section.NORM,
            prior_prob=section.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "in_features": in_features,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=tuple(section.BBOX_REG_WEIGHTS)),
            "anchor_matcher": Matcher(
                list(section.IOU_THRESHOLDS),
                list(section.IOU_LABELS),
                allow_low_quality_matches=True,
            ),
            "focal_loss_alpha": section.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": section.FOCAL_LOSS_GAMMA,
            "box_reg_loss_type": section.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": section.SMOOTH_L1_BETA,
            "loss_normalizer": section.LOSS_NORMALIZER,
            "test_score_thresh": section.SCORE_THRESH_TEST,
            "test_topk_candidates": section.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": section.NMS_THRESH_TEST,
            "max_detections_per_image": section.DETECTIONS_PER_IMAGE,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Detections (evaluation mode; in the coordinates of `images`) and the losses (when
        `targets` are given)."""
        features = self.backbone(images.tensor)
        maps = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(maps, image_size=tuple(images.tensor.shape[-2:]))
        logits, deltas = self.head(maps)
        logits = [_flatten(x, self.num_classes) for x in logits]
        deltas = [_flatten(x, 4) for x in deltas]
        losses: dict[str, Tensor] = {}
        if targets is not None:
            gt_classes, gt_boxes = self.label_anchors(torch.cat(anchors), targets)
            losses = self.losses(torch.cat(anchors), logits, deltas, gt_classes, gt_boxes)
        if self.training:
            return [], losses
        return self.decode_detections(anchors, logits, deltas, images.image_sizes), losses

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, targets: Sequence[Instances]) -> tuple[Tensor, Tensor]:
        """Each anchor's target class and box (see the module docstring).

        Args:
            anchors: [R, 4] the anchors of all levels.
            targets: N Instances with gt_boxes and gt_classes (G may be 0).

        Returns:
            (gt_classes [N, R] int64: the class in [0, K) for foreground, K for background,
            -1 ignored; gt_boxes [N, R, 4]: the matched gt box, zeros where there is none).
        """
        classes, boxes = [], []
        for target in targets:
            gt_boxes = target.gt_boxes.to(anchors.device)
            matches, labels = self.anchor_matcher(pairwise_iou(gt_boxes, Boxes(anchors)))
            if len(target) > 0:
                gt_classes = target.gt_classes.to(anchors.device, torch.int64)[matches]
                matched = gt_boxes.tensor[matches]
            else:
                gt_classes = torch.zeros_like(matches)
                matched = torch.zeros_like(anchors)
            gt_classes = torch.where(labels == 0, self.num_classes, gt_classes)
            classes.append(torch.where(labels == -1, -1, gt_classes))
            boxes.append(matched)
        return torch.stack(classes), torch.stack(boxes)

    def losses(
        self,
        anchors: Tensor,
        pred_logits: Sequence[Tensor],
        pred_deltas: Sequence[Tensor],
        gt_classes: Tensor,
        gt_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box_reg"} (see the module docstring).

        Args:
            anchors: [R, 4].
            pred_logits: per level [N, R_l, K].
            pred_deltas: per level [N, R_l, 4].
            gt_classes: [N, R] from `label_anchors`.
            gt_boxes: [N, R, 4] from `label_anchors`.
        """
        logits = torch.cat(list(pred_logits), dim=1)  # [N, R, K]
        deltas = torch.cat(list(pred_deltas), dim=1)  # [N, R, 4]
        valid = gt_classes >= 0
        foreground = valid & (gt_classes < self.num_classes)
        # One-hot targets with the background column dropped: background is all zeros.
        targets = nn.functional.one_hot(gt_classes.clamp(min=0), self.num_classes + 1)
        targets = targets[..., : self.num_classes].to(logits.dtype)
        cls_per_anchor = sigmoid_focal_loss(
            logits, targets, self.focal_loss_alpha, self.focal_loss_gamma
        ).sum(dim=2)  # [N, R]
        cls_per_image = (cls_per_anchor * valid).sum(dim=1)
        box_per_image = torch.stack(
            [
                dense_box_regression_loss(
                    anchors.to(deltas.dtype),
                    self.box2box_transform,
                    deltas[i : i + 1],
                    gt_boxes[i : i + 1].to(deltas.dtype),
                    foreground[i : i + 1],
                    self.box_reg_loss_type,
                    self.smooth_l1_beta,
                )
                for i in range(len(deltas))
            ]
        )
        fg_per_image = foreground.sum(dim=1)
        if self.loss_normalizer == "per_image":
            normalizer = fg_per_image.clamp(min=1).to(logits.dtype)
            return {
                "loss_cls": (cls_per_image / normalizer).mean(),
                "loss_box_reg": (box_per_image / normalizer).mean(),
            }
        count = fg_per_image.sum()
        if self.training:
            count = average_over_ranks(count)
            self.normalizer_average = _NORMALIZER_MOMENTUM * self.normalizer_average + (
                1 - _NORMALIZER_MOMENTUM
            ) * max(float(count), 1.0)
            normalizer = self.normalizer_average
        else:
            normalizer = max(float(count), 1.0)
        return {
            "loss_cls": cls_per_image.sum() / normalizer,
            "loss_box_reg": box_per_image.sum() / normalizer,
        }

    def decode_detections(
        self,
        anchors: Sequence[Tensor],
        pred_logits: Sequence[Tensor],
        pred_deltas: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Instances]:
        """Detections per image (see the module docstring).

        Args:
            anchors: per level [R_l, 4].
            pred_logits: per level [N, R_l, K].
            pred_deltas: per level [N, R_l, 4].
            image_sizes: N (height, width) to clip to.
        """
        results = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, classes = [], [], []
            for anchors_l, logits_l, deltas_l in zip(
                anchors, pred_logits, pred_deltas, strict=True
            ):
                probs = logits_l[i].detach().flatten().sigmoid()  # [R_l * K]
                candidates = torch.nonzero(probs > self.test_score_thresh).squeeze(1)
                k = min(self.test_topk_candidates, candidates.numel())
                top_probs, order = probs[candidates].topk(k)
                flat = candidates[order]
                anchor_index = torch.div(flat, self.num_classes, rounding_mode="floor")
                decoded = self.box2box_transform.apply_deltas(
                    deltas_l[i].detach()[anchor_index], anchors_l.to(deltas_l.dtype)[anchor_index]
                )
                box = Boxes(decoded)
                box.clip(image_size)
                boxes.append(box.tensor)
                scores.append(top_probs)
                classes.append(flat % self.num_classes)
            boxes_t, scores_t, classes_t = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
            keep = batched_nms(boxes_t, scores_t, classes_t, self.test_nms_thresh)
            keep = keep[: self.max_detections_per_image]
            results.append(
                Instances(
                    tuple(image_size),
                    pred_boxes=Boxes(boxes_t[keep]),
                    scores=scores_t[keep],
                    pred_classes=classes_t[keep],
                )
            )
        return results
