"""Offline proposal methods: one image in, class-agnostic boxes out, computed once per dataset.

Shorthand: one H x W image, R proposals.

    image (in)     np.ndarray [H, W, 3] uint8, BGR (as `cv2.imread` gives it)
    boxes (out)    np.ndarray [R, 4] float32, XYXY in the image's pixels
    scores (out)   np.ndarray [R] float32, the method's ranking: higher is better, distinct

Such a method is not a module of a model: `detframe proposals --method NAME` runs it over
every image of a dataset (in worker processes) and writes a proposals file, which a Fast
R-CNN config then reads through its dataset (`PrecomputedProposals`). A method derives from
`OfflineProposalMethod`, implements `propose(image)`, and is registered in
`OFFLINE_PROPOSAL_REGISTRY` under its class name with a `from_config(cfg)` classmethod, like
every other component; it must be picklable (worker processes receive a copy).

`SelectiveSearch` (Uijlings et al., IJCV 2013; the proposals of R-CNN and Fast R-CNN) is
OpenCV's implementation, `cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`, in its
"fast" (2 colour spaces, 2 strategies, k = BASE_K, BASE_K + INC_K) or "quality" (5 colour
spaces, 4 strategies, 5 values of k) mode. OpenCV returns unique XYWH rectangles sorted by
rank = rand() * hierarchy level (lowest first, as in the paper's pseudo-random ranking). It
draws the ranks from the C library's `rand()`, so the order would depend on how many images a
process has seen before; `SelectiveSearch` seeds `rand()` with `seed` before each image
(`srand`, through ctypes), so an image's proposals are the same in any worker and any order,
and equal to OpenCV's own call after `srand(seed)`. Its outputs are OpenCV's first TOPK boxes
at least MIN_SIZE pixels wide and high, in OpenCV's order, converted to XYXY
(x1 = x, x2 = x + w), with scores -rank (0 for the first box, -1 for the next, ...).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from abc import ABC, abstractmethod
from typing import Any, Literal

import cv2
import numpy as np
from omegaconf import DictConfig

from detframe.config import declare
from detframe.registry import OFFLINE_PROPOSAL_REGISTRY

__all__ = ["OfflineProposalMethod", "SelectiveSearch", "seed_c_rand"]

logger = logging.getLogger(__name__)

declare(
    "MODEL.SELECTIVE_SEARCH.MODE",
    str,
    "fast",
    "selective search strategy set: fast (R-CNN's choice) or quality (more, slower proposals)",
    choices=("fast", "quality"),
)
declare(
    "MODEL.SELECTIVE_SEARCH.TOPK",
    int,
    2000,
    "proposals kept per image, in the method's ranking (R-CNN used ~2000 in fast mode)",
    min=1,
)
declare(
    "MODEL.SELECTIVE_SEARCH.BASE_K",
    int,
    150,
    "k of the first Felzenszwalb graph segmentation (larger: larger initial regions)",
    min=1,
)
declare(
    "MODEL.SELECTIVE_SEARCH.INC_K",
    int,
    150,
    "increment of k between the graph segmentations",
    min=1,
)
declare(
    "MODEL.SELECTIVE_SEARCH.SIGMA",
    float,
    0.8,
    "Gaussian smoothing sigma of the graph segmentations",
    min=0.0,
    min_exclusive=True,
)
declare(
    "MODEL.SELECTIVE_SEARCH.MIN_SIZE",
    int,
    0,
    "drop boxes narrower or lower than this many pixels (0 keeps all; Uijlings' demo used 20)",
    min=0,
)


class OfflineProposalMethod(ABC):
    """An offline proposal method (see the module docstring): subclasses implement `propose`.

    Calling the method checks the image and the proposals: `method(image)` -> (boxes [R, 4]
    float32 XYXY, scores [R] float32).
    """

    @property
    def name(self) -> str:
        """The name the method is registered under (its class name)."""
        return type(self).__name__

    @abstractmethod
    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [R, 4] XYXY pixels, scores [R], higher is better) of a BGR uint8 image
        [H, W, 3]."""

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`propose(image)` as float32 arrays, checked.

        Raises:
            ValueError: `image` is not an [H, W, 3] uint8 array, or `propose` returned
                arrays of other shapes than [R, 4] and [R].
        """
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
            described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else image
            raise ValueError(f"{self.name} needs an [H, W, 3] uint8 BGR image, got {described}")
        if image.shape[2] != 3:
            raise ValueError(f"{self.name} needs an [H, W, 3] uint8 BGR image, got {image.shape}")
        boxes, scores = self.propose(image)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != (len(boxes),):
            raise ValueError(
                f"{self.name} returned {len(boxes)} boxes but scores of shape {scores.shape}"
            )
        return boxes, scores


def seed_c_rand(seed: int) -> None:
    """Seeds the C library's `rand()` (`srand(seed)`), which OpenCV's selective search draws
    its ranking from. Does nothing on Windows, where OpenCV's C runtime is not reachable."""
    if sys.platform != "win32":
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))


@OFFLINE_PROPOSAL_REGISTRY.register()
class SelectiveSearch(OfflineProposalMethod):
    """Selective search by OpenCV (see the module docstring).

    Args:
        mode: "fast" or "quality" (OpenCV's `switchToSelectiveSearchFast` / `...Quality`).
        topk: boxes kept per image, the first in OpenCV's ranking.
        base_k, inc_k, sigma: the graph segmentations' k (base_k, base_k + inc_k, ...) and
            smoothing, OpenCV's parameters of the same names.
        min_size: boxes narrower or lower than this (pixels) are dropped before the top-k.
        seed: `rand()` is seeded with it before every image (reproducible ranking).
    """

    def __init__(
        self,
        *,
        mode: Literal["fast", "quality"] = "fast",
        topk: int = 2000,
        base_k: int = 150,
        inc_k: int = 150,
        sigma: float = 0.8,
        min_size: int = 0,
        seed: int = 1,
    ) -> None:
        if mode not in ("fast", "quality"):
            raise ValueError(f"SelectiveSearch mode must be 'fast' or 'quality', got {mode!r}")
        if topk < 1 or base_k < 1 or inc_k < 1 or sigma <= 0 or min_size < 0:
            raise ValueError(
                "SelectiveSearch needs topk, base_k, inc_k >= 1, sigma > 0 and min_size >= 0, "
                f"got topk={topk}, base_k={base_k}, inc_k={inc_k}, sigma={sigma}, "
                f"min_size={min_size}"
            )
        self.mode = mode
        self.topk = int(topk)
        self.base_k = int(base_k)
        self.inc_k = int(inc_k)
        self.sigma = float(sigma)
        self.min_size = int(min_size)
        self.seed = int(seed)
        if sys.platform == "win32":
            logger.warning(
                "cannot seed rand() here: selective search's ranking is not reproducible"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        ss = cfg.MODEL.SELECTIVE_SEARCH
        return {
            "mode": ss.MODE,
            "topk": ss.TOPK,
            "base_k": ss.BASE_K,
            "inc_k": ss.INC_K,
            "sigma": ss.SIGMA,
            "min_size": ss.MIN_SIZE,
        }

    def rectangles(self, image: np.ndarray) -> np.ndarray:
        """OpenCV's rectangles for `image` [H, W, 3] BGR uint8: [M, 4] int32 XYWH, unique,
        in its ranking, after seeding `rand()`."""
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(image)
        if self.mode == "fast":
            search.switchToSelectiveSearchFast(self.base_k, self.inc_k, self.sigma)
        else:
            search.switchToSelectiveSearchQuality(self.base_k, self.inc_k, self.sigma)
        seed_c_rand(self.seed)
        return np.asarray(search.process(), dtype=np.int32).reshape(-1, 4)

    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first `topk` boxes of OpenCV's ranking that are at least `min_size` wide and
        high: (boxes [R, 4] float32 XYXY, scores [R] float32 = -rank)."""
        rects = self.rectangles(image)
        rects = rects[(rects[:, 2] >= self.min_size) & (rects[:, 3] >= self.min_size)]
        # OpenCV returns each rectangle once; keep the first of any repeat all the same.
        _, first = np.unique(rects, axis=0, return_index=True)
        rects = rects[np.sort(first)][: self.topk].astype(np.float32)
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        return boxes, 0.0 - np.arange(len(boxes), dtype=np.float32)
