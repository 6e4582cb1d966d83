"""DatasetMapper: one dataset dict (see detframe/data/coco.py) -> one model input.

Output of `DatasetMapper.__call__`, for an image resized to H' x W'::

    {"image": Tensor[3, H', W'] in 0..255, channels in `image_format`: uint8, or float after a
              torchvision resize (INPUT.RESIZE_METHOD; see `DatasetMapper.from_config`),
     "height": int, "width": int (the original size, from the dataset dict),
     "image_id": the dataset dict's image id,
     "instances": Instances(image_size=(H', W'),
                            gt_boxes=Boxes [N, 4] XYXY,
                            gt_classes=Tensor[N] int64 (contiguous ids),
                            gt_masks=PolygonMasks or BitMasks [N, H', W'] (with mask_on))}

"instances" is there in training, and in evaluation only with `instances_in_eval=True`.
A dataset dict with precomputed proposals ("proposal_boxes", "proposal_objectness_logits")
also gives, in training and evaluation, "proposals": Instances(image_size=(H', W'),
proposal_boxes=Boxes [R, 4] (transformed with the image, clipped, empty ones dropped),
objectness_logits=Tensor[R]), the input of `PrecomputedProposals`. In training, with
`proposal_crowd_filter_thresh` t > 0, a proposal that has more than t of its area inside
one crowd region (an iscrowd=1 annotation's box) is dropped, so it is neither foreground
nor background for the ROI heads: the `crowd_thresh` of py-faster-rcnn's and Detectron's
COCO loaders (0.7 there), which filtered precomputed proposals the same way.
Crowd annotations (iscrowd=1) are never targets: they are left out of "instances".

Images are read with `cv2.imread(file, cv2.IMREAD_COLOR)`, which applies the EXIF
orientation tag and turns grayscale and RGBA images into 3 BGR channels (alpha dropped);
the dict's height and width must be those of the image as displayed (after EXIF rotation).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch

from detframe.config import declare
from detframe.registry import MAPPER_REGISTRY
from detframe.structures import Boxes, Instances
from detframe.structures.coco_format import polygons_to_bitmask, rle_to_bitmask
from detframe.structures.masks import BitMasks, PolygonMasks

from .coco import DatasetError, OnBad
from .transforms import (
    Augmentation,
    RandomFlip,
    ResizeShortestEdge,
    TorchvisionResizeShortestEdge,
    TransformList,
    apply_transforms,
)

__all__ = ["DatasetMapper", "image_to_tensor"]

declare(
    "INPUT.RANDOM_FLIP",
    str,
    "horizontal",
    "random flip at training (probability 0.5)",
    choices=("none", "horizontal", "vertical"),
)
declare(
    "INPUT.MASK_FORMAT",
    str,
    "polygon",
    "form of gt_masks: polygons or dense bitmaps",
    choices=("polygon", "bitmask"),
)
declare(
    "INPUT.RESIZE_METHOD",
    str,
    "opencv",
    "resize the uint8 image with OpenCV (detectron2), or the float image as torchvision's "
    "detectors do (for their checkpoints; the image is then float)",
    choices=("opencv", "torchvision"),
)
declare("DATALOADER.MAPPER", str, "DatasetMapper", "name in MAPPER_REGISTRY")
declare(
    "DATALOADER.PROPOSAL_CROWD_FILTER_THRESH",
    float,
    0.0,
    "at training, drop precomputed proposals with more than this fraction of their area inside "
    "a crowd region (py-faster-rcnn, Detectron: 0.7); 0 keeps them all",
    min=0,
    max=1,
)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """A model input image: [H, W, 3] array -> [3, H, W] tensor of the same dtype."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _segmentation(annotation: dict[str, Any], file_name: str) -> list[Any] | dict[str, Any]:
    """The annotation's segmentation (polygons or RLE); DatasetError when it has none, since
    a mask target cannot be made up."""
    segm = annotation.get("segmentation")
    if not segm:
        raise DatasetError(
            f"{file_name}: annotation {annotation.get('id', '?')} has no segmentation, which "
            "the mask targets need (MODEL.MASK_ON); for a box-only dataset set "
            "MODEL.MASK_ON=false"
        )
    return segm


def _fraction_inside(boxes: np.ndarray, regions_xywh: np.ndarray) -> np.ndarray:
    """[R] the largest fraction of each box's area (boxes [R, 4] XYXY) inside one region
    (regions [C, 4] XYWH); 0 for a box without area."""
    x0, y0 = regions_xywh[:, 0], regions_xywh[:, 1]
    x1, y1 = x0 + regions_xywh[:, 2], y0 + regions_xywh[:, 3]
    width = np.minimum(boxes[:, None, 2], x1) - np.maximum(boxes[:, None, 0], x0)
    height = np.minimum(boxes[:, None, 3], y1) - np.maximum(boxes[:, None, 1], y0)
    intersection = width.clip(min=0) * height.clip(min=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    fraction = np.divide(
        intersection, area[:, None], out=np.zeros_like(intersection), where=area[:, None] > 0
    )
    return fraction.max(axis=1)


@MAPPER_REGISTRY.register()
class DatasetMapper:
    """Reads the image of a dataset dict, augments it and builds the targets.

    Args:
        is_train: training mode: random augmentation, instances always produced.
        augmentations: applied in order to image, boxes and masks (see transforms.py).
        image_format: "BGR" or "RGB", the channel order of the output image.
        mask_on: produce gt_masks.
        mask_format: "polygon" (PolygonMasks; an RLE segmentation raises DatasetError) or
            "bitmask" (BitMasks; polygons are rasterised after transforming).
        on_bad: "error" raises DatasetError for a missing, unreadable or wrongly-sized
            image; "skip" returns None instead and counts it in `skipped` by kind.
        instances_in_eval: produce "instances" in evaluation too (e.g. validation loss).
        proposal_crowd_filter_thresh: in training, drop precomputed proposals with more than
            this fraction of their area inside one crowd box (see the module docstring);
            0 keeps them all.
        seed: seeds the mapper's own numpy Generator, used when `__call__` gets no rng
            (every data-loader worker then gets a copy of the same stream). None (the
            default) draws each call's Generator from numpy's global state, which the
            training loader seeds per sample from SEED and the sample's place in the data
            order: reproducible, and the same whatever the workers, ranks or resumption.
    """

    def __init__(
        self,
        is_train: bool,
        augmentations: Sequence[Augmentation],
        image_format: Literal["BGR", "RGB"] = "BGR",
        mask_on: bool = False,
        mask_format: Literal["polygon", "bitmask"] = "polygon",
        on_bad: OnBad = "error",
        instances_in_eval: bool = False,
        proposal_crowd_filter_thresh: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got {mask_format!r}")
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        if not 0.0 <= proposal_crowd_filter_thresh <= 1.0:
            raise ValueError(
                "proposal_crowd_filter_thresh must be in [0, 1], got "
                f"{proposal_crowd_filter_thresh}"
            )
        self.is_train = is_train
        self.augmentations = list(augmentations)
        self.image_format, self.mask_on, self.mask_format = image_format, mask_on, mask_format
        self.on_bad, self.instances_in_eval = on_bad, instances_in_eval
        self.proposal_crowd_filter_thresh = proposal_crowd_filter_thresh
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.skipped: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool) -> dict[str, Any]:
        """Constructor keyword arguments from INPUT.*, MODEL.MASK_ON and DATALOADER.ON_BAD_DATA
        (the protocol of MAPPER_REGISTRY: `from_config(cfg, is_train)` -> kwargs).

        With INPUT.RESIZE_METHOD "torchvision" the resized image is float32 in training,
        where the loader's memory counts, and float64 at test time, so that a float64 model
        gives torchvision's detections to rounding (a float32 model casts it).
        """
        if is_train:
            lengths, max_size = list(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
        else:
            lengths, max_size = [cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        resize: Augmentation
        if cfg.INPUT.RESIZE_METHOD == "torchvision":
            dtype = np.float32 if is_train else np.float64
            resize = TorchvisionResizeShortestEdge(lengths, max_size, "choice", dtype)
        else:
            resize = ResizeShortestEdge(lengths, max_size, "choice")
        augmentations = [resize]
        if is_train and cfg.INPUT.RANDOM_FLIP != "none":
            augmentations.append(RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal"))
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "on_bad": cfg.DATALOADER.ON_BAD_DATA,
            "proposal_crowd_filter_thresh": cfg.DATALOADER.PROPOSAL_CROWD_FILTER_THRESH,
        }

    def _bad(self, kind: str, message: str) -> None:
        """Raises DatasetError(message) with on_bad="error"; else counts `kind`."""
        if self.on_bad == "error":
            raise DatasetError(message)
        self.skipped[kind] += 1

    def read_image(self, dataset_dict: dict[str, Any]) -> np.ndarray | None:
        """The image [H, W, 3] uint8 in `image_format`, checked against the dict's size;
        None (counted) with on_bad="skip" when it cannot be used."""
        file_name = dataset_dict["file_name"]
        if not os.path.isfile(file_name):
            return self._bad("missing image file", f"image file not found: {file_name}")
        image = cv2.imread(file_name, cv2.IMREAD_COLOR)
        if image is None:
            return self._bad("corrupt image", f"cannot decode image file: {file_name}")
        expected = (dataset_dict["height"], dataset_dict["width"])
        if image.shape[:2] != expected:
            return self._bad(
                "wrong image size",
                f"{file_name}: image is {image.shape[0]}x{image.shape[1]} (HxW) but the "
                f"dataset says {expected[0]}x{expected[1]}",
            )
        return image[:, :, ::-1] if self.image_format == "RGB" else image

    def _masks(
        self,
        annotations: list[dict[str, Any]],
        transforms: TransformList,
        size: tuple[int, int],
        file_name: str,
    ) -> PolygonMasks | BitMasks:
        """gt_masks for `annotations` of the image `file_name` of `size` (H, W) before
        transforming."""
        height, width = size
        new_size = transforms.apply_image(np.zeros((height, width, 1), np.uint8)).shape[:2]
        segmentations = [_segmentation(ann, file_name) for ann in annotations]
        if self.mask_format == "polygon":
            polygons = []
            for segm in segmentations:
                if isinstance(segm, dict):
                    raise DatasetError(
                        f"{file_name}: an RLE segmentation cannot be used with mask_format "
                        "'polygon'; set INPUT.MASK_FORMAT to 'bitmask'"
                    )
                polygons.append([np.asarray(p, np.float64) for p in segm])
            return PolygonMasks(transforms.apply_polygons(polygons))
        masks = []
        for segm in segmentations:
            if isinstance(segm, dict):
                mask = rle_to_bitmask(segm)[None]
                masks.append(transforms.apply_bitmasks(mask)[0])
            else:
                polygons = transforms.apply_polygons([[np.asarray(p) for p in segm]])[0]
                masks.append(polygons_to_bitmask(polygons, *new_size))
        if not masks:
            return BitMasks(torch.zeros((0, *new_size), dtype=torch.bool))
        return BitMasks(torch.from_numpy(np.stack(masks)))

    def __call__(
        self, dataset_dict: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any] | None:
        """Maps one dataset dict (not modified) to a model input (see the module docstring).

        Args:
            rng: draws the random augmentation choices; if None, the mapper's own Generator
                (`seed`) or one seeded from numpy's global state.

        Raises:
            DatasetError: with on_bad="error", a missing or undecodable image file (the
                message names the file) or an image whose size differs from the dict's
                (naming the file and both sizes).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        if image is None:
            return None
        original_size = image.shape[:2]
        if rng is None:
            rng = (
                self.rng
                if self.rng is not None
                else np.random.default_rng(np.random.randint(2**31))
            )
        image, transforms = apply_transforms(self.augmentations, image, rng)
        out: dict[str, Any] = {
            "image": image_to_tensor(image),
            "height": dataset_dict["height"],
            "width": dataset_dict["width"],
            "image_id": dataset_dict["image_id"],
        }
        if "proposal_boxes" in dataset_dict:
            out["proposals"] = self._proposals(dataset_dict, transforms, image.shape[:2])
        if not (self.is_train or self.instances_in_eval):
            return out
        annotations = [a for a in dataset_dict.get("annotations", []) if not a.get("iscrowd", 0)]
        new_size = (image.shape[0], image.shape[1])
        boxes = transforms.apply_boxes(np.array([a["bbox"] for a in annotations], np.float32))
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, new_size[1])
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, new_size[0])
        instances = Instances(
            new_size,
            gt_boxes=Boxes(torch.from_numpy(boxes)),
            gt_classes=torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
        )
        if self.mask_on:
            instances.gt_masks = self._masks(
                annotations, transforms, original_size, dataset_dict["file_name"]
            )
        out["instances"] = instances
        return out

    def _proposals(
        self, dataset_dict: dict[str, Any], transforms: TransformList, size: tuple[int, int]
    ) -> Instances:
        """The dict's precomputed proposals, moved with the image to `size` (H', W'), less
        those inside crowd regions in training (see the module docstring)."""
        original = np.asarray(dataset_dict["proposal_boxes"], np.float32).reshape(-1, 4)
        boxes = np.ascontiguousarray(transforms.apply_boxes(original).reshape(-1, 4))
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, size[1])
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, size[0])
        logits = np.asarray(dataset_dict["proposal_objectness_logits"], np.float32)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if self.is_train and self.proposal_crowd_filter_thresh > 0:
            crowds = [a["bbox"] for a in dataset_dict.get("annotations", []) if a.get("iscrowd")]
            if crowds:
                inside = _fraction_inside(original, np.array(crowds, np.float32))
                keep &= inside <= self.proposal_crowd_filter_thresh
        return Instances(
            size,
            proposal_boxes=Boxes(torch.from_numpy(boxes[keep])),
            objectness_logits=torch.from_numpy(logits[keep]),
        )
