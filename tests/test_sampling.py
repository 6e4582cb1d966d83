"""subsample_labels against torchvision's BalancedPositiveNegativeSampler and by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from detframe.modeling.sampling import subsample_labels


def as_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices] = True
    return mask


def random_labels(n: int, seed: int, fg_fraction: float) -> torch.Tensor:
    """RPN-style labels: 1 foreground, 0 background, -1 ignore."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    labels = torch.zeros(n, dtype=torch.int64)
    labels[u < 0.2] = -1
    labels[u > 1 - fg_fraction] = 1
    return labels


@pytest.mark.parametrize(("num_samples", "fraction"), [(256, 0.5), (64, 0.25), (20, 1.0)])
def test_same_samples_as_torchvision_for_a_batch(num_samples, fraction):
    images = [random_labels(500, 0, 0.05), random_labels(300, 1, 0.3), random_labels(50, 2, 0.0)]
    torch.manual_seed(123)
    ours = [subsample_labels(labels, num_samples, fraction, bg_label=0) for labels in images]
    torch.manual_seed(123)
    tv_pos, tv_neg = BalancedPositiveNegativeSampler(num_samples, fraction)(images)
    for (pos, neg), tp, tn, labels in zip(ours, tv_pos, tv_neg, images, strict=True):
        assert torch.equal(as_mask(pos, len(labels)), tp.bool())
        assert torch.equal(as_mask(neg, len(labels)), tn.bool())


def test_same_samples_as_torchvision_with_class_labels():
    # ROI-head style: classes 0..K-1, background K; torchvision: background 0, classes 1..K.
    num_classes = 3
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, num_classes + 1, (400,), generator=g)
    labels[torch.rand(400, generator=g) < 0.5] = num_classes
    tv_labels = torch.where(labels == num_classes, 0, labels + 1)
    torch.manual_seed(7)
    pos, neg = subsample_labels(labels, 128, 0.25, bg_label=num_classes)
    torch.manual_seed(7)
    (tp,), (tn,) = BalancedPositiveNegativeSampler(128, 0.25)([tv_labels])
    assert torch.equal(as_mask(pos, 400), tp.bool())
    assert torch.equal(as_mask(neg, 400), tn.bool())


def test_randperm_calls_are_the_documented_ones(monkeypatch):
    calls = []

    def recording_randperm(n, **kwargs):
        calls.append((n, kwargs))
        return torch.arange(n, device=kwargs.get("device"))

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    labels = torch.tensor([1, 0, 0, -1, 1, 0, 1, 0])
    pos, neg = subsample_labels(labels, 4, 0.5, bg_label=0)
    assert [n for n, _ in calls] == [3, 4]
    assert all(kwargs == {"device": torch.device("cpu")} for _, kwargs in calls)
    # With randperm = arange the first indices in order are taken.
    assert pos.tolist() == [0, 4] and neg.tolist() == [1, 2]


def test_fractions_and_counts():
    labels = torch.tensor([1] * 100 + [0] * 1000 + [-1] * 50)
    pos, neg = subsample_labels(labels, 256, 0.25, bg_label=0)
    assert len(pos) == 64 and len(neg) == 192
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 64 and len(set(neg.tolist())) == 192


def test_few_positives_are_filled_with_negatives():
    labels = torch.tensor([2] * 10 + [5] * 1000)
    pos, neg = subsample_labels(labels, 256, 0.5, bg_label=5)
    assert len(pos) == 10 and len(neg) == 246
    assert set(pos.tolist()) == set(range(10))


def test_few_negatives_make_a_smaller_sample():
    labels = torch.tensor([1] * 500 + [0] * 20)
    pos, neg = subsample_labels(labels, 256, 0.5, bg_label=0)
    assert len(pos) == 128 and len(neg) == 20


def test_ignored_labels_are_never_sampled():
    labels = torch.tensor([-1] * 300 + [1] * 3 + [0] * 4)
    for seed in range(5):
        torch.manual_seed(seed)
        pos, neg = subsample_labels(labels, 256, 0.5, bg_label=0)
        assert (labels[torch.cat([pos, neg])] != -1).all()
        assert len(pos) == 3 and len(neg) == 4


def test_empty_and_zero_samples():
    pos, neg = subsample_labels(torch.zeros(0, dtype=torch.int64), 256, 0.5, bg_label=0)
    assert pos.shape == (0,) and neg.shape == (0,)
    pos, neg = subsample_labels(torch.tensor([1, 0, 0]), 0, 0.5, bg_label=0)
    assert pos.shape == (0,) and neg.shape == (0,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        subsample_labels(torch.zeros(2, 3, dtype=torch.int64), 4, 0.5, 0)
    with pytest.raises(TypeError, match="integer"):
        subsample_labels(torch.zeros(3), 4, 0.5, 0)
    with pytest.raises(ValueError, match="num_samples"):
        subsample_labels(torch.zeros(3, dtype=torch.int64), -1, 0.5, 0)
    with pytest.raises(ValueError, match="positive_fraction"):
        subsample_labels(torch.zeros(3, dtype=torch.int64), 4, 1.5, 0)
