"""Proposal generators: images and features -> per-image proposals (and losses).

Every generator is called as

    proposals, losses = generator(images, features, gt_instances, precomputed)

- images: ImageList (the padded batch, with each image's size);
- features: dict[str, Tensor] of backbone maps [N, C, H_l, W_l];
- gt_instances: list[Instances] with gt_boxes, or None (no losses then);
- precomputed: list[Instances] with proposal_boxes and objectness_logits, the proposals that
  came with the inputs, or None;

and returns N Instances with proposal_boxes (Boxes) and objectness_logits, highest first,
and a dict of scalar losses (empty when there are none). `RPN` computes proposals from the
features and ignores `precomputed`; `PrecomputedProposals` (Fast R-CNN) passes `precomputed`
on, truncated, and needs it.
"""

from .build import build_proposal_generator
from .precomputed import PrecomputedProposals
from .rpn import RPN, StandardRPNHead, find_top_proposals

__all__ = [
    "RPN",
    "PrecomputedProposals",
    "StandardRPNHead",
    "build_proposal_generator",
    "find_top_proposals",
]
