"""How the compiled operators fit into PyTorch: registration (opcheck), torch.compile,
torch.export, autocast, reproducible CPU backward, and the fallback when the library is
missing."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import detframe.layers
from detframe.layers import ops_backend, roi_align, roi_pool


def small_case(dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 10, generator=g, dtype=dtype).requires_grad_(requires_grad)
    rois = torch.tensor(
        [[0, 1.0, 1.5, 7.0, 6.0], [1, -2.0, 3.0, 4.0, 12.0], [1, 3.0, 3.0, 3.5, 8.0]],
        dtype=dtype,
    )
    return x, rois


def test_backend_is_compiled_for_cpu():
    backend = ops_backend()
    assert backend.name == "compiled" and "cpu" in backend.devices, str(backend)
    assert backend.library.endswith(".so")


@pytest.mark.parametrize(
    "op, args",
    [
        ("roi_align", lambda x, r: (x, r, 0.5, 3, 2, 2, True)),
        ("roi_align", lambda x, r: (x, r, 1.0, 2, 2, 0, False)),
        ("roi_pool", lambda x, r: (x, r, 0.5, 3, 2)),
        (
            "_roi_align_backward",
            lambda x, r: (
                torch.randn(3, 3, 2, 2, dtype=x.dtype),
                r,
                0.5,
                2,
                2,
                2,
                3,
                9,
                10,
                2,
                True,
            ),
        ),
        (
            "_roi_pool_backward",
            lambda x, r: (
                torch.randn(3, 3, 2, 2, dtype=x.dtype),
                r,
                torch.ops.detframe.roi_pool(x.detach(), r, 0.5, 2, 2)[1],
                0.5,
                2,
                2,
                2,
                3,
                9,
                10,
            ),
        ),
    ],
)
def test_opcheck(op, args):
    x, rois = small_case(requires_grad=not op.startswith("_"))
    torch.library.opcheck(getattr(torch.ops.detframe, op).default, args(x, rois))


class Pooler(nn.Module):
    def forward(self, x, rois):
        return roi_align(x, rois, (2, 3), 0.5, 2, True).sum(dim=(2, 3)) + roi_pool(
            x, rois, 2, 0.5
        ).amax(dim=(2, 3))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, rois = small_case(torch.float32)
    eager = Pooler()(x, rois)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(Pooler(), fullgraph=True)(x, rois)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_torch_export():
    x, rois = small_case(torch.float32, requires_grad=False)
    program = torch.export.export(Pooler(), (x, rois))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"detframe.roi_align.default", "detframe.roi_pool.default"} <= targets
    torch.testing.assert_close(program.module()(x, rois), Pooler()(x, rois))


def test_autocast_cpu_runs_in_float32():
    x, rois = small_case(torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = x.to(torch.bfloat16)  # what a conv under autocast would produce
        aligned = roi_align(features, rois, 2, 0.5, 2, True)
        pooled = roi_pool(features, rois, 2, 0.5)
    assert aligned.dtype == pooled.dtype == torch.bfloat16
    exact = features.float()
    torch.testing.assert_close(
        aligned.float(), roi_align(exact, rois, 2, 0.5, 2, True), atol=1e-2, rtol=1e-2
    )
    torch.testing.assert_close(pooled.float(), roi_pool(exact, rois, 2, 0.5), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cpu(dtype):
    x, rois = small_case(torch.float32, requires_grad=False)
    x, rois = x.to(dtype), rois.to(dtype)
    for ours, theirs in (
        (
            roi_align(x, rois, 2, 0.5, 2, True),
            torchvision.ops.roi_align(x.double(), rois.double(), 2, 0.5, 2, True),
        ),
        (roi_pool(x, rois, 2, 0.5), torchvision.ops.roi_pool(x.double(), rois.double(), 2, 0.5)),
    ):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.double(), theirs, atol=2e-2, rtol=2e-2)


def test_cpu_backward_is_reproducible_across_thread_counts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 40, 50, generator=g).requires_grad_()
    boxes = torch.rand(300, 4, generator=g) * 160
    rois = torch.cat(
        [torch.randint(0, 2, (300, 1), generator=g).float(), boxes.sort(dim=1).values], 1
    )
    rois = rois[:, [0, 1, 3, 2, 4]]  # x1 <= x2, y1 <= y2 after the sort
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for fn in (
                lambda t: roi_align(t, rois, 7, 0.25, 0, True),
                lambda t: roi_pool(t, rois, 7, 0.25),
            ):
                grads.append((n, torch.autograd.grad(fn(x).square().sum(), x)[0]))
    finally:
        torch.set_num_threads(threads)
    for (n, grad), (_, first) in zip(grads, grads[:2] * 3, strict=True):
        assert torch.equal(grad, first), f"gradient with {n} threads differs"


FALLBACK = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "detframe._C":
                raise ImportError("blocked for the test")

    sys.meta_path.insert(0, Block())
    import torch, torchvision
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from detframe.layers import ops_backend, roi_align, roi_pool
        x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
        rois = torch.tensor([[0, 1.0, 1.5, 7, 6], [1, -2, 3, 4, 12]], dtype=torch.float64)
        for _ in range(3):
            a = roi_align(x, rois, 2, 0.5, 2, True)
            p = roi_pool(x, rois, 2, 0.5)
    assert ops_backend().name == "reference", ops_backend()
    assert "blocked for the test" in str(ops_backend())
    messages = [str(w.message) for w in caught if "reference RoI operators" in str(w.message)]
    assert len(messages) == 1, messages
    torch.testing.assert_close(a, torchvision.ops.roi_align(x, rois, 2, 0.5, 2, True))
    torch.testing.assert_close(p, torchvision.ops.roi_pool(x, rois, 2, 0.5))
    print("fallback ok")
    """
)


def test_fallback_without_compiled_library():
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_layers_exports():
    assert set(detframe.layers.__all__) == {
        "BoxesShapeError",
        "FrozenBatchNorm2d",
        "OpsBackend",
        "RoIAlign",
        "RoIPool",
        "ShapeSpec",
        "conv_norm",
        "frozen_bn_affine",
        "get_norm",
        "giou_loss",
        "ops_backend",
        "roi_align",
        "roi_pool",
        "sigmoid_focal_loss",
        "smooth_l1_loss",
    }
