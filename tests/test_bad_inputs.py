"""Bad input raises a clear Python error naming the problem; non-finite boxes are defined."""

import pytest
import torch
import torchvision

from detframe.layers import RoIAlign, roi_align, roi_pool

OPS = {
    "roi_align": lambda x, b, size=2, scale=1.0: roi_align(x, b, size, scale, 2, True),
    "roi_pool": lambda x, b, size=2, scale=1.0: roi_pool(x, b, size, scale),
}


def case():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 7.0, 6.0]])
    return x, rois


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, r: (x, r[:, 1:]), ValueError, r"shape \[K, 5\]"),
        (lambda x, r: (x, r[None]), ValueError, r"shape \[K, 5\]"),
        (lambda x, r: (x, [r[:, 1:], r[:, :3]]), ValueError, r"boxes\[1\] must be .*\[L, 4\]"),
        (lambda x, r: (x, [r[:, 1:]] * 3), ValueError, "boxes for 3 images but input has 2"),
        (lambda x, r: (x, r.numpy()), TypeError, "Tensor"),
        (lambda x, r: (x[0], r), ValueError, r"4-D tensor \[N, C, H, W\]"),
        (lambda x, r: (x.long(), r), TypeError, "floating-point"),
        (lambda x, r: (x, r.double()), TypeError, "same dtype"),
        (lambda x, r: (x, r.to("meta")), ValueError, "same device"),
        (
            lambda x, r: (x, torch.tensor([[2, 0.0, 0, 1, 1]])),
            IndexError,
            r"batch index 2.*\[0, 2\)",
        ),
        (lambda x, r: (x, torch.tensor([[-1, 0.0, 0, 1, 1]])), IndexError, "batch index -1"),
        (lambda x, r: (x, torch.tensor([[0.5, 0.0, 0, 1, 1]])), IndexError, "not an integer"),
        (
            lambda x, r: (x, torch.tensor([[float("nan"), 0.0, 0, 1, 1]])),
            IndexError,
            "batch index nan",
        ),
    ],
)
def test_bad_arguments(name, make, error, match):
    with pytest.raises(error, match=match):
        OPS[name](*make(*case()))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("size", [0, -1, (2, 0), (2, 2, 2), 1.5])
def test_bad_output_size(name, size):
    x, rois = case()
    with pytest.raises(ValueError, match="output_size"):
        OPS[name](x, rois, size=size)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("scale", [0.0, -0.25, float("nan"), float("inf")])
def test_bad_spatial_scale(name, scale):
    x, rois = case()
    with pytest.raises(ValueError, match="spatial_scale"):
        OPS[name](x, rois, scale=scale)


def test_module_checks_arguments_at_construction():
    with pytest.raises(ValueError, match="output_size"):
        RoIAlign(0, 1.0, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda x, r: torch.ops.detframe.roi_align(x, r[:, 1:], 1.0, 2, 2, 2, True),
            ValueError,
            r"\[K, 5\]",
        ),
        (
            lambda x, r: torch.ops.detframe.roi_align(x, r, 1.0, 0, 2, 2, True),
            ValueError,
            "positive",
        ),
        (
            lambda x, r: torch.ops.detframe.roi_pool(x, r.double(), 1.0, 2, 2),
            TypeError,
            "same dtype",
        ),
        (
            lambda x, r: torch.ops.detframe.roi_pool(x, r * 3, 1.0, 2, 2),
            IndexError,
            "batch index 3",
        ),
        (
            lambda x, r: torch.ops.detframe._roi_align_backward(
                torch.ones(2, 3, 2, 2), r, 1.0, 2, 2, 2, 4, 8, 8, 2, True
            ),
            ValueError,
            "grad must have shape",
        ),
        (
            lambda x, r: torch.ops.detframe._roi_pool_backward(
                torch.ones(2, 3, 2, 2),
                r,
                torch.full((2, 3, 2, 2), 64, dtype=torch.int32),
                1.0,
                2,
                2,
                2,
                3,
                8,
                8,
            ),
            IndexError,
            "argmax values",
        ),
        (
            lambda x, r: torch.ops.detframe._roi_pool_backward(
                torch.ones(2, 3, 2, 2),
                r,
                torch.zeros(2, 3, 2, 2, dtype=torch.long),
                1.0,
                2,
                2,
                2,
                3,
                8,
                8,
            ),
            TypeError,
            "int32",
        ),
    ],
)
def test_direct_op_calls_are_checked(call, error, match):
    """Calls that bypass the Python face still get an error, never a crash."""
    with pytest.raises(error, match=match):
        call(*case())


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_boxes_give_zeros_and_no_gradient(name, bad):
    x, rois = case()
    x.requires_grad_()
    broken = rois.clone()
    broken[0, 3] = bad
    out = OPS[name](x, torch.cat([broken, rois]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not out.isnan().any()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.isfinite().all()
    # the finite boxes are unaffected: same outputs and gradient as without the broken box
    reference = getattr(torchvision.ops, name)
    args = (2, 1.0, 2, True) if name == "roi_align" else (2, 1.0)
    expected = reference(x, torch.cat([rois[1:], rois]), *args)
    torch.testing.assert_close(out[1:], expected)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)
