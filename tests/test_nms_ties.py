"""NMS on ties, where detections and proposals are selected: hand-computed expectations.

Equal scores are where an implementation's sort order could leak into results. What must
hold: of identical boxes with equal scores exactly one survives (and which one cannot
matter, they are the same box); equal scores in different classes or on boxes that do not
overlap all survive; results stay sorted by score.
"""

from __future__ import annotations

import torch

from detframe.modeling.box_coder import Box2BoxTransform
from detframe.modeling.proposal_generator import find_top_proposals
from detframe.modeling.roi_heads import FastRCNNOutputLayers
from detframe.structures import Boxes, Instances

SAME = [0.0, 0.0, 10.0, 10.0]
OTHER = [20.0, 20.0, 30.0, 30.0]


def as_set(boxes: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(b) for b in boxes.tolist()}


def test_rpn_keeps_one_of_identical_tied_proposals() -> None:
    anchors = torch.tensor([SAME, SAME, OTHER, OTHER, SAME])  # one level, A = 5
    logits = torch.full((1, 5), 2.0)  # all tied
    deltas = torch.zeros(1, 5, 4)
    (props,) = find_top_proposals(
        [anchors], [logits], [deltas], Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), [(40, 40)],
        pre_nms_topk=5, post_nms_topk=10, nms_thresh=0.7, min_box_size=0.0,
    )  # fmt: skip
    assert len(props) == 2
    assert as_set(props.proposal_boxes.tensor) == {tuple(SAME), tuple(OTHER)}
    assert torch.equal(props.objectness_logits, torch.tensor([2.0, 2.0]))


def test_rpn_ties_across_levels_are_not_suppressed() -> None:
    # NMS runs per level: the same box on two levels survives twice.
    boxes = [torch.tensor([SAME]), torch.tensor([SAME])]
    logits = [torch.full((1, 1), 1.0), torch.full((1, 1), 1.0)]
    deltas = [torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)]
    (props,) = find_top_proposals(
        boxes, logits, deltas, Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), [(40, 40)],
        pre_nms_topk=5, post_nms_topk=10, nms_thresh=0.7, min_box_size=0.0,
    )  # fmt: skip
    assert len(props) == 2


def predictor(num_classes: int) -> FastRCNNOutputLayers:
    return FastRCNNOutputLayers(
        input_size=4,
        num_classes=num_classes,
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        test_score_thresh=0.05,
        test_nms_thresh=0.5,
        test_topk_per_image=100,
    )


def test_detections_on_tied_scores() -> None:
    # Three classes + background (last). ROIs 0 and 1 are the same box with the same
    # scores; ROI 2 overlaps them fully but its best class differs; ROI 3 is elsewhere.
    head = predictor(3)
    rois = torch.tensor([SAME, SAME, SAME, OTHER])
    big, small = 5.0, -5.0
    logits = torch.tensor(
        [
            [big, small, small, small],  # class 0
            [big, small, small, small],  # class 0, tied with ROI 0
            [small, big, small, small],  # class 1, same score as the others
            [big, small, small, small],  # class 0, no overlap
        ]
    )
    deltas = torch.zeros(4, 3 * 4)
    proposals = [Instances((40, 40), proposal_boxes=Boxes(rois))]
    (dets,) = head.inference((logits, deltas), proposals)
    pairs = {
        (tuple(b), int(c))
        for b, c in zip(dets.pred_boxes.tensor.tolist(), dets.pred_classes.tolist(), strict=True)
    }
    assert pairs == {(tuple(SAME), 0), (tuple(SAME), 1), (tuple(OTHER), 0)}
    assert len(dets) == 3
    assert torch.allclose(dets.scores, dets.scores[0].expand(3))
    assert (dets.scores[:-1] >= dets.scores[1:]).all()
