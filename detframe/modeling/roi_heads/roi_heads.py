"""ROI heads: per-proposal classification, box refinement and masks (Fast / Mask R-CNN).

Shapes: N images, R_i proposals of image i (R all together), G_i gt instances of image i,
K foreground classes, S x S pooled resolution, L pooled feature levels.

    features    dict name -> [N, C_l, H_l, W_l]; each branch pools its own IN_FEATURES
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

`ROIHeads` is the base: it owns the matching and sampling and the forward protocol
(`losses` with targets, `inference` in evaluation mode). `StandardROIHeads` adds a box branch
and an optional mask branch, each built in its own overridable classmethod (`_init_box_head`,
`_init_mask_head`) from its config section: its IN_FEATURES (empty: MODEL.ROI_HEADS.
IN_FEATURES), its pooler (POOLER_NAME in POOLER_REGISTRY, e.g. FPN level assignment or every
box from every level, with POOLER_BOX_SCALE context) and its head; the box predictor is
MODEL.ROI_BOX_HEAD.PREDICTOR_NAME in BOX_PREDICTOR_REGISTRY.

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
from detframe.registry import (
    BOX_PREDICTOR_REGISTRY,
    POOLER_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
)
from detframe.registry import build as build_component
from detframe.structures import Boxes, ImageList, Instances, pairwise_iou

from .. import poolers  # noqa: F401  (registers the built-in poolers)
from ..matcher import Matcher
from ..sampling import subsample_labels
from .fast_rcnn import foreground_mask

__all__ = [
    "ROIHeads",
    "StandardROIHeads",
    "build_roi_heads",
    "build_roi_pooler",
    "select_foreground_proposals",
]

_POOLER_TYPES = ("ROIAlignV2", "ROIAlign", "ROIPool")

declare("MODEL.MASK_ON", bool, False, "predict instance masks (the mapper loads mask targets)")
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
    min=0,
    max=1,
)
declare(
    "MODEL.ROI_HEADS.IOU_LABELS",
    list[int],
    [0, 1],
    "label per IoU interval: 0 background, 1 foreground, -1 ignored",
    choices=(-1, 0, 1),
)
declare("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", int, 512, "proposals sampled per image", min=1)
declare(
    "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    float,
    0.25,
    "largest fraction of foreground among the sampled proposals",
    min=0,
    max=1,
)
declare(
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    bool,
    True,
    "add the gt boxes to the proposals at training",
)
declare("MODEL.ROI_BOX_HEAD.NAME", str, "FastRCNNConvFCHead", "name in ROI_BOX_HEAD_REGISTRY")
declare(
    "MODEL.ROI_BOX_HEAD.PREDICTOR_NAME",
    str,
    "FastRCNNOutputLayers",
    "name in BOX_PREDICTOR_REGISTRY: box features -> class scores and box deltas",
)
declare(
    "MODEL.ROI_BOX_HEAD.IN_FEATURES",
    list[str],
    [],
    "features the box pooler reads, finest first; empty: MODEL.ROI_HEADS.IN_FEATURES",
)
declare("MODEL.ROI_BOX_HEAD.POOLER_NAME", str, "ROIPooler", "name in POOLER_REGISTRY")
declare(
    "MODEL.ROI_BOX_HEAD.POOLER_BOX_SCALE",
    float,
    1.0,
    "box pooler: each box is scaled about its centre by this before pooling (context)",
    min=0,
    min_exclusive=True,
)
declare("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", int, 7, "side S of the pooled box features", min=1)
declare(
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO",
    int,
    0,
    "RoIAlign sampling points per bin side for the box head; 0 is adaptive",
    min=0,
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
declare(
    "MODEL.ROI_MASK_HEAD.IN_FEATURES",
    list[str],
    [],
    "features the mask pooler reads, finest first; empty: MODEL.ROI_HEADS.IN_FEATURES",
)
declare("MODEL.ROI_MASK_HEAD.POOLER_NAME", str, "ROIPooler", "name in POOLER_REGISTRY")
declare(
    "MODEL.ROI_MASK_HEAD.POOLER_BOX_SCALE",
    float,
    1.0,
    "mask pooler: each box is scaled about its centre by this before pooling (context)",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", int, 14, "side S of the pooled mask features", min=1
)
declare(
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
    int,
    0,
    "RoIAlign sampling points per bin side for the mask head; 0 is adaptive",
    min=0,
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


def build_roi_pooler(
    section: DictConfig, section_name: str, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]
) -> tuple[list[str], nn.Module, ShapeSpec]:
    """The pooler of one ROI branch, from its config section.

    Args:
        section: the branch's section, e.g. cfg.MODEL.ROI_BOX_HEAD, with IN_FEATURES,
            POOLER_NAME, POOLER_RESOLUTION, POOLER_SAMPLING_RATIO, POOLER_TYPE and
            POOLER_BOX_SCALE.
        section_name: its dotted name, for error messages.
        cfg: the whole config (for MODEL.ROI_HEADS.IN_FEATURES, the default features).
        input_shape: the backbone's output shapes by feature name.

    Returns:
        (the feature names pooled, finest first; the pooler, built from POOLER_REGISTRY with
        scales 1 / stride; the ShapeSpec of the pooled features: the pooler's output
        channels and the stride of the first feature).

    Raises:
        ValueError: a feature the backbone does not produce.
    """
    in_features = list(section.IN_FEATURES) or list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    key = f"{section_name}.IN_FEATURES" if section.IN_FEATURES else "MODEL.ROI_HEADS.IN_FEATURES"
    missing = [f for f in in_features if f not in input_shape]
    if missing or not in_features:
        raise ValueError(
            f"{key}: {in_features} must name features the backbone produces; it gives "
            f"{sorted(input_shape)}"
        )
    pooler = build_component(
        POOLER_REGISTRY,
        section.POOLER_NAME,
        None,
        output_size=section.POOLER_RESOLUTION,
        scales=[1.0 / input_shape[f].stride for f in in_features],
        sampling_ratio=section.POOLER_SAMPLING_RATIO,
        pooler_type=section.POOLER_TYPE,
        box_scale=section.POOLER_BOX_SCALE,
    )
    channels = pooler.output_channels([input_shape[f].channels for f in in_features])
    return (
        in_features,
        pooler,
        ShapeSpec(channels=channels, stride=input_shape[in_features[0]].stride),
    )


def select_foreground_proposals(
    proposals: Sequence[Instances], num_classes: int
) -> list[Instances]:
    """Per image, the sampled proposals whose gt_classes is a foreground class in [0, K)."""
    return [p[foreground_mask(p.gt_classes, num_classes)] for p in proposals]


class ROIHeads(nn.Module):
    """The base of ROI heads: proposal-target matching and sampling, and the forward protocol.

    A subclass implements `losses(features, proposals, targets)` (it usually starts with
    `label_and_sample_proposals`) and `inference(features, proposals)`.

    Args:
        num_classes: K.
        proposal_matcher: matches proposals to gt boxes by IoU (labels 0 / 1 / -1).
        batch_size_per_image: proposals sampled per image for the losses.
        positive_fraction: largest fraction of foreground among them.
        proposal_append_gt: add the gt boxes to the proposals before matching.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        proposal_matcher: Matcher,
        batch_size_per_image: int,
        positive_fraction: float,
        proposal_append_gt: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proposal_matcher = proposal_matcher
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.proposal_append_gt = proposal_append_gt

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]) -> dict[str, Any]:
        """The base's arguments from MODEL.ROI_HEADS.*; `input_shape` is for subclasses."""
        heads = cfg.MODEL.ROI_HEADS
        return {
            "num_classes": heads.NUM_CLASSES,
            "proposal_matcher": Matcher(
                list(heads.IOU_THRESHOLDS),
                list(heads.IOU_LABELS),
                allow_low_quality_matches=False,
            ),
            "batch_size_per_image": heads.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": heads.POSITIVE_FRACTION,
            "proposal_append_gt": heads.PROPOSAL_APPEND_GT,
        }

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
            features: backbone outputs by name.
            proposals: per image, its proposals (see the module docstring).
            targets: per image, its gt instances; required in training mode.

        Returns:
            (detections, losses): detections is [] in training mode; losses is {} without
            targets.
        """
        if len(proposals) != len(images):
            raise ValueError(f"{len(images)} images but proposals for {len(proposals)}")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but targets for {len(targets)}")
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} needs targets in training mode")
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
        """{loss name: scalar} of the proposals against `targets`."""
        raise NotImplementedError

    def inference(
        self, features: Mapping[str, Tensor], proposals: Sequence[Instances]
    ) -> list[Instances]:
        """Detections per image from all its proposals."""
        raise NotImplementedError

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


@ROI_HEADS_REGISTRY.register()
class StandardROIHeads(ROIHeads):
    """A box branch and an optional mask branch, each pooling its own features.

    Args:
        box_in_features: names of the feature maps the box pooler reads, in its order.
        box_pooler: (feature maps, boxes) -> [R, C, S, S] box features.
        box_head: pooled features -> box features (e.g. FastRCNNConvFCHead).
        box_predictor: box features -> scores and deltas; `losses(predictions, sampled)`
            and `inference(predictions, proposals)` (e.g. FastRCNNOutputLayers).
        mask_in_features, mask_pooler, mask_head: all or none; the mask head has `forward`
            (pooled features -> logits), `losses(logits, fg_proposals, gt_masks)` and
            `inference(logits, detections)` (e.g. MaskRCNNConvUpsampleHead).
        **kwargs: the base's arguments (`ROIHeads`).
    """

    def __init__(
        self,
        *,
        box_in_features: Sequence[str],
        box_pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_in_features: Sequence[str] | None = None,
        mask_pooler: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        mask_parts = (mask_in_features, mask_pooler, mask_head)
        if any(part is None for part in mask_parts) != all(part is None for part in mask_parts):
            raise ValueError("mask_in_features, mask_pooler and mask_head go together")
        if len(box_in_features) == 0 or (mask_in_features is not None and not mask_in_features):
            raise ValueError("box_in_features and mask_in_features must name feature maps")
        self.box_in_features = list(box_in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_in_features = None if mask_in_features is None else list(mask_in_features)
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]) -> dict[str, Any]:
        """`input_shape`: the backbone's output shapes by feature name. The box branch
        always, the mask branch with MODEL.MASK_ON."""
        kwargs = super().from_config(cfg, input_shape)
        kwargs.update(cls._init_box_head(cfg, input_shape))
        if cfg.MODEL.MASK_ON:
            kwargs.update(cls._init_mask_head(cfg, input_shape))
        return kwargs

    @classmethod
    def _init_box_head(
        cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]
    ) -> dict[str, Any]:
        """box_in_features, box_pooler, box_head and box_predictor from MODEL.ROI_BOX_HEAD."""
        box = cfg.MODEL.ROI_BOX_HEAD
        in_features, pooler, pooled_shape = build_roi_pooler(
            box, "MODEL.ROI_BOX_HEAD", cfg, input_shape
        )
        box_head = build_component(ROI_BOX_HEAD_REGISTRY, box.NAME, cfg, pooled_shape)
        box_predictor = build_component(
            BOX_PREDICTOR_REGISTRY, box.PREDICTOR_NAME, cfg, box_head.output_size
        )
        return {
            "box_in_features": in_features,
            "box_pooler": pooler,
            "box_head": box_head,
            "box_predictor": box_predictor,
        }

    @classmethod
    def _init_mask_head(
        cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]
    ) -> dict[str, Any]:
        """mask_in_features, mask_pooler and mask_head from MODEL.ROI_MASK_HEAD."""
        mask = cfg.MODEL.ROI_MASK_HEAD
        in_features, pooler, pooled_shape = build_roi_pooler(
            mask, "MODEL.ROI_MASK_HEAD", cfg, input_shape
        )
        return {
            "mask_in_features": in_features,
            "mask_pooler": pooler,
            "mask_head": build_component(ROI_MASK_HEAD_REGISTRY, mask.NAME, cfg, pooled_shape),
        }

    def losses(
        self,
        features: Mapping[str, Tensor],
        proposals: Sequence[Instances],
        targets: Sequence[Instances],
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box_reg"[, "loss_mask"]} on proposals sampled against
        `targets` (which need gt_masks when the mask branch is on)."""
        if self.mask_head is not None:
            for i, t in enumerate(targets):
                if not t.has("gt_masks"):
                    raise ValueError(f"targets[{i}] has no gt_masks, which the mask head needs")
        sampled = self.label_and_sample_proposals(proposals, targets)
        boxes = [p.proposal_boxes for p in sampled]
        box_features = self._pool(features, self.box_in_features, self.box_pooler, boxes)
        predictions = self.box_predictor(self.box_head(box_features))
        losses = self.box_predictor.losses(predictions, sampled)
        if self.mask_head is not None:
            fg = select_foreground_proposals(sampled, self.num_classes)
            boxes = [p.proposal_boxes for p in fg]
            mask_features = self._pool(features, self.mask_in_features, self.mask_pooler, boxes)
            mask_logits = self.mask_head(mask_features)
            losses.update(self.mask_head.losses(mask_logits, fg, [t.gt_masks for t in targets]))
        return losses

    def inference(
        self, features: Mapping[str, Tensor], proposals: Sequence[Instances]
    ) -> list[Instances]:
        """Detections per image from all its proposals (see the module docstring)."""
        boxes = [p.proposal_boxes for p in proposals]
        box_features = self._pool(features, self.box_in_features, self.box_pooler, boxes)
        predictions = self.box_predictor(self.box_head(box_features))
        detections = self.box_predictor.inference(predictions, proposals)
        if self.mask_head is not None:
            boxes = [d.pred_boxes for d in detections]
            mask_features = self._pool(features, self.mask_in_features, self.mask_pooler, boxes)
            self.mask_head.inference(self.mask_head(mask_features), detections)
        return detections

    @staticmethod
    def _pool(
        features: Mapping[str, Tensor],
        in_features: Sequence[str],
        pooler: nn.Module,
        boxes: Sequence[Boxes],
    ) -> Tensor:
        """[R, C, S, S] pooled features of every image's `boxes`, image 0's first."""
        return pooler([features[f] for f in in_features], boxes)
