"""PrecomputedProposals: the proposals that came with the inputs (Fast R-CNN).

Shorthand: N images, R proposals given for an image, P = min(R, topk) kept.

    proposals (in)   N Instances(proposal_boxes: Boxes [R, 4], objectness_logits [R]), the
                     inputs' "proposals", in the coordinates of the (resized) input image;
                     the data mapper transforms the boxes along with the image, this module
                     does not touch them
    proposals (out)  N Instances(proposal_boxes: Boxes [P, 4], objectness_logits [P]), the P
                     highest objectness_logits, highest first (ties keep their given order)

Called like every proposal generator (see `detframe.modeling.proposal_generator`), with the
inputs' "proposals" handed over by the meta-architecture because the class lists the key in
`INPUT_KEYS`:

    proposals, losses = PrecomputedProposals(...)(images, features, gt_instances,
                                                  proposals=inputs_proposals)

`features` and `gt_instances` are not used; `losses` is always {}. Reads
MODEL.PRECOMPUTED_PROPOSALS.TOPK_TRAIN / _TEST.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import PROPOSAL_GENERATOR_REGISTRY
from detframe.structures import ImageList, Instances

__all__ = ["PrecomputedProposals"]

declare(
    "MODEL.PRECOMPUTED_PROPOSALS.TOPK_TRAIN",
    int,
    2000,
    "precomputed proposals kept per training image, by objectness",
    min=1,
)
declare(
    "MODEL.PRECOMPUTED_PROPOSALS.TOPK_TEST",
    int,
    1000,
    "precomputed proposals kept per test image, by objectness",
    min=1,
)


@PROPOSAL_GENERATOR_REGISTRY.register()
class PrecomputedProposals(nn.Module):
    """Passes on the inputs' precomputed proposals, each image's top `topk`.

    Args:
        topk: (training, evaluation) proposals kept per image.
    """

    # Input fields the meta-architecture hands to `forward` as keyword arguments.
    INPUT_KEYS: ClassVar[tuple[str, ...]] = ("proposals",)

    def __init__(self, *, topk: tuple[int, int]) -> None:
        super().__init__()
        if len(topk) != 2 or min(topk) < 1:
            raise ValueError(f"PrecomputedProposals: topk must be two positive ints, got {topk!r}")
        self.topk = {True: topk[0], False: topk[1]}

    @classmethod
    def from_config(
        cls, cfg: DictConfig, input_shape: dict[str, ShapeSpec] | None = None
    ) -> dict[str, Any]:
        """MODEL.PRECOMPUTED_PROPOSALS.TOPK_TRAIN / _TEST; `input_shape` is not needed (it is
        accepted because `build_proposal_generator` passes it to every generator)."""
        section = cfg.MODEL.PRECOMPUTED_PROPOSALS
        return {"topk": (section.TOPK_TRAIN, section.TOPK_TEST)}

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor] | None = None,
        gt_instances: Sequence[Instances] | None = None,
        *,
        proposals: Sequence[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """
        Args:
            images: the padded batch; image i's size must equal proposals[i].image_size.
            features: not used.
            gt_instances: not used.
            proposals: N Instances with proposal_boxes and objectness_logits [R], the
                inputs' "proposals".

        Returns:
            (N Instances with the top `topk` (training or evaluation value) proposal_boxes
            and objectness_logits, highest first; {}).

        Raises:
            ValueError: `proposals` is None, has a different length than `images`, lacks
                a field, or an image size differs.
        """
        del features, gt_instances
        if proposals is None:
            raise ValueError(
                "PrecomputedProposals needs precomputed proposals: give every input a "
                "'proposals' Instances (a dataset with a proposals file), or use "
                "MODEL.PROPOSAL_GENERATOR.NAME=RPN"
            )
        if len(proposals) != len(images):
            raise ValueError(
                f"PrecomputedProposals: {len(proposals)} precomputed proposal sets for "
                f"{len(images)} images"
            )
        topk = self.topk[self.training]
        results = []
        for i, (given, image_size) in enumerate(zip(proposals, images.image_sizes, strict=True)):
            for field in ("proposal_boxes", "objectness_logits"):
                if not given.has(field):
                    raise ValueError(
                        f"PrecomputedProposals: proposals[{i}] has no field {field!r} "
                        f"(fields: {sorted(given.fields())})"
                    )
            if given.image_size != tuple(image_size):
                raise ValueError(
                    f"PrecomputedProposals: proposals[{i}].image_size {given.image_size} "
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
