"""sigmoid_focal_loss against torchvision.ops.sigmoid_focal_loss and against the formula
evaluated element by element in float64 with `math` (stable logs of the sigmoid), logits of
+-100 included; gradients, reductions and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from detframe.layers import sigmoid_focal_loss

# Logits from saturated to saturated, each met with a negative, a positive and soft targets.
EXTREME_LOGITS = [-100.0, -40.0, -17.0, -3.0, -0.5, 0.0, 0.5, 3.0, 17.0, 40.0, 100.0]
TARGETS = [0.0, 1.0, 0.25, 0.9]
ALPHA_GAMMA = [(0.25, 2.0), (0.5, 1.0), (0.75, 0.0), (-1.0, 2.0), (-1.0, 0.0), (0.0, 3.0)]


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))) without overflow or loss of precision."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def focal_by_hand(x: float, t: float, alpha: float, gamma: float) -> float:
    p, one_minus_p = math.exp(log_sigmoid(x)), math.exp(log_sigmoid(-x))
    cross_entropy = -(t * log_sigmoid(x) + (1 - t) * log_sigmoid(-x))
    one_minus_p_t = one_minus_p * t + p * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return alpha_t * one_minus_p_t**gamma * cross_entropy


def random_case(seed: int, dtype: torch.dtype, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 500, 9] logits (std 4) and 0/1 targets (about 1 in 10 positive) or soft ones."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2, 500, 9, generator=g, dtype=dtype) * 4
    if soft:
        targets = torch.rand(2, 500, 9, generator=g, dtype=dtype)
    else:
        targets = (torch.rand(2, 500, 9, generator=g) < 0.1).to(dtype)
    return inputs, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("alpha", "gamma"), ALPHA_GAMMA)
@pytest.mark.parametrize("soft", [False, True])
def test_matches_torchvision(dtype, alpha, gamma, soft):
    inputs, targets = random_case(0, dtype, soft)
    ours_in = inputs.clone().requires_grad_()
    theirs_in = inputs.clone().requires_grad_()
    ours = sigmoid_focal_loss(ours_in, targets, alpha, gamma)
    theirs = tv_sigmoid_focal_loss(theirs_in, targets, alpha, gamma)
    assert ours.dtype == dtype and ours.shape == inputs.shape
    torch.testing.assert_close(ours, theirs)
    weights = torch.rand(inputs.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours.mul(weights).sum().backward()
    theirs.mul(weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)


@pytest.mark.parametrize(("alpha", "gamma"), ALPHA_GAMMA)
def test_matches_float64_hand_computation_at_extreme_logits(alpha, gamma):
    pairs = [(x, t) for x in EXTREME_LOGITS for t in TARGETS]
    inputs = torch.tensor([x for x, _ in pairs], dtype=torch.float64)
    targets = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    expected = torch.tensor(
        [focal_by_hand(x, t, alpha, gamma) for x, t in pairs], dtype=torch.float64
    )
    ours = sigmoid_focal_loss(inputs, targets, alpha, gamma)
    assert bool(torch.isfinite(ours).all())
    # Relative 1e-12, and absolute 1e-12 where 1 - p_t rounds to 0 (true loss < 1e-14).
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_float32_extreme_logits_match_hand_computation():
    pairs = [(x, t) for x in EXTREME_LOGITS for t in TARGETS]
    inputs = torch.tensor([x for x, _ in pairs])
    targets = torch.tensor([t for _, t in pairs])
    expected = torch.tensor([focal_by_hand(x, t, 0.25, 2.0) for x, t in pairs], dtype=torch.float64)
    ours = sigmoid_focal_loss(inputs, targets, 0.25, 2.0)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0])
def test_gradients_finite_at_extreme_logits(dtype, gamma):
    pairs = [(x, t) for x in EXTREME_LOGITS for t in TARGETS]
    inputs = torch.tensor([x for x, _ in pairs], dtype=dtype, requires_grad=True)
    targets = torch.tensor([t for _, t in pairs], dtype=dtype)
    sigmoid_focal_loss(inputs, targets, 0.25, gamma, "sum").backward()
    grad = inputs.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    # Confidently wrong (|x| = 100, hard target on the other side): d loss / dx = alpha_t
    # * (p - t) with p_t ~ 0, i.e. -0.25 for a missed positive and +0.75 for a false one.
    missed = (inputs == -100) & (targets == 1)
    false = (inputs == 100) & (targets == 0)
    torch.testing.assert_close(grad[missed], torch.full_like(grad[missed], -0.25))
    torch.testing.assert_close(grad[false], torch.full_like(grad[false], 0.75))


def test_gradient_matches_finite_differences():
    inputs, targets = random_case(2, torch.float64, soft=True)
    inputs = inputs[:, :20].clone().requires_grad_()
    targets = targets[:, :20]
    assert torch.autograd.gradcheck(
        lambda x: sigmoid_focal_loss(x, targets, 0.25, 2.0, "sum"), (inputs,)
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(reduction):
    inputs, targets = random_case(3, torch.float64, soft=False)
    ours = sigmoid_focal_loss(inputs, targets, 0.25, 2.0, reduction)
    elementwise = torch.tensor(
        [
            focal_by_hand(x, t, 0.25, 2.0)
            for x, t in zip(inputs.flatten().tolist(), targets.flatten().tolist(), strict=True)
        ],
        dtype=torch.float64,
    ).view_as(inputs)
    expected = {"none": elementwise, "sum": elementwise.sum(), "mean": elementwise.mean()}
    torch.testing.assert_close(ours, expected[reduction], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ours, tv_sigmoid_focal_loss(inputs, targets, 0.25, 2.0, reduction), rtol=1e-12, atol=1e-15
    )


def test_empty_input():
    inputs = torch.zeros(0, 80, requires_grad=True)
    targets = torch.zeros(0, 80)
    assert sigmoid_focal_loss(inputs, targets).shape == (0, 80)
    assert sigmoid_focal_loss(inputs, targets, reduction="sum").item() == 0.0
    mean = sigmoid_focal_loss(inputs, targets, reduction="mean")
    assert mean.item() == 0.0
    mean.backward()
    assert inputs.grad is not None and inputs.grad.shape == (0, 80)


def test_bad_arguments():
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss(a, a, reduction="avg")
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        sigmoid_focal_loss(a, a, alpha=1.5)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(a, a, gamma=-1.0)
    with pytest.raises(ValueError, match=r"inputs \(3, 4\) and targets \(3, 5\)"):
        sigmoid_focal_loss(a, torch.zeros(3, 5))
