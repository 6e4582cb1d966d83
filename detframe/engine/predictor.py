"""Predictor: a detector run on one image, as an application would call it.

Shapes: one H x W image, resized to H' x W' for the model; R detections.

    image (in)    np.ndarray [H, W, 3] uint8, BGR (what `read_image` and cv2 give)
    model input   {"image": uint8 Tensor[3, H', W'] in INPUT.FORMAT order,
                   "height": H, "width": W}
    output        Instances(image_size=(H, W), pred_boxes=Boxes[R] XYXY pixels of the
                  original image, scores=Tensor[R], pred_classes=Tensor[R] int64,
                  pred_masks=bool Tensor[R, H, W] (mask models))

Conventions:

- The image is resized as the test-time `DatasetMapper` does: `ResizeShortestEdge([min_size],
  max_size)` (cv2.INTER_LINEAR), so the shorter side becomes min_size unless the longer side
  would pass max_size. The model reports detections at the original H x W.
- The model runs under `torch.no_grad()` in evaluation mode; its previous training mode is
  restored afterwards (`inference_context`). Outputs stay on the model's device.
- Images are read with `cv2.imread(path, cv2.IMREAD_COLOR)`, which applies the EXIF orientation
  and turns grayscale and RGBA images into 3 BGR channels (alpha dropped).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import nn

from detframe.data.transforms import ResizeShortestEdge, apply_transforms
from detframe.evaluation.inference import inference_context
from detframe.structures import Instances
from detframe.utils.visualizer import check_image

__all__ = ["Predictor", "read_image"]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as an [H, W, 3] uint8 BGR array, as displayed (EXIF-rotated).

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: OpenCV cannot decode the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}")
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image file: {os.fspath(path)}")
    return image


class Predictor:
    """Runs `model` on single BGR images at test-time resolution.

    Args:
        model: a detector taking a list of input dicts and returning a list of Instances in
            evaluation mode (e.g. `GeneralizedRCNN`), with its weights loaded.
        image_format: "BGR" or "RGB", the channel order the model expects (INPUT.FORMAT).
        min_size: the shorter side after resizing (INPUT.MIN_SIZE_TEST).
        max_size: the longer side after resizing is at most this (INPUT.MAX_SIZE_TEST).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_format: Literal["BGR", "RGB"] = "BGR",
        min_size: int = 800,
        max_size: int = 1333,
    ) -> None:
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        self.model = model
        self.image_format = image_format
        self.resize = ResizeShortestEdge([min_size], max_size)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Predictor:
        """A Predictor for `model` with INPUT.FORMAT, INPUT.MIN_SIZE_TEST and
        INPUT.MAX_SIZE_TEST of `cfg`."""
        return cls(
            model,
            image_format=cfg.INPUT.FORMAT,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
        )

    def __call__(self, image: np.ndarray) -> Instances:
        """The detections in `image` [H, W, 3] uint8 BGR, at its size H x W.

        Raises:
            ValueError: `image` is not an [H, W, 3] uint8 array.
        """
        check_image(image)
        height, width = image.shape[:2]
        if self.image_format == "RGB":
            image = np.ascontiguousarray(image[:, :, ::-1])
        # One length to choose from: the generator's draw is always the same.
        resized, _ = apply_transforms([self.resize], image, np.random.default_rng(0))
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": height, "width": width}
        with inference_context(self.model), torch.no_grad():
            (instances,) = self.model([inputs])
        return instances
