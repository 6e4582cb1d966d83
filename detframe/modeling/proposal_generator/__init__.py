"""Proposal generators: images and features -> per-image proposals (and losses).

Every generator is called as

    proposals, losses = generator(images, features, gt_instances, **extra)

- images: ImageList (the padded batch, with each image's size);
- features: dict[str, Tensor] of backbone maps [N, C, H_l, W_l];
- gt_instances: list[Instances] with gt_boxes, or None (no losses then);
- extra: for each name in the generator's class attribute `INPUT_KEYS` (default none), that
  field of every input (list[Instances]), handed over by the meta-architecture;

and returns N Instances with proposal_boxes (Boxes) and objectness_logits, highest first,
and a dict of scalar losses (empty when there are none). `RPN` computes proposals from the
features; `PrecomputedProposals` (Fast R-CNN, INPUT_KEYS = ("proposals",)) passes the inputs'
proposals on, truncated.

Offline methods (`OfflineProposalMethod`, OFFLINE_PROPOSAL_REGISTRY, e.g. `SelectiveSearch`)
are not generators: they turn one image into ranked boxes once, before training, and
`detframe proposals` writes what they give to the file that `PrecomputedProposals` reads.
"""

from .build import build_proposal_generator
from .offline import OfflineProposalMethod, SelectiveSearch
from .precomputed import PrecomputedProposals
from .rpn import RPN, StandardRPNHead, find_top_proposals

__all__ = [
    "RPN",
    "OfflineProposalMethod",
    "PrecomputedProposals",
    "SelectiveSearch",
    "StandardRPNHead",
    "build_proposal_generator",
    "find_top_proposals",
]
