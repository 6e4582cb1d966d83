"""detframe's compiled RoIAlign / RoIPool (CPU) against torchvision's operators and hand values.

torchvision.ops is the independent oracle: same signature, same semantics. Box sets cover
boxes inside, partly and fully outside the map, zero-width and inverted boxes, on several
images; the feature map is sized so that every spatial scale sees all of these cases.
"""

import pytest
import torch
import torchvision

from detframe.layers import RoIAlign, RoIPool, roi_align, roi_pool

F64 = {"atol": 1e-12, "rtol": 1e-12}
F32 = {"atol": 1e-5, "rtol": 1e-5}


def make_case(scale: float, dtype=torch.float64, images=3, channels=4, size=(11, 13), seed=0):
    """Features [images, channels, *size] and rois [K, 5] in image coordinates (1 / scale)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(images, channels, *size, generator=g, dtype=dtype)
    extent = torch.tensor([size[1], size[0]], dtype=dtype) / scale
    low = (torch.rand(24, 2, generator=g, dtype=dtype) * 1.4 - 0.2) * extent
    side = torch.rand(24, 2, generator=g, dtype=dtype) * 0.6 * extent
    boxes = torch.cat([low, low + side], dim=1)
    special = torch.tensor(
        [
            [-0.2, -0.3, 0.3, 0.2],  # partly outside, top-left (in units of the extent)
            [0.8, 0.8, 1.3, 1.3],  # partly outside, bottom-right
            [1.5, 1.5, 2.0, 2.5],  # fully outside
            [-2.0, 0.2, -1.2, 0.4],  # fully outside, left
            [0.3, 0.3, 0.3, 0.6],  # zero width
            [0.5, 0.5, 0.5, 0.5],  # a point
            [0.6, 0.2, 0.4, 0.5],  # inverted (x2 < x1)
        ],
        dtype=dtype,
    )
    special[:, 0::2] *= extent[0]
    special[:, 1::2] *= extent[1]
    boxes = torch.cat([boxes, special])
    batch = torch.randint(0, images, (len(boxes), 1), generator=g).to(dtype)
    return features, torch.cat([batch, boxes], dim=1)


def torchvision_safe(rois: torch.Tensor, aligned: bool, sampling_ratio: int) -> torch.Tensor:
    """torchvision's CPU kernel crashes on inverted boxes with aligned=True and an adaptive
    grid (a negative grid size); detframe gives zeros there (checked separately)."""
    if aligned and sampling_ratio <= 0:
        return rois[(rois[:, 3] >= rois[:, 1]) & (rois[:, 4] >= rois[:, 2])]
    return rois


def forward_backward(fn, features, rois):
    x = features.detach().clone().requires_grad_()
    out = fn(x, rois)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x) if out.numel() else (None,)
    return out, grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 16])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, scale):
    features, rois = make_case(scale)
    rois = torchvision_safe(rois, aligned, sampling_ratio)
    args = ((3, 4), scale, sampling_ratio, aligned)
    ours = forward_backward(lambda x, r: roi_align(x, r, *args), features, rois)
    theirs = forward_backward(lambda x, r: torchvision.ops.roi_align(x, r, *args), features, rois)
    torch.testing.assert_close(ours, theirs, **F64)


@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 16])
def test_roi_pool_matches_torchvision(scale):
    features, rois = make_case(scale)
    ours = forward_backward(lambda x, r: roi_pool(x, r, (3, 4), scale), features, rois)
    theirs = forward_backward(
        lambda x, r: torchvision.ops.roi_pool(x, r, (3, 4), scale), features, rois
    )
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_float32_within_float32_tolerance(op):
    features, rois = make_case(0.25, dtype=torch.float32, channels=16)
    if op == "align":
        ours = forward_backward(lambda x, r: roi_align(x, r, 7, 0.25, 2, True), features, rois)
        theirs = forward_backward(
            lambda x, r: torchvision.ops.roi_align(x, r, 7, 0.25, 2, True), features, rois
        )
    else:
        ours = forward_backward(lambda x, r: roi_pool(x, r, 7, 0.25), features, rois)
        theirs = forward_backward(
            lambda x, r: torchvision.ops.roi_pool(x, r, 7, 0.25), features, rois
        )
    torch.testing.assert_close(ours, theirs, **F32)


def test_inverted_boxes_with_adaptive_grid_give_zeros():
    features, _ = make_case(1.0)
    rois = torch.tensor([[0, 8.0, 2.0, 2.0, 9.0], [1, 2.0, 9.0, 8.0, 2.0]], dtype=torch.float64)
    out, grad = forward_backward(lambda x, r: roi_align(x, r, 3, 1.0, 0, True), features, rois)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


def test_empty_rois():
    features, _ = make_case(1.0)
    rois = torch.zeros(0, 5, dtype=torch.float64)
    for fn in (lambda x: roi_align(x, rois, 2, 1.0, 2), lambda x: roi_pool(x, rois, 2, 1.0)):
        x = features.clone().requires_grad_()
        out = fn(x)
        assert out.shape == (0, 4, 2, 2)
        out.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last"])
def test_memory_layouts(layout):
    features, rois = make_case(0.5, channels=6)
    if layout == "channels_last":
        x = features.contiguous(memory_format=torch.channels_last)
    else:
        x = features.transpose(2, 3).contiguous().transpose(2, 3)[:, ::2]
        features = features[:, ::2]
    assert not x.is_contiguous()
    rois = torchvision_safe(rois, True, 0)
    for ours_fn, theirs_fn in (
        (roi_align, torchvision.ops.roi_align),
        (roi_pool, torchvision.ops.roi_pool),
    ):
        extra = (0, True) if ours_fn is roi_align else ()
        ours = forward_backward(lambda x, r, f=ours_fn, e=extra: f(x, r, 3, 0.5, *e), x, rois)
        theirs = forward_backward(
            lambda x, r, f=theirs_fn, e=extra: f(x, r, 3, 0.5, *e), features, rois
        )
        torch.testing.assert_close(ours, theirs, **F64)


def test_list_of_boxes_equals_tensor_form():
    features, rois = make_case(1.0)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(features.size(0))]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(features.size(0))])
    torch.testing.assert_close(
        roi_align(features, per_image, 2, 1.0, 2), roi_align(features, ordered, 2, 1.0, 2)
    )
    torch.testing.assert_close(
        roi_pool(features, per_image, 2, 1.0), roi_pool(features, ordered, 2, 1.0)
    )


def ramp(height=5, width=5):
    """input[0, 0, h, w] = 5h + w, for which bilinear sampling is exact: value(y, x) = 5y + x."""
    return torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)


def test_roi_align_hand_values():
    x = ramp()
    box = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    # 2 x 2 bins of size 2; the mean sample of bin (i, j) is at y = 1 + 2i, x = 1 + 2j.
    expected = torch.tensor([[[[6.0, 8.0], [16.0, 18.0]]]], dtype=torch.float64)
    torch.testing.assert_close(roi_align(x, box, 2, 1.0, 2, aligned=False), expected)
    # aligned=True shifts the box by -0.5: (0.5, 0.5, 4.5, 4.5) covers the same samples.
    torch.testing.assert_close(
        roi_align(x, box + torch.tensor([0, 0.5, 0.5, 0.5, 0.5]), 2, 1.0, 2, aligned=True), expected
    )
    # One sample at (2, 2) of the box (1, 1, 3, 3): 5 * 2 + 2.
    one = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    assert roi_align(x, one, 1, 1.0, 1).item() == 12.0
    # A sample at (4.5, 4.5), beyond the last pixel centre, is clamped to pixel (4, 4) = 24.
    edge = torch.tensor([[0, 3.0, 3.0, 6.0, 6.0]], dtype=torch.float64)
    assert roi_align(x, edge, 1, 1.0, 1).item() == 24.0
    # Gradient of the single sample at (2, 2): all of it lands on that pixel.
    leaf = x.clone().requires_grad_()
    roi_align(leaf, one, 1, 1.0, 1).sum().backward()
    assert leaf.grad[0, 0, 2, 2] == 1.0 and leaf.grad.sum() == 1.0


def test_roi_pool_hand_values():
    x = ramp()
    box = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    # Cells 0..3 in both directions, 2 x 2 windows of 2 x 2 cells: each maximum sits at the
    # window's bottom-right cell.
    leaf = x.clone().requires_grad_()
    out = roi_pool(leaf, box, 2, 1.0)
    torch.testing.assert_close(
        out, torch.tensor([[[[6.0, 8.0], [16.0, 18.0]]]], dtype=torch.float64)
    )
    out.sum().backward()
    expected_grad = torch.zeros_like(x)
    expected_grad[0, 0, [1, 1, 3, 3], [1, 3, 1, 3]] = 1.0
    torch.testing.assert_close(leaf.grad, expected_grad)
    # Rounding is half away from zero: (0.4, 0.6, 2.5, 2.5) -> cells x 0..3, y 1..3.
    rounded = torch.tensor([[0, 0.4, 0.6, 2.5, 2.5]], dtype=torch.float64)
    assert roi_pool(x, rounded, 1, 1.0).item() == 18.0
    # A window entirely outside the map pools to 0.
    outside = torch.tensor([[0, 10.0, 10.0, 12.0, 12.0]], dtype=torch.float64)
    assert roi_pool(x, outside, 1, 1.0).item() == 0.0


def test_gradcheck_and_gradgradcheck():
    features, rois = make_case(0.5, images=2, channels=2, size=(6, 7))
    x = features.requires_grad_()
    rois = torchvision_safe(rois[:8], True, 0)
    align = lambda t: roi_align(t, rois, (2, 3), 0.5, 0, True)  # noqa: E731
    pool = lambda t: roi_pool(t, rois, (2, 3), 0.5)  # noqa: E731
    for fn in (align, pool):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_modules():
    features, rois = make_case(0.25)
    align = RoIAlign((3, 2), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    pool = RoIPool(3, spatial_scale=0.25)
    torch.testing.assert_close(
        align(features, rois), roi_align(features, rois, (3, 2), 0.25, 2, True)
    )
    torch.testing.assert_close(pool(features, rois), roi_pool(features, rois, 3, 0.25))
    assert "aligned=True" in repr(align) and "output_size=(3, 3)" in repr(pool)
