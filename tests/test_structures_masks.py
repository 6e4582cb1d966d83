"""BitMasks, PolygonMasks and COCO conversions, against pycocotools and hand values."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

from detframe.structures import (
    BitMasks,
    Boxes,
    PolygonMasks,
    bitmask_to_rle,
    polygons_to_bitmask,
    rle_to_bitmask,
    xywh_to_xyxy,
    xyxy_to_xywh,
)

H, W = 48, 64
ANGLES = np.linspace(0, 2 * np.pi, 6, endpoint=False)
SHAPES = [
    [np.array([8.0, 6.0, 30.0, 6.0, 30.0, 26.0, 8.0, 26.0])],  # rectangle
    [np.array([40.0, 5.0, 60.0, 40.0, 35.0, 44.0])],  # triangle
    [np.stack([20 + 10 * np.cos(ANGLES), 36 + 10 * np.sin(ANGLES)], 1).reshape(-1)],  # hexagon
    [np.array([2.0, 2.0, 6.0, 2.0, 6.0, 6.0]), np.array([50.5, 30.5, 58, 30.5, 58, 38])],  # 2 parts
]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > 0) & (b > 0)).sum().item() / ((a > 0) | (b > 0)).sum().item()


def test_polygon_validation_names_instance_and_polygon():
    with pytest.raises(ValueError, match="polygon 1 of instance 2"):
        PolygonMasks([[[0, 0, 1, 0, 1, 1]], [], [[0, 0, 2, 0, 2, 2], [0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="polygon 0 of instance 0"):
        PolygonMasks([[[0, 0, 1, 0, 1, 1, 5]]])  # odd number of coordinates
    with pytest.raises(ValueError, match="instance 0"):
        PolygonMasks([np.zeros(6)])  # a polygon where the list of an instance's polygons belongs


def test_bitmasks_validation():
    with pytest.raises(ValueError, match="N, H, W"):
        BitMasks(torch.zeros(4, 4))
    assert BitMasks(torch.tensor([[[0, 2], [0, 0]]])).tensor.dtype == torch.bool


def test_polygon_to_bitmask_and_area_match_pycocotools():
    polygons = PolygonMasks(SHAPES)
    bitmasks = BitMasks.from_polygon_masks(polygons, H, W)
    assert bitmasks.tensor.shape == (4, H, W)
    for i, parts in enumerate(SHAPES):
        rle = mask_util.merge(mask_util.frPyObjects([p.tolist() for p in parts], H, W))
        assert torch.equal(bitmasks.tensor[i], torch.from_numpy(mask_util.decode(rle) == 1))
        assert bitmasks.area()[i].item() == mask_util.area(rle)
        if i < 3:  # large shapes: the geometric area is close to the rasterised one
            assert polygons.area()[i].item() == pytest.approx(mask_util.area(rle), rel=0.05)
    assert polygons.area()[0].item() == 22 * 20 == bitmasks.area()[0].item()
    assert polygons.area()[3].item() == pytest.approx(8 + 7.5 * 7.5 / 2)


def test_bounding_boxes_hand_values_and_agree():
    polygons = PolygonMasks(SHAPES)
    boxes = polygons.get_bounding_boxes().tensor
    assert boxes[0].tolist() == [8, 6, 30, 26]
    assert boxes[1].tolist() == [35, 5, 60, 44]
    assert boxes[3].tolist() == [2, 2, 58, 38]
    bit_boxes = BitMasks.from_polygon_masks(polygons, H, W).get_bounding_boxes().tensor
    assert bit_boxes[0].tolist() == [8, 6, 30, 26]
    assert (bit_boxes - boxes).abs().max() <= 1.0
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2] = True
    assert BitMasks(masks).get_bounding_boxes().tensor.tolist() == [[2, 1, 3, 3], [0, 0, 0, 0]]


def test_nonempty_and_empty_structures():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[1, 0, 0] = True
    assert BitMasks(masks).nonempty().tolist() == [False, True]
    assert PolygonMasks([[], SHAPES[0]]).nonempty().tolist() == [False, True]
    assert PolygonMasks([[], SHAPES[0]]).get_bounding_boxes().tensor[0].tolist() == [0, 0, 0, 0]
    for empty in (BitMasks(torch.zeros(0, H, W)), PolygonMasks([])):
        assert len(empty) == 0 and empty.area().shape == (0,)
        assert empty.get_bounding_boxes().tensor.shape == (0, 4)
        assert empty.crop_and_resize(torch.zeros(0, 4), 7).shape == (0, 7, 7)
    assert BitMasks.from_polygon_masks(PolygonMasks([]), H, W).tensor.shape == (0, H, W)


@pytest.mark.parametrize(
    "index",
    [1, -1, slice(0, 3, 2), torch.tensor([True, False, False, True]), torch.tensor([3, 3, 0])],
    ids=["int", "negative", "slice", "mask", "index"],
)
def test_mask_indexing(index):
    polygons = PolygonMasks(SHAPES)
    bitmasks = BitMasks.from_polygon_masks(polygons, H, W)
    expected = torch.arange(4)[index].reshape(-1).tolist()
    assert torch.equal(bitmasks[index].tensor, bitmasks.tensor[expected])
    selected = polygons[index]
    assert len(selected) == len(expected)
    for parts, i in zip(selected.polygons, expected, strict=True):
        assert all(np.array_equal(p, q) for p, q in zip(parts, SHAPES[i], strict=True))


def test_mask_cat_and_to():
    polygons = PolygonMasks(SHAPES)
    bitmasks = BitMasks.from_polygon_masks(polygons, H, W)
    assert torch.equal(BitMasks.cat([bitmasks[:1], bitmasks[1:]]).tensor, bitmasks.tensor)
    assert len(PolygonMasks.cat([polygons[:1], polygons[1:]])) == 4
    with pytest.raises(ValueError, match="image size"):
        BitMasks.cat([bitmasks, BitMasks(torch.zeros(1, 2, 2))])
    assert bitmasks.to("cpu").device == torch.device("cpu")
    assert polygons.to("cpu").device == torch.device("cpu")


@pytest.mark.parametrize("mask_size", [14, 28])
@pytest.mark.parametrize("margin", [0.0, 3.5])
def test_crop_and_resize_bitmasks_agree_with_polygons(mask_size, margin):
    polygons = PolygonMasks(SHAPES[:3])
    bitmasks = BitMasks.from_polygon_masks(polygons, H, W)
    boxes = polygons.get_bounding_boxes().tensor + torch.tensor([-margin, -margin, margin, margin])
    from_bits = bitmasks.crop_and_resize(boxes, mask_size)
    from_polygons = polygons.crop_and_resize(boxes, mask_size)
    for out in (from_bits, from_polygons):
        assert out.shape == (3, mask_size, mask_size) and out.dtype == torch.float32
        assert set(out.unique().tolist()) == {0.0, 1.0}
    for i in range(3):
        assert mask_iou(from_bits[i], from_polygons[i]) > 0.9
    if margin == 0:  # the rectangle fills its own box
        assert from_polygons[0].all() and from_bits[0].all()


def test_crop_of_full_image_box_is_a_resize():
    size = 32
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((3, size, size)) > 0.6)
    bitmasks = BitMasks(masks)
    full = torch.tensor([[0.0, 0.0, size, size]]).expand(3, 4)
    assert torch.equal(bitmasks.crop_and_resize(full, size), masks.float())
    for mask_size in (16, 64):  # bilinear, half-pixel centres: as F.interpolate
        size_2d = (mask_size, mask_size)
        resized = F.interpolate(masks[:, None].float(), size=size_2d, mode="bilinear")
        expected = (resized[:, 0] >= 0.5).float()
        assert torch.equal(bitmasks.crop_and_resize(full, mask_size), expected)
    polygons = PolygonMasks(SHAPES)
    square = torch.tensor([[0.0, 0.0, W, W]]).expand(4, 4)
    expected = BitMasks.from_polygon_masks(polygons, W, W).tensor.float()
    assert torch.equal(polygons.crop_and_resize(square, W), expected)


def test_polygon_crop_hand_value():
    # a square covering the left half of its box: at M = 4 the two left columns
    polygons = PolygonMasks([[[10.0, 20.0, 14.0, 20.0, 14.0, 28.0, 10.0, 28.0]]])
    out = polygons.crop_and_resize(torch.tensor([[10.0, 20.0, 18.0, 28.0]]), 4)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)
    assert torch.equal(out[0], expected)


def test_crop_and_resize_checks_boxes():
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        PolygonMasks(SHAPES).crop_and_resize(torch.zeros(3, 4), 7)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        BitMasks(torch.zeros(1, 5, 5)).crop_and_resize(torch.zeros(1, 5), 7)


def test_rle_round_trips_with_pycocotools():
    mask = BitMasks.from_polygon_masks(PolygonMasks(SHAPES), H, W).tensor[3]
    rle = bitmask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
    oracle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    assert rle["counts"].encode() == oracle["counts"]
    assert mask_util.area({"size": rle["size"], "counts": rle["counts"]}) == mask.sum().item()
    assert np.array_equal(rle_to_bitmask(rle), mask.numpy())
    assert np.array_equal(rle_to_bitmask(oracle), mask.numpy())  # bytes counts
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}  # column-major runs: 0, 1 1, 0 0 0
    assert rle_to_bitmask(uncompressed).tolist() == [[False, True, False], [True, False, False]]
    empty = bitmask_to_rle(np.zeros((4, 5), dtype=bool))
    assert not rle_to_bitmask(empty).any() and rle_to_bitmask(empty).shape == (4, 5)
    with pytest.raises(ValueError):
        bitmask_to_rle(np.zeros((1, 4, 5)))


def test_polygons_to_bitmask_empty_and_union():
    assert not polygons_to_bitmask([], 3, 4).any() and polygons_to_bitmask([], 3, 4).shape == (3, 4)
    both = polygons_to_bitmask(SHAPES[3], H, W)
    parts = [polygons_to_bitmask([p], H, W) for p in SHAPES[3]]
    assert np.array_equal(both, parts[0] | parts[1])


def test_box_format_round_trip_with_pycocotools():
    xyxy = torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    xywh = xyxy_to_xywh(xyxy)
    assert xywh.tolist() == [[1, 2, 10, 5], [0, 0, 0, 0]]
    assert torch.equal(xywh_to_xyxy(xywh), xyxy)
    # pycocotools: a XYWH bbox converted to RLE covers exactly the XYXY box's pixels
    rle = mask_util.frPyObjects(xywh[:1].double().numpy(), 12, 14)[0]
    assert Boxes(xyxy[:1]).area().item() == mask_util.area(rle)
    assert (
        BitMasks(torch.from_numpy(mask_util.decode(rle))[None])
        .get_bounding_boxes()
        .tensor[0]
        .tolist()
        == xyxy[0].tolist()
    )
