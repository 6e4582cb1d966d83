"""Tests of detframe.data.transforms: geometry of each transform and determinism.

The torchvision resize is checked against torchvision's own `_resize_image_and_masks` and
`resize_boxes` (the functions its detectors' GeneralizedRCNNTransform calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes

from detframe.data.transforms import (
    FlipTransform,
    RandomFlip,
    ResizeShortestEdge,
    ResizeTransform,
    TorchvisionResizeShortestEdge,
    TorchvisionResizeTransform,
    apply_transforms,
)


def _image(height: int, width: int) -> np.ndarray:
    return np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)


def test_resize_shortest_edge_sizes_and_max_size() -> None:
    rng = np.random.default_rng(0)
    t = ResizeShortestEdge((100,), 1000).get_transform(_image(50, 80), rng)
    assert (t.new_height, t.new_width) == (100, 160)
    t = ResizeShortestEdge((100,), 120).get_transform(_image(50, 80), rng)
    assert (t.new_height, t.new_width) == (75, 120)


def test_resize_maps_boxes_polygons_and_masks() -> None:
    t = ResizeTransform(10, 20, 20, 40)
    np.testing.assert_allclose(t.apply_boxes(np.array([[1, 2, 3, 4]])), [[2, 4, 6, 8]])
    np.testing.assert_allclose(
        t.apply_polygons([[np.array([1.0, 2, 3, 4, 5, 6])]])[0][0], [2, 4, 6, 8, 10, 12]
    )
    masks = np.zeros((1, 10, 20), dtype=bool)
    masks[0, 2:5, 3:7] = True
    out = t.apply_bitmasks(masks)
    ys, xs = np.nonzero(out[0])
    assert out.shape == (1, 20, 40) and out.dtype == bool
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (6, 14, 4, 10)
    assert t.apply_image(_image(10, 20)).shape == (20, 40, 3)
    assert t.apply_image(_image(10, 20)[:, :, :1]).shape == (20, 40, 1)
    assert t.apply_bitmasks(np.zeros((0, 10, 20), bool)).shape == (0, 20, 40)
    with pytest.raises(ValueError, match="expected 10x20"):
        t.apply_image(_image(11, 20))


def test_flip_maps_boxes_polygons_masks_and_image() -> None:
    t = FlipTransform(10, 20)
    np.testing.assert_allclose(t.apply_boxes(np.array([[1, 2, 3, 4]])), [[17, 2, 19, 4]])
    np.testing.assert_allclose(t.apply_coords(np.array([1.0, 2, 3, 4])), [19, 2, 17, 4])
    image = _image(10, 20)
    np.testing.assert_array_equal(t.apply_image(image), image[:, ::-1])
    masks = np.zeros((1, 10, 20), dtype=bool)
    masks[0, 2:4, 1:3] = True  # box (1, 2, 3, 4) -> flipped (17, 2, 19, 4)
    _, xs = np.nonzero(t.apply_bitmasks(masks)[0])
    assert (xs.min(), xs.max() + 1) == (17, 19)
    v = FlipTransform(10, 20, horizontal=False)
    np.testing.assert_allclose(v.apply_boxes(np.array([[1, 2, 3, 4]])), [[1, 6, 3, 8]])


def test_random_choices_are_deterministic_given_rng() -> None:
    augs = [ResizeShortestEdge((16, 24, 32, 40), 100), RandomFlip()]
    image = _image(20, 30)

    def run(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [repr(apply_transforms(augs, image, rng)[1]) for _ in range(20)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    seen = run(5)
    assert len({s for s in seen}) > 2  # several sizes and both flip outcomes occur
    assert any("Flip" in s for s in seen) and not all("Flip" in s for s in seen)


def test_range_style_draws_within_range_and_rejects_bad_arguments() -> None:
    aug = ResizeShortestEdge((20, 25), 1000, sample_style="range")
    rng = np.random.default_rng(0)
    heights = {aug.get_transform(_image(10, 10), rng).new_height for _ in range(50)}
    assert heights <= set(range(20, 26)) and len(heights) > 1
    with pytest.raises(ValueError, match="range"):
        ResizeShortestEdge((20, 25, 30), 100, sample_style="range")
    with pytest.raises(ValueError, match="prob"):
        RandomFlip(prob=1.5)


def test_transform_list_chains_in_order() -> None:
    rng = np.random.default_rng(0)
    image, tl = apply_transforms(
        [ResizeShortestEdge((20,), 100), RandomFlip(prob=1.0)], _image(10, 20), rng
    )
    assert image.shape == (20, 40, 3)
    np.testing.assert_allclose(tl.apply_boxes(np.array([[1, 2, 3, 4]])), [[34, 4, 38, 8]])


# --- torchvision's resize ----------------------------------------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# (H, W, min_size, max_size): shrink by the shorter side, shrink by the longer side (the cap
# binds), enlarge, and a scale whose product with a side is just below an integer.
SIZES = [(333, 517, 320, 512), (600, 400, 320, 400), (50, 75, 64, 200), (100, 300, 77, 1000)]


@pytest.mark.parametrize(("height", "width", "min_size", "max_size"), SIZES)
def test_torchvision_resize_equals_torchvision_on_image_masks_and_boxes(
    height: int, width: int, min_size: int, max_size: int
) -> None:
    image = _random_image(height, width)
    masks = np.random.default_rng(1).random((2, height, width)) > 0.5
    boxes = np.array([[3.5, 7.25, 40.0, 33.0], [0.0, 0.0, width, height]], np.float32)
    tv_image = torch.from_numpy(image).permute(2, 0, 1).double()
    tv_resized, target = _resize_image_and_masks(
        tv_image, min_size, max_size, {"masks": torch.from_numpy(masks).to(torch.uint8)}
    )
    aug = TorchvisionResizeShortestEdge((min_size,), max_size, dtype=np.float64)
    t = aug.get_transform(image, np.random.default_rng(0))
    assert isinstance(t, TorchvisionResizeTransform)
    assert (t.new_height, t.new_width) == tuple(tv_resized.shape[-2:])

    out = t.apply_image(image)
    assert out.dtype == np.float64 and out.shape == (t.new_height, t.new_width, 3)
    assert torch.equal(torch.from_numpy(out).permute(2, 0, 1), tv_resized)
    # torchvision normalises before it resizes, detframe's model after: the same to rounding.
    normalised_first, _ = _resize_image_and_masks((tv_image / 255 - MEAN) / STD, min_size, max_size)
    resized_first = (torch.from_numpy(out).permute(2, 0, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(resized_first, normalised_first, rtol=0, atol=1e-13)

    resized_masks = t.apply_bitmasks(masks)
    assert resized_masks.dtype == bool
    np.testing.assert_array_equal(resized_masks, target["masks"].numpy().astype(bool))
    expected_boxes = resize_boxes(
        torch.from_numpy(boxes), [height, width], list(tv_resized.shape[-2:])
    )
    np.testing.assert_allclose(t.apply_boxes(boxes), expected_boxes.numpy(), rtol=1e-6)
    coords = t.apply_coords(np.array([10.0, 20.0]))
    np.testing.assert_allclose(
        coords, [10 * t.new_width / width, 20 * t.new_height / height], rtol=1e-15
    )


def test_torchvision_resize_keeps_grey_images_and_rejects_bad_arguments() -> None:
    t = TorchvisionResizeTransform(10, 20, 1.5)
    grey = t.apply_image(_image(10, 20)[:, :, 0])
    assert grey.shape == (15, 30) and grey.dtype == np.float32
    assert t.apply_image(_image(10, 20)[:, :, :1]).shape == (15, 30, 1)
    assert t.apply_bitmasks(np.zeros((0, 10, 20), np.uint8)).shape == (0, 15, 30)
    with pytest.raises(ValueError, match="expected 10x20"):
        t.apply_image(_image(11, 20))
    with pytest.raises(ValueError, match="dtype"):
        TorchvisionResizeTransform(10, 20, 1.5, dtype=np.uint8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        TorchvisionResizeTransform(10, 20, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        TorchvisionResizeShortestEdge((10,), 20, dtype=np.float16)  # type: ignore[arg-type]


def test_torchvision_resize_chains_with_a_flip() -> None:
    image = _random_image(20, 30)
    out, tl = apply_transforms(
        [TorchvisionResizeShortestEdge((40,), 100), RandomFlip(prob=1.0)],
        image,
        np.random.default_rng(0),
    )
    assert out.shape == (40, 60, 3) and out.dtype == np.float32
    expected, _ = _resize_image_and_masks(torch.from_numpy(image).permute(2, 0, 1).float(), 40, 100)
    np.testing.assert_array_equal(out, expected.permute(1, 2, 0).numpy()[:, ::-1])
    np.testing.assert_allclose(tl.apply_boxes(np.array([[1, 2, 3, 4]])), [[54, 4, 58, 8]])
