"""Benchmark library: stage timing and its removal, peak memory, parameters, FLOPs, training.

The detector is the narrow ResNet-18-FPN Mask R-CNN of test_rcnn_model.py with random
weights, on 64 x 96 images. FLOPs are checked against hand counts (fvcore counts a fused
multiply-add as one flop), parameters against sums over the modules, memory against
/proc/self/status.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_rcnn_model import ROOT, SMALL, sample
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from detframe.engine.benchmark import (
    ROI_ALIGN_ADAPTIVE,
    benchmark_inference,
    benchmark_training,
    count_flops,
    count_parameters,
    flop_count_analysis,
    instrument,
    model_stages,
)
from detframe.engine.setup import load_config
from detframe.layers import roi_align, roi_pool
from detframe.modeling import GeneralizedRCNN, build_model
from detframe.utils.profiling import StageTimes, peak_memory_mb, reset_peak_memory

STAGES = ("preprocessing", "backbone", "proposal_generator", "roi_heads", "post-processing")
CONFIG = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"


def small_model(*overrides: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(load_config(CONFIG, [*SMALL, *overrides]))


def eval_inputs(*sizes: tuple[int, int]) -> list[dict]:
    """Test-mode inputs (no targets) of the given (height, width)."""
    inputs = [sample(h, w, [[10.0, 10.0, 40.0, 40.0]], seed=i) for i, (h, w) in enumerate(sizes)]
    return [{k: v for k, v in x.items() if k != "instances"} for x in inputs]


def assert_uninstrumented(model: GeneralizedRCNN) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
    assert "preprocess_image" not in vars(model)
    assert "postprocess" not in vars(model)
    assert model.preprocess_image.__func__ is GeneralizedRCNN.preprocess_image
    assert model.postprocess.__func__ is GeneralizedRCNN.postprocess


# ------------------------------------------------------------------------------ profiling


class Calls:
    """An object whose method counts its calls; `shadow` gives it an instance attribute."""

    def __init__(self) -> None:
        self.count = 0

    def run(self) -> int:
        self.count += 1
        return self.count


def test_stage_times_hooks_wraps_and_removes_all() -> None:
    module = nn.Linear(3, 2)
    plain, shadowed = Calls(), Calls()
    own = shadowed.run  # an instance attribute that the wrapper shadows, then restores
    shadowed.run = own
    times = StageTimes()
    times.hook_module(module, "linear")
    times.wrap_method(plain, "run", "plain")
    times.wrap_method(plain, "run", "plain twice")  # a wrapper around the wrapper
    times.wrap_method(shadowed, "run", "shadowed")
    module(torch.zeros(1, 3))
    module(torch.zeros(1, 3))
    assert plain.run() == 1
    assert shadowed.run() == 1
    with times.stage("block"):
        pass
    assert dict(times.calls) == {
        "linear": 2,
        "plain": 1,
        "plain twice": 1,
        "shadowed": 1,
        "block": 1,
    }
    assert all(s > 0 for s in times.seconds.values())
    assert times.seconds["plain"] <= times.seconds["plain twice"]

    times.remove()
    assert not module._forward_hooks and not module._forward_pre_hooks
    assert "run" not in vars(plain) and plain.run.__func__ is Calls.run
    assert vars(shadowed)["run"] is own
    module(torch.zeros(1, 3))
    plain.run()
    assert times.calls["linear"] == 2 and times.calls["plain"] == 1

    times.reset()
    assert not times.seconds and not times.calls


def test_stage_times_as_context_manager_removes_on_error() -> None:
    module = nn.Identity()
    with pytest.raises(RuntimeError, match="inside"), StageTimes() as times:
        times.hook_module(module, "identity")
        raise RuntimeError("inside")
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_cpu_peak_memory_is_the_process_high_water_mark() -> None:
    reset_peak_memory("cpu")  # nothing to reset; must not fail
    before = peak_memory_mb("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    status = Path("/proc/self/status")
    if status.exists():
        line = next(s for s in status.read_text().splitlines() if s.startswith("VmHWM:"))
        vm_hwm_mb = int(line.split()[1]) / 1024  # kB
        assert peak_memory_mb("cpu") == pytest.approx(vm_hwm_mb, rel=0.02)
    assert peak_memory_mb("cpu") >= before > 0
    del block


def test_cuda_paths_synchronise_and_read_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU: the CUDA calls are replaced by recorders."""
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**20)
    cuda = torch.device("cuda", 0)
    times = StageTimes("cuda:0")
    with times.stage("block"):
        calls.append(("inside", cuda))
    reset_peak_memory(cuda)
    assert calls == [("sync", cuda), ("inside", cuda), ("sync", cuda), ("reset", cuda)]
    assert peak_memory_mb("cuda:0") == 3.0


# ------------------------------------------------------------------------- parameters


def test_count_parameters_by_hand_and_with_a_frozen_backbone_part() -> None:
    toy = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    toy[0].requires_grad_(False)
    toy.append(toy[2])  # shared: counted once
    assert count_parameters(toy) == (3 * 4 + 4 + 4 * 2 + 2, 4 * 2 + 2)

    model = small_model("MODEL.RESNETS.FREEZE_AT=2")  # the stem and res2 frozen
    bottom_up = model.backbone.bottom_up
    frozen = sum(p.numel() for m in (bottom_up.conv1, bottom_up.layer1) for p in m.parameters())
    total = sum(
        p.numel()
        for part in (model.backbone, model.proposal_generator, model.roi_heads)
        for p in part.parameters()
    )
    assert frozen > 0
    assert count_parameters(model) == (total, total - frozen)


# ------------------------------------------------------------------------------ FLOPs


class ConvLinear(nn.Module):
    """[N, 3, 10, 12] -> conv 3x3 to 8 channels -> linear to 5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 10 * 12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).relu().flatten(1))


class RoIOps(nn.Module):
    """RoIAlign with a fixed and an adaptive sampling ratio, and RoIPool, on one map."""

    def forward(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            roi_align(features, rois, 5, 0.5, sampling_ratio=2, aligned=True),
            roi_align(features, rois, 5, 0.5, sampling_ratio=0, aligned=True),
            roi_pool(features, rois, 5, 0.5),
        )


def test_flops_of_a_conv_and_a_linear_equal_the_hand_count() -> None:
    analysis = flop_count_analysis(ConvLinear(), (torch.randn(2, 3, 10, 12),))
    conv = 2 * (8 * 10 * 12) * (3 * 3 * 3)  # per output element: C_in k^2 multiply-adds
    linear = 2 * 5 * (8 * 10 * 12)
    assert analysis.total() == conv + linear
    assert analysis.by_module()["conv"] == conv
    assert analysis.by_module()["fc"] == linear


def test_flops_of_roi_align_and_roi_pool() -> None:
    features = torch.randn(1, 4, 16, 16)
    rois = torch.tensor([[0, 0, 0, 10, 10], [0, 4, 4, 30, 20], [0, 1, 2, 3, 4]], dtype=torch.float)
    analysis = flop_count_analysis(RoIOps(), (features, rois))
    bins = 3 * 4 * 5 * 5  # K rois x C channels x PH x PW
    assert analysis.by_operator() == {"roi_align": 4 * bins * 2**2, ROI_ALIGN_ADAPTIVE: 4 * bins}
    assert "detframe::roi_pool" not in analysis.unsupported_ops()


class ConvFlops(TorchFunctionMode):
    """Adds up the multiply-adds of every F.conv2d call: output elements x C_in / groups x
    k_h x k_w (the weight's [C_in / groups, k_h, k_w])."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        output = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.total += output.numel() * weight[0].numel()
        return output


def test_detector_flops_per_module_and_backbone_against_its_convolutions() -> None:
    model = small_model()
    model.train()
    inputs = eval_inputs((64, 96), (96, 64))
    report = count_flops(model, inputs)

    assert model.training
    assert_uninstrumented(model)
    assert report.images == 2
    assert set(report.gflops_by_module) == {"backbone", "proposal_generator", "roi_heads", "other"}
    assert all(v >= 0 for v in report.gflops_by_module.values())
    assert sum(report.gflops_by_module.values()) == pytest.approx(report.gflops)
    assert sum(report.gflops_by_operator.values()) == pytest.approx(report.gflops)
    assert report.gflops_by_module["roi_heads"] > 0
    assert "aten::add" in report.skipped_ops  # FrozenBN's shift, the residuals
    assert "detframe::roi_align" not in report.skipped_ops

    # Both images pad to 64 x 96 or 96 x 64 (multiples of 32): the same backbone work.
    model.eval()
    images = model.preprocess_image(inputs[:1]).tensor
    with torch.no_grad(), ConvFlops() as convs:
        model.backbone(images)
    by_hand = convs.total / 1e9
    # fvcore also counts FPN's nearest upsampling, 1 per output element: 0.007% here.
    assert report.gflops_by_module["backbone"] == pytest.approx(by_hand, rel=1e-3)
    text = report.format()
    assert "backbone" in text and "aten::add" in text and "detframe::roi_pool" in text


# -------------------------------------------------------------------------- inference


def test_inference_times_every_stage_and_cleans_up() -> None:
    model = small_model()
    model.train()
    inputs = eval_inputs((64, 96), (96, 64))
    shapes: list[tuple[int, ...]] = []
    grad_enabled: list[bool] = []

    def record(_: nn.Module, args: tuple[Tensor]) -> None:
        shapes.append(tuple(args[0].shape[-2:]))
        grad_enabled.append(torch.is_grad_enabled())

    handle = model.backbone.register_forward_pre_hook(record)
    report = benchmark_inference(model, inputs, warmup=1, repeat=3)
    handle.remove()

    # One warm-up, then 3 timed calls cycling over the 2 inputs from the first.
    assert shapes == [(64, 96), (64, 96), (96, 64), (64, 96)]
    assert not any(grad_enabled)
    assert model.training
    assert_uninstrumented(model)

    assert len(report.seconds_per_image) == 3
    assert report.median_seconds == statistics.median(report.seconds_per_image)
    assert report.images_per_second == pytest.approx(1 / report.median_seconds)
    assert list(report.stage_seconds) == [*STAGES, "other"]
    stages = [report.stage_seconds[s] for s in STAGES]
    assert all(s > 0 for s in stages)
    assert sum(stages) <= statistics.fmean(report.seconds_per_image)
    assert report.stage_seconds["other"] >= 0
    assert report.peak_memory_mb > 0
    assert report.memory_kind == "process peak RSS since start"
    text = report.format()
    assert all(s in text for s in STAGES) and "images/s" in text


def test_instrument_times_one_call_of_each_stage() -> None:
    model = small_model().eval()
    with torch.no_grad(), instrument(model) as times:
        model(eval_inputs((64, 96)))
    assert model_stages(model) == STAGES
    assert dict(times.calls) == dict.fromkeys(STAGES, 1)
    assert_uninstrumented(model)


def test_bad_benchmark_arguments() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="inputs"):
        benchmark_inference(model, [])
    with pytest.raises(ValueError, match="repeat"):
        benchmark_inference(model, eval_inputs((64, 96)), repeat=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="no batches"):
        benchmark_training(model, [], optimizer)
    assert_uninstrumented(model)


# --------------------------------------------------------------------------- training


def test_training_steps_update_the_weights_and_report_consistently() -> None:
    model = small_model("MODEL.RESNETS.FREEZE_AT=1")
    model.eval()
    batch = [
        sample(64, 96, [[10.0, 10.0, 50.0, 40.0]], seed=0),
        sample(64, 96, [[30.0, 5.0, 90.0, 60.0]], seed=1),
    ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    report = benchmark_training(model, [batch], optimizer, warmup=0, repeat=2)

    assert not model.training
    assert_uninstrumented(model)
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "roi_heads.box_predictor.cls_score.weight" in changed
    assert not any(name.startswith("backbone.bottom_up.conv1.") for name in changed)

    assert len(report.seconds_per_step) == 2
    assert report.images_per_step == 2
    assert report.images_per_second == pytest.approx(2 / report.median_seconds)
    assert set(report.losses) == {
        "loss_rpn_cls",
        "loss_rpn_loc",
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
    }
    assert all(math.isfinite(v) for v in report.losses.values())
    forward = ["preprocessing", "backbone", "proposal_generator", "roi_heads"]
    assert list(report.stage_seconds) == [*forward, "backward", "optimizer step", "other"]
    assert all(report.stage_seconds[s] > 0 for s in [*forward, "backward", "optimizer step"])
    assert sum(report.stage_seconds.values()) == pytest.approx(
        statistics.fmean(report.seconds_per_step)
    )
    assert report.stage_seconds["other"] >= 0
    assert "backward" in report.format()
