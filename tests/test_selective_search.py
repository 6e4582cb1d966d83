"""SelectiveSearch against OpenCV's own selective search called directly on the same image.

The reference seeds the C library's `rand()` itself (OpenCV ranks regions by rand() * level),
calls `cv2.ximgproc.segmentation.createSelectiveSearchSegmentation` as OpenCV's samples do,
and converts XYWH rectangles to XYXY by hand.
"""

from __future__ import annotations

import ctypes
import sys

import cv2
import numpy as np
import pytest
from tiny_run import QUICKSTART

from detframe.data.shapes import ShapesConfig, render_image
from detframe.engine import load_config
from detframe.engine.proposals import resolve_method
from detframe.modeling.proposal_generator import OfflineProposalMethod, SelectiveSearch
from detframe.registry import OFFLINE_PROPOSAL_REGISTRY, build

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="rand() is not seedable there")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 96 x 128 shapes image (BGR uint8): textured background, several shapes."""
    return render_image(ShapesConfig(num_images=1, image_size=(96, 128), seed=4), 0).image


def opencv_rectangles(
    image: np.ndarray, mode: str, base_k: int, inc_k: int, sigma: float, seed: int
) -> np.ndarray:
    """OpenCV's selective search, called directly after srand(seed): [M, 4] XYWH."""
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image)
    if mode == "fast":
        search.switchToSelectiveSearchFast(base_k, inc_k, sigma)
    else:
        search.switchToSelectiveSearchQuality(base_k, inc_k, sigma)
    ctypes.CDLL(None).srand(seed)
    return search.process()


def xyxy(rects: np.ndarray) -> np.ndarray:
    x, y, w, h = (rects[:, i].astype(np.float32) for i in range(4))
    return np.stack([x, y, x + w, y + h], axis=1)


@pytest.mark.parametrize(
    ("mode", "base_k", "inc_k", "sigma", "topk"),
    [("fast", 150, 150, 0.8, 60), ("quality", 100, 200, 0.5, 5000)],
)
def test_matches_opencv_called_directly(
    image: np.ndarray, mode: str, base_k: int, inc_k: int, sigma: float, topk: int
) -> None:
    method = SelectiveSearch(mode=mode, topk=topk, base_k=base_k, inc_k=inc_k, sigma=sigma)
    boxes, scores = method(image)
    rects = opencv_rectangles(image, mode, base_k, inc_k, sigma, seed=1)
    expected = xyxy(rects)[:topk]
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_array_equal(boxes, expected)  # same boxes, same order
    assert np.all(np.diff(scores) < 0)  # the order is the ranking
    assert len(boxes) == min(topk, len(rects))


def test_ranking_is_reproducible_and_follows_the_seed(image: np.ndarray) -> None:
    method = SelectiveSearch(topk=10_000)
    first, _ = method(image)
    opencv_rectangles(image, "fast", 150, 150, 0.8, seed=99)  # advances rand() in between
    again, _ = method(image)
    np.testing.assert_array_equal(first, again)
    other, _ = SelectiveSearch(topk=10_000, seed=7)(image)
    np.testing.assert_array_equal(other, xyxy(opencv_rectangles(image, "fast", 150, 150, 0.8, 7)))
    assert not np.array_equal(first, other)  # rand() decides the order...
    assert sorted(map(tuple, first)) == sorted(map(tuple, other))  # ...not the set of boxes


def test_fast_and_quality_modes_differ(image: np.ndarray) -> None:
    fast, _ = SelectiveSearch(mode="fast", topk=10_000)(image)
    quality, _ = SelectiveSearch(mode="quality", topk=10_000)(image)
    assert len(quality) > len(fast)
    assert {tuple(b) for b in quality} != {tuple(b) for b in fast}


def test_min_size_drops_small_boxes_before_the_top_k(image: np.ndarray) -> None:
    boxes, _ = SelectiveSearch(min_size=20, topk=15)(image)
    rects = opencv_rectangles(image, "fast", 150, 150, 0.8, seed=1)
    kept = rects[(rects[:, 2] >= 20) & (rects[:, 3] >= 20)]
    assert len(kept) < len(rects)  # the image has smaller regions
    np.testing.assert_array_equal(boxes, xyxy(kept)[:15])
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= 20)


def test_boxes_lie_in_the_image_and_are_unique(image: np.ndarray) -> None:
    boxes, _ = SelectiveSearch(mode="quality", topk=10_000)(image)
    height, width = image.shape[:2]
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= width)
    assert np.all(boxes[:, 3] <= height) and np.all(boxes[:, 2:] > boxes[:, :2])
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_built_from_the_config_by_its_registered_name() -> None:
    cfg = load_config(
        QUICKSTART,
        [
            "MODEL.SELECTIVE_SEARCH.MODE=quality",
            "MODEL.SELECTIVE_SEARCH.TOPK=300",
            "MODEL.SELECTIVE_SEARCH.BASE_K=200",
            "MODEL.SELECTIVE_SEARCH.INC_K=100",
            "MODEL.SELECTIVE_SEARCH.SIGMA=0.6",
            "MODEL.SELECTIVE_SEARCH.MIN_SIZE=4",
        ],
    )
    for spelling in ("selective_search", "SelectiveSearch", "SELECTIVE-SEARCH"):
        assert resolve_method(cfg, spelling) == "SelectiveSearch"
    method = build(OFFLINE_PROPOSAL_REGISTRY, "SelectiveSearch", cfg)
    assert isinstance(method, OfflineProposalMethod) and method.name == "SelectiveSearch"
    assert (method.mode, method.topk, method.base_k, method.inc_k) == ("quality", 300, 200, 100)
    assert (method.sigma, method.min_size) == (0.6, 4)


def test_bad_arguments_and_images_are_errors(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mode"):
        SelectiveSearch(mode="slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk=0"):
        SelectiveSearch(topk=0)
    with pytest.raises(ValueError, match="uint8"):
        SelectiveSearch()(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        SelectiveSearch()(image[:, :, 0])
