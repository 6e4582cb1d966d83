"""RegionCNN: R-CNN (Girshick, Donahue, Darrell, Malik 2014), every proposal through the CNN.

Shorthand: N images, R_i proposals of image i (R all together), S x S the warped region
(WARP_SIZE), p the context padding (CONTEXT_PADDING), C x P x P pool5 features (C channels
of IN_FEATURE, P = MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION), D box-head features (fc7), K
foreground classes.

    proposals   N Instances(proposal_boxes, objectness_logits), the inputs' "proposals"
                (precomputed, e.g. selective search), top TOPK_TRAIN / TOPK_TEST kept by
                `PrecomputedProposals`
    regions     [r, 3, S, S]  a chunk of r <= CHUNK_SIZE warped regions of one image
    pool5       [r, C, P, P]  IN_FEATURE of the backbone, max-pooled to P x P
    fc7         [r, D]        the box head (VGGFCHead: fc6, fc7)
    scores      [R, K + 1]    softmax classifier on fc7 (background last)
    deltas      [R, K * 4]    class-specific box regression on pool5

Where Fast R-CNN pools every proposal from one shared feature map, R-CNN runs the whole
backbone once per proposal: it is slow by design, and measuring that is the point.

Warping (the paper's appendix A, "warp with context padding p = 16"): each proposal is
scaled about its centre by S / (S - 2p), so that once the region is warped to S x S the
proposal fills the inner (S - 2p) x (S - 2p) and p pixels of context surround it; the
region is then resampled anisotropically from the normalised image by detframe's RoIAlign
(aligned=True, so that pixel centres align). WARP_SAMPLING_RATIO 1 takes one bilinear
sample per output pixel, the paper's resize (MATLAB's imresize, bilinear, without
anti-aliasing); 0 averages ceil(box side / S) samples per pixel side (anti-aliased when
shrinking). Where a dilated region leaves the image the paper fills it with the image mean,
which after normalisation is 0: what RoIAlign reads beyond the image (more than one pixel
out; within one pixel it repeats the edge pixel, as bilinear sampling at the border does).
Each image is warped from its own unpadded pixels, so its detections do not depend on the
other images of the batch.

pool5: the backbone's IN_FEATURE map, adaptively max-pooled to P x P. For VGG16 at S = 224
(or the paper's 227), conv5_3 is 14 x 14 and this is exactly VGG16's pool5 (2 x 2 max pool,
stride 2), [R, 512, 7, 7], the input of fc6.

Training (the paper's fine-tuning, with its softmax kept as the classifier instead of the
SVMs trained afterwards): per image the gt boxes are appended to the proposals, each is
labelled with the gt box it overlaps most at IoU >= 0.5, else background, and
BATCH_SIZE_PER_IMAGE of them are sampled with at most POSITIVE_FRACTION foreground
(`ROIHeads.label_and_sample_proposals`, MODEL.ROI_HEADS.*). The losses are those of
`FastRCNNOutputLayers`: cross-entropy, and the box loss (smooth L1 on deltas normalised by
MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS) of the foreground ROIs. The paper fits its box
regressor on pool5 afterwards, by ridge regression on fixed features; here it is trained
with the classifier, and its loss reaches the backbone too.

Inference is `FastRCNNOutputLayers.inference` (score threshold, per-class NMS, detections
per image, MODEL.ROI_HEADS.*_TEST), on every proposal. CHUNK_SIZE bounds how many regions
go through the backbone at once: in evaluation it bounds the memory; in training the graph
of every sampled region is kept for the backward pass (the paper's 128-region minibatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import roi_align
from detframe.registry import BOX_PREDICTOR_REGISTRY, META_ARCH_REGISTRY, ROI_BOX_HEAD_REGISTRY
from detframe.registry import build as build_component
from detframe.structures import ImageList, Instances

from ..backbone import Backbone, build_backbone
from ..poolers import scale_boxes_about_centre
from ..proposal_generator import PrecomputedProposals
from ..roi_heads import FastRCNNOutputLayers, ROIHeads
from .base import MetaArchitecture

__all__ = ["RegionCNN", "RegionCNNOutputLayers", "context_boxes", "warp_regions"]

declare(
    "MODEL.REGION_CNN.IN_FEATURE",
    str,
    "conv5_3",
    "RegionCNN: the backbone feature map max-pooled to pool5 (P = ROI_BOX_HEAD.POOLER_RESOLUTION)",
)
declare(
    "MODEL.REGION_CNN.WARP_SIZE",
    int,
    224,
    "RegionCNN: side S of the square each proposal is warped to (paper: 227)",
    min=1,
)
declare(
    "MODEL.REGION_CNN.CONTEXT_PADDING",
    int,
    16,
    "RegionCNN: pixels of context around the proposal in the warped S x S region (paper: 16)",
    min=0,
)
declare(
    "MODEL.REGION_CNN.WARP_SAMPLING_RATIO",
    int,
    1,
    "RegionCNN: RoIAlign samples per warped pixel side; 1 bilinear (the paper), 0 adaptive",
    min=0,
)
declare(
    "MODEL.REGION_CNN.CHUNK_SIZE",
    int,
    32,
    "RegionCNN: warped regions run through the backbone at once (bounds the memory)",
    min=1,
)
declare(
    "MODEL.REGION_CNN.PREDICTOR_NAME",
    str,
    "RegionCNNOutputLayers",
    "RegionCNN: name in BOX_PREDICTOR_REGISTRY of a predictor called with (fc7, pool5)",
)


def context_boxes(boxes: Tensor, warp_size: int, context_padding: int) -> Tensor:
    """The regions to warp: `boxes` dilated so that, warped to S x S, they have p pixels of
    context on every side.

    Args:
        boxes: [R, 4] XYXY proposals in image pixels.
        warp_size: S.
        context_padding: p, with 2p < S.

    Returns:
        [R, 4] XYXY boxes with the same centres and S / (S - 2p) times the width and height
        (not clipped to the image).
    """
    return scale_boxes_about_centre(boxes, warp_size / (warp_size - 2 * context_padding))


def warp_regions(image: Tensor, boxes: Tensor, warp_size: int, sampling_ratio: int) -> Tensor:
    """Each box of one image resampled to S x S (anisotropic; zero beyond the image).

    Args:
        image: [3, H, W] normalised image.
        boxes: [r, 4] XYXY boxes in its pixels, its dtype and device.
        warp_size: S.
        sampling_ratio: RoIAlign's samples per output pixel side (0: adaptive).

    Returns:
        [r, 3, S, S]: detframe's RoIAlign with aligned=True, so that a box with integer
        corners and side S gives exactly the pixels it covers.
    """
    return roi_align(image[None], [boxes], warp_size, 1.0, sampling_ratio, aligned=True)


@BOX_PREDICTOR_REGISTRY.register()
class RegionCNNOutputLayers(FastRCNNOutputLayers):
    """R-CNN's predictor: `cls_score` on the box head's features (fc7), `bbox_pred` on
    pool5, with `FastRCNNOutputLayers`' losses and inference. Called with two inputs, it is
    RegionCNN's predictor (MODEL.REGION_CNN.PREDICTOR_NAME), not StandardROIHeads' one.

    Args:
        input_size: D, features of the classifier's input (fc7).
        bbox_input_size: C * P * P, features of the box regressor's input (pool5).
        **kwargs: the other arguments of `FastRCNNOutputLayers`.
    """

    def __init__(self, *, input_size: int, bbox_input_size: int, **kwargs: Any) -> None:
        super().__init__(input_size=input_size, **kwargs)
        # The regressor reads pool5, not the classifier's input: replace the one built above.
        num_boxes = 1 if self.cls_agnostic_bbox_reg else self.num_classes
        self.bbox_pred = nn.Linear(bbox_input_size, num_boxes * 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @classmethod
    def from_config(  # type: ignore[override]
        cls, cfg: DictConfig, input_size: int, bbox_input_size: int
    ) -> dict[str, Any]:
        """`input_size`: D (the box head's `output_size`); `bbox_input_size`: C * P * P."""
        return {**super().from_config(cfg, input_size), "bbox_input_size": bbox_input_size}

    def forward(  # type: ignore[override]
        self, cls_features: Tensor, bbox_features: Tensor
    ) -> tuple[Tensor, Tensor]:
        """fc7 [R, D] and pool5 [R, C, P, P] -> (scores [R, K + 1], deltas [R, B * 4])."""
        return self.cls_score(cls_features.flatten(1)), self.bbox_pred(bbox_features.flatten(1))


@META_ARCH_REGISTRY.register()
class RegionCNN(MetaArchitecture):
    """R-CNN: each precomputed proposal warped out of the image and classified by the CNN
    (see the module docstring).

    Args:
        backbone: regions [r, 3, S, S] -> named feature maps.
        in_feature: the feature map pooled to pool5.
        box_head: pool5 [r, C, P, P] -> [r, D] (e.g. VGGFCHead: fc6, fc7).
        box_predictor: (fc7, pool5) -> (scores, deltas), with `losses(predictions,
            sampled)` and `inference(predictions, proposals)` (RegionCNNOutputLayers).
        proposal_selector: keeps each image's top proposals (PrecomputedProposals).
        sampler: labels and samples proposals for the losses (its
            `label_and_sample_proposals`; ROIHeads).
        pool_size: P.
        warp_size: S; a multiple of the backbone's size divisibility.
        context_padding: p, with 2p < S.
        warp_sampling_ratio: RoIAlign's samples per warped pixel side (0: adaptive).
        chunk_size: regions run through the backbone at once.
        pixel_mean, pixel_std: see `MetaArchitecture`.
    """

    NUM_CLASSES_KEY = "MODEL.ROI_HEADS.NUM_CLASSES"

    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        box_head: nn.Module,
        box_predictor: nn.Module,
        proposal_selector: PrecomputedProposals,
        sampler: ROIHeads,
        pool_size: int,
        warp_size: int,
        context_padding: int,
        warp_sampling_ratio: int = 1,
        chunk_size: int = 32,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, size_divisibility=1)
        outputs = backbone.output_shape()
        if in_feature not in outputs:
            raise ValueError(
                f"RegionCNN: in_feature {in_feature!r} is not a feature of the backbone "
                f"{type(backbone).__name__}, which gives {sorted(outputs)}"
            )
        if not 0 <= 2 * context_padding < warp_size:
            raise ValueError(
                f"RegionCNN: context_padding {context_padding} must be >= 0 and leave room for "
                f"the proposal in warp_size {warp_size} (2 * padding < size)"
            )
        divisibility = backbone.size_divisibility
        if divisibility > 0 and warp_size % divisibility != 0:
            raise ValueError(
                f"RegionCNN: warp_size {warp_size} must be a multiple of the backbone's size "
                f"divisibility {divisibility}"
            )
        if min(pool_size, chunk_size) < 1 or warp_sampling_ratio < 0:
            raise ValueError(
                f"RegionCNN: pool_size {pool_size} and chunk_size {chunk_size} must be >= 1 "
                f"and warp_sampling_ratio {warp_sampling_ratio} >= 0"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_selector = proposal_selector
        self.sampler = sampler
        self.pool_size = pool_size
        self.warp_size = warp_size
        self.context_padding = context_padding
        self.warp_sampling_ratio = warp_sampling_ratio
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        """MODEL.REGION_CNN.*, the backbone (MODEL.BACKBONE.NAME), the box head
        (MODEL.ROI_BOX_HEAD.NAME) on pool5, the predictor (MODEL.REGION_CNN.PREDICTOR_NAME),
        the proposals kept (MODEL.PRECOMPUTED_PROPOSALS.*) and the sampling
        (MODEL.ROI_HEADS.*)."""
        section = cfg.MODEL.REGION_CNN
        backbone = build_backbone(cfg)
        outputs = backbone.output_shape()
        if section.IN_FEATURE not in outputs:
            raise ValueError(
                f"MODEL.REGION_CNN.IN_FEATURE {section.IN_FEATURE!r} is not a feature of "
                f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}, which gives {sorted(outputs)}"
            )
        pool5 = outputs[section.IN_FEATURE]
        pool_size = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        box_head = build_component(ROI_BOX_HEAD_REGISTRY, cfg.MODEL.ROI_BOX_HEAD.NAME, cfg, pool5)
        box_predictor = build_component(
            BOX_PREDICTOR_REGISTRY,
            section.PREDICTOR_NAME,
            cfg,
            box_head.output_size,
            pool5.channels * pool_size * pool_size,
        )
        return {
            "backbone": backbone,
            "in_feature": section.IN_FEATURE,
            "box_head": box_head,
            "box_predictor": box_predictor,
            "proposal_selector": PrecomputedProposals(**PrecomputedProposals.from_config(cfg)),
            "sampler": ROIHeads(**ROIHeads.from_config(cfg, {})),
            "pool_size": pool_size,
            "warp_size": section.WARP_SIZE,
            "context_padding": section.CONTEXT_PADDING,
            "warp_sampling_ratio": section.WARP_SAMPLING_RATIO,
            "chunk_size": section.CHUNK_SIZE,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Detections (in the coordinates of `images`) from every kept proposal, and the
        losses of the sampled ones (with targets)."""
        given = self.gather_inputs(batched_inputs, "proposals", type(self).__name__)
        proposals, _ = self.proposal_selector(images, None, targets, proposals=given)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            sampled = self.sampler.label_and_sample_proposals(proposals, targets)
            losses = self.box_predictor.losses(self.predict(images, sampled), sampled)
        if self.training:
            return [], losses
        return self.box_predictor.inference(self.predict(images, proposals), proposals), losses

    def predict(self, images: ImageList, proposals: Sequence[Instances]) -> tuple[Tensor, Tensor]:
        """(scores [R, K + 1], deltas [R, B * 4]) of every proposal_box, image 0's first:
        each image's regions warped and classified CHUNK_SIZE at a time."""
        predictions = []
        for i, p in enumerate(proposals):
            image = images[i]
            boxes = p.proposal_boxes.tensor.to(image.dtype)
            regions = context_boxes(boxes, self.warp_size, self.context_padding)
            for chunk in regions.split(self.chunk_size):
                warped = warp_regions(image, chunk, self.warp_size, self.warp_sampling_ratio)
                predictions.append(self.classify(warped))
        scores, deltas = zip(*predictions, strict=True)
        return torch.cat(scores), torch.cat(deltas)

    def classify(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """Warped regions [r, 3, S, S] -> (scores [r, K + 1], deltas [r, B * 4])."""
        pool5 = self.pool5(regions)
        return self.box_predictor(self.box_head(pool5), pool5)

    def pool5(self, regions: Tensor) -> Tensor:
        """Warped regions [r, 3, S, S] -> pool5 [r, C, P, P]: IN_FEATURE max-pooled."""
        return F.adaptive_max_pool2d(self.backbone(regions)[self.in_feature], self.pool_size)
