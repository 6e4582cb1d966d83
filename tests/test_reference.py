"""detframe.layers.reference against torchvision's CPU kernels, the independent oracle.

Small maps (N=2, C=3, H=11, W=13) and seeded RoIs that lie inside, across and outside the
map, plus degenerate ones. In float64 the forward results must agree bit for bit (same
formulas, same order of operations) and the gradients to rounding.
"""

import math
import re

import pytest
import torch
import torchvision
from torch import Tensor

from detframe.layers import reference
from detframe.layers.reference import roi_align_reference, roi_pool_reference

N, C, H, W = 2, 3, 11, 13
PH, PW = 3, 4
LOWEST = torch.finfo(torch.float32).min  # -FLT_MAX
SCALES = [1.0, 0.25, 1 / 16]


def make_input(dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """[N, C, H, W] random feature map that requires grad."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, C, H, W, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    )


def make_rois(spatial_scale: float, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """[K, 5] RoIs in image coordinates (feature-map boxes divided by `spatial_scale`):
    random boxes inside, across and outside the map's edges, then degenerate ones."""
    generator = torch.Generator().manual_seed(seed)
    extent = torch.tensor([W, H], dtype=torch.float64)
    corner = torch.rand(32, 2, generator=generator, dtype=torch.float64) * (extent + 8) - 4
    size = torch.rand(32, 2, generator=generator, dtype=torch.float64) * extent
    special = torch.tensor(
        [
            [-9.0, -8.0, -3.0, -2.0],  # fully outside, above and left
            [W + 2.0, H + 1.0, W + 6.0, H + 5.0],  # fully outside, below and right
            [-3.0, 2.0, W + 3.0, 7.0],  # wider than the map
            [4.0, 3.0, 4.0, 8.0],  # zero width
            [2.0, 5.0, 9.0, 5.0],  # zero height
            [6.0, 6.0, 6.0, 6.0],  # a point
            [7.0, 2.0, 6.5, 9.0],  # slightly inverted in x
            [9.0, 8.0, 3.0, 2.0],  # inverted in x and y
            [-0.5, 2.5, 7.5, 10.5],  # halves: C's round() is not torch.round()
            [0.5, -1.5, 3.5, 4.5],
        ],
        dtype=torch.float64,
    )
    boxes = torch.cat([torch.cat([corner, corner + size], dim=1), special]) / spatial_scale
    images = torch.randint(0, N, (len(boxes), 1), generator=generator).to(torch.float64)
    return torch.cat([images, boxes], dim=1).to(dtype)


def weighted_grad(output: Tensor, input: Tensor, seed: int = 1) -> Tensor:
    """Gradient of sum(output * w) w.r.t. `input`, for seeded random weights w."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((output * weights.to(output.dtype)).sum(), input)
    return grad


def torchvision_align(input: Tensor, rois: Tensor, scale: float, ratio: int, aligned: bool):
    return torchvision.ops.roi_align(input, rois, (PH, PW), scale, ratio, aligned)


def torchvision_pool(input: Tensor, rois: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return torch.ops.torchvision.roi_pool(input, rois, scale, PH, PW)


@pytest.mark.parametrize("spatial_scale", SCALES)
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_torchvision_float64(aligned, sampling_ratio, spatial_scale):
    input, rois = make_input(), make_rois(spatial_scale)
    args = (spatial_scale, sampling_ratio, aligned)
    output = roi_align_reference(input, rois, spatial_scale, PH, PW, sampling_ratio, aligned)
    expected = torchvision_align(input, rois, *args)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("spatial_scale", SCALES)
def test_roi_pool_matches_torchvision_float64(spatial_scale):
    input, rois = make_input(), make_rois(spatial_scale)
    output, argmax = roi_pool_reference(input, rois, spatial_scale, PH, PW)
    expected, expected_argmax = torchvision_pool(input, rois, spatial_scale)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert argmax.dtype == torch.int32
    assert torch.equal(argmax, expected_argmax)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(0, True), (2, False), (3, True)])
def test_roi_align_matches_torchvision_float32(sampling_ratio, aligned):
    input, rois = make_input(torch.float32), make_rois(0.25, torch.float32)
    output = roi_align_reference(input, rois, 0.25, PH, PW, sampling_ratio, aligned)
    expected = torchvision_align(input, rois, 0.25, sampling_ratio, aligned)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-5, atol=1e-5
    )


def test_roi_pool_matches_torchvision_float32():
    input, rois = make_input(torch.float32), make_rois(0.25, torch.float32)
    output, argmax = roi_pool_reference(input, rois, 0.25, PH, PW)
    expected, expected_argmax = torchvision_pool(input, rois, 0.25)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, expected_argmax)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-5, atol=1e-5
    )


def test_roi_align_box_inverted_along_one_axis():
    # aligned with an adaptive grid: a bin of size <= -1 gets ceil() <= -1 samples, which
    # roi_geometry.h clamps to none (torchvision cannot take this box); legacy mode forces
    # the box to 1 x 1 and agrees with torchvision.
    input = make_input()
    rois = torch.tensor([[1.0, 9.0, 2.0, 3.0, 8.0]], dtype=torch.float64)
    output = roi_align_reference(input, rois, 1.0, PH, PW, 0, True)
    assert torch.equal(output, torch.zeros(1, C, PH, PW, dtype=torch.float64))
    legacy = roi_align_reference(input, rois, 1.0, PH, PW, 0, False)
    torch.testing.assert_close(
        legacy, torchvision_align(input, rois, 1.0, 0, False), rtol=0, atol=0
    )


@pytest.mark.parametrize("budget", [1, 36 * 40])
def test_chunking_does_not_change_the_result(monkeypatch, budget):
    # A budget of 1 puts every RoI in a chunk of its own; 36 * 40 (C * PH * PW = 36) gives
    # chunks of 1 to 11 RoIs whose grids and windows differ.
    input, rois = make_input(), make_rois(0.25)
    align = roi_align_reference(input, rois, 0.25, PH, PW, 0, True)
    pool, argmax = roi_pool_reference(input, rois, 0.25, PH, PW)
    monkeypatch.setattr(reference, "MAX_CHUNK_ELEMENTS", budget)
    chunked_align = roi_align_reference(input, rois, 0.25, PH, PW, 0, True)
    chunked_pool, chunked_argmax = roi_pool_reference(input, rois, 0.25, PH, PW)
    assert torch.equal(chunked_align, align)
    assert torch.equal(chunked_pool, pool)
    assert torch.equal(chunked_argmax, argmax)
    torch.testing.assert_close(
        weighted_grad(chunked_align, input), weighted_grad(align, input), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        weighted_grad(chunked_pool, input), weighted_grad(pool, input), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(
    ("map_shape", "num_rois"), [((N, C, H, W), 0), ((N, C, 0, W), 5), ((N, C, H, 0), 5)]
)
def test_empty_rois_or_empty_map_give_zeros(map_shape, num_rois):
    input = torch.randn(map_shape, dtype=torch.float32, requires_grad=True)
    rois = make_rois(1.0, torch.float32)[:num_rois]
    shape = (num_rois, C, PH, PW)
    align = roi_align_reference(input, rois, 1.0, PH, PW, 2, True)
    pool, argmax = roi_pool_reference(input, rois, 1.0, PH, PW)
    assert torch.equal(align, torch.zeros(shape))
    assert torch.equal(pool, torch.zeros(shape))
    assert torch.equal(argmax, torch.full(shape, -1, dtype=torch.int32))
    for output in (align, pool):  # still differentiable, with a zero gradient
        (grad,) = torch.autograd.grad(output.sum(), input)
        assert torch.equal(grad, torch.zeros(map_shape))


def test_roi_pool_ties_go_to_the_first_cell_in_row_major_order():
    input = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    input[0, 0, 2, 1] = input[0, 0, 1, 3] = input[0, 0, 3, 0] = 7.0  # (1, 3) comes first
    input.requires_grad_()
    # One bin over the whole map (4 rows x 5 columns).
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 3.0]], dtype=torch.float64)
    output, argmax = roi_pool_reference(input, rois, 1.0, 1, 1)
    assert output.item() == 7.0
    assert argmax.item() == 1 * 5 + 3
    (grad,) = torch.autograd.grad(output.sum(), input)
    expected_grad = torch.zeros_like(input)
    expected_grad[0, 0, 1, 3] = 1.0  # all of it to one cell, not split between the ties
    assert torch.equal(grad, expected_grad)

    # Bins of 2 rows x 2.5 columns: rows [0, 2) or [2, 4), columns [0, 3) or [2, 5).
    output, argmax = roi_pool_reference(input, rois, 1.0, 2, 2)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(input, rois, 1.0, 2, 2)
    # all zeros: the first cell; one 7; (2, 1) before (3, 0); all zeros from (2, 2) on
    assert argmax.flatten().tolist() == [0, 1 * 5 + 3, 2 * 5 + 1, 2 * 5 + 2]
    assert torch.equal(argmax, expected_argmax)
    assert torch.equal(output, expected)


def test_roi_pool_values_that_never_win():
    nan, inf = math.nan, math.inf
    input = torch.tensor(
        [
            [nan, nan, nan, 2.0, -inf, LOWEST],
            [nan, nan, nan, 1.0, 2 * LOWEST, -inf],  # 2 * LOWEST: below -FLT_MAX in float64
        ],
        dtype=torch.float64,
    )[None, None].requires_grad_()
    rois = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0, 1.0],  # all NaN
            [0.0, 2.0, 0.0, 3.0, 1.0],  # NaN never beats a number
            [0.0, 4.0, 0.0, 5.0, 1.0],  # nothing above -FLT_MAX
            [0.0, 10.0, 0.0, 12.0, 1.0],  # outside the map: empty window
        ],
        dtype=torch.float64,
    )
    output, argmax = roi_pool_reference(input, rois, 1.0, 1, 1)
    assert output.flatten().tolist() == [LOWEST, 2.0, LOWEST, 0.0]
    assert argmax.flatten().tolist() == [-1, 3, -1, -1]
    expected, expected_argmax = torch.ops.torchvision.roi_pool(input, rois, 1.0, 1, 1)
    assert torch.equal(output, expected)
    assert torch.equal(argmax, expected_argmax)
    (grad,) = torch.autograd.grad(output.sum(), input)
    expected_grad = torch.zeros_like(input)
    expected_grad[0, 0, 0, 3] = 1.0
    assert torch.equal(grad, expected_grad)


def test_roi_pool_rounds_halves_away_from_zero():
    # x1 = y1 = round(0.5) = 1 and x2 = y2 = round(2.5) = 3 (torch.round: 0 and 2), so the
    # window is rows and columns [1, 4), whose largest value is at (3, 3).
    input = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64)
    output, argmax = roi_pool_reference(input, rois, 1.0, 1, 1)
    assert argmax.item() == 3 * 5 + 3
    assert output.item() == 18.0


@pytest.mark.parametrize(
    ("op", "sampling_ratio", "aligned"),
    [("roi_align", 0, True), ("roi_align", 2, False), ("roi_pool", None, None)],
)
def test_nonfinite_roi_gives_zeros_and_finite_gradients(op, sampling_ratio, aligned):
    # spatial_scale 2 turns the finite 1e308 into inf. With a fixed sampling ratio and
    # legacy boxes, an invalid RoI would still have samples if it were not skipped.
    scale = 2.0
    input, valid = make_input(), make_rois(scale)[:8]
    invalid = torch.tensor(
        [
            [0.0, math.nan, 1.0, 2.0, 3.0],
            [1.0, 1.0, 1.0, 2.0, math.inf],
            [0.0, 1.0, -math.inf, 2.0, 3.0],
            [1.0, 1.0, 1.0, 1e308, 3.0],
        ],
        dtype=torch.float64,
    )
    rois = torch.cat([invalid[:2], valid[:3], invalid[2:], valid[3:]])
    is_valid = torch.tensor([False, False, True, True, True, False, False] + [True] * 5)
    if op == "roi_align":
        output = roi_align_reference(input, rois, scale, PH, PW, sampling_ratio, aligned)
        expected = torchvision_align(input, valid, scale, sampling_ratio, aligned)
    else:
        output, argmax = roi_pool_reference(input, rois, scale, PH, PW)
        expected, expected_argmax = torchvision_pool(input, valid, scale)
        assert torch.equal(argmax[~is_valid], torch.full_like(argmax[~is_valid], -1))
        assert torch.equal(argmax[is_valid], expected_argmax)
    assert torch.equal(output[~is_valid], torch.zeros_like(output[~is_valid]))
    assert torch.equal(output[is_valid], expected)
    grad = weighted_grad(output, input)
    assert torch.isfinite(grad).all()
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * weights[is_valid]).sum(), input)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize(
    ("value", "text"),
    [(-1.0, "-1"), (2.0, "2"), (0.5, "0.5"), (math.nan, "nan"), (math.inf, "inf")],
)
def test_bad_batch_index_raises(op, value, text):
    input, rois = make_input(), make_rois(1.0)[:3].clone()
    rois[1, 0] = value
    message = f"{op}: RoI 1 has batch index {text}, which is not an integer in [0, 2)"
    with pytest.raises(IndexError, match=re.escape(message)):
        if op == "roi_align":
            roi_align_reference(input, rois, 1.0, PH, PW, 2, True)
        else:
            roi_pool_reference(input, rois, 1.0, PH, PW)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_computed_in_float32(dtype):
    # Compared with torchvision in float32 on the same (rounded) input, RoIs and weights.
    input, rois = make_input(dtype), make_rois(0.25, dtype)
    input32 = input.detach().float().requires_grad_()
    rois32 = rois.float()
    tolerance = {"rtol": 8e-3, "atol": 1e-3}

    output = roi_align_reference(input, rois, 0.25, PH, PW, 0, True)
    expected = torchvision_align(input32, rois32, 0.25, 0, True)
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), expected, **tolerance)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad,) = torch.autograd.grad((output * weights).sum(), input)
    (expected_grad,) = torch.autograd.grad((expected * weights.float()).sum(), input32)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), expected_grad, **tolerance)

    output, argmax = roi_pool_reference(input, rois, 0.25, PH, PW)
    expected, expected_argmax = torchvision_pool(input32, rois32, 0.25)
    assert output.dtype == dtype
    assert torch.equal(output, expected.to(dtype))  # a maximum is one of the inputs
    assert torch.equal(argmax, expected_argmax)


LARGE_BOXES = [
    [-1200.0, -900.0, 1800.0, 2100.0],  # the map inside one bin
    [-2500.0, 2.5, 500.0, 3002.5],  # the map across the edge of two bins
    [3.0, 2.0, 3003.0, 3002.0],  # the map at the box's top-left corner
    [-2990.0, -2995.0, 10.0, 5.0],  # ... and at its bottom-right corner
]


@pytest.mark.parametrize("aligned", [True, False])
def test_large_boxes_match_torchvision(aligned):
    """Side 3000 with an adaptive grid: only the samples that reach the map are computed,
    with torchvision's result to the last bit (torchvision computes all 3000^2 per channel)."""
    input = make_input()
    rois = torch.tensor([[1.0, *box] for box in LARGE_BOXES], dtype=torch.float64)
    output = roi_align_reference(input, rois, 1.0, 2, 3, 0, aligned)
    expected = torchvision.ops.roi_align(input, rois, (2, 3), 1.0, 0, aligned)
    assert output.abs().sum() > 0
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("side", [1e6, 1e9, 1e30])
def test_huge_boxes_match_the_compiled_kernel(side):
    """Boxes no kernel could sample in full (1e12 samples per bin and more) take bounded
    time and memory, and agree bit for bit with detframe's C++ kernel."""
    input = make_input()
    rois = torch.tensor(
        [[0, -0.4 * side, -0.3 * side, 0.6 * side, 0.7 * side], [1, -side, 3.0, 5.0, side]],
        dtype=torch.float64,
    )
    output = roi_align_reference(input, rois, 1.0, PH, PW, 0, True)
    expected = torch.ops.detframe.roi_align(input, rois, 1.0, PH, PW, 0, True)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        weighted_grad(output, input), weighted_grad(expected, input), rtol=1e-10, atol=1e-30
    )
