"""Predictor: a detector run on one image, as an application would call it.

Shapes: one H x W image, resized to H' x W' for the model; R detections.

    image (in)    np.ndarray [H, W, 3] uint8, BGR (what `read_image` and cv2 give)
    model input   {"image": Tensor[3, H', W'] in INPUT.FORMAT order (uint8, or float after
                   a torchvision resize), "height": H, "width": W}
    output        Instances(image_size=(H, W), pred_boxes=Boxes[R] XYXY pixels of the
                  original image, scores=Tensor[R], pred_classes=Tensor[R] int64,
                  pred_masks=bool Tensor[R, H, W] (mask models))

Conventions:

- The image goes through the test-time augmentations of `DatasetMapper` built from the same
  config (`from_config`): the resize of INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST by
  INPUT.RESIZE_METHOD, so that the Predictor sees what evaluation sees. The model reports
  detections at the original H x W.
- The model runs under `torch.no_grad()` in evaluation mode; its previous training mode is
  restored afterwards (`inference_context`). Outputs stay on the model's device.
- Images are read with `cv2.imread(path, cv2.IMREAD_COLOR)`, which applies the EXIF orientation
  and turns grayscale and RGBA images into 3 BGR channels (alpha dropped).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import nn

from detframe.data.mapper import DatasetMapper, image_to_tensor
from detframe.data.transforms import Augmentation, apply_transforms
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
        model: a detector taking a list of input dicts and returning one dict
            {"instances": Instances} per input in evaluation mode (the model protocol of
            `detframe.modeling.meta_arch`; e.g. `GeneralizedRCNN`), with its weights loaded.
        augmentations: deterministic test-time augmentations applied to the image, in order
            (`from_config` takes the test-time DatasetMapper's); none: the image as it is.
        image_format: "BGR" or "RGB", the channel order the model expects (INPUT.FORMAT).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        augmentations: Sequence[Augmentation] = (),
        image_format: Literal["BGR", "RGB"] = "BGR",
    ) -> None:
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        self.model = model
        self.augmentations = list(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Predictor:
        """A Predictor for `model` with the augmentations and image format of the test-time
        `DatasetMapper.from_config(cfg, is_train=False)`."""
        mapper_kwargs = DatasetMapper.from_config(cfg, is_train=False)
        return cls(
            model,
            augmentations=mapper_kwargs["augmentations"],
            image_format=mapper_kwargs["image_format"],
        )

    def __call__(self, image: np.ndarray) -> Instances:
        """The detections in `image` [H, W, 3] uint8 BGR, at its size H x W.

        Raises:
            ValueError: `image` is not an [H, W, 3] uint8 array, or the model's output has
                no "instances" (it is not a detector).
        """
        check_image(image)
        height, width = image.shape[:2]
        if self.image_format == "RGB":
            image = np.ascontiguousarray(image[:, :, ::-1])
        # Test-time augmentations draw nothing: any generator gives the same transforms.
        image, _ = apply_transforms(self.augmentations, image, np.random.default_rng(0))
        inputs = {"image": image_to_tensor(image), "height": height, "width": width}
        with inference_context(self.model), torch.no_grad():
            (output,) = self.model([inputs])
        if "instances" not in output:
            raise ValueError(
                f"Predictor runs detectors, whose outputs are {{'instances': Instances}}; "
                f"{type(self.model).__name__} returned {sorted(output)}"
            )
        return output["instances"]
