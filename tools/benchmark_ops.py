"""Times detframe's RoIAlign / RoIPool kernels against torchvision's, in one process.

Workload (an FPN P2 level at batch 2): input 2 x 256 x 200 x 272 float32, 1024 random
boxes over an 800 x 1088 image (centres uniform, sides log-uniform in [16, 512] pixels,
clipped to the image, images drawn at random), output 7 x 7, spatial scale 1/4, sampling
ratio 2, aligned=True. Each row is the median of --repeat timed runs after one warm-up;
detframe and torchvision alternate run by run so that both see the same machine state.

    python tools/benchmark_ops.py [--device cpu|cuda] [--repeat 7] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from detframe.layers import ops_backend, roi_align, roi_pool

BATCH, CHANNELS, HEIGHT, WIDTH = 2, 256, 200, 272
IMAGE_H, IMAGE_W = 800, 1088
NUM_BOXES, OUTPUT, SCALE, SAMPLING, ALIGNED = 1024, (7, 7), 0.25, 2, True
TARGETS = {"RoIAlign forward+backward": 0.5, "RoIPool forward+backward": 0.3}


def make_workload(device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns features [2, 256, 200, 272] and rois [1024, 5] (batch_index, x1, y1, x2, y2)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=g)
    centre = torch.rand(NUM_BOXES, 2, generator=g) * torch.tensor([IMAGE_W, IMAGE_H])
    side = torch.empty(NUM_BOXES, 2).uniform_(math.log(16), math.log(512), generator=g).exp()
    limit = torch.tensor([IMAGE_W, IMAGE_H])
    low = (centre - side / 2).clamp(min=0)
    high = torch.minimum(centre + side / 2, limit)
    image = torch.randint(0, BATCH, (NUM_BOXES, 1), generator=g).float()
    rois = torch.cat([image, low, high], dim=1)
    return features.to(device), rois.to(device)


def timer(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """Returns a function that runs `fn` once and gives its wall time in seconds."""

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def cases(features: torch.Tensor, rois: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """The four timed workloads, each as {implementation: thunk}."""
    leaf = features.detach().requires_grad_()
    grad = torch.randn(NUM_BOXES, CHANNELS, *OUTPUT, device=features.device)

    def forward(op):
        def run():
            with torch.no_grad():
                op(features)

        return run

    def forward_backward(op):
        def run():
            leaf.grad = None
            op(leaf).backward(grad)

        return run

    impls = {
        "RoIAlign": {
            "detframe": lambda x: roi_align(x, rois, OUTPUT, SCALE, SAMPLING, ALIGNED),
            "torchvision": lambda x: torchvision.ops.roi_align(
                x, rois, OUTPUT, SCALE, SAMPLING, ALIGNED
            ),
        },
        "RoIPool": {
            "detframe": lambda x: roi_pool(x, rois, OUTPUT, SCALE),
            "torchvision": lambda x: torchvision.ops.roi_pool(x, rois, OUTPUT, SCALE),
        },
    }
    table = {}
    for name, pair in impls.items():
        table[f"{name} forward"] = {impl: forward(op) for impl, op in pair.items()}
        table[f"{name} forward+backward"] = {
            impl: forward_backward(op) for impl, op in pair.items()
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per row (default: 7)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"detframe operators: {ops_backend()}")
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} threads"
    )
    print(
        f"workload: input {BATCH}x{CHANNELS}x{HEIGHT}x{WIDTH} float32, {NUM_BOXES} boxes over "
        f"{IMAGE_H}x{IMAGE_W}, output {OUTPUT[0]}x{OUTPUT[1]}, scale {SCALE}, "
        f"sampling ratio {SAMPLING}, aligned={ALIGNED}; median of {args.repeat} runs"
    )
    features, rois = make_workload(device)
    header = f"{'operation':<28}{'detframe ms':>13}{'torchvision ms':>16}{'ratio':>8}{'target':>9}"
    print(header)
    print("-" * len(header))
    for name, pair in cases(features, rois).items():
        timers = {impl: timer(fn, device) for impl, fn in pair.items()}
        samples: dict[str, list[float]] = {impl: [] for impl in timers}
        for run in timers.values():  # warm-up
            run()
        for _ in range(args.repeat):
            for impl, run in timers.items():
                samples[impl].append(run())
        ours, theirs = (statistics.median(samples[i]) for i in ("detframe", "torchvision"))
        target = f"<= {TARGETS[name]}" if name in TARGETS and device.type == "cpu" else ""
        print(f"{name:<28}{ours * 1e3:>13.1f}{theirs * 1e3:>16.1f}{ours / theirs:>8.3f}{target:>9}")


if __name__ == "__main__":
    main()
