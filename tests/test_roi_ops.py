"""detframe's compiled RoIAlign / RoIPool (CPU) against torchvision's operators and hand values.

torchvision.ops is the independent oracle: same signature, same semantics. Box sets cover
boxes inside, partly and fully outside the map, zero-width and inverted boxes, on several
images; the feature map is sized so that every spatial scale sees all of these cases.
"""

import math
from fractions import Fraction

import pytest
import torch
import torch.fx
import torchvision
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------------------
# Huge boxes: adaptive sampling visits only the samples that can reach the map.


def in_map_samples(start, bin_size, grid, size):
    """How many of the grid samples start + (i + 0.5) * bin_size / grid lie in [-1, size],
    in exact rational arithmetic (an oracle independent of the kernels' bisection)."""
    start, bin_size = Fraction(start), Fraction(bin_size)
    step = bin_size / grid
    first = max(math.ceil((-1 - start) / step - Fraction(1, 2)), 0)
    last = min(math.floor((size - start) / step - Fraction(1, 2)), grid - 1)
    return max(last - first + 1, 0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    "box",
    [
        (-1200.0, -900.0, 1800.0, 2100.0),  # the map inside one bin
        (-2500.0, 2.5, 500.0, 3002.5),  # the map across the edge of two bins
        (3.0, 2.0, 3003.0, 3002.0),  # the map at the box's top-left corner
        (-2990.0, -2995.0, 10.0, 5.0),  # ... and at its bottom-right corner
    ],
)
def test_large_boxes_match_torchvision(box, aligned):
    """Boxes of side 3000 on a 6 x 7 map: torchvision visits all 3000^2 samples per channel,
    detframe the few that reach the map; the results agree to the last bit."""
    features = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(3))
    features = features.double()
    rois = torch.tensor([[1.0, *box]], dtype=torch.float64)
    args = ((3, 2), 1.0, 0, aligned)
    ours = forward_backward(lambda x, r: roi_align(x, r, *args), features, rois)
    theirs = forward_backward(lambda x, r: torchvision.ops.roi_align(x, r, *args), features, rois)
    assert ours[0].abs().sum() > 0
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], **F64)


@pytest.mark.parametrize("side", [1e6, 1e9, 1e30])
def test_huge_boxes_are_bounded_and_exact(side):
    """A constant map v makes every sample that reaches the map worth exactly v, so bin
    (ph, pw) is v * n_y(ph) * n_x(pw) / (grid_h * grid_w): counted here with fractions.
    Before bounded sampling a 1e6 box took hours (1e12 samples per bin)."""
    height, width, pooled, value = 6, 7, 7, 1.5
    x = torch.full((1, 2, height, width), value, dtype=torch.float64, requires_grad=True)
    x1, y1 = -0.4 * side, -0.3 * side
    rois = torch.tensor([[0, x1, y1, x1 + side, y1 + side]], dtype=torch.float64)
    out = roi_align(x, rois, pooled, 1.0, 0, True)
    out.sum().backward()

    bin_size = (Fraction(x1 + side) - Fraction(x1)) / pooled  # aligned: both shift by 0.5
    grid = min(math.ceil(bin_size), 2**20)  # the documented cap on an adaptive grid
    n_x = [
        in_map_samples(Fraction(x1) - Fraction(1, 2) + p * bin_size, bin_size, grid, width)
        for p in range(pooled)
    ]
    n_y = [
        in_map_samples(Fraction(y1) - Fraction(1, 2) + p * bin_size, bin_size, grid, height)
        for p in range(pooled)
    ]
    expected = torch.tensor(
        [[value * ny * nx / grid**2 for nx in n_x] for ny in n_y], dtype=torch.float64
    )
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(out[0, 1], expected, rtol=1e-9, atol=0)
    # The gradient of sum(out) spreads 1 / count per in-map sample over its taps.
    torch.testing.assert_close(x.grad.sum(), 2 * expected.sum() / value, rtol=1e-9, atol=1e-30)


def test_spatial_scale_checked_by_compiled_ops():
    """Direct calls reject what the Python face rejects (they used to return zeros)."""
    x = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]])
    grad = torch.ones(1, 2, 2, 2)
    argmax = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    for scale in (-1.0, 0.0, float("nan"), float("inf")):
        calls = [
            lambda s: torch.ops.detframe.roi_align(x, rois, s, 2, 2, 2, True),
            lambda s: torch.ops.detframe.roi_pool(x, rois, s, 2, 2),
            lambda s: torch.ops.detframe._roi_align_backward(
                grad, rois, s, 2, 2, 1, 2, 5, 5, 2, True
            ),
            lambda s: torch.ops.detframe._roi_pool_backward(
                grad, rois, argmax, s, 2, 2, 1, 2, 5, 5
            ),
        ]
        for call in calls:
            with pytest.raises(ValueError, match=r"spatial_scale must be a finite positive"):
                call(scale)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.detframe.roi_align(x.long(), rois.long(), 1.0, 2, 2, 2, True)


# ---------------------------------------------------------------------------------------
# torchvision's ways of using the operators: TorchScript, torch.fx, quantized input.
# (torchvision's own tests run against detframe in tests/test_torchvision_op_suite.py.)


class TwoLevels(nn.Module):
    """Pools one list of boxes from two maps with both functions and both modules."""

    def __init__(self) -> None:
        super().__init__()
        self.align = RoIAlign((2, 3), 0.5, 2, aligned=True)
        self.pool = RoIPool(2, 0.25)

    def forward(self, p2: Tensor, p3: Tensor, boxes: list[Tensor]) -> Tensor:
        parts = [
            self.align(p2, boxes),
            roi_align(p3, boxes, [2, 3], 0.25, 0, False),
            self.pool(p3, boxes).repeat(1, 1, 1, 2)[..., :3],
            roi_pool(p2, boxes, (2, 3), 0.5),
        ]
        return torch.cat(parts, dim=1)


def two_level_inputs():
    g = torch.Generator().manual_seed(5)
    p2, p3 = torch.randn(2, 3, 16, 20, generator=g), torch.randn(2, 3, 8, 10, generator=g)
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 25.0]]), torch.tensor([[0.0, 0.0, 9.0, 7.0]] * 2)]
    return p2, p3, boxes


def expected_two_levels(p2, p3, boxes):
    ops = torchvision.ops
    return torch.cat(
        [
            ops.roi_align(p2, boxes, (2, 3), 0.5, 2, True),
            ops.roi_align(p3, boxes, (2, 3), 0.25, 0, False),
            ops.roi_pool(p3, boxes, 2, 0.25).repeat(1, 1, 1, 2)[..., :3],
            ops.roi_pool(p2, boxes, (2, 3), 0.5),
        ],
        dim=1,
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_module_and_functions():
    inputs = two_level_inputs()
    scripted = torch.jit.script(TwoLevels())
    torch.testing.assert_close(scripted(*inputs), expected_two_levels(*inputs))
    # Argument checks are compiled too.
    with pytest.raises(torch.jit.Error, match=r"boxes\[0\] must be a tensor of shape \[L, 4\]"):
        scripted(inputs[0], inputs[1], [torch.zeros(1, 5)])


def test_fx_keeps_the_operators_as_leaf_calls():
    """RoIAlign / RoIPool trace as leaf calls on their own (torch.fx.wrap); functions
    called from other modules are named to the tracer, as for torchvision.ops."""
    model = TwoLevels()
    tracer = torch.fx.Tracer(autowrap_functions=(roi_align, roi_pool))
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert calls.count(roi_align) == 2 and calls.count(roi_pool) == 2
    inputs = two_level_inputs()
    torch.testing.assert_close(traced(*inputs), expected_two_levels(*inputs))


# PyTorch deprecates its quantized dtypes; torchvision (and so detframe) still serve them.
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_roi_align_is_quantized_float_result():
    x = torch.rand(1, 3, 9, 11) * 40
    rois = torch.tensor([[0, 1.0, 2.0, 7.0, 8.0], [0, -2.0, 0.5, 12.0, 4.0]])
    qx = torch.quantize_per_tensor(x, 0.5, 3, torch.quint8)
    qrois = torch.quantize_per_tensor(rois, 0.5, 10, torch.quint8)
    out = roi_align(qx, qrois, 3, 1.0, 2, True)
    expected = torchvision.ops.roi_align(qx, qrois, 3, 1.0, 2, True)
    assert out.dtype == torch.quint8 and out.q_scale() == 0.5 and out.q_zero_point() == 3
    assert (out.int_repr() - expected.int_repr()).abs().max() <= 1  # rounding order differs
    with pytest.raises(TypeError, match="floating-point"):
        roi_pool(qx, qrois, 3, 1.0)
    per_channel = torch.quantize_per_channel(
        x, torch.ones(3), torch.zeros(3, dtype=torch.long), 1, torch.quint8
    )
    with pytest.raises(TypeError, match="per tensor"):
        roi_align(per_channel, rois, 3)
