"""Sampling a fixed-size, class-balanced minibatch of labelled anchors or proposals.

Shapes:

    R   labelled predictions of one image

    labels             [R]   int; -1 ignore, `bg_label` background, anything else foreground
    pos_idx, neg_idx   [P], [Q]   int64 indices into `labels`, P + Q <= num_samples

Random draws: per call, `torch.randperm(#foreground, device=...)` then
`torch.randperm(#background, device=...)`, each truncated to the number wanted, exactly as
torchvision's `BalancedPositiveNegativeSampler` does per image, so both draw the same
samples from the same random state (and tests can make both deterministic by replacing
`torch.randperm`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["subsample_labels"]


def subsample_labels(
    labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[Tensor, Tensor]:
    """Draws at most `num_samples` indices, a `positive_fraction` of them foreground.

    At most int(num_samples * positive_fraction) foreground indices are drawn; the rest of
    `num_samples` is filled with background (so an image with few foreground gets more
    background); with too little background the sample is smaller than `num_samples`.
    Ignored labels (-1) are never drawn.

    Args:
        labels: [R] integer labels: -1 ignore, `bg_label` background, other values
            foreground (e.g. 1 for the RPN, a class index for the ROI heads).
        num_samples: total number of indices wanted, >= 0.
        positive_fraction: the fraction of `num_samples` wanted as foreground, in [0, 1].
        bg_label: the label of background.

    Returns:
        pos_idx: [P] int64 indices of the drawn foreground, in random order.
        neg_idx: [Q] int64 indices of the drawn background, in random order.

    Raises:
        ValueError: `labels` is not 1-D, `num_samples` < 0, or `positive_fraction` is not
            in [0, 1].
        TypeError: `labels` is not an integer tensor.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"subsample_labels: labels must be a 1-D tensor [R], got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"subsample_labels: labels must be an integer tensor, got {labels.dtype}")
    if num_samples < 0:
        raise ValueError(f"subsample_labels: num_samples must be >= 0, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"subsample_labels: positive_fraction must be in [0, 1], got {positive_fraction}"
        )
    positive = torch.where((labels != -1) & (labels != bg_label))[0]
    negative = torch.where(labels == bg_label)[0]

    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)

    perm1 = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm2 = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm1], negative[perm2]
