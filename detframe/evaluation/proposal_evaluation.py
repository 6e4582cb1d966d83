"""Class-agnostic average recall (AR) of box and segment proposals on COCO ground truth.

Shapes: P proposals and G non-crowd ground-truth instances of one image of size (H, W).

    inputs[i]                    {"image_id": int, ...}
    outputs[i]                   {"proposals": Instances} (a proposal network's output)
    proposals.proposal_boxes     Boxes[P]  XYXY, in original image coordinates (pixels)
    proposals.objectness_logits  Tensor[P]  proposals are ranked by it, highest first
    proposals.proposal_masks     BitMasks[P] or bool Tensor[P, H, W] (for "segm_proposals")

The metric is the one of the DeepMask / SharpMask papers and detectron2's
`_evaluate_box_proposals`. For every image, limit L and COCO area range (on the ground truth's
"area" field: all, small < 32^2, medium 32^2..96^2, large > 96^2):

1. take the top-L proposals and the non-crowd ground truth in the area range (crowd regions
   are ignored: they are neither recalled nor do they consume proposals);
2. IoU matrix [L, G] (boxes: `pairwise_iou`; masks: `pycocotools.mask.iou` on RLEs);
3. greedy one-to-one matching: repeatedly take the remaining (proposal, gt) pair with the
   highest IoU and remove its row and column; a gt left unmatched has IoU 0;
4. recall(t) = fraction of all ground truth (over all images) whose matched IoU >= t, for
   t in 0.5:0.05:0.95, and AR = mean over t.

Results are in percent, keyed "AR@L" (all areas) and "ARs@L", "ARm@L", "ARl@L"; NaN where
there is no ground truth in the area range.

`protocol="coco"` computes the same keys with pycocotools' COCOeval instead
(`coco_average_recalls`), class-agnostic: `params.useCats = 0`, `params.maxDets` = the limits,
the proposals scored by their rank. Its matching differs from the greedy one above: for every
IoU threshold separately, the proposals in rank order each take the best-overlapping
unmatched ground truth; a proposal that overlaps a crowd region (or a ground truth outside
the area range) is ignored rather than counted; ground-truth areas are those of the
annotations' "area" field, as above. The recall of a threshold is the fraction of
ground truth matched, and AR the mean over the thresholds with ground truth.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from detframe.registry import EVALUATOR_REGISTRY
from detframe.structures import (
    BitMasks,
    Boxes,
    Instances,
    bitmask_to_rle,
    pairwise_iou,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from detframe.utils.comm import gather_to_main_process

from .coco_evaluation import _captured, _ground_truth_file, load_coco

__all__ = [
    "AREA_RANGES",
    "IOU_THRESHOLDS",
    "ProposalEvaluator",
    "coco_average_recalls",
    "greedy_matched_ious",
]

# COCO's area ranges (in pixels^2 of the ground truth's "area"), keyed by the metric prefix.
AREA_RANGES = {
    "AR": (0.0, 1e5**2),
    "ARs": (0.0, 32.0**2),
    "ARm": (32.0**2, 96.0**2),
    "ARl": (96.0**2, 1e5**2),
}
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10, dtype=torch.float64)
TASKS = ("box_proposals", "segm_proposals")
PROTOCOLS = ("greedy", "coco")
# COCOeval's iouType of each task, and its area ranges (params.areaRngLbl) by metric prefix.
_COCO_IOU_TYPES = {"box_proposals": "bbox", "segm_proposals": "segm"}
_COCO_AREAS = {"AR": "all", "ARs": "small", "ARm": "medium", "ARl": "large"}


def greedy_matched_ious(ious: Tensor) -> Tensor:
    """The IoU each ground truth gets in a greedy one-to-one matching.

    Args:
        ious: [P, G] IoU of proposals (rows) with ground truth (columns).

    Returns:
        [G] float64: the IoU of the proposal matched to each ground truth, 0 where none is.
        Matching repeatedly takes the highest remaining pair and removes its row and column.
    """
    ious = ious.to(torch.float64).clone()
    num_gt = ious.size(1)
    matched = torch.zeros(num_gt, dtype=torch.float64)
    for _ in range(min(ious.shape)):
        flat_index = int(torch.argmax(ious))
        proposal, gt = divmod(flat_index, num_gt)
        matched[gt] = ious[proposal, gt]
        ious[proposal, :] = -1
        ious[:, gt] = -1
    return matched


def coco_average_recalls(
    coco_gt: COCO,
    predictions: Sequence[Mapping[str, Any]],
    task: str = "box_proposals",
    limits: Sequence[int] = (10, 100, 1000),
) -> dict[str, float]:
    """Class-agnostic average recall by pycocotools' COCOeval (see the module docstring).

    Args:
        coco_gt: the ground truth.
        predictions: per image {"image_id": int, "boxes": Tensor[P, 4] XYXY pixels, ranked
            best first, and for "segm_proposals" "masks": P RLE dicts in the same order}.
            Only these images are evaluated.
        task: "box_proposals" (COCOeval's "bbox") or "segm_proposals" ("segm").
        limits: the proposals per image to evaluate recall at (`params.maxDets`).

    Returns:
        {"AR@L", "ARs@L", "ARm@L", "ARl@L" for every limit L}, in percent; NaN where the
        evaluated images have no ground truth in the area range.
    """
    if task not in _COCO_IOU_TYPES:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    category_id = min(coco_gt.getCatIds(), default=1)  # loadRes needs one; useCats=0 ignores it
    results = []
    for prediction in predictions:
        boxes = xyxy_to_xywh(prediction["boxes"].double()).tolist()
        masks = prediction.get("masks") if task == "segm_proposals" else None
        for rank, box in enumerate(boxes):
            result = {
                "image_id": int(prediction["image_id"]),
                "category_id": category_id,
                "score": float(len(boxes) - rank),  # COCOeval ranks by score, highest first
            }
            # Without "bbox", loadRes takes a segment's area (for the area ranges) from its mask.
            if masks is None:
                result["bbox"] = box
            else:
                result["segmentation"] = masks[rank]
            results.append(result)
    if results:
        coco_dt, _ = _captured(lambda: coco_gt.loadRes(results))
    else:  # loadRes refuses an empty list: no proposals is an empty results set
        coco_dt = COCO()
        coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": []}
        coco_dt.dataset["categories"] = coco_gt.dataset.get("categories", [])
        _captured(coco_dt.createIndex)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType=_COCO_IOU_TYPES[task])
    coco_eval.params.imgIds = sorted({int(p["image_id"]) for p in predictions})
    coco_eval.params.useCats = 0
    coco_eval.params.maxDets = sorted(int(limit) for limit in limits)
    _captured(lambda: (coco_eval.evaluate(), coco_eval.accumulate()))
    recall = coco_eval.eval["recall"]  # [T thresholds, 1 category, A areas, M limits]
    metrics = {}
    for prefix, label in _COCO_AREAS.items():
        area = coco_eval.params.areaRngLbl.index(label)
        for m, limit in enumerate(coco_eval.params.maxDets):
            values = recall[:, 0, area, m]
            values = values[values > -1]
            metrics[f"{prefix}@{limit}"] = float(np.mean(values) * 100) if values.size else math.nan
    return metrics


@EVALUATOR_REGISTRY.register()
class ProposalEvaluator:
    """Average recall of box proposals and segment proposals (see the module docstring).

    Use: `reset()`, then `process(inputs, outputs)` for every batch, then `evaluate()`.
    """

    def __init__(
        self,
        ground_truth: str | os.PathLike | COCO,
        tasks: Sequence[str] = ("box_proposals",),
        limits: Sequence[int] = (10, 100, 1000),
        protocol: Literal["greedy", "coco"] = "greedy",
    ) -> None:
        """
        Args:
            ground_truth: path to a COCO-format json, or a pycocotools COCO object.
            tasks: any of "box_proposals" and "segm_proposals".
            limits: the numbers of top-ranked proposals per image to evaluate recall at.
            protocol: "greedy" (detectron2's, the DeepMask papers') or "coco" (COCOeval with
                useCats=0), see the module docstring.

        Raises:
            ValueError: an unknown task or protocol, or a limit that is not positive.
        """
        if not tasks or set(tasks) - set(TASKS):
            raise ValueError(f"ProposalEvaluator tasks must be among {TASKS}, got {tasks!r}")
        if not limits or min(limits) < 1:
            raise ValueError(f"ProposalEvaluator limits must be positive, got {limits!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"ProposalEvaluator protocol must be one of {PROTOCOLS}, got {protocol!r}"
            )
        self.coco_gt = load_coco(ground_truth)
        self.tasks = tuple(tasks)
        self.limits = tuple(int(limit) for limit in limits)
        self.protocol = protocol
        self._predictions: list[dict[str, Any]] = []

    @classmethod
    def from_config(
        cls, cfg: Any, metadata: Mapping[str, Any], output_dir: str | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for a dataset: its metadata's "json_file", box proposals at the
        default limits; `cfg` and `output_dir` are not needed."""
        del cfg, output_dir
        return {"ground_truth": _ground_truth_file(metadata, cls.__name__)}

    def reset(self) -> None:
        """Forgets the processed proposals (call before a new evaluation)."""
        self._predictions = []

    def process(
        self, inputs: Sequence[dict[str, Any]], outputs: Sequence[Mapping[str, Instances]]
    ) -> None:
        """Keeps the top `max(limits)` proposals of every image (on the CPU; masks as RLEs).

        Raises:
            ValueError: an output without "proposals" (a detector's: evaluate it with
                COCOEvaluator), or "segm_proposals" is evaluated but an image has no
                proposal_masks.
        """
        for input_dict, output in zip(inputs, outputs, strict=True):
            image_id = int(input_dict["image_id"])
            if "proposals" not in output:
                raise ValueError(
                    f"ProposalEvaluator needs proposals {{'proposals': ...}}; the output of "
                    f"image {image_id} has {sorted(output)} (for detections, use COCOEvaluator)"
                )
            instances = output["proposals"]
            masks = None
            if "segm_proposals" in self.tasks and instances.has("proposal_masks"):
                masks = instances.proposal_masks
                masks = (masks.tensor if isinstance(masks, BitMasks) else masks).detach().cpu()
            self.add_proposals(
                image_id, instances.proposal_boxes.tensor, instances.objectness_logits, masks
            )

    def add_proposals(
        self,
        image_id: int,
        boxes: Tensor,
        objectness: Tensor,
        masks: Tensor | Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Keeps the top `max(limits)` proposals of one image by objectness (highest first,
        ties in the given order): what `process` does for each output, for proposals that
        come from elsewhere (e.g. a proposals file).

        Args:
            image_id: the COCO image id.
            boxes: [P, 4] XYXY in the image's pixels.
            objectness: [P], higher is better.
            masks: for "segm_proposals": bool Tensor [P, H, W], or P COCO RLE dicts.

        Raises:
            ValueError: "segm_proposals" is evaluated and `masks` is None.
        """
        order = torch.argsort(objectness.detach().cpu(), descending=True, stable=True)
        order = order[: max(self.limits)]
        prediction: dict[str, Any] = {"image_id": image_id, "boxes": boxes.detach().cpu()[order]}
        if "segm_proposals" in self.tasks:
            if masks is None:
                raise ValueError(
                    f"'segm_proposals' is evaluated but image {image_id} has no proposal_masks"
                )
            if isinstance(masks, Tensor):
                prediction["masks"] = [bitmask_to_rle(masks[i]) for i in order.tolist()]
            else:
                prediction["masks"] = [masks[i] for i in order.tolist()]
        self._predictions.append(prediction)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """{task: {"AR@L", "ARs@L", "ARm@L", "ARl@L" for every limit L}} in percent on rank 0,
        {} on the other ranks."""
        predictions = gather_to_main_process(self._predictions)
        if predictions is None:
            return {}
        if self.protocol == "coco":
            return {
                task: coco_average_recalls(self.coco_gt, predictions, task, self.limits)
                for task in self.tasks
            }
        return {task: self._average_recalls(task, predictions) for task in self.tasks}

    def _ground_truth(self, image_id: int) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        """The non-crowd ground truth of one image: XYXY boxes [G, 4], areas [G], RLEs [G]."""
        annotations = self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=[image_id]))
        annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64)
        areas = torch.tensor([float(a["area"]) for a in annotations], dtype=torch.float64)
        rles = [self.coco_gt.annToRLE(a) for a in annotations]
        return xywh_to_xyxy(boxes.reshape(-1, 4)), areas, rles

    def _average_recalls(self, task: str, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """The AR of every (area range, limit) of one task, in percent."""
        matched: dict[tuple[str, int], list[Tensor]] = {
            (area, limit): [] for area in AREA_RANGES for limit in self.limits
        }
        for prediction in predictions:
            gt_boxes, gt_areas, gt_rles = self._ground_truth(prediction["image_id"])
            if task == "box_proposals":
                ious = pairwise_iou(Boxes(prediction["boxes"].double()), Boxes(gt_boxes))
            elif prediction["masks"] and gt_rles:
                iscrowd = [0] * len(gt_rles)
                ious = torch.as_tensor(mask_util.iou(prediction["masks"], gt_rles, iscrowd))
            else:
                ious = torch.zeros(len(prediction["masks"]), len(gt_rles), dtype=torch.float64)
            for area, (low, high) in AREA_RANGES.items():
                in_range = (gt_areas >= low) & (gt_areas <= high)
                for limit in self.limits:
                    matched[area, limit].append(greedy_matched_ious(ious[:limit, in_range]))
        metrics = {}
        for (area, limit), per_image in matched.items():
            ious = torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64)
            if ious.numel() == 0:
                metrics[f"{area}@{limit}"] = math.nan
                continue
            recalls = (ious[None, :] >= IOU_THRESHOLDS[:, None]).double().mean(dim=1)
            metrics[f"{area}@{limit}"] = float(recalls.mean() * 100)
        return metrics
