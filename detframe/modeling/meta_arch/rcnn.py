"""GeneralizedRCNN: backbone, then proposal generator, then ROI heads.

Shorthand: N images in a batch, H x W an image as given, H' x W' the padded batch.

Input, one dict per image (what `detframe.data.DatasetMapper` produces)::

    {"image": Tensor[3, H, W] uint8 or float, channels in INPUT.FORMAT,
     "height": int, "width": int   (size to report detections at; default H, W),
     "instances": Instances(gt_boxes, gt_classes[, gt_masks])   (targets; optional),
     "proposals": Instances(proposal_boxes, objectness_logits)  (precomputed; optional)}

Output: in training mode, a dict of scalar losses; in evaluation mode, one `Instances` per
image with pred_boxes, scores, pred_classes (and pred_masks, bool [R, height, width]),
rescaled to (height, width). `detect_and_compute_losses` returns both at once, which gives
validation losses from a model in evaluation mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.registry import META_ARCH_REGISTRY
from detframe.structures import ImageList, Instances

from ..backbone import Backbone, build_backbone
from ..postprocessing import detector_postprocess
from ..proposal_generator import build_proposal_generator
from ..roi_heads import build_roi_heads

__all__ = ["GeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN(nn.Module):
    """A two-stage detector: Faster R-CNN, Mask R-CNN, Fast R-CNN (precomputed proposals).

    Args:
        backbone: images [N, 3, H', W'] -> named feature maps.
        proposal_generator: (images, features, gt_instances, precomputed) -> proposals and
            losses; an RPN or `PrecomputedProposals`.
        roi_heads: (images, features, proposals, gt_instances) -> detections and losses.
        pixel_mean, pixel_std: per channel, in the input's channel order and units; images
            are normalised as (image - pixel_mean) / pixel_std.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"pixel_mean and pixel_std need 3 values, got {list(pixel_mean)} and "
                f"{list(pixel_std)}"
            )
        if min(pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {list(pixel_std)}")
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        # float64, so that a model cast to float64 normalises with the exact values; images
        # are normalised in the dtype of the model's parameters.
        mean = torch.tensor(pixel_mean, dtype=torch.float64).view(-1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float64).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, shapes),
            "roi_heads": build_roi_heads(cfg, shapes),
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: Sequence[dict[str, Any]]) -> Any:
        """Losses (dict of scalars) in training mode; detections (list[Instances]) otherwise."""
        detections, losses = self.detect_and_compute_losses(batched_inputs)
        return losses if self.training else detections

    def detect_and_compute_losses(
        self, batched_inputs: Sequence[dict[str, Any]]
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """One pass that returns detections (evaluation mode) and losses (given targets).

        Returns:
            (detections, losses): detections is empty in training mode; losses is empty
            when the inputs carry no "instances".

        Raises:
            ValueError: training mode without "instances" in every input, or an input
                without "image".
        """
        if len(batched_inputs) == 0:
            raise ValueError("GeneralizedRCNN needs at least one input image")
        images = self.preprocess_image(batched_inputs)
        gt_instances = self._targets(batched_inputs)
        precomputed = self._precomputed_proposals(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(
            images, features, gt_instances, precomputed
        )
        results, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses = {**proposal_losses, **detector_losses}
        if self.training:
            return [], losses
        return self.postprocess(results, batched_inputs), losses

    def inference(self, batched_inputs: Sequence[dict[str, Any]]) -> list[Instances]:
        """Detections for images without targets, in the original image sizes."""
        if self.training:
            raise RuntimeError("inference() needs evaluation mode: call model.eval() first")
        inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs]
        return self.detect_and_compute_losses(inputs)[0]

    def preprocess_image(self, batched_inputs: Sequence[dict[str, Any]]) -> ImageList:
        """Normalises the images and pads them into one batch [N, 3, H', W'], in the dtype
        of the model's parameters."""
        dtype = next(self.backbone.parameters()).dtype
        mean, std = self.pixel_mean.to(dtype), self.pixel_std.to(dtype)
        images = []
        for i, x in enumerate(batched_inputs):
            if "image" not in x:
                raise ValueError(f"input {i} has no 'image' (keys: {sorted(x)})")
            image = x["image"].to(self.device, non_blocking=True)
            if image.dim() != 3 or image.size(0) != 3:
                raise ValueError(f"input {i}: image must be [3, H, W], got {tuple(image.shape)}")
            images.append((image.to(dtype) - mean) / std)
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def _targets(self, batched_inputs: Sequence[dict[str, Any]]) -> list[Instances] | None:
        has = ["instances" in x for x in batched_inputs]
        if not any(has):
            if self.training:
                raise ValueError("training needs 'instances' (targets) in every input")
            return None
        if not all(has):
            missing = [i for i, h in enumerate(has) if not h]
            raise ValueError(f"inputs {missing} have no 'instances' but others do")
        return [x["instances"].to(self.device) for x in batched_inputs]

    def _precomputed_proposals(
        self, batched_inputs: Sequence[dict[str, Any]]
    ) -> list[Instances] | None:
        if "proposals" not in batched_inputs[0]:
            return None
        return [x["proposals"].to(self.device) for x in batched_inputs]

    @staticmethod
    def postprocess(
        results: Sequence[Instances], batched_inputs: Sequence[dict[str, Any]]
    ) -> list[Instances]:
        """Rescales each image's detections to its requested output size (height, width)."""
        processed = []
        for result, x in zip(results, batched_inputs, strict=True):
            height = x.get("height", x["image"].shape[1])
            width = x.get("width", x["image"].shape[2])
            processed.append(detector_postprocess(result, int(height), int(width)))
        return processed
