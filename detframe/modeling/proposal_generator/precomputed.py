"""PrecomputedProposals: the proposals that came with the inputs (Fast R-CNN).

Shorthand: N images, R proposals given for an image, P = min(R, post_nms_topk) kept.

    precomputed  N Instances(proposal_boxes: Boxes [R, 4], objectness_logits [R]), in the
                 coordinates of the (resized) input image; the data mapper transforms the
                 boxes along with the image, this module does not touch them
    proposals    N Instances(proposal_boxes: Boxes [P, 4], objectness_logits [P]), the P
                 highest objectness_logits, highest first (ties keep their given order)

Called like every proposal generator (see `detframe.modeling.proposal_generator`):

    proposals, losses = PrecomputedProposals(...)(images, features, gt_instances, precomputed)

`features` and `gt_instances` are not used; `losses` is always {}. Reads
MODEL.RPN.POST_NMS_TOPK_TRAIN / _TEST (declared in `rpn.py`, which this package imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.layers import ShapeSpec
from detframe.registry import PROPOSAL_GENERATOR_REGISTRY
from detframe.structures import ImageList, Instances

from . import rpn  # noqa: F401  (declares MODEL.RPN.POST_NMS_TOPK_*)

__all__ = ["PrecomputedProposals"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class PrecomputedProposals(nn.Module):
    """Passes on the inputs' precomputed proposals, each image's top `post_nms_topk`.

    Args:
        post_nms_topk: (training, evaluation) proposals kept per image.
    """

    def __init__(self, *, post_nms_topk: tuple[int, int]) -> None:
        super().__init__()
        if len(post_nms_topk) != 2 or min(post_nms_topk) < 1:
            raise ValueError(
                f"PrecomputedProposals: post_nms_topk must be two positive ints, "
                f"got {post_nms_topk!r}"
            )
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}

    @classmethod
    def from_config(
        cls, cfg: DictConfig, input_shape: dict[str, ShapeSpec] | None = None
    ) -> dict[str, Any]:
        """MODEL.RPN.POST_NMS_TOPK_TRAIN / _TEST; `input_shape` is not needed (it is accepted
        because `build_proposal_generator` passes it to every generator)."""
        return {
            "post_nms_topk": (cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
        }

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor] | None = None,
        gt_instances: Sequence[Instances] | None = None,
        precomputed: Sequence[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """
        Args:
            images: the padded batch; image i's size must equal precomputed[i].image_size.
            features: not used.
            gt_instances: not used.
            precomputed: N Instances with proposal_boxes and objectness_logits [R].

        Returns:
            (N Instances with the top `post_nms_topk` (training or evaluation value)
            proposal_boxes and objectness_logits, highest first; {}).

        Raises:
            ValueError: `precomputed` is None, has a different length than `images`, lacks
                a field, or an image size differs.
        """
        del features, gt_instances
        if precomputed is None:
            raise ValueError(
                "PrecomputedProposals needs precomputed proposals: give every input a "
                "'proposals' Instances (a dataset with a proposals file), or use "
                "MODEL.PROPOSAL_GENERATOR.NAME=RPN"
            )
        if len(precomputed) != len(images):
            raise ValueError(
                f"PrecomputedProposals: {len(precomputed)} precomputed proposal sets for "
                f"{len(images)} images"
            )
        topk = self.post_nms_topk[self.training]
        results = []
        for i, (given, image_size) in enumerate(zip(precomputed, images.image_sizes, strict=True)):
            for field in ("proposal_boxes", "objectness_logits"):
                if not given.has(field):
                    raise ValueError(
                        f"PrecomputedProposals: precomputed[{i}] has no field {field!r} "
                        f"(fields: {sorted(given.fields())})"
                    )
            if given.image_size != tuple(image_size):
                raise ValueError(
                    f"PrecomputedProposals: precomputed[{i}].image_size {given.image_size} "
                    f"differs from the image's size {tuple(image_size)}; the data mapper must "
                    "transform proposals with the image"
                )
            order = torch.sort(given.objectness_logits, descending=True, stable=True).indices
            kept = given[order[:topk]]
            results.append(
                Instances(
                    given.image_size,
                    proposal_boxes=kept.proposal_boxes,
                    objectness_logits=kept.objectness_logits,
                )
            )
        return results, {}
