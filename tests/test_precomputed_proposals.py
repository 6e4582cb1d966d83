"""PrecomputedProposals against a slow reference (Python sort of the given proposals)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detframe.engine.setup import load_config
from detframe.layers import ShapeSpec
from detframe.modeling.proposal_generator import PrecomputedProposals, build_proposal_generator
from detframe.structures import Boxes, ImageList, Instances

IMAGE_SIZES = [(60, 80), (50, 70)]


def images() -> ImageList:
    return ImageList(torch.zeros(2, 3, 64, 96), IMAGE_SIZES)


def given(count: int, image_size: tuple[int, int], seed: int) -> Instances:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 1 + torch.rand(count, 2, generator=g) * 20], dim=1)
    logits = torch.randn(count, generator=g)
    return Instances(image_size, proposal_boxes=Boxes(boxes), objectness_logits=logits)


def reference_top(instances: Instances, k: int) -> tuple[list[list[float]], list[float]]:
    rows = list(
        zip(
            instances.objectness_logits.tolist(),
            instances.proposal_boxes.tensor.tolist(),
            strict=True,
        )
    )
    rows.sort(key=lambda r: -r[0])
    return [box for _, box in rows[:k]], [score for score, _ in rows[:k]]


def build(tmp_path: Path, overrides: list[str]) -> PrecomputedProposals:
    path = tmp_path / "config.yaml"
    path.write_text("")
    cfg = load_config(path, ["MODEL.PROPOSAL_GENERATOR.NAME=PrecomputedProposals", *overrides])
    generator = build_proposal_generator(cfg, {"p2": ShapeSpec(channels=8, stride=4)})
    assert isinstance(generator, PrecomputedProposals)
    return generator


@pytest.mark.parametrize("training", [True, False])
def test_keeps_top_k_of_each_image_highest_first(tmp_path: Path, training: bool) -> None:
    generator = build(
        tmp_path,
        ["MODEL.PRECOMPUTED_PROPOSALS.TOPK_TRAIN=7", "MODEL.PRECOMPUTED_PROPOSALS.TOPK_TEST=4"],
    )
    generator.train(training)
    k = 7 if training else 4
    inputs = [given(12, IMAGE_SIZES[0], 0), given(3, IMAGE_SIZES[1], 1)]
    gt = [Instances(s, gt_boxes=Boxes(torch.tensor([[1.0, 2, 3, 4]]))) for s in IMAGE_SIZES]
    proposals, losses = generator(images(), {}, gt, proposals=inputs)
    assert losses == {}
    assert [len(p) for p in proposals] == [k, 3]
    for out, src in zip(proposals, inputs, strict=True):
        assert out.image_size == src.image_size
        assert sorted(out.fields()) == ["objectness_logits", "proposal_boxes"]
        boxes, scores = reference_top(src, k)
        assert out.proposal_boxes.tensor.tolist() == boxes
        assert out.objectness_logits.tolist() == scores


def test_ties_keep_the_given_order_and_extra_fields_are_dropped() -> None:
    boxes = Boxes(torch.tensor([[0.0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 4, 4]]))
    src = Instances(
        IMAGE_SIZES[0],
        proposal_boxes=boxes,
        objectness_logits=torch.tensor([1.0, 2.0, 1.0, 2.0]),
        extra=torch.arange(4),
    )
    generator = PrecomputedProposals(topk=(3, 3))
    other = given(2, IMAGE_SIZES[1], 0)
    (out, _), _ = generator(images(), {}, None, proposals=[src, other])
    assert out.proposal_boxes.tensor[:, 0].tolist() == [1.0, 3.0, 0.0]
    assert not out.has("extra")


def test_bad_inputs() -> None:
    generator = PrecomputedProposals(topk=(5, 5))
    with pytest.raises(ValueError, match="needs precomputed proposals"):
        generator(images(), {}, None)
    with pytest.raises(ValueError, match="1 precomputed proposal sets for 2 images"):
        generator(images(), {}, None, proposals=[given(3, IMAGE_SIZES[0], 0)])
    no_logits = Instances(IMAGE_SIZES[1], proposal_boxes=Boxes(torch.zeros(2, 4)))
    with pytest.raises(ValueError, match=r"proposals\[1\] has no field 'objectness_logits'"):
        generator(images(), {}, None, proposals=[given(3, IMAGE_SIZES[0], 0), no_logits])
    with pytest.raises(ValueError, match=r"proposals\[0\].image_size \(50, 70\) differs"):
        generator(images(), {}, None, proposals=[given(3, (50, 70), 0), given(3, (50, 70), 1)])
    with pytest.raises(ValueError, match="topk"):
        PrecomputedProposals(topk=(0, 5))
