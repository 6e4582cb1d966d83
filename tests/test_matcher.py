"""Matcher against torchvision's Matcher, and its edge cases by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TvMatcher
from torchvision.ops import box_iou

from detframe.modeling.matcher import Matcher


def tv_labels(tv_matches: torch.Tensor, between_label: int) -> torch.Tensor:
    """torchvision's codes as labels: -1 (below low) -> 0, -2 (between) -> between_label."""
    labels = torch.ones_like(tv_matches, dtype=torch.int8)
    labels[tv_matches == TvMatcher.BELOW_LOW_THRESHOLD] = 0
    labels[tv_matches == TvMatcher.BETWEEN_THRESHOLDS] = between_label
    return labels


def random_iou(num_gt: int, num_pred: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 5], dim=1)

    gt = boxes(num_gt)
    # Predictions near the ground truth, so that all intervals are populated, plus a copy
    # of some predictions (exact ties).
    pred = torch.cat([boxes(num_pred), gt.repeat(3, 1) + torch.randn(3 * num_gt, 4, generator=g)])
    pred = torch.cat([pred, pred[:5]])
    return box_iou(gt, pred)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_thresholds_match_torchvision(seed):
    iou = random_iou(6, 200, seed)
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    tv = TvMatcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    expected = tv_labels(tv, between_label=-1)
    assert labels.dtype == torch.int8 and matches.dtype == torch.int64
    assert torch.equal(labels, expected)
    assert {0, -1, 1} <= set(labels.tolist())
    assert torch.equal(matches[tv >= 0], tv[tv >= 0])
    assert torch.equal(matches, iou.argmax(dim=0))


@pytest.mark.parametrize("seed", [0, 1])
def test_roi_thresholds_match_torchvision(seed):
    iou = random_iou(5, 150, seed)
    matches, labels = Matcher([0.5], [0, 1])(iou)
    tv = TvMatcher(0.5, 0.5, allow_low_quality_matches=False)(iou)
    assert torch.equal(labels, tv_labels(tv, between_label=-1))
    assert not (labels == -1).any()
    assert torch.equal(matches[tv >= 0], tv[tv >= 0])


def test_threshold_intervals_are_half_open():
    iou = torch.tensor([[0.0, 0.29, 0.3, 0.69, 0.7, 1.0]])
    _, labels = Matcher([0.3, 0.7], [0, -1, 1])(iou)
    assert labels.tolist() == [0, 0, -1, -1, 1, 1]


def test_low_quality_ties_all_become_positive():
    # gt 0's best IoU 0.4 is shared by predictions 0 and 2; gt 1's best is 0.6 at 3.
    iou = torch.tensor([[0.4, 0.1, 0.4, 0.2], [0.0, 0.2, 0.1, 0.6]])
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 0, 1, 1]
    assert matches.tolist() == [0, 1, 0, 1]
    _, labels = Matcher([0.3, 0.7], [0, -1, 1])(iou)
    assert labels.tolist() == [-1, 0, -1, -1]


def test_gt_with_zero_iou_everywhere_marks_its_best_predictions():
    # As torchvision and detectron2: a gt overlapping nothing has maximum 0, so every
    # prediction with IoU 0 to it is a low-quality match.
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    tv = TvMatcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert torch.equal(labels, tv_labels(tv, between_label=-1))
    assert labels.tolist() == [1, 1, 1]
    assert matches.tolist() == [1, 1, 0]


def test_no_ground_truth():
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], True)(torch.zeros(0, 7))
    assert matches.tolist() == [0] * 7 and matches.dtype == torch.int64
    assert labels.tolist() == [0] * 7 and labels.dtype == torch.int8
    _, labels = Matcher([0.5], [-1, 1])(torch.zeros(0, 3))
    assert labels.tolist() == [-1] * 3


def test_no_predictions():
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], True)(torch.zeros(4, 0))
    assert matches.shape == (0,) and labels.shape == (0,)


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "NaN"), (float("inf"), "infinite"), (-0.5, ">= 0")],
)
def test_bad_values_raise(value, message):
    iou = torch.rand(3, 5)
    iou[1, 2] = value
    with pytest.raises(ValueError, match=message):
        Matcher([0.5], [0, 1])(iou)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-decreasing"):
        Matcher([0.7, 0.3], [0, -1, 1])
    with pytest.raises(ValueError, match="labels"):
        Matcher([0.5], [0, 2])
    with pytest.raises(ValueError, match="len"):
        Matcher([0.5], [0, -1, 1])
    with pytest.raises(ValueError, match="\\[G, R\\]"):
        Matcher([0.5], [0, 1])(torch.zeros(5))
