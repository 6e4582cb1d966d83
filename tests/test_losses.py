"""smooth_l1_loss, giou_loss and dense_box_regression_loss against torch / torchvision
(F.smooth_l1_loss, F.l1_loss, generalized_box_iou_loss, BoxCoder) and by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss

from detframe.layers import giou_loss, smooth_l1_loss
from detframe.layers.losses import BOX_REGRESSION_LOSS_TYPES, dense_box_regression_loss
from detframe.modeling.box_coder import Box2BoxTransform


def smooth_l1_by_hand(input: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    out = torch.empty_like(input)
    for i, (a, b) in enumerate(zip(input.tolist(), target.tolist(), strict=True)):
        d = abs(a - b)
        out[i] = d if beta < 1e-5 else (0.5 * d * d / beta if d < beta else d - 0.5 * beta)
    return out


@pytest.mark.parametrize("beta", [0.0, 1e-6, 1 / 9, 1.0])
def test_smooth_l1_elementwise(beta):
    g = torch.Generator().manual_seed(0)
    input = torch.randn(200, generator=g, dtype=torch.float64)
    target = torch.randn(200, generator=g, dtype=torch.float64)
    target[:50] = input[:50] + torch.randn(50, generator=g, dtype=torch.float64) * 0.05
    ours = smooth_l1_loss(input, target, beta)
    torch.testing.assert_close(ours, smooth_l1_by_hand(input, target, beta))
    if beta < 1e-5:
        torch.testing.assert_close(ours, F.l1_loss(input, target, reduction="none"))
    else:
        expected = F.smooth_l1_loss(input, target, reduction="none", beta=beta)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_smooth_l1_reductions_match_torch(reduction):
    g = torch.Generator().manual_seed(1)
    input, target = torch.randn(2, 7, 4, generator=g)
    ours = smooth_l1_loss(input, target, 1 / 9, reduction)
    torch.testing.assert_close(
        ours, F.smooth_l1_loss(input, target, reduction=reduction, beta=1 / 9)
    )
    torch.testing.assert_close(
        smooth_l1_loss(input, target, 0.0, reduction), F.l1_loss(input, target, reduction=reduction)
    )


def test_smooth_l1_empty_input():
    input = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, 4)
    assert smooth_l1_loss(input, target, 0.0, "sum").item() == 0.0
    mean = smooth_l1_loss(input, target, 1 / 9, "mean")
    assert mean.item() == 0.0 and not torch.isnan(mean)
    mean.backward()
    assert input.grad is not None and input.grad.shape == (0, 4)
    assert smooth_l1_loss(input, target, 0.0).shape == (0, 4)


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=torch.float64) * 40], dim=1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_giou_matches_torchvision(reduction):
    g = torch.Generator().manual_seed(2)
    boxes1, boxes2 = random_boxes(100, g), random_boxes(100, g)
    boxes2[:10] = boxes1[:10]  # identical boxes: loss 0
    boxes2[10] = torch.tensor([500.0, 500.0, 510.0, 510.0], dtype=torch.float64)  # disjoint
    ours = giou_loss(boxes1, boxes2, reduction)
    theirs = generalized_box_iou_loss(boxes1, boxes2, reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    if reduction == "none":
        assert ours[:10].abs().max() < 1e-6
        assert 1.0 < ours[10] < 2.0


def test_giou_by_hand():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # intersection 1, union 7, enclosing 9: giou = 1/7 - 2/9
    expected = 1 - (1 / 7 - 2 / 9)
    assert giou_loss(boxes1, boxes2, eps=0.0).item() == pytest.approx(expected)


def test_giou_empty_input():
    boxes = torch.zeros(0, 4, requires_grad=True)
    assert giou_loss(boxes, torch.zeros(0, 4), "sum").item() == 0.0
    mean = giou_loss(boxes, torch.zeros(0, 4), "mean")
    assert mean.item() == 0.0 and not torch.isnan(mean)
    mean.backward()
    assert giou_loss(boxes, torch.zeros(0, 4)).shape == (0,)


def test_bad_arguments():
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1_loss(a, a, 0.0, "avg")
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(a, a, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        smooth_l1_loss(a, torch.zeros(3, 5), 0.0)
    with pytest.raises(ValueError, match="reduction"):
        giou_loss(a, a, "avg")
    with pytest.raises(ValueError, match="boxes2"):
        giou_loss(a, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="x2 >= x1"):
        giou_loss(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


# --- dense_box_regression_loss ---------------------------------------------------------------


def dense_inputs(seed: int):
    """2 images, 50 anchors: anchors [50, 4], deltas [2, 50, 4], matched gt [2, 50, 4] and a
    foreground mask [2, 50] with some of each image's anchors."""
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(50, g) + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    deltas = torch.randn(2, 50, 4, generator=g, dtype=torch.float64) * 0.5
    gt = torch.stack([random_boxes(50, g) for _ in range(2)]) + 1.0
    fg = torch.rand(2, 50, generator=g) < 0.3
    return anchors, deltas.requires_grad_(), gt, fg


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l1", "giou"])
@pytest.mark.parametrize("beta", [0.0, 1 / 9])
def test_dense_box_regression_loss_matches_torchvision(loss_type, beta):
    anchors, deltas, gt, fg = dense_inputs(3)
    assert 10 < int(fg.sum()) < 90
    ours = dense_box_regression_loss(
        anchors, Box2BoxTransform((1.0, 2.0, 3.0, 4.0)), deltas, gt, fg, loss_type, beta
    )
    coder = BoxCoder((1.0, 2.0, 3.0, 4.0))
    fg_anchors = anchors.expand(2, -1, -1)[fg]
    if loss_type == "giou":
        decoded = coder.decode_single(deltas[fg], fg_anchors)
        expected = generalized_box_iou_loss(decoded, gt[fg], reduction="sum")
    else:
        targets = coder.encode_single(gt[fg], fg_anchors)
        if loss_type == "smooth_l1" and beta > 0:
            expected = F.smooth_l1_loss(deltas[fg], targets, reduction="sum", beta=beta)
        else:
            expected = F.l1_loss(deltas[fg], targets, reduction="sum")
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, deltas)
    (expected_grad,) = torch.autograd.grad(expected, deltas)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert bool((grad[~fg] == 0).all()) and bool((grad[fg] != 0).any())


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l1", "giou"])
def test_dense_box_regression_loss_without_foreground(loss_type):
    anchors, deltas, gt, fg = dense_inputs(4)
    loss = dense_box_regression_loss(
        anchors, Box2BoxTransform((1.0,) * 4), deltas, gt, torch.zeros_like(fg), loss_type
    )
    assert loss.item() == 0.0
    loss.backward()
    assert deltas.grad is not None and bool((deltas.grad == 0).all())


def test_dense_box_regression_loss_bad_arguments():
    anchors, deltas, gt, fg = dense_inputs(5)
    transform = Box2BoxTransform((1.0,) * 4)
    assert BOX_REGRESSION_LOSS_TYPES == ("smooth_l1", "l1", "giou")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dense_box_regression_loss(anchors, transform, deltas, gt, fg, "diou")
    with pytest.raises(ValueError, match=r"fg_mask \[N, A\]"):
        dense_box_regression_loss(anchors, transform, deltas, gt, fg[:1])
    with pytest.raises(ValueError, match=r"anchors \[A, B\]"):
        dense_box_regression_loss(anchors[:10], transform, deltas, gt, fg)
