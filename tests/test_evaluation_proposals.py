"""ProposalEvaluator: average recall on a small case computed by hand.

One 100 x 100 image with two non-crowd ground-truth rectangles and a crowd region:

    A = [0, 0, 20, 20]    area 400   (small)
    B = [50, 50, 90, 90]  area 1600  (medium)
    C = [60, 0, 100, 30]  crowd: ignored

Proposals, by objectness (highest first), with their IoUs:

    p1 = [0, 0, 19, 16]   IoU(p1, A) = 19*16 / 400 = 0.76,  IoU(p1, B) = 0
    p2 = [0, 0, 20, 20]   IoU(p2, A) = 1.0
    p3 = [50, 50, 90, 81] IoU(p3, B) = 40*31 / 1600 = 0.775
    p4 = [60, 0, 100, 30] exactly the crowd region, no overlap with A or B

Thresholds t = 0.50, 0.55, ..., 0.95 (10). An IoU of 0.76 or 0.775 clears 6 of them
(0.50..0.75), an IoU of 1.0 all 10. With greedy matching (best pair first):

    top 1: A <- p1 (0.76: 6/10), B unmatched (0)  -> AR = (6 + 0) / 20  = 30
           small (A only): 60; medium (B only): 0
    top 2: A <- p2 (1.0, beats p1), B unmatched  -> AR = (10 + 0) / 20 = 50
           small 100, medium 0
    top 10: A <- p2, B <- p3 (0.775: 6/10)       -> AR = (10 + 6) / 20 = 80
           small 100, medium 60
    large: no ground truth -> NaN. Were the crowd region counted, p4 would recall it and the
    denominators would be 3.

Rectangles with integer corners rasterise to exactly their boxes, so the mask proposals (the
same rectangles as bitmaps) have the same IoUs and the same ARs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from detframe.evaluation import ProposalEvaluator, greedy_matched_ious
from detframe.registry import EVALUATOR_REGISTRY
from detframe.structures import BitMasks, Boxes, Instances

SIZE = (100, 100)
PROPOSALS = [[0, 0, 19, 16], [0, 0, 20, 20], [50, 50, 90, 81], [60, 0, 100, 30]]
OBJECTNESS = [3.0, 2.0, 1.0, 0.5]
EXPECTED = {
    "AR@1": 30.0,
    "ARs@1": 60.0,
    "ARm@1": 0.0,
    "AR@2": 50.0,
    "ARs@2": 100.0,
    "ARm@2": 0.0,
    "AR@10": 80.0,
    "ARs@10": 100.0,
    "ARm@10": 60.0,
}


def _rectangle(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y1, x2, y2, x1, y2]


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    def annotation(ann_id: int, box: list[int], iscrowd: int) -> dict:
        x1, y1, x2, y2 = box
        return {
            "id": ann_id,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [_rectangle(*box)],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float((x2 - x1) * (y2 - y1)),
            "iscrowd": iscrowd,
        }

    dataset = {
        "images": [{"id": 1, "height": SIZE[0], "width": SIZE[1]}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            annotation(1, [0, 0, 20, 20], 0),
            annotation(2, [50, 50, 90, 90], 0),
            annotation(3, [60, 0, 100, 30], 1),
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def _proposals(order: list[int]) -> Instances:
    """The proposals in the given storage order (ranking is by objectness, not by order)."""
    masks = torch.zeros(len(order), *SIZE, dtype=torch.bool)
    for row, i in enumerate(order):
        x1, y1, x2, y2 = PROPOSALS[i]
        masks[row, y1:y2, x1:x2] = True
    return Instances(
        SIZE,
        proposal_boxes=Boxes(torch.tensor([PROPOSALS[i] for i in order], dtype=torch.float32)),
        objectness_logits=torch.tensor([OBJECTNESS[i] for i in order]),
        proposal_masks=BitMasks(masks),
    )


def test_registered() -> None:
    assert EVALUATOR_REGISTRY.get("ProposalEvaluator") is ProposalEvaluator


def test_hand_computed_average_recall(gt_path: Path) -> None:
    evaluator = ProposalEvaluator(
        str(gt_path), tasks=("box_proposals", "segm_proposals"), limits=(1, 2, 10)
    )
    evaluator.process([{"image_id": 1}], [{"proposals": _proposals([3, 1, 0, 2])}])
    results = evaluator.evaluate()
    for task in ("box_proposals", "segm_proposals"):
        for name, value in EXPECTED.items():
            assert results[task][name] == pytest.approx(value), (task, name)
        for limit in (1, 2, 10):
            assert math.isnan(results[task][f"ARl@{limit}"])


def test_images_without_proposals_count_as_misses(gt_path: Path) -> None:
    evaluator = ProposalEvaluator(gt_path, tasks=("box_proposals", "segm_proposals"), limits=(10,))
    empty = Instances(
        SIZE,
        proposal_boxes=Boxes(torch.zeros(0, 4)),
        objectness_logits=torch.zeros(0),
        proposal_masks=torch.zeros(0, *SIZE, dtype=torch.bool),
    )
    evaluator.process([{"image_id": 1}], [{"proposals": empty}])
    results = evaluator.evaluate()
    assert results["box_proposals"]["AR@10"] == 0.0
    assert results["segm_proposals"]["ARm@10"] == 0.0


def test_greedy_matching_is_one_to_one() -> None:
    # p0 is the best proposal for both gts; greedy gives it to g1 (0.9) and g0 gets p1 (0.6).
    ious = torch.tensor([[0.8, 0.9], [0.6, 0.1]])
    assert greedy_matched_ious(ious).tolist() == pytest.approx([0.6, 0.9])
    # More gts than proposals: the unmatched gt gets 0.
    assert greedy_matched_ious(torch.tensor([[0.7, 0.8, 0.2]])).tolist() == pytest.approx(
        [0.0, 0.8, 0.0]
    )
    # No proposals: every gt gets 0.
    assert greedy_matched_ious(torch.zeros(0, 2)).tolist() == [0.0, 0.0]


def test_bad_arguments(gt_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks"):
        ProposalEvaluator(gt_path, tasks=("bbox",))
    with pytest.raises(ValueError, match="limits"):
        ProposalEvaluator(gt_path, limits=(0,))
    evaluator = ProposalEvaluator(gt_path, tasks=("segm_proposals",))
    no_masks = Instances(
        SIZE, proposal_boxes=Boxes(torch.zeros(1, 4)), objectness_logits=torch.zeros(1)
    )
    with pytest.raises(ValueError, match="proposal_masks"):
        evaluator.process([{"image_id": 1}], [{"proposals": no_masks}])
