"""Instances (fields indexed together) and ImageList (padded batches), with hand values."""

import numpy as np
import pytest
import torch

from detframe.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks


def make_instances(n: int = 4, offset: int = 0) -> Instances:
    square = [0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]
    return Instances(
        (12, 16),
        boxes=Boxes(torch.arange(4 * n, dtype=torch.float32).reshape(n, 4) + offset),
        scores=torch.arange(n, dtype=torch.float32) + offset,
        masks=BitMasks(torch.arange(n)[:, None, None].expand(n, 12, 16) == torch.arange(16)),
        polygons=PolygonMasks([[np.array(square) + i + offset] for i in range(n)]),
        names=[f"obj{i + offset}" for i in range(n)],
    )


def test_fields_set_get_has_remove_and_attributes():
    inst = Instances((10, 20), scores=torch.tensor([0.5, 0.7]))
    inst.classes = torch.tensor([1, 2])
    inst.set("names", ["a", "b"])
    assert inst.image_size == (10, 20) and len(inst) == 2
    assert inst.has("classes") and inst.get("names") == ["a", "b"]
    assert inst.classes.tolist() == [1, 2]
    assert list(inst.fields()) == ["scores", "classes", "names"]
    inst.remove("classes")
    assert not inst.has("classes")
    with pytest.raises(AttributeError, match="classes"):
        _ = inst.classes
    with pytest.raises(AttributeError):
        inst.remove("classes")
    with pytest.raises(ValueError):
        inst.image_size = (1, 1)  # not a field: shadows the property
    with pytest.raises(ValueError):
        Instances((10,))


def test_mismatched_length_names_field_and_lengths():
    inst = Instances((10, 20), scores=torch.zeros(3))
    with pytest.raises(ValueError, match=r"'boxes' has length 2.*'scores' has length 3"):
        inst.boxes = Boxes(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'labels' has length 1"):
        Instances((10, 20), scores=torch.zeros(3), labels=["x"])
    inst.scores = torch.zeros(5)  # replacing the only field may change the length
    assert len(inst) == 5


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (2, [2]),
        (-1, [3]),
        (slice(1, 3), [1, 2]),
        (torch.tensor([True, False, False, True]), [0, 3]),
        (torch.tensor([3, 1, 1]), [3, 1, 1]),
    ],
    ids=["int", "negative", "slice", "mask", "index"],
)
def test_getitem_indexes_every_field(index, expected):
    inst = make_instances()
    sub = inst[index]
    assert len(sub) == len(expected) and sub.image_size == inst.image_size
    assert sub.scores.tolist() == [float(i) for i in expected]
    assert torch.equal(sub.boxes.tensor, inst.boxes.tensor[expected])
    assert torch.equal(sub.masks.tensor, inst.masks.tensor[expected])
    assert [p[0][0] for p in sub.polygons.polygons] == [float(i) for i in expected]
    assert sub.names == [f"obj{i}" for i in expected]


def test_getitem_errors_and_empty():
    inst = make_instances()
    with pytest.raises(IndexError):
        inst[4]
    with pytest.raises(IndexError):
        inst[torch.tensor([True, False])]
    empty = inst[torch.zeros(4, dtype=torch.bool)]
    assert len(empty) == 0 and empty.names == [] and empty.boxes.tensor.shape == (0, 4)
    assert len(Instances((5, 5))) == 0


def test_cat():
    a, b = make_instances(2), make_instances(3, offset=10)
    joined = Instances.cat([a, b])
    assert len(joined) == 5
    assert joined.scores.tolist() == [0, 1, 10, 11, 12]
    assert joined.names == ["obj0", "obj1", "obj10", "obj11", "obj12"]
    assert torch.equal(joined.boxes.tensor, torch.cat([a.boxes.tensor, b.boxes.tensor]))
    assert torch.equal(joined.masks.tensor, torch.cat([a.masks.tensor, b.masks.tensor]))
    assert len(joined.polygons) == 5
    with pytest.raises(ValueError, match="image size"):
        Instances.cat([a, Instances((1, 1), scores=torch.zeros(1))])
    with pytest.raises(ValueError, match="same fields"):
        Instances.cat([Instances((12, 16), scores=torch.zeros(1)), a])
    with pytest.raises(ValueError):
        Instances.cat([])


def test_to_and_repr():
    inst = make_instances(2)
    moved = inst.to("cpu")
    assert moved.boxes.device == torch.device("cpu") and moved.names == inst.names
    assert torch.equal(moved.scores, inst.scores)
    text = repr(inst)
    assert "num_instances=2" in text and "image_height=12" in text and "image_width=16" in text
    assert "scores: Tensor[2]" in text and "names: list[2]" in text


def test_image_list_pads_to_divisible_size():
    a = torch.ones(3, 5, 7)
    b = torch.full((3, 9, 4), 2.0)
    images = ImageList.from_tensors([a, b], size_divisibility=8, pad_value=-1.0)
    assert images.tensor.shape == (2, 3, 16, 8)
    assert images.image_sizes == [(5, 7), (9, 4)] and len(images) == 2
    assert torch.equal(images[0], a) and torch.equal(images[1], b)
    assert (images.tensor[0, :, 5:] == -1).all() and (images.tensor[0, :, :, 7:] == -1).all()
    assert (images.tensor[1, :, 9:] == -1).all() and (images.tensor[1, :, :, 4:] == -1).all()
    assert images.to("cpu").image_sizes == images.image_sizes


def test_image_list_without_divisibility_and_exact_multiple():
    images = ImageList.from_tensors([torch.zeros(1, 3, 5), torch.zeros(1, 4, 2)])
    assert images.tensor.shape == (2, 1, 4, 5)
    assert ImageList.from_tensors([torch.zeros(1, 32, 64)], 32).tensor.shape == (1, 1, 32, 64)


def test_image_list_errors():
    with pytest.raises(ValueError, match="at least one"):
        ImageList.from_tensors([])
    with pytest.raises(ValueError, match="channels"):
        ImageList.from_tensors([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match=r"image 1 must be a tensor \[C, H, W\]"):
        ImageList.from_tensors([torch.zeros(3, 4, 4), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="image sizes"):
        ImageList(torch.zeros(2, 3, 4, 4), [(4, 4)])
