"""What the detframe-against-torchvision benchmarks in tools/ share: torchvision's resize,
the alternating timed runs, the output comparison and the printed tables.

Imported by `tools/benchmark_rcnn.py` and `tools/benchmark_retinanet.py` (run as scripts,
so this folder is on sys.path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detframe.structures import Instances
from detframe.utils.profiling import StageTimes


def resize_like_torchvision(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """torchvision's GeneralizedRCNNTransform resize of one [3, H, W] image."""
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True
    )[0]


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with lr 0: the update costs what it costs, the weights stay as they are."""
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)


def measure(
    runs: dict[str, Callable[[], Any]], repeat: int, stage_times: list[StageTimes]
) -> dict[str, list[float]]:
    """Runs each thunk once to warm up, then `repeat` times alternating; returns the times.
    The stage times count the timed runs only."""
    for fn in runs.values():
        fn()
    for times in stage_times:
        times.reset()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def compare_detections(tv_out: dict[str, Tensor], df_out: Instances, min_iou: float = 0.9) -> str:
    """How far detframe's detections are from torchvision's, compared as sets (detframe's
    class c is torchvision's label c + 1).

    In detframe's score order, each detection is paired with the unpaired torchvision
    detection of the same class that overlaps it most, if that IoU is >= `min_iou`. Float32
    rounding can reorder detections of nearly equal score and move one across the score
    threshold or the per-image cap, so the detections left unpaired are reported with their
    highest score: near the threshold, or below the lowest kept score, they are such edge
    cases; anything else is a real difference.
    """
    tv_boxes, tv_scores, tv_labels = tv_out["boxes"], tv_out["scores"], tv_out["labels"] - 1
    df_boxes, df_scores, df_labels = df_out.pred_boxes.tensor, df_out.scores, df_out.pred_classes
    if len(df_out) == 0 and len(tv_boxes) == 0:
        return "0 detections in both"
    ious = box_iou(df_boxes, tv_boxes)
    ious[df_labels[:, None] != tv_labels[None, :]] = -1.0
    pairs: list[tuple[int, int]] = []
    for i in torch.argsort(df_scores, descending=True).tolist():
        if ious.shape[1] == 0:
            break
        best, j = ious[i].max(0)
        if best >= min_iou:
            pairs.append((i, int(j)))
            ious[:, j] = -1.0
    lines = [f"{len(pairs)} paired of detframe {len(df_out)}, torchvision {len(tv_boxes)}"]
    if pairs:
        mine, theirs = (torch.tensor(index) for index in zip(*pairs, strict=True))
        box = (df_boxes[mine] - tv_boxes[theirs]).abs().max().item()
        score = (df_scores[mine] - tv_scores[theirs]).abs().max().item()
        lines.append(f"max |box diff| {box:.2e} px, max |score diff| {score:.2e}")
    for name, scores, paired in (
        ("detframe", df_scores, {i for i, _ in pairs}),
        ("torchvision", tv_scores, {j for _, j in pairs}),
    ):
        unpaired = [k for k in range(len(scores)) if k not in paired]
        if unpaired:
            top = scores[unpaired].max().item()
            lines.append(f"{len(unpaired)} of {name} unpaired (highest score {top:.4f})")
    return "; ".join(lines)


def print_table(rows: list[tuple[str, float, float, float | None]]) -> None:
    """The results table: per workload detframe's and torchvision's seconds and the ratio."""
    print("| workload | detframe s | torchvision s | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, df_s, tv_s, target in rows:
        target_text = f"<= {target}" if target else ""
        print(f"| {name} | {df_s:.3f} | {tv_s:.3f} | {df_s / tv_s:.3f} | {target_text} |")


def print_stages(title: str, times: StageTimes, total: float, runs: int) -> None:
    """Mean seconds per run of each stage, then the rest ("other") and the total."""
    print(f"\n{title} (mean per run over {runs} runs, seconds):")
    accounted = 0.0
    for stage, seconds in times.seconds.items():
        print(f"  {stage:<28} {seconds / runs:7.3f}")
        accounted += seconds / runs
    print(f"  {'other':<28} {total - accounted:7.3f}")
    print(f"  {'total':<28} {total:7.3f}")
