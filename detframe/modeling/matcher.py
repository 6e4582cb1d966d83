"""Matching predictions (anchors, proposals) to ground-truth boxes by a quality matrix (IoU).

Shapes:

    G   ground-truth boxes
    R   predictions (anchors or proposals)

    match_quality_matrix   [G, R]   e.g. pairwise IoU, values >= 0
    matches                [R]      int64, index of the best ground truth of each prediction
    match_labels           [R]      int8, the label of the interval its best quality falls in

With thresholds [t_1, ..., t_n] and labels [l_0, ..., l_n], a prediction whose best quality
q falls in [t_i, t_{i+1}) (t_0 = -inf, t_{n+1} = +inf) gets label l_i. Labels are 1
(foreground), 0 (background) or -1 (ignore). E.g. the RPN's thresholds [0.3, 0.7] with
labels [0, -1, 1]: q < 0.3 background, 0.3 <= q < 0.7 ignored, q >= 0.7 foreground.

Low-quality matches (Faster R-CNN's RPN rule): every prediction whose quality with some
ground truth equals that ground truth's best quality over all predictions (ties included,
also when that best is 0) is labelled 1; its match stays its own best ground truth. Same
results as torchvision's `Matcher` and detectron2's `Matcher`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Matcher"]


class Matcher:
    """Assigns each prediction its best ground truth and a label from quality thresholds."""

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ) -> None:
        """
        Args:
            thresholds: n increasing thresholds splitting [-inf, inf) into n + 1 intervals.
            labels: n + 1 labels in {-1, 0, 1}, one per interval.
            allow_low_quality_matches: also label 1 every prediction that is the best match
                (ties included) of some ground truth (see the module docstring).

        Raises:
            ValueError: thresholds are not increasing or not finite, a label is not in
                {-1, 0, 1}, or len(labels) != len(thresholds) + 1.
        """
        thresholds = [float(t) for t in thresholds]
        labels = [int(label) for label in labels]
        if not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"Matcher: thresholds must be finite, got {thresholds}")
        if any(low > high for low, high in itertools.pairwise(thresholds)):
            raise ValueError(f"Matcher: thresholds must be non-decreasing, got {thresholds}")
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher: labels must be -1, 0 or 1, got {labels}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher: need len(thresholds) + 1 labels, got {len(thresholds)} thresholds "
                f"{thresholds} and {len(labels)} labels {labels}"
            )
        self.thresholds = [-math.inf, *thresholds, math.inf]
        self.labels = labels
        self.allow_low_quality_matches = allow_low_quality_matches

    def __repr__(self) -> str:
        return (
            f"Matcher(thresholds={self.thresholds[1:-1]}, labels={self.labels}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, match_quality_matrix: Tensor) -> tuple[Tensor, Tensor]:
        """Matches predictions to ground truth.

        Args:
            match_quality_matrix: [G, R] quality (e.g. IoU) of each ground truth with each
                prediction; finite and >= 0.

        Returns:
            matches: [R] int64, the ground-truth index with the highest quality for each
                prediction (0 when G == 0).
            match_labels: [R] int8, the label of each prediction (labels[0] when G == 0).

        Raises:
            ValueError: the matrix is not 2-D, or holds NaN, infinite or negative values.
        """
        if not isinstance(match_quality_matrix, Tensor) or match_quality_matrix.dim() != 2:
            shape = (
                tuple(match_quality_matrix.shape)
                if isinstance(match_quality_matrix, Tensor)
                else type(match_quality_matrix).__name__
            )
            raise ValueError(f"Matcher: match_quality_matrix must be [G, R], got {shape}")
        num_gt, num_pred = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0 or num_pred == 0:
            matches = torch.zeros(num_pred, dtype=torch.int64, device=device)
            match_labels = torch.full((num_pred,), self.labels[0], dtype=torch.int8, device=device)
            return matches, match_labels
        _check_values(match_quality_matrix)

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = torch.ones(num_pred, dtype=torch.int8, device=device)
        for label, low, high in zip(
            self.labels, self.thresholds[:-1], self.thresholds[1:], strict=True
        ):
            in_interval = (matched_vals >= low) & (matched_vals < high)
            match_labels[in_interval] = label
        if self.allow_low_quality_matches:
            self._set_low_quality_matches(match_labels, match_quality_matrix)
        return matches, match_labels

    def _set_low_quality_matches(self, match_labels: Tensor, match_quality_matrix: Tensor) -> None:
        """Labels 1, in place, every prediction that is some ground truth's best (ties too).

        match_labels [R] int8, match_quality_matrix [G, R].
        """
        highest_quality_foreach_gt = match_quality_matrix.max(dim=1).values
        is_best = match_quality_matrix == highest_quality_foreach_gt[:, None]
        match_labels[is_best.any(dim=0)] = 1


def _check_values(match_quality_matrix: Tensor) -> None:
    """Raises ValueError naming NaN, infinite or negative entries."""
    if bool((torch.isfinite(match_quality_matrix) & (match_quality_matrix >= 0)).all()):
        return
    if torch.isnan(match_quality_matrix).any():
        raise ValueError("Matcher: match_quality_matrix contains NaN")
    if torch.isinf(match_quality_matrix).any():
        raise ValueError("Matcher: match_quality_matrix contains infinite values")
    minimum = match_quality_matrix.min().item()
    raise ValueError(f"Matcher: match_quality_matrix must be >= 0, got a minimum of {minimum}")
