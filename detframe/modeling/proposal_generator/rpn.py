"""Region Proposal Network: objectness and box deltas per anchor -> proposals and losses.

Shorthand: N images, L feature levels, A anchors per location, H_l x W_l the size of level l,
A_l = H_l * W_l * A anchors of level l, A_total = sum of A_l, B = box_dim numbers per box
delta (4), G ground-truth boxes of an image, P proposals of an image,
K_l = min(pre_nms_topk, A_l).

    head outputs   objectness [N, A, H_l, W_l] and deltas [N, A*B, H_l, W_l] per level
    flattened      logits [N, A_l] and deltas [N, A_l, B] per level, anchors [A_l, 4],
                   all ordered location-major, then anchor (as the anchor generator)
    proposals      per image Instances(proposal_boxes: Boxes [P, 4], objectness_logits [P]),
                   sorted by objectness_logits, highest first; detached
    losses         {"loss_rpn_cls", "loss_rpn_loc"} scalars, when gt_instances are given

Proposal generators are called as

    proposals, losses = generator(images, features, gt_instances=None)

with `images: ImageList`, `features: dict[str, Tensor]` and `gt_instances: list[Instances] |
None` (fields gt_boxes).

Selection (torchvision's and detectron2's): per image and level the K_l anchors of highest
objectness logit, their deltas decoded (only those), boxes with a non-finite coordinate or
logit dropped, clipped to the image, boxes whose width or height is below `min_box_size`
dropped (kept when both are >= it), NMS per level (`batched_nms` on the logits), then the
`post_nms_topk` highest per image. Training uses the `*_TRAIN` top-k values, evaluation the
`*_TEST` ones.

Losses: every anchor is matched to the ground truth (`Matcher`, low-quality matches kept),
labelled 1 (foreground), 0 (background) or -1 (ignored), and `batch_size_per_image` anchors per
image are sampled (`subsample_labels`); the others become -1. `loss_rpn_cls` is the binary
cross-entropy with logits summed over sampled anchors, `loss_rpn_loc` the box-regression loss
(`dense_box_regression_loss` of type `box_reg_loss_type`; by default the smooth L1, beta
`smooth_l1_beta`, 0 = L1, between predicted and target deltas) summed over sampled foreground
anchors; both are divided by the normaliser (`"batch_size"`: batch_size_per_image * N,
detectron2; `"sampled"`: the number of sampled anchors in the batch, at least 1, torchvision)
and multiplied by `loss_weight`.
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
from detframe.layers import ShapeSpec
from detframe.layers.losses import BOX_REGRESSION_LOSS_TYPES, dense_box_regression_loss
from detframe.registry import (
    ANCHOR_GENERATOR_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    RPN_HEAD_REGISTRY,
    build,
)
from detframe.structures import Boxes, ImageList, Instances, pairwise_iou
from detframe.utils.comm import average_over_ranks

from ..anchors import DefaultAnchorGenerator  # noqa: F401  (declares MODEL.ANCHOR_GENERATOR.*)
from ..box_coder import Box2BoxTransform
from ..matcher import Matcher
from ..sampling import subsample_labels

__all__ = ["RPN", "StandardRPNHead", "find_top_proposals"]

declare("MODEL.RPN.HEAD_NAME", str, "StandardRPNHead", "name in RPN_HEAD_REGISTRY")
declare(
    "MODEL.RPN.IN_FEATURES",
    list[str],
    ["p2", "p3", "p4", "p5", "p6"],
    "backbone features the RPN reads, finest first; one anchor size per feature",
)
declare(
    "MODEL.RPN.IOU_THRESHOLDS",
    list[float],
    [0.3, 0.7],
    "IoU thresholds between the anchor labels IOU_LABELS, increasing",
    min=0,
    max=1,
)
declare(
    "MODEL.RPN.IOU_LABELS",
    list[int],
    [0, -1, 1],
    "anchor label per IoU interval: 0 background, -1 ignored, 1 foreground",
    choices=(-1, 0, 1),
)
declare(
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", int, 256, "anchors sampled per image for the losses", min=1
)
declare(
    "MODEL.RPN.POSITIVE_FRACTION",
    float,
    0.5,
    "most foreground share of the sampled anchors",
    min=0,
    max=1,
)
declare(
    "MODEL.RPN.BBOX_REG_WEIGHTS",
    list[float],
    [1.0, 1.0, 1.0, 1.0],
    "weights (wx, wy, ww, wh) of the anchor box deltas",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.RPN.SMOOTH_L1_BETA",
    float,
    0.0,
    "beta of the smooth L1 box loss; 0 is L1 (torchvision: 1/9)",
    min=0,
)
declare(
    "MODEL.RPN.BBOX_REG_LOSS_TYPE",
    str,
    "smooth_l1",
    "box loss: smooth_l1 (beta SMOOTH_L1_BETA) or l1 of the deltas, giou of the decoded boxes",
    choices=BOX_REGRESSION_LOSS_TYPES,
)
declare("MODEL.RPN.LOSS_WEIGHT", float, 1.0, "factor of both RPN losses", min=0)
declare(
    "MODEL.RPN.LOSS_NORMALIZER",
    str,
    "batch_size",
    "RPN losses divided by BATCH_SIZE_PER_IMAGE * images or by the anchors sampled",
    choices=("batch_size", "sampled"),
)
declare(
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", int, 2000, "anchors kept per image and level before NMS", min=1
)
declare(
    "MODEL.RPN.PRE_NMS_TOPK_TEST", int, 1000, "anchors kept per image and level before NMS", min=1
)
declare("MODEL.RPN.POST_NMS_TOPK_TRAIN", int, 1000, "proposals kept per image after NMS", min=1)
declare("MODEL.RPN.POST_NMS_TOPK_TEST", int, 1000, "proposals kept per image after NMS", min=1)
declare(
    "MODEL.RPN.NMS_THRESH",
    float,
    0.7,
    "IoU threshold of the per-level NMS of proposals",
    min=0,
    max=1,
)
declare(
    "MODEL.RPN.MIN_SIZE",
    float,
    0.0,
    "proposals narrower or lower than this after clipping are dropped (torchvision: 1e-3)",
    min=0,
)


@RPN_HEAD_REGISTRY.register()
class StandardRPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and A*box_dim deltas.

    Args:
        in_channels: channels C of every input level.
        num_anchors: A, anchors per location.
        box_dim: B, numbers per box delta (the box transform's `box_dim`).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4) -> None:
        super().__init__()
        sizes = (("in_channels", in_channels), ("num_anchors", num_anchors), ("box_dim", box_dim))
        for name, value in sizes:
            if value < 1:
                raise ValueError(f"StandardRPNHead: {name} must be >= 1, got {value}")
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: Sequence[ShapeSpec]) -> dict[str, Any]:
        """`in_channels` from `input_shape` (one ShapeSpec per level, all of one channel
        count). `num_anchors` and `box_dim` are not in the config: the RPN passes its anchor
        generator's and its box transform's."""
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"StandardRPNHead needs one channel count for all levels, got {sorted(channels)}"
            )
        return {"in_channels": channels.pop()}

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: L maps [N, C, H_l, W_l].

        Returns:
            (objectness logits, one [N, A, H_l, W_l] per level; deltas, one
            [N, A*box_dim, H_l, W_l] per level).
        """
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def find_top_proposals(
    anchors: Sequence[Tensor],
    pred_objectness_logits: Sequence[Tensor],
    pred_anchor_deltas: Sequence[Tensor],
    box2box_transform: Box2BoxTransform,
    image_sizes: Sequence[tuple[int, int]],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_box_size: float,
) -> list[Instances]:
    """Selects each image's proposals (see the module docstring for the steps).

    Args:
        anchors: per level [A_l, 4] XYXY.
        pred_objectness_logits: per level [N, A_l].
        pred_anchor_deltas: per level [N, A_l, B].
        box2box_transform: decodes deltas against anchors.
        image_sizes: N pairs (height, width) to clip to.
        pre_nms_topk: anchors kept per image and level before NMS.
        post_nms_topk: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        min_box_size: smallest width and height kept (compared with >=).

    Returns:
        N Instances with proposal_boxes (Boxes [P, 4]) and objectness_logits [P], highest
        first, P <= post_nms_topk. Nothing keeps gradients.
    """
    num_images = len(image_sizes)
    device = pred_objectness_logits[0].device
    batch_idx = torch.arange(num_images, device=device)[:, None]
    topk_boxes, topk_logits, topk_levels = [], [], []
    for level, (anchors_l, logits_l, deltas_l) in enumerate(
        zip(anchors, pred_objectness_logits, pred_anchor_deltas, strict=True)
    ):
        k = min(pre_nms_topk, logits_l.shape[1])
        logits_l, idx = logits_l.detach().topk(k, dim=1)  # [N, K_l], sorted
        deltas_l = deltas_l.detach()[batch_idx, idx]  # [N, K_l, B]
        box_dim = deltas_l.shape[-1]
        boxes_l = box2box_transform.apply_deltas(
            deltas_l.reshape(-1, box_dim), anchors_l.to(deltas_l.dtype)[idx.reshape(-1)]
        )
        topk_boxes.append(boxes_l.view(num_images, k, box_dim))
        topk_logits.append(logits_l)
        topk_levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
    boxes_all = torch.cat(topk_boxes, dim=1)  # [N, sum K_l, 4]
    logits_all = torch.cat(topk_logits, dim=1)  # [N, sum K_l]
    levels_all = torch.cat(topk_levels)  # [sum K_l]

    results = []
    for boxes_t, logits, image_size in zip(boxes_all, logits_all, image_sizes, strict=True):
        levels = levels_all
        finite = torch.isfinite(boxes_t).all(dim=1) & torch.isfinite(logits)
        if not bool(finite.all()):
            boxes_t, logits, levels = boxes_t[finite], logits[finite], levels[finite]
        boxes = Boxes(boxes_t.clone())
        boxes.clip(image_size)
        wh = boxes.tensor[:, 2:] - boxes.tensor[:, :2]
        keep = (wh >= min_box_size).all(dim=1)
        if not bool(keep.all()):
            boxes, logits, levels = boxes[keep], logits[keep], levels[keep]
        keep = batched_nms(boxes.tensor, logits, levels, nms_thresh)[:post_nms_topk]
        results.append(
            Instances(image_size, proposal_boxes=boxes[keep], objectness_logits=logits[keep])
        )
    return results


@PROPOSAL_GENERATOR_REGISTRY.register()
class RPN(nn.Module):
    """Region Proposal Network (Faster R-CNN) over one or more feature levels.

    Args:
        in_features: names of the feature maps read, one per anchor level.
        head: features (list of [N, C, H_l, W_l]) -> (logits [N, A, H_l, W_l] per level,
            deltas [N, A*B, H_l, W_l] per level); e.g. `StandardRPNHead`.
        anchor_generator: features -> anchors per level [A_l, 4]; has `num_anchors`.
        anchor_matcher: IoU matrix [G, A_total] -> (matches [A_total], labels [A_total]).
        box2box_transform: encodes and decodes anchor deltas; its `box_dim` is B.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: most foreground share of the sampled anchors.
        pre_nms_topk: (training, evaluation) anchors kept per image and level before NMS.
        post_nms_topk: (training, evaluation) proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        min_box_size: smallest proposal width and height kept (>=).
        smooth_l1_beta: beta of the "smooth_l1" box loss; 0 gives L1.
        box_reg_loss_type: the box loss, one of `BOX_REGRESSION_LOSS_TYPES` ("smooth_l1",
            "l1", "giou"; see `dense_box_regression_loss`).
        loss_weight: factor of both losses.
        loss_normalizer: "batch_size" (batch_size_per_image * N) or "sampled" (anchors sampled
            in the batch; in training, averaged over the ranks of a distributed run, so that
            data-parallel training computes the gradients of the whole batch).
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        head: nn.Module,
        anchor_generator: nn.Module,
        anchor_matcher: Matcher,
        box2box_transform: Box2BoxTransform,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_topk: tuple[int, int],
        post_nms_topk: tuple[int, int],
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        smooth_l1_beta: float = 0.0,
        box_reg_loss_type: str = "smooth_l1",
        loss_weight: float = 1.0,
        loss_normalizer: str = "batch_size",
    ) -> None:
        super().__init__()
        if loss_normalizer not in ("batch_size", "sampled"):
            raise ValueError(
                f"RPN: loss_normalizer must be 'batch_size' or 'sampled', got {loss_normalizer!r}"
            )
        if box_reg_loss_type not in BOX_REGRESSION_LOSS_TYPES:
            raise ValueError(
                f"RPN: box_reg_loss_type must be one of {BOX_REGRESSION_LOSS_TYPES}, got "
                f"{box_reg_loss_type!r}"
            )
        for name, pair in (("pre_nms_topk", pre_nms_topk), ("post_nms_topk", post_nms_topk)):
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"RPN: {name} must be two positive ints, got {pair!r}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"RPN: positive_fraction must be in [0, 1], got {positive_fraction}")
        if batch_size_per_image < 1:
            raise ValueError(f"RPN: batch_size_per_image must be >= 1, got {batch_size_per_image}")
        self.in_features = list(in_features)
        self.head = head
        self.anchor_generator = anchor_generator
        self.anchor_matcher = anchor_matcher
        self.box2box_transform = box2box_transform
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk[0], False: pre_nms_topk[1]}
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.nms_thresh = nms_thresh
        self.min_box_size = min_box_size
        self.smooth_l1_beta = smooth_l1_beta
        self.box_reg_loss_type = box_reg_loss_type
        self.loss_weight = loss_weight
        self.loss_normalizer = loss_normalizer

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        """Reads MODEL.RPN.*; builds the anchor generator (MODEL.ANCHOR_GENERATOR.NAME) and the
        head (MODEL.RPN.HEAD_NAME, given the anchor generator's `num_anchors` and the box
        transform's `box_dim`).

        Raises:
            ValueError: a feature in MODEL.RPN.IN_FEATURES is not in `input_shape`.
        """
        rpn = cfg.MODEL.RPN
        in_features = list(rpn.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.RPN.IN_FEATURES: {missing} not among the backbone outputs "
                f"{sorted(input_shape)}"
            )
        shapes = [input_shape[f] for f in in_features]
        anchor_generator = build(
            ANCHOR_GENERATOR_REGISTRY, cfg.MODEL.ANCHOR_GENERATOR.NAME, cfg, shapes
        )
        box2box_transform = Box2BoxTransform(weights=tuple(rpn.BBOX_REG_WEIGHTS))
        head = build(
            RPN_HEAD_REGISTRY,
            rpn.HEAD_NAME,
            cfg,
            shapes,
            num_anchors=anchor_generator.num_anchors,
            box_dim=box2box_transform.box_dim,
        )
        return {
            "in_features": in_features,
            "head": head,
            "anchor_generator": anchor_generator,
            "anchor_matcher": Matcher(
                list(rpn.IOU_THRESHOLDS), list(rpn.IOU_LABELS), allow_low_quality_matches=True
            ),
            "box2box_transform": box2box_transform,
            "batch_size_per_image": rpn.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": rpn.POSITIVE_FRACTION,
            "pre_nms_topk": (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST),
            "nms_thresh": rpn.NMS_THRESH,
            "min_box_size": rpn.MIN_SIZE,
            "smooth_l1_beta": rpn.SMOOTH_L1_BETA,
            "box_reg_loss_type": rpn.BBOX_REG_LOSS_TYPE,
            "loss_weight": rpn.LOSS_WEIGHT,
            "loss_normalizer": rpn.LOSS_NORMALIZER,
        }

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        gt_instances: Sequence[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """
        Args:
            images: the padded batch; its image_sizes are what proposals are clipped to.
            features: backbone maps by name, [N, C, H_l, W_l]; `in_features` are read.
            gt_instances: N Instances with gt_boxes, or None; when given the losses are
                computed (in training and in evaluation mode).

        Returns:
            (proposals: N Instances with proposal_boxes and objectness_logits, detached;
            losses: {"loss_rpn_cls", "loss_rpn_loc"}, or {} without gt_instances).

        Raises:
            ValueError: a feature of `in_features` is missing, the head's deltas do not
                have A * B channels, or gt_instances are not one per image.
        """
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise ValueError(f"RPN: features {missing} missing (given: {sorted(features)})")
        maps = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(maps, image_size=tuple(images.tensor.shape[-2:]))
        logits, deltas = self.head(maps)
        box_dim = self.box2box_transform.box_dim
        num_anchors = self.anchor_generator.num_anchors
        if any(x.shape[1] != num_anchors * box_dim for x in deltas):
            raise ValueError(
                f"RPN: the head's deltas must have num_anchors * box_dim = {num_anchors} * "
                f"{box_dim} channels, got {[x.shape[1] for x in deltas]}"
            )
        # [N, A, H, W] -> [N, H*W*A]; [N, A*B, H, W] -> [N, H*W*A, B] (location-major).
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [
            x.view(x.shape[0], num_anchors, box_dim, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, 3)
            for x in deltas
        ]
        losses: dict[str, Tensor] = {}
        if gt_instances is not None:
            if len(gt_instances) != len(images):
                raise ValueError(f"RPN: {len(gt_instances)} gt_instances for {len(images)} images")
            gt_labels, gt_boxes = self.label_and_sample_anchors(anchors, gt_instances)
            losses = self.losses(anchors, logits, deltas, gt_labels, gt_boxes)
        proposals = self.predict_proposals(anchors, logits, deltas, images.image_sizes)
        return proposals, losses

    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: Sequence[Tensor], gt_instances: Sequence[Instances]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Matches the anchors to each image's gt_boxes and samples them.

        Args:
            anchors: per level [A_l, 4].
            gt_instances: N Instances with gt_boxes (G may be 0).

        Returns:
            (labels: N tensors [A_total] int8 with 1 for sampled foreground, 0 for sampled
            background, -1 otherwise; matched gt boxes: N tensors [A_total, 4], zeros where
            the image has no gt).
        """
        all_anchors = Boxes(torch.cat(list(anchors)))
        labels, matched_boxes = [], []
        for gt in gt_instances:
            gt_boxes = gt.gt_boxes.to(all_anchors.device)
            iou = pairwise_iou(gt_boxes, all_anchors)  # [G, A_total]
            matches, label = self.anchor_matcher(iou)
            label = label.to(torch.int8)
            pos_idx, neg_idx = subsample_labels(
                label, self.batch_size_per_image, self.positive_fraction, 0
            )
            label = torch.full_like(label, -1)
            label[pos_idx] = 1
            label[neg_idx] = 0
            labels.append(label)
            if len(gt_boxes) == 0:
                matched_boxes.append(torch.zeros_like(all_anchors.tensor))
            else:
                matched_boxes.append(gt_boxes.tensor[matches])
        return labels, matched_boxes

    def losses(
        self,
        anchors: Sequence[Tensor],
        pred_objectness_logits: Sequence[Tensor],
        pred_anchor_deltas: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        """The RPN losses (see the module docstring).

        Args:
            anchors: per level [A_l, 4].
            pred_objectness_logits: per level [N, A_l].
            pred_anchor_deltas: per level [N, A_l, B].
            gt_labels: N tensors [A_total] of 1 / 0 / -1 (`label_and_sample_anchors`).
            gt_boxes: N tensors [A_total, 4], the matched gt box of each anchor.

        Returns:
            {"loss_rpn_cls": scalar, "loss_rpn_loc": scalar}.
        """
        num_images = len(gt_labels)
        labels = torch.stack(list(gt_labels))  # [N, A_total]
        logits = torch.cat(list(pred_objectness_logits), dim=1)  # [N, A_total]
        deltas = torch.cat(list(pred_anchor_deltas), dim=1)  # [N, A_total, B]
        all_anchors = torch.cat(list(anchors)).to(deltas.dtype)  # [A_total, 4]
        matched = torch.stack(list(gt_boxes)).to(deltas.dtype)  # [N, A_total, 4]

        loss_loc = dense_box_regression_loss(
            all_anchors,
            self.box2box_transform,
            deltas,
            matched,
            labels == 1,
            self.box_reg_loss_type,
            self.smooth_l1_beta,
        )
        valid = labels >= 0
        loss_cls = F.binary_cross_entropy_with_logits(
            logits[valid], labels[valid].to(logits.dtype), reduction="sum"
        )
        if self.loss_normalizer == "batch_size":
            normalizer = float(self.batch_size_per_image * num_images)
        elif self.training:
            normalizer = average_over_ranks(valid.sum())
        else:
            normalizer = float(max(int(valid.sum()), 1))
        scale = self.loss_weight / normalizer
        return {"loss_rpn_cls": loss_cls * scale, "loss_rpn_loc": loss_loc * scale}

    @torch.no_grad()
    def predict_proposals(
        self,
        anchors: Sequence[Tensor],
        pred_objectness_logits: Sequence[Tensor],
        pred_anchor_deltas: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Instances]:
        """Each image's proposals with this mode's top-k values (`find_top_proposals`).

        Args:
            anchors: per level [A_l, 4].
            pred_objectness_logits: per level [N, A_l].
            pred_anchor_deltas: per level [N, A_l, B].
            image_sizes: N pairs (height, width).

        Returns:
            N Instances with proposal_boxes and objectness_logits, highest first.
        """
        return find_top_proposals(
            anchors,
            pred_objectness_logits,
            pred_anchor_deltas,
            self.box2box_transform,
            image_sizes,
            self.pre_nms_topk[self.training],
            self.post_nms_topk[self.training],
            self.nms_thresh,
            self.min_box_size,
        )
