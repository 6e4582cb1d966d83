"""inference_on_dataset with a stub detector and COCOEvaluator on a tiny hand-written COCO json.

Ground truth: 3 images of 32 x 32, categories 1 "a" (images 1 and 2) and 2 "b" (image 3), one
rectangle each. The stub model answers each image_id with fixed detections; expected APs are
worked out by hand from COCO's 101-point interpolated precision.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detframe.evaluation import COCOEvaluator, inference_on_dataset
from detframe.structures import BitMasks, Boxes, Instances

SIZE = (32, 32)
# image id -> (category id, box XYXY)
GROUND_TRUTH = {1: (1, [2, 2, 12, 14]), 2: (1, [10, 8, 30, 20]), 3: (2, [4, 16, 20, 30])}


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    annotations = []
    for image_id, (category, (x1, y1, x2, y2)) in GROUND_TRUTH.items():
        polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": category,
                "segmentation": [polygon],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((x2 - x1) * (y2 - y1)),
                "iscrowd": 0,
            }
        )
    dataset = {
        "images": [{"id": i, "height": SIZE[0], "width": SIZE[1]} for i in GROUND_TRUTH],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations,
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def _detection(image_id: int) -> Instances:
    """The ground truth of the image as one detection of score 1 (class index = id - 1)."""
    category, (x1, y1, x2, y2) = GROUND_TRUTH[image_id]
    mask = torch.zeros(SIZE, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return Instances(
        SIZE,
        pred_boxes=Boxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)),
        scores=torch.ones(1),
        pred_classes=torch.tensor([category - 1]),
        pred_masks=BitMasks(mask[None]),
    )


def _no_detection() -> Instances:
    return Instances(
        SIZE,
        pred_boxes=Boxes(torch.zeros(0, 4)),
        scores=torch.zeros(0),
        pred_classes=torch.zeros(0, dtype=torch.int64),
        pred_masks=BitMasks(torch.zeros(0, *SIZE, dtype=torch.bool)),
    )


class StubDetector(nn.Module):
    """Detects the ground truth of the images in `detected`; losses depend on the image ids.

    Records, per call, whether it ran in training mode and with gradients enabled. Its first
    call sleeps `first_call_sleep` seconds (a slow warm-up).
    """

    def __init__(self, detected: set[int], first_call_sleep: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.detected = detected
        self.first_call_sleep = first_call_sleep
        self.calls: list[tuple[bool, bool]] = []
        self.saw_instances = False

    def forward(self, inputs):
        if not self.calls:
            time.sleep(self.first_call_sleep)
        self.calls.append((self.training, torch.is_grad_enabled()))
        self.saw_instances |= any("instances" in x for x in inputs)
        ids = [x["image_id"] for x in inputs]
        return [
            {"instances": _detection(i) if i in self.detected else _no_detection()} for i in ids
        ]

    def outputs_and_losses(self, inputs):
        ids = torch.tensor([float(x["image_id"]) for x in inputs])
        losses = {"loss_a": ids.mean() * self.weight, "loss_b": torch.tensor(2.0)}
        return self(inputs), losses


def _loader(with_instances: bool = False) -> list[list[dict]]:
    batches = [[1, 2], [3]]
    return [
        [
            {"image_id": i, **({"instances": Instances(SIZE)} if with_instances else {})}
            for i in batch
        ]
        for batch in batches
    ]


def test_perfect_detections_give_100_ap(gt_path: Path) -> None:
    model = StubDetector({1, 2, 3})
    evaluator = COCOEvaluator(gt_path, tasks=("bbox", "segm"))
    results = inference_on_dataset(model, _loader(), evaluator, progress=False)
    assert set(results) == {"bbox", "segm", "time_per_image"}
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0)
        assert results[task]["AP-a"] == pytest.approx(100.0)
    assert "validation_loss" not in results


def test_missing_detection_gives_hand_computed_ap(gt_path: Path) -> None:
    # Category "a": 2 objects, one found at score 1 -> precision 1 up to recall 0.5, 0 after:
    # 51 of the 101 recall points. Category "b": found -> 100. AP = mean over categories.
    model = StubDetector({1, 3})
    evaluator = COCOEvaluator(gt_path, tasks=("bbox",))
    results = inference_on_dataset(model, _loader(), evaluator, progress=False)
    assert results["bbox"]["AP-a"] == pytest.approx(100 * 51 / 101)
    assert results["bbox"]["AP"] == pytest.approx((100 * 51 / 101 + 100) / 2)


def test_no_detections_give_zero_ap(gt_path: Path) -> None:
    results = inference_on_dataset(
        StubDetector(set()), _loader(), COCOEvaluator(gt_path), progress=False
    )
    assert results["bbox"]["AP"] == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_runs_in_eval_mode_without_grad_and_restores_mode(gt_path: Path, training: bool) -> None:
    model = StubDetector({1, 2, 3})
    model.train(training)
    inference_on_dataset(model, _loader(), COCOEvaluator(gt_path), progress=False)
    assert model.calls == [(False, False), (False, False)]
    assert model.training is training
    assert torch.is_grad_enabled()


def test_mode_is_restored_after_an_error(gt_path: Path) -> None:
    model = StubDetector({1, 2, 3}).train()
    with pytest.raises(ValueError, match=r"images \[1, 2\] have none"):
        inference_on_dataset(
            model, _loader(), COCOEvaluator(gt_path), progress=False, validation_loss=True
        )
    assert model.training


def test_validation_loss_is_the_image_weighted_mean(gt_path: Path) -> None:
    # Batch [1, 2]: loss_a 1.5 for 2 images; batch [3]: loss_a 3 for 1 image -> (3 + 3) / 3.
    model = StubDetector({1, 2, 3}).train()
    results = inference_on_dataset(
        model,
        _loader(with_instances=True),
        COCOEvaluator(gt_path),
        progress=False,
        validation_loss=True,
    )
    assert results["validation_loss"] == pytest.approx({"loss_a": 2.0, "loss_b": 2.0})
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert model.calls == [(False, False), (False, False)]
    assert model.training


def test_targets_are_not_passed_without_validation_loss(gt_path: Path) -> None:
    model = StubDetector({1, 2, 3})
    loader = _loader(with_instances=True)
    results = inference_on_dataset(model, loader, COCOEvaluator(gt_path), progress=False)
    assert not model.saw_instances
    assert all("instances" in x for batch in loader for x in batch)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_time_per_image_excludes_the_warm_up_batch(gt_path: Path) -> None:
    # Two batches: the first (sleeping 0.3 s) is the warm-up; the second is timed alone.
    model = StubDetector({1, 2, 3}, first_call_sleep=0.3)
    results = inference_on_dataset(model, _loader(), COCOEvaluator(gt_path), progress=False)
    assert 0.0 < results["time_per_image"] < 0.3


def test_empty_loader_gives_nan_time(gt_path: Path) -> None:
    results = inference_on_dataset(StubDetector(set()), [], COCOEvaluator(gt_path), progress=False)
    assert math.isnan(results["time_per_image"])
    assert math.isnan(results["bbox"]["AP"])


def test_progress_bar_counts_images(gt_path: Path, capsys: pytest.CaptureFixture) -> None:
    inference_on_dataset(StubDetector({1, 2, 3}), _loader(), COCOEvaluator(gt_path))
    assert "3img" in capsys.readouterr().err.replace(" ", "")
    inference_on_dataset(StubDetector({1, 2, 3}), _loader(), COCOEvaluator(gt_path), progress=False)
    assert capsys.readouterr().err == ""
