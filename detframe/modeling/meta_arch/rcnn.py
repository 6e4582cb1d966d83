"""GeneralizedRCNN (backbone, proposal generator, ROI heads) and ProposalNetwork (backbone,
proposal generator).

Shorthand: N images in a batch, H x W an image as given, H' x W' the padded batch.

Inputs and outputs follow `MetaArchitecture` (see `base.py`): GeneralizedRCNN outputs
{"instances": Instances(pred_boxes, scores, pred_classes[, pred_masks bool [R, height,
width]])} per image; ProposalNetwork outputs {"proposals": Instances(proposal_boxes,
objectness_logits)}, both rescaled to (height, width).

A proposal generator is called as `generator(images, features, gt_instances, **extra)`,
where `extra` holds, for each input key listed in the generator's `INPUT_KEYS` (e.g.
"proposals" for `PrecomputedProposals`), that field of every input; every input must have it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.registry import META_ARCH_REGISTRY
from detframe.structures import ImageList, Instances

from ..backbone import Backbone, build_backbone
from ..proposal_generator import build_proposal_generator
from ..roi_heads import build_roi_heads
from .base import MetaArchitecture

__all__ = ["GeneralizedRCNN", "ProposalNetwork"]


class _ProposalStage(MetaArchitecture):
    """A backbone and a proposal generator: what both meta-architectures here share."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            size_divisibility=backbone.size_divisibility,
        )
        self.backbone = backbone
        self.proposal_generator = proposal_generator

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone.output_shape()),
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    def propose(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[dict[str, Tensor], list[Instances], dict[str, Tensor]]:
        """(backbone features, proposals, proposal losses) of the batch."""
        features = self.backbone(images.tensor)
        generator = type(self.proposal_generator).__name__
        extra = {
            key: self.gather_inputs(batched_inputs, key, f"the proposal generator {generator}")
            for key in getattr(self.proposal_generator, "INPUT_KEYS", ())
        }
        proposals, losses = self.proposal_generator(images, features, targets, **extra)
        return features, proposals, losses


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN(_ProposalStage):
    """A two-stage detector: Faster R-CNN, Mask R-CNN, Fast R-CNN (precomputed proposals).

    Args:
        backbone: images [N, 3, H', W'] -> named feature maps.
        proposal_generator: (images, features, gt_instances, **extra) -> proposals and
            losses; an RPN or `PrecomputedProposals`.
        roi_heads: (images, features, proposals, gt_instances) -> detections and losses.
        pixel_mean, pixel_std: see `MetaArchitecture`.
    """

    NUM_CLASSES_KEY = "MODEL.ROI_HEADS.NUM_CLASSES"

    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(
            backbone=backbone,
            proposal_generator=proposal_generator,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.roi_heads = roi_heads

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        kwargs = super().from_config(cfg)
        kwargs["roi_heads"] = build_roi_heads(cfg, kwargs["backbone"].output_shape())
        return kwargs

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Detections (in the coordinates of `images`) and the proposal and ROI losses."""
        features, proposals, proposal_losses = self.propose(images, batched_inputs, targets)
        detections, detector_losses = self.roi_heads(images, features, proposals, targets)
        return detections, {**proposal_losses, **detector_losses}


@META_ARCH_REGISTRY.register()
class ProposalNetwork(_ProposalStage):
    """A proposal network alone (e.g. an RPN), evaluated by proposal recall.

    Args: see `GeneralizedRCNN`, without the ROI heads.
    """

    OUTPUT_KEY = "proposals"

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Proposals (in the coordinates of `images`) and the proposal losses."""
        _, proposals, losses = self.propose(images, batched_inputs, targets)
        return proposals, losses

    def postprocess_one(self, result: Instances, height: int, width: int) -> Instances:
        """The proposals with their boxes scaled to (height, width) and clipped to it."""
        scale_y = height / result.image_size[0]
        scale_x = width / result.image_size[1]
        boxes = result.proposal_boxes.clone()
        boxes.scale(scale_x, scale_y)
        boxes.clip((height, width))
        return Instances(
            (height, width),
            proposal_boxes=boxes,
            objectness_logits=result.objectness_logits,
        )
