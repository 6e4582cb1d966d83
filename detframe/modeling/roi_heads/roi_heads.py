"""ROI heads: per-proposal classification, box refinement and masks (Fast / Mask R-CNN).

Shapes: N images, R_i proposals of image i (R all together), G_i gt instances of image i,
K foreground classes, S x S pooled resolution, L pooled feature levels.

    features    dict name -> [N, C, H_l, W_l]; IN_FEATURES (finest first) are pooled
    proposals   N Instances: proposal_boxes (Boxes [R_i]) [, objectness_logits [R_i]]
    targets     N Instances: gt_boxes (Boxes [G_i]), gt_classes (int64 [G_i] in [0, K))
                [, gt_masks (BitMasks / PolygonMasks [G_i]) when masks are on]
    detections  N Instances: pred_boxes (Boxes), scores, pred_classes [, pred_masks
                [R_i, 1, M, M] probabilities], in the coordinates of the (resized) input

Training samples per image (`label_and_sample_proposals`): the gt boxes are appended to the
proposals (PROPOSAL_APPEND_GT), each proposal is matched to the gt box of highest IoU (label
1 if IoU >= 0.5, else background), and BATCH_SIZE_PER_IMAGE of them are drawn with at most
POSITIVE_FRACTION foreground (`subsample_labels`, torchvision's random draws). Sampled
proposals carry gt_classes (K = background), gt_boxes (the matched box) and gt_indices (the
matched gt instance; 0 when the image has none). The mask head is trained on the foreground
ones only.

`StandardROIHeads` with torchvision's settings (POOLER_TYPE "ROIAlign", sampling ratio 2,
SMOOTH_L1_BETA 1/9, MIN_SIZE_TEST 0.01, mask TARGET_ALIGNED and BINARY_TARGETS False) and
converted weights computes what torchvision's `RoIHeads` computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detframe.registry import build as build_component
from detframe.structures import Boxes, ImageList, Instances, pairwise_iou

from ..matcher import Matcher
from ..poolers import ROIPooler
from ..sampling import subsample_labels
from .fast_rcnn import FastRCNNOutputLayers

__all__ = ["StandardROIHeads", "build_roi_heads"]

_POOLER_TYPES = ("ROIAlignV2", "ROIAlign", "ROIPool")

declare("MODEL.ROI_HEADS.NAME", str, "StandardROIHeads", "name in ROI_HEADS_REGISTRY")
declare(
    "MODEL.ROI_HEADS.IN_FEATURES",
    list[str],
    ["p2", "p3", "p4", "p5"],
    "backbone features the ROI heads pool from, finest first",
)
declare(
    "MODEL.ROI_HEADS.IOU_THRESHOLDS",
    list[float],
    [0.5],
    "IoU thresholds splitting proposals into IOU_LABELS intervals",
)
declare(
    "MODEL.ROI_HEADS.IOU_LABELS",
    list[int],
    [0, 1],
    "label per IoU interval: 0 background, 1 foreground, -1 ignored",
    choices=(-1, 0, 1),
)
declare("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", int, 512, "proposals sampled per image")
declare(
    "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    float,
    0.25,
    "largest fraction of foreground among the sampled proposals",
)
declare(
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    bool,
    True,
    "add the gt boxes to the proposals at training",
)
declare("MODEL.ROI_BOX_HEAD.NAME", str, "FastRCNNConvFCHead", "name in ROI_BOX_HEAD_REGISTRY")
declare("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", int, 7, "side S of the pooled box features")
declare(
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO",
    int,
    0,
    "RoIAlign sampling points per bin side for the box head; 0 is adaptive",
)
declare(
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
    str,
    "ROIAlignV2",
    "box pooler: RoIAlign aligned=True (V2), aligned=False (torchvision) or RoIPool",
    choices=_POOLER_TYPES,
)
declare(
    "MODEL.ROI_MASK_HEAD.NAME",
    str,
    "MaskRCNNConvUpsampleHead",
    "name in ROI_MASK_HEAD_REGISTRY",
)
declare("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", int, 14, "side S of the pooled mask features")
declare(
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
    int,
    0,
    "RoIAlign sampling points per bin side for the mask head; 0 is adaptive",
)
declare(
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
    str,
    "ROIAlignV2",
    "mask pooler: RoIAlign aligned=True (V2), aligned=False (torchvision) or RoIPool",
    choices=_POOLER_TYPES,
)


def build_roi_heads(cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The ROI heads named by MODEL.ROI_HEADS.NAME, for backbone outputs `input_shape`."""
    return build_component(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, cfg, input_shape)


@ROI_HEADS_REGISTRY.register()
class StandardROIHeads(nn.Module):
    """A box head and an optional mask head, each on its own pooled features.

    Args:
        in_features: names of the feature maps to pool from, finest first.
        box_pooler: pools [R, C, S, S] box features from those maps.
        box_head: pooled features -> box features (e.g. FastRCNNConvFCHead).
        box_predictor: box features -> scores and deltas; losses and detections.
        proposal_matcher: matches proposals to gt boxes by IoU (labels 0 / 1 / -1).
        num_classes: K.
        batch_size_per_image: proposals sampled per image for the losses.
        positive_fraction: largest fraction of foreground among them.
        proposal_append_gt: add the gt boxes to the proposals before matching.
        mask_pooler, mask_head: both or neither; the mask head has `forward` (pooled
            features -> logits), `losses(logits, fg_proposals, gt_masks)` and
            `inference(logits, detections)` (e.g. MaskRCNNConvUpsampleHead).
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        box_pooler: ROIPooler,
        box_head: nn.Module,
        box_predictor: FastRCNNOutputLayers,
        proposal_matcher: Matcher,
        num_classes: int,
        batch_size_per_image: int,
        positive_fraction: float,
        proposal_append_gt: bool = True,
        mask_pooler: ROIPooler | None = None,
        mask_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("mask_pooler and mask_head must be given together")
        if len(in_features) == 0:
            raise ValueError("in_features must name at least one feature map")
        self.in_features = list(in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.proposal_matcher = proposal_matcher
        self.num_classes = num_classes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.proposal_append_gt = proposal_append_gt

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]) -> dict[str, Any]:
        """`input_shape`: the backbone's output shapes by feature name.

        Pooler scales are 1 / stride of IN_FEATURES; the box and mask heads are built from
        their registries with the pooled maps' ShapeSpec (channels C, stride of the finest).

        Raises:
            ValueError: an IN_FEATURES name the backbone does not produce, or pooled maps
                with different channel counts.
        """
        heads = cfg.MODEL.ROI_HEADS
        in_features = list(heads.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES names {missing}, which the backbone does not "
                f"produce (it gives {sorted(input_shape)})"
            )
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES {in_features} have different channel counts "
                f"{sorted(channels)}; the ROI heads need one"
            )
        pooled_shape = ShapeSpec(channels=channels.pop(), stride=input_shape[in_features[0]].stride)
        scales = [1.0 / input_shape[f].stride for f in in_features]

        box = cfg.MODEL.ROI_BOX_HEAD
        box_head = build_component(ROI_BOX_HEAD_REGISTRY, box.NAME, cfg, pooled_shape)
        predictor_kwargs = FastRCNNOutputLayers.from_config(cfg, box_head.output_size)
        kwargs: dict[str, Any] = {
            "in_features": in_features,
            "box_pooler": ROIPooler(
                output_size=box.POOLER_RESOLUTION,
                scales=scales,
                sampling_ratio=box.POOLER_SAMPLING_RATIO,
                pooler_type=box.POOLER_TYPE,
            ),
            "box_head": box_head,
            "box_predictor": FastRCNNOutputLayers(**predictor_kwargs),
            "proposal_matcher": Matcher(
                list(heads.IOU_THRESHOLDS),
                list(heads.IOU_LABELS),
                allow_low_quality_matches=False,
            ),
            "num_classes": heads.NUM_CLASSES,
            "batch_size_per_image": heads.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": heads.POSITIVE_FRACTION,
            "proposal_append_gt": heads.PROPOSAL_APPEND_GT,
        }
        if cfg.MODEL.MASK_ON:
            mask = cfg.MODEL.ROI_MASK_HEAD
            kwargs["mask_pooler"] = ROIPooler(
                output_size=mask.POOLER_RESOLUTION,
                scales=scales,
                sampling_ratio=mask.POOLER_SAMPLING_RATIO,
                pooler_type=mask.POOLER_TYPE,
            )
            kwargs["mask_head"] = build_component(
                ROI_MASK_HEAD_REGISTRY, mask.NAME, cfg, pooled_shape
            )
        return kwargs

    def forward(
        self,
        images: ImageList,
        features: Mapping[str, Tensor],
        proposals: Sequence[Instances],
        targets: Sequence[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Detections (evaluation mode) and losses (when `targets` are given).

        Args:
            images: the batch; only its length is used (sizes come from the proposals).
            features: backbone outputs by name, including `in_features`.
            proposals: per image, its proposals (see the module docstring).
            targets: per image, its gt instances; required in training mode.

        Returns:
            (detections, losses): detections is [] in training mode; losses is
            {"loss_cls", "loss_box_reg"[, "loss_mask"]} when targets are given, else {}.
        """
        if len(proposals) != len(images):
            raise ValueError(f"{len(images)} images but proposals for {len(proposals)}")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but targets for {len(targets)}")
        if self.training and targets is None:
            raise ValueError("StandardROIHeads needs targets in training mode")
        losses = self.losses(features, proposals, targets) if targets is not None else {}
        if self.training:
            return [], losses
        return self.inference(features, proposals), losses

    def losses(
        self,
        features: Mapping[str, Tensor],
        proposals: Sequence[Instances],
        targets: Sequence[Instances],
    ) -> dict[str, Tensor]:
        """Box (and mask) losses on proposals sampled against `targets`."""
        if self.mask_head is not None:
            for i, t in enumerate(targets):
                if not t.has("gt_masks"):
                    raise ValueError(f"targets[{i}] has no gt_masks, which the mask head needs")
        sampled = self.label_and_sample_proposals(proposals, targets)
        feats = [features[f] for f in self.in_features]
        box_features = self.box_head(self.box_pooler(feats, [p.proposal_boxes for p in sampled]))
        losses = self.box_predictor.losses(self.box_predictor(box_features), sampled)
        if self.mask_head is not None:
            k = self.num_classes
            fg = [p[(p.gt_classes >= 0) & (p.gt_classes < k)] for p in sampled]
            mask_features = self.mask_pooler(feats, [p.proposal_boxes for p in fg])
            mask_logits = self.mask_head(mask_features)
            losses.update(self.mask_head.losses(mask_logits, fg, [t.gt_masks for t in targets]))
        return losses

    def inference(
        self, features: Mapping[str, Tensor], proposals: Sequence[Instances]
    ) -> list[Instances]:
        """Detections per image from all its proposals (see the module docstring)."""
        feats = [features[f] for f in self.in_features]
        box_features = self.box_head(self.box_pooler(feats, [p.proposal_boxes for p in proposals]))
        detections = self.box_predictor.inference(self.box_predictor(box_features), proposals)
        if self.mask_head is not None:
            mask_features = self.mask_pooler(feats, [d.pred_boxes for d in detections])
            self.mask_head.inference(self.mask_head(mask_features), detections)
        return detections

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: Sequence[Instances], targets: Sequence[Instances]
    ) -> list[Instances]:
        """Matches proposals to gt boxes and samples them (see the module docstring).

        Returns:
            per image, the sampled proposals (foreground first) with proposal_boxes,
            gt_classes (int64, K = background), gt_boxes and gt_indices (int64).
        """
        sampled = []
        for p, t in zip(proposals, targets, strict=True):
            boxes = p.proposal_boxes.tensor
            gt_boxes = t.gt_boxes.tensor.to(device=boxes.device, dtype=boxes.dtype)
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, gt_boxes])
            matches, match_labels = self.proposal_matcher(
                pairwise_iou(Boxes(gt_boxes), Boxes(boxes))
            )
            if len(t) > 0:
                gt_classes = t.gt_classes.to(device=boxes.device, dtype=torch.int64)[matches]
                gt_classes[match_labels == 0] = self.num_classes
                gt_classes[match_labels == -1] = -1
                matched_boxes = gt_boxes[matches]
            else:
                gt_classes = torch.full_like(matches, self.num_classes)
                matched_boxes = torch.zeros_like(boxes)
            pos, neg = subsample_labels(
                gt_classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            keep = torch.cat([pos, neg])
            sampled.append(
                Instances(
                    p.image_size,
                    proposal_boxes=Boxes(boxes[keep]),
                    gt_classes=gt_classes[keep],
                    gt_boxes=Boxes(matched_boxes[keep]),
                    gt_indices=matches[keep],
                )
            )
        return sampled
