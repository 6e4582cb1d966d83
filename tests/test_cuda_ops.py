"""The CUDA kernels of detframe's RoI operators, checked against their CPU kernels.

The oracle is the CPU kernel of the same op, run on float64 copies of exactly the inputs the
CUDA kernel sees (already rounded to the dtype under test). roi_pool is the exception below
float64: its windows come from floor/ceil of scaled box coordinates, where float32 and
float64 arithmetic can pick different cells, so its oracle runs in float32, the arithmetic
type of float32, float16 and bfloat16, and the maxima and argmax must agree exactly.

The backward kernels accumulate with atomic adds in the gradient's own dtype, rounding every
partial sum, so bfloat16 gradients get a looser tolerance than the forward. Skipped without
a GPU.
"""

import pytest
import torch

import detframe  # noqa: F401  (loads the compiled operators)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, C, H, W = 2, 3, 16, 20  # feature map
K = 20  # RoIs
POOLED = (7, 5)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Relative tolerances; assert_close also scales them into absolute ones.
FORWARD_TOL = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
BACKWARD_TOL = {**FORWARD_TOL, torch.bfloat16: 3e-2}
VALID_ROI = [1.0, 2.0, 3.0, 12.0, 10.0]


def has_cuda_kernel(op):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"detframe::{op}", "CUDA")
    except RuntimeError:  # no such operator: the compiled library was not loaded
        return False


@pytest.fixture(autouse=True, scope="module")
def require_cuda_kernels():
    ops = ("roi_align", "_roi_align_backward", "roi_pool", "_roi_pool_backward")
    missing = [op for op in ops if not has_cuda_kernel(op)]
    if missing:
        pytest.fail(
            f"detframe has no CUDA kernel for {', '.join(missing)}: it was built without "
            "CUDA; rebuild it with nvcc available (FORCE_CUDA=1)",
            pytrace=False,
        )


def make_case(dtype, spatial_scale=1.0, seed=0):
    """Features [N, C, H, W], RoIs [K, 5] and a non-contiguous output gradient, on the CPU.

    The boxes are in image coordinates (the feature map divided by spatial_scale); some
    stick out of the image and two are reversed (x2 < x1, y2 < y1).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    corner = torch.rand(K, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.2
    extent = torch.rand(K, 2, generator=gen, dtype=torch.float64) * 0.7
    boxes = torch.cat([corner, corner + extent], dim=1)
    boxes = boxes * torch.tensor([W, H, W, H], dtype=torch.float64) / spatial_scale
    boxes[:2] = boxes[:2, [2, 3, 0, 1]]
    batch = torch.randint(0, N, (K, 1), generator=gen).to(torch.float64)
    rois = torch.cat([batch, boxes], dim=1)
    # Laid out as [K, PH, PW, C]: the backward kernels must read it through its strides.
    grad = torch.randn(K, *POOLED, C, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2)
    return x.to(dtype), rois.to(dtype), grad.to(dtype)


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def roi_align(x, rois, grad, spatial_scale=1.0, sampling_ratio=2, aligned=True):
    """Output of roi_align and the input gradient for output gradient `grad`."""
    x = x.detach().requires_grad_()
    out = torch.ops.detframe.roi_align(x, rois, spatial_scale, *POOLED, sampling_ratio, aligned)
    (grad_input,) = torch.autograd.grad(out, x, grad)
    return out.detach(), grad_input


def roi_pool(x, rois, grad, spatial_scale=1.0):
    """Output and argmax of roi_pool and the input gradient for output gradient `grad`."""
    x = x.detach().requires_grad_()
    out, argmax = torch.ops.detframe.roi_pool(x, rois, spatial_scale, *POOLED)
    (grad_input,) = torch.autograd.grad(out, x, grad)
    return out.detach(), argmax, grad_input


def run(op, x, rois, grad):
    """(output, input gradient) of `op` with its default settings."""
    if op == "roi_align":
        return roi_align(x, rois, grad)
    out, _, grad_input = roi_pool(x, rois, grad)
    return out, grad_input


def assert_close(actual, expected, tol):
    """Compares to `tol` relative to each value and to the largest expected value."""
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align_matches_cpu(dtype, aligned, sampling_ratio, spatial_scale):
    x, rois, grad = make_case(dtype, spatial_scale)
    settings = (spatial_scale, sampling_ratio, aligned)
    out, grad_input = roi_align(*cuda(x, rois, grad), *settings)
    expected_out, expected_grad = roi_align(x.double(), rois.double(), grad.double(), *settings)
    assert out.dtype == dtype and out.is_contiguous()
    assert grad_input.dtype == dtype and grad_input.shape == x.shape
    assert_close(out, expected_out, FORWARD_TOL[dtype])
    assert_close(grad_input, expected_grad, BACKWARD_TOL[dtype])


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_pool_matches_cpu(dtype, spatial_scale):
    x, rois, grad = make_case(dtype, spatial_scale)
    out, argmax, grad_input = roi_pool(*cuda(x, rois, grad), spatial_scale)
    oracle = torch.float64 if dtype == torch.float64 else torch.float32
    expected_out, expected_argmax, expected_grad = roi_pool(
        x.to(oracle), rois.to(oracle), grad.to(oracle), spatial_scale
    )
    assert out.dtype == dtype and argmax.dtype == torch.int32
    assert (argmax >= 0).any() and (argmax == -1).any()  # the case covers both
    torch.testing.assert_close(out.cpu(), expected_out.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(argmax.cpu(), expected_argmax, rtol=0, atol=0)
    assert_close(grad_input, expected_grad, BACKWARD_TOL[dtype])


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_empty_rois(op):
    x, _, _ = make_case(torch.float32)
    rois = torch.empty(0, 5)
    grad = torch.empty(0, C, *POOLED)
    out, grad_input = run(op, *cuda(x, rois, grad))
    assert out.shape == (0, C, *POOLED)
    assert torch.equal(grad_input.cpu(), torch.zeros_like(x))


INVALID_ROIS = {
    "nan_x1": [0.0, float("nan"), 3.0, 12.0, 10.0],
    "inf_x2": [1.0, 2.0, 3.0, float("inf"), 10.0],
    "-inf_y1": [0.0, 2.0, -float("inf"), 12.0, 10.0],
    "nan_batch": [float("nan"), 2.0, 3.0, 12.0, 10.0],
    "batch_too_large": [float(N), 2.0, 3.0, 12.0, 10.0],
    "negative_batch": [-1.0, 2.0, 3.0, 12.0, 10.0],
    "fractional_batch": [0.5, 2.0, 3.0, 12.0, 10.0],
}


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("bad_roi", list(INVALID_ROIS.values()), ids=list(INVALID_ROIS))
def test_invalid_roi_gives_zeros(op, bad_roi):
    """An invalid RoI pools zeros and passes no gradient; the valid one beside it is intact.

    (The CPU kernels reject a bad batch index instead; on CUDA that would need a sync.)
    """
    x, _, _ = make_case(torch.float32)
    x, rois, grad = cuda(x, torch.tensor([VALID_ROI, bad_roi]), torch.ones(2, C, *POOLED))
    out, grad_input = run(op, x, rois, grad)
    alone_out, alone_grad = run(op, x, rois[:1], grad[:1])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[:1], alone_out)
    torch.testing.assert_close(grad_input, alone_grad)
    if op == "roi_pool":
        argmax = torch.ops.detframe.roi_pool(x, rois, 1.0, *POOLED)[1]
        assert torch.equal(argmax[1], torch.full_like(argmax[1], -1))


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_nan_coordinates_match_cpu(op):
    x, rois, grad = make_case(torch.float64)
    rois[3, 1] = float("nan")
    out, grad_input = run(op, *cuda(x, rois, grad))
    expected_out, expected_grad = run(op, x, rois, grad)
    assert torch.equal(out[3].cpu(), torch.zeros_like(out[3].cpu()))
    assert_close(out, expected_out, 1e-10)
    assert_close(grad_input, expected_grad, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_input(dtype):
    x, rois, _ = cuda(*make_case(dtype, spatial_scale=0.25))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for args in [(0.25, *POOLED, 2, False), (0.25, *POOLED, 0, True)]:
        assert torch.equal(
            torch.ops.detframe.roi_align(x_cl, rois, *args),
            torch.ops.detframe.roi_align(x, rois, *args),
        )
    out_cl, argmax_cl = torch.ops.detframe.roi_pool(x_cl, rois, 0.25, *POOLED)
    out, argmax = torch.ops.detframe.roi_pool(x, rois, 0.25, *POOLED)
    assert torch.equal(out_cl, out) and torch.equal(argmax_cl, argmax)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_backward_reads_expanded_grad(op):
    """out.sum().backward() hands the backward an expanded gradient (all strides 0)."""
    x, rois, _ = cuda(*make_case(torch.float64))
    ones = torch.ones((), dtype=torch.float64, device="cuda").expand(K, C, *POOLED)
    _, grad_input = run(op, x, rois, ones)
    _, expected = run(op, x, rois, ones.contiguous())
    assert_close(grad_input, expected, 1e-10)


def test_runs_on_current_stream():
    """The kernels are queued on the current stream.

    The input is written on a side stream only after a delay there, so a kernel launched on
    any other stream would pool the zeros the input held before.
    """
    x, rois, grad = cuda(*make_case(torch.float32))
    expected_align = roi_align(x, rois, grad)
    expected_pool = roi_pool(x, rois, grad)
    late_x = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # some tens of milliseconds
        late_x.copy_(x)
        align = roi_align(late_x, rois, grad)
        pool = roi_pool(late_x, rois, grad)
    torch.cuda.current_stream().wait_stream(side)
    for actual, expected in [(align, expected_align), (pool, expected_pool)]:
        assert torch.equal(actual[0], expected[0])  # the forward is deterministic
        torch.testing.assert_close(actual[-1], expected[-1])


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_backward_refuses_deterministic_mode(op):
    x, rois, grad = cuda(*make_case(torch.float32))
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match=rf"detframe::_{op}_backward.*deterministic"):
            run(op, x, rois, grad)
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_autocast_half_input(op):
    """Under autocast the op runs in float32 (rois stay float32) and returns input's dtype."""
    x, rois, _ = make_case(torch.float32)
    x, rois = cuda(x.half(), rois)

    def forward(features):
        if op == "roi_align":
            return torch.ops.detframe.roi_align(features, rois, 1.0, *POOLED, 2, True)
        return torch.ops.detframe.roi_pool(features, rois, 1.0, *POOLED)[0]

    with torch.autocast("cuda", dtype=torch.float16):
        out = forward(x)
    assert out.dtype == torch.float16
    assert_close(out, forward(x.float()), 1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_second_device(op):
    """The kernels run on their tensors' device, whichever device is current."""
    x, rois, grad = make_case(torch.float64)
    with torch.cuda.device(0):
        out, grad_input = run(op, *(t.to("cuda:1") for t in (x, rois, grad)))
    assert out.device == grad_input.device == torch.device("cuda:1")
    expected_out, expected_grad = run(op, x, rois, grad)
    assert_close(out, expected_out, 1e-10)
    assert_close(grad_input, expected_grad, 1e-10)


@pytest.mark.parametrize("side", [3e3, 1e6, 1e9])
def test_huge_boxes_match_cpu(side):
    """Adaptive sampling visits only the samples that reach the map on CUDA too: a box of
    side 1e9 returns at once, with the CPU kernel's result (forward and backward). float64:
    which far-away samples reach the map depends on the last bits of their coordinates."""
    dtype = torch.float64
    x, _, grad = make_case(dtype)
    rois = torch.tensor(
        [[0, -0.4 * side, -0.3 * side, 0.6 * side, 0.7 * side], [1, -side, 3.0, 5.0, side]],
        dtype=dtype,
    )
    grad = grad[:2]
    out, grad_input = roi_align(*cuda(x, rois, grad), sampling_ratio=0)
    expected_out, expected_grad = roi_align(x, rois, grad, sampling_ratio=0)
    assert_close(out, expected_out, FORWARD_TOL[dtype])
    assert_close(grad_input, expected_grad, BACKWARD_TOL[dtype])


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_spatial_scale_is_rejected(scale):
    x, rois, _ = cuda(*make_case(torch.float32))
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.detframe.roi_align(x, rois, scale, *POOLED, 2, True)
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.detframe.roi_pool(x, rois, scale, *POOLED)
