"""Benchmarks of a detector: time per stage of inference and of a training step, parameters,
FLOPs and peak memory; the library behind `detframe benchmark`.

Shorthand: N images in a call, H x W an image as given, R detections of an image.

Conventions:

- Inputs are what `detframe.data.DatasetMapper` produces: for inference, test-mode dicts
  ({"image": [3, H, W], "height", "width"}), one image per call; for training, batches
  (lists) of train-mode dicts that carry "instances".
- Times are wall-clock seconds (`time.perf_counter`) of the timed calls after `warmup`
  untimed ones. On CUDA the device is synchronised before and after each timed call and at
  each stage boundary (`StageTimes`), so stage times are the device's work. A stage's figure
  is its mean over the timed calls; "other" is the mean total minus the stages (the work
  between them: moving targets, splitting the batch, summing the losses, zero_grad).
- The stages of a meta-architecture (`model_stages`) are its `preprocess_image`
  ("preprocessing"), each of its direct submodules by attribute name in registration order
  (e.g. "backbone", "proposal_generator", "roi_heads" for a GeneralizedRCNN) and its
  `postprocess` ("post-processing"); a training step adds "backward" and "optimizer step"
  (a training forward has no post-processing). Only the `MetaArchitecture` protocol is
  assumed, so every kind of model is timed the same way.
- Peak memory is `detframe.utils.profiling.peak_memory_mb`: on CUDA the most held by tensors
  during the timed calls; on the CPU the process's peak RSS since it started, which cannot be
  reset (so it also counts whatever ran before).
- FLOPs are fvcore's (`FlopCountAnalysis`), traced with torch.jit on each input alone and
  averaged per image. fvcore counts one fused multiply-add as one flop, as detectron2
  reports: a k x k convolution from C to C' channels on an H x W output counts
  C' H W C k^2. Only operators with a handle count: fvcore's (convolution, linear / matmul /
  addmm / bmm / einsum, normalisations, upsampling, adaptive average pooling, grid_sample)
  and `detframe::roi_align`, counted as 4 per bilinear sample (as fvcore counts bilinear
  upsampling), sampling_ratio^2 samples per output bin. With adaptive sampling
  (sampling_ratio <= 0) the number of samples depends on the box sizes, which a trace does
  not record: one sample per bin is counted, a lower bound, reported under its own operator
  name. `detframe::roi_pool` is counted as 0 (a maximum: comparisons only). Element-wise
  operators (add, mul, exp, sigmoid, ...) have no handle; they are reported as skipped.
- Each benchmark leaves the model as it found it: hooks and wrappers removed, training or
  evaluation mode restored. `benchmark_training` does update the weights (through the
  optimizer); pass a copy of the model to keep them.
"""

from __future__ import annotations

import math
import statistics
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import cycle
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from detframe.modeling import MetaArchitecture
from detframe.structures import Boxes
from detframe.utils.profiling import (
    StageTimes,
    peak_memory_kind,
    peak_memory_mb,
    reset_peak_memory,
)

if TYPE_CHECKING:
    from fvcore.nn import FlopCountAnalysis

__all__ = [
    "POSTPROCESSING",
    "PREPROCESSING",
    "FlopReport",
    "InferenceReport",
    "TrainingReport",
    "benchmark_inference",
    "benchmark_training",
    "count_flops",
    "count_parameters",
    "flop_count_analysis",
    "instrument",
    "model_stages",
]

PREPROCESSING, POSTPROCESSING = "preprocessing", "post-processing"
TRAINING_STAGES = ("backward", "optimizer step")
ROI_ALIGN_ADAPTIVE = "roi_align (adaptive sampling: 1 sample per bin, a lower bound)"
# detframe's operators that are counted as 0 flops, and why.
IGNORED_OPS = {"detframe::roi_pool": "a maximum over each bin: comparisons only"}


def model_stages(model: MetaArchitecture) -> tuple[str, ...]:
    """The stages `instrument` times, in the order they run (see the module docstring)."""
    return (PREPROCESSING, *(name for name, _ in model.named_children()), POSTPROCESSING)


def instrument(model: MetaArchitecture) -> StageTimes:
    """Times the stages of `model` (`model_stages`) on every call until `.remove()` (or the
    end of a `with` block over the returned object)."""
    times = StageTimes(model.device)
    times.wrap_method(model, "preprocess_image", PREPROCESSING)
    for name, module in model.named_children():
        times.hook_module(module, name)
    times.wrap_method(model, "postprocess", POSTPROCESSING)
    return times


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) numbers of parameter elements; a shared parameter counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------------------------- timing


def _table(stage_seconds: dict[str, float], mean_seconds: float, unit: str) -> list[str]:
    lines = [f"  {'stage':<20} {f'ms/{unit}':>10} {'share':>7}"]
    for stage, seconds in stage_seconds.items():
        share = seconds / mean_seconds if mean_seconds > 0 else 0.0
        lines.append(f"  {stage:<20} {seconds * 1e3:10.2f} {share:7.1%}")
    lines.append(f"  {'total (mean)':<20} {mean_seconds * 1e3:10.2f}")
    return lines


@dataclass
class InferenceReport:
    """Inference time of one image per call.

    Attributes:
        seconds_per_image: wall time of each timed call.
        stage_seconds: mean seconds per timed call of each stage (`model_stages`), then
            "other".
        peak_memory_mb: see `memory_kind`.
        memory_kind: what the peak memory measures (`peak_memory_kind`).
        warmup: untimed calls before the timed ones.
        device: where the model ran.
        median_seconds: median of `seconds_per_image`.
        images_per_second: 1 / median_seconds.
    """

    seconds_per_image: list[float]
    stage_seconds: dict[str, float]
    peak_memory_mb: float
    memory_kind: str
    warmup: int
    device: str
    median_seconds: float = field(init=False)
    images_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_seconds = statistics.median(self.seconds_per_image)
        self.images_per_second = 1.0 / self.median_seconds

    def format(self) -> str:
        """A readable table of the stages, the speed and the memory."""
        calls = len(self.seconds_per_image)
        mean = statistics.fmean(self.seconds_per_image)
        return "\n".join(
            [
                f"Inference, 1 image per call, mean of {calls} timed calls after "
                f"{self.warmup} warm-up, {self.device}:",
                *_table(self.stage_seconds, mean, "image"),
                f"  median {self.median_seconds * 1e3:.2f} ms/image, "
                f"{self.images_per_second:.2f} images/s",
                f"  peak memory {self.peak_memory_mb:.1f} MB ({self.memory_kind})",
            ]
        )


@dataclass
class TrainingReport:
    """Training-step time: forward (losses), backward and optimizer step.

    Attributes:
        seconds_per_step: wall time of each timed step.
        stage_seconds: mean seconds per timed step of each forward stage (that ran),
            "backward", "optimizer step", then "other" (summing the losses, zero_grad, and
            the forward's work between its stages).
        images_per_step: mean number of images in a timed step's batch.
        losses: the last timed step's losses.
        peak_memory_mb: see `memory_kind`.
        memory_kind: what the peak memory measures (`peak_memory_kind`).
        warmup: untimed steps before the timed ones.
        device: where the model ran.
        median_seconds: median of `seconds_per_step`.
        images_per_second: images_per_step / median_seconds.
    """

    seconds_per_step: list[float]
    stage_seconds: dict[str, float]
    images_per_step: float
    losses: dict[str, float]
    peak_memory_mb: float
    memory_kind: str
    warmup: int
    device: str
    median_seconds: float = field(init=False)
    images_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_seconds = statistics.median(self.seconds_per_step)
        self.images_per_second = self.images_per_step / self.median_seconds

    def format(self) -> str:
        """A readable table of the stages, the speed, the memory and the last losses."""
        steps = len(self.seconds_per_step)
        mean = statistics.fmean(self.seconds_per_step)
        losses = ", ".join(f"{name} {value:.4g}" for name, value in self.losses.items())
        return "\n".join(
            [
                f"Training step, {self.images_per_step:g} images per step, mean of {steps} "
                f"timed steps after {self.warmup} warm-up, {self.device}:",
                *_table(self.stage_seconds, mean, "step"),
                f"  median {self.median_seconds * 1e3:.2f} ms/step, "
                f"{self.images_per_second:.2f} images/s",
                f"  peak memory {self.peak_memory_mb:.1f} MB ({self.memory_kind})",
                f"  losses of the last step: {losses}",
            ]
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Puts `model` in training or evaluation mode, and back as it was on exit."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _stage_means(times: StageTimes, stages: Sequence[str], calls: int) -> dict[str, float]:
    return {stage: times.seconds[stage] / calls for stage in stages if times.calls[stage] > 0}


def benchmark_inference(
    model: MetaArchitecture,
    inputs: Sequence[dict[str, Any]],
    *,
    warmup: int = 2,
    repeat: int | None = None,
) -> InferenceReport:
    """Times `model` on one image per call, in evaluation mode under `torch.no_grad`.

    Args:
        model: the detector, on its device.
        inputs: test-mode mapped dicts ({"image": [3, H, W], "height", "width"}).
        warmup: untimed calls first, over `inputs` in order (cycling).
        repeat: timed calls, over `inputs` in order from the first, cycling when there are
            more calls than inputs; default one per input.

    Raises:
        ValueError: no inputs, a negative `warmup` or `repeat` < 1.
    """
    repeat = len(inputs) if repeat is None else repeat
    if not inputs or warmup < 0 or repeat < 1:
        raise ValueError(
            f"benchmark_inference needs inputs, warmup >= 0 and repeat >= 1; got "
            f"{len(inputs)} inputs, warmup={warmup}, repeat={repeat}"
        )
    device = model.device
    seconds: list[float] = []
    with _mode(model, False), torch.no_grad(), instrument(model) as times:
        for i in range(warmup):
            model([inputs[i % len(inputs)]])
        times.reset()
        reset_peak_memory(device)
        for i in range(repeat):
            _synchronize(device)
            start = time.perf_counter()
            model([inputs[i % len(inputs)]])
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    stage_seconds = _stage_means(times, model_stages(model), repeat)
    stage_seconds["other"] = statistics.fmean(seconds) - sum(stage_seconds.values())
    return InferenceReport(
        seconds_per_image=seconds,
        stage_seconds=stage_seconds,
        peak_memory_mb=peak_memory_mb(device),
        memory_kind=peak_memory_kind(device),
        warmup=warmup,
        device=str(device),
    )


def benchmark_training(
    model: MetaArchitecture,
    batches: Iterable[list[dict[str, Any]]],
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int = 1,
    repeat: int = 3,
) -> TrainingReport:
    """Times training steps of `model` in training mode: forward (the losses), their sum,
    zero_grad, backward, optimizer.step. Updates the model's weights.

    Args:
        model: the detector, on its device.
        batches: lists of train-mode mapped dicts (with "instances"); `warmup` + `repeat` of
            them are taken, cycling over them if there are fewer (a data loader works).
        optimizer: over the model's parameters.
        warmup: untimed steps first.
        repeat: timed steps.

    Raises:
        ValueError: no batches, a negative `warmup` or `repeat` < 1.
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(
            f"benchmark_training needs warmup >= 0 and repeat >= 1; got warmup={warmup}, "
            f"repeat={repeat}"
        )
    device = model.device
    batch_iter = cycle(batches)
    seconds: list[float] = []
    sizes: list[int] = []
    losses: dict[str, Tensor] = {}
    with _mode(model, True), instrument(model) as times:
        for step in range(warmup + repeat):
            if step == warmup:
                times.reset()
                reset_peak_memory(device)
            batch = next(batch_iter, None)
            if batch is None:
                raise ValueError("benchmark_training got no batches")
            _synchronize(device)
            start = time.perf_counter()
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            with times.stage("backward"):
                total.backward()
            with times.stage("optimizer step"):
                optimizer.step()
            _synchronize(device)
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
                sizes.append(len(batch))
    stage_seconds = _stage_means(times, model_stages(model) + TRAINING_STAGES, repeat)
    stage_seconds["other"] = statistics.fmean(seconds) - sum(stage_seconds.values())
    return TrainingReport(
        seconds_per_step=seconds,
        stage_seconds=stage_seconds,
        images_per_step=statistics.fmean(sizes),
        losses={name: value.item() for name, value in losses.items()},
        peak_memory_mb=peak_memory_mb(device),
        memory_kind=peak_memory_kind(device),
        warmup=warmup,
        device=str(device),
    )


# ----------------------------------------------------------------------------------- FLOPs


def _roi_align_flops(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """fvcore handle of detframe::roi_align(input, rois, spatial_scale, PH, PW,
    sampling_ratio, aligned) -> [K, C, PH, PW]: 4 flops per bilinear sample."""
    bins = math.prod(outputs[0].type().sizes())
    sampling_ratio = inputs[5].toIValue()
    if sampling_ratio > 0:
        return Counter({"roi_align": 4 * bins * sampling_ratio**2})
    return Counter({ROI_ALIGN_ADAPTIVE: 4 * bins})


def flop_count_analysis(module: nn.Module, inputs: tuple[Any, ...]) -> FlopCountAnalysis:
    """fvcore's `FlopCountAnalysis` of `module(*inputs)`, with detframe's operator handles
    (see the module docstring), already run, without its warnings (unsupported operators,
    uncalled modules, tracer warnings, torch.jit deprecation): query `.total()`,
    `.by_module()`, `.by_operator()`, `.unsupported_ops()`.

    Runs `module` as it is (training or evaluation mode), under `torch.no_grad`.
    """
    with warnings.catch_warnings():
        # fvcore scripts functions when imported, and torch deprecates torch.jit.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        from fvcore.nn import FlopCountAnalysis

        analysis = (
            FlopCountAnalysis(module, inputs)
            .set_op_handle("detframe::roi_align", _roi_align_flops)
            .set_op_handle(**dict.fromkeys(IGNORED_OPS))
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
        )
        with torch.no_grad():
            analysis.total()
    return analysis


class _TracedDetector(nn.Module):
    """detector(image [3, H, W]) -> the fields of its output Instances as tensors (e.g. boxes
    [R, 4], scores [R], classes [R], masks [R, height, width]), for tracing; the other keys of
    the input dict (height, width, precomputed proposals) are fixed."""

    def __init__(self, detector: nn.Module, template: dict[str, Any]) -> None:
        super().__init__()
        self.detector = detector
        self.template = {k: v for k, v in template.items() if k not in ("image", "instances")}

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        (output,) = self.detector([{**self.template, "image": image}])
        (result,) = output.values()
        return tuple(v.tensor if isinstance(v, Boxes) else v for v in result.fields().values())


@dataclass
class FlopReport:
    """FLOPs per image of a detector's inference (fvcore; a fused multiply-add is 1 flop).

    Attributes:
        images: how many images were traced (the figures are means over them).
        gflops: total GFLOPs per image.
        gflops_by_module: GFLOPs per image of each top-level module that ran (backbone,
            proposal_generator, roi_heads), then "other" (pre- and post-processing: the rest
            of the total, e.g. mask pasting).
        gflops_by_operator: GFLOPs per image of each counted operator.
        skipped_ops: operators without a flop handle, with their number of occurrences in
            all the traces together; they are counted as 0.
        ignored_ops: detframe operators counted as 0 on purpose, and why.
    """

    images: int
    gflops: float
    gflops_by_module: dict[str, float]
    gflops_by_operator: dict[str, float]
    skipped_ops: dict[str, int]
    ignored_ops: dict[str, str]

    def format(self) -> str:
        """A readable table of the GFLOPs per module and per operator, and what was skipped."""
        lines = [
            f"FLOPs per image, mean over {self.images} images (fvcore: 1 fused multiply-add "
            f"= 1 flop):",
            f"  {'module':<28} {'GFLOPs':>10} {'share':>7}",
        ]
        for name, gflops in self.gflops_by_module.items():
            label = "other (pre/post-processing)" if name == "other" else name
            share = gflops / self.gflops if self.gflops > 0 else 0.0
            lines.append(f"  {label:<28} {gflops:10.4f} {share:7.1%}")
        lines.append(f"  {'total':<28} {self.gflops:10.4f}")
        by_operator = ", ".join(f"{op} {g:.4f}" for op, g in self.gflops_by_operator.items())
        ignored = "; ".join(f"{op} ({why})" for op, why in self.ignored_ops.items())
        skipped = ", ".join(f"{op} x{n}" for op, n in self.skipped_ops.items())
        for title, text in (
            ("GFLOPs by operator", by_operator),
            ("counted as 0 on purpose", ignored or "none"),
            (f"skipped, no flop handle (occurrences in {self.images} traces)", skipped or "none"),
        ):
            lines.append(
                textwrap.fill(
                    f"{title}: {text}", 100, initial_indent="  ", subsequent_indent="    "
                )
            )
        return "\n".join(lines)


def count_flops(model: MetaArchitecture, inputs: Sequence[dict[str, Any]]) -> FlopReport:
    """FLOPs of `model`'s inference per image, averaged over `inputs` (each traced alone, in
    evaluation mode). See the module docstring for what is counted.

    Args:
        model: the detector.
        inputs: test-mode mapped dicts ({"image": [3, H, W], "height", "width"}).

    Raises:
        ValueError: no inputs.
    """
    if not inputs:
        raise ValueError("count_flops needs at least one input")
    total = 0
    by_module: Counter[str] = Counter()
    by_operator: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    children = [name for name, _ in model.named_children()]
    with _mode(model, False):
        for x in inputs:
            analysis = flop_count_analysis(_TracedDetector(model, x), (x["image"],))
            total += analysis.total()
            modules = analysis.by_module()
            by_module.update({name: modules[f"detector.{name}"] for name in children})
            by_operator.update(analysis.by_operator())
            skipped.update(analysis.unsupported_ops())
    n = len(inputs)
    gflops_by_module = {name: by_module[name] / n / 1e9 for name in children if by_module[name]}
    gflops_by_module["other"] = total / n / 1e9 - sum(gflops_by_module.values())
    return FlopReport(
        images=n,
        gflops=total / n / 1e9,
        gflops_by_module=gflops_by_module,
        gflops_by_operator={op: f / n / 1e9 for op, f in by_operator.most_common()},
        skipped_ops=dict(skipped.most_common()),
        ignored_ops=dict(IGNORED_OPS),
    )
