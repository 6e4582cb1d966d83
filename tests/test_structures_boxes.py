"""Boxes and pairwise IoU against torchvision.ops and hand-computed values."""

import pytest
import torch
import torchvision

from detframe.structures import Boxes, pairwise_intersection, pairwise_iou


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 2, generator=g) * 50
    return torch.cat([low, low + 1 + torch.rand(n, 2, generator=g) * 30], dim=1)


def test_constructor_validates_and_accepts_empty():
    assert Boxes(torch.zeros(0)).tensor.shape == (0, 4)
    assert Boxes(torch.zeros(0, 7)).tensor.shape == (0, 4)
    assert Boxes(torch.tensor([[1, 2, 3, 4]])).tensor.dtype == torch.float32
    assert Boxes(torch.zeros(2, 4, dtype=torch.float64)).tensor.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        Boxes(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        Boxes(torch.zeros(4))
    with pytest.raises(TypeError):
        Boxes([[0, 0, 1, 1]])


def test_area_centers_nonempty_hand_values():
    boxes = Boxes(torch.tensor([[0, 0, 10, 5], [2, 2, 2, 8], [5, 5, 4, 9], [1, 1, 1.5, 3]]))
    assert boxes.area().tolist() == [50, 0, 0, 1]
    assert boxes.get_centers().tolist() == [[5, 2.5], [2, 5], [4.5, 7], [1.25, 2]]
    assert boxes.nonempty().tolist() == [True, False, False, True]
    assert boxes.nonempty(threshold=0.5).tolist() == [True, False, False, False]


def test_clip_and_scale_in_place():
    boxes = Boxes(torch.tensor([[-5.0, -1.0, 30.0, 8.0], [3.0, 12.0, 4.0, 25.0]]))
    boxes.clip((10, 20))
    assert boxes.tensor.tolist() == [[0, 0, 20, 8], [3, 10, 4, 10]]
    boxes.scale(0.5, 2.0)
    assert boxes.tensor.tolist() == [[0, 0, 10, 16], [1.5, 20, 2, 20]]


@pytest.mark.parametrize(
    "index",
    [1, -1, slice(1, 3), torch.tensor([True, False, True, False]), torch.tensor([3, 0, 3])],
    ids=["int", "negative", "slice", "mask", "index"],
)
def test_indexing(index):
    tensor = random_boxes(4, seed=0)
    selected = Boxes(tensor)[index]
    expected = tensor[index].reshape(-1, 4)
    assert isinstance(selected, Boxes)
    assert torch.equal(selected.tensor, expected)


def test_indexing_errors():
    boxes = Boxes(random_boxes(3, seed=0))
    with pytest.raises(IndexError):
        boxes[3]
    with pytest.raises(IndexError):
        boxes[torch.tensor([True, False])]
    with pytest.raises(TypeError):
        boxes[torch.tensor([0.0])]


def test_cat_to_and_device():
    a, b = random_boxes(2, seed=1), random_boxes(3, seed=2)
    joined = Boxes.cat([Boxes(a), Boxes(b), Boxes(torch.zeros(0, 4))])
    assert torch.equal(joined.tensor, torch.cat([a, b]))
    moved = joined.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.tensor, joined.tensor)
    with pytest.raises(ValueError):
        Boxes.cat([])


def test_pairwise_iou_matches_torchvision():
    a, b = random_boxes(7, seed=3), random_boxes(5, seed=4)
    iou = pairwise_iou(Boxes(a), Boxes(b))
    assert iou.shape == (7, 5)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b))
    assert (iou > 0).any() and (iou == 0).any()  # the case mixes overlapping and disjoint


def test_pairwise_intersection_and_iou_hand_values():
    a = Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    b = Boxes(torch.tensor([[2.0, 2.0, 6.0, 6.0], [4.0, 0.0, 8.0, 4.0], [0, 0, 4, 4]]))
    assert pairwise_intersection(a, b).tolist() == [[4, 0, 16]]
    torch.testing.assert_close(pairwise_iou(a, b), torch.tensor([[4 / 28, 0.0, 1.0]]))


def test_pairwise_iou_degenerate_and_empty():
    point = Boxes(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert pairwise_iou(point, point).tolist() == [[0.0]]  # torchvision gives NaN here
    empty = Boxes(torch.zeros(0, 4))
    assert pairwise_iou(empty, Boxes(random_boxes(3, seed=0))).shape == (0, 3)
    assert pairwise_iou(point, empty).shape == (1, 0)
