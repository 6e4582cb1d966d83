"""COCO box and mask AP with pycocotools, for the predictions of a detector.

Shapes: N detections of one image of size (H, W).

    inputs[i]                  {"image_id": int, ...}          the dataset dict of image i
    outputs[i]                 {"instances": Instances}         the model's output of image i
    instances.pred_boxes       Boxes[N]  XYXY, in original image coordinates (pixels)
    instances.scores           Tensor[N] float
    instances.pred_classes     Tensor[N] int, contiguous class index 0..K-1
    instances.pred_masks       BitMasks[N] or bool Tensor[N, H, W] (needed for "segm")

Conventions:

- A detection becomes one COCO result {"image_id", "category_id", "score", "bbox": [x, y, w, h],
  "segmentation": RLE with str counts}; the contiguous class index is mapped to the dataset's
  category id by `contiguous_to_dataset_id` (default: the sorted category ids of the ground truth).
- For "bbox" the results are loaded without their masks (areas are box areas) and for "segm"
  without their boxes (areas and boxes come from the masks), as detectron2 does.
- Only the images that were processed are evaluated (`COCOeval.params.imgIds`).
- Metrics are percentages, as in detectron2; a metric pycocotools cannot compute (-1, e.g. APl
  when there are no large objects) is NaN. When the evaluated images have no annotations at
  all (a split without ground truth), every metric is NaN and a warning says so.
- Under torch.distributed every rank processes its share of images; `evaluate` gathers the
  predictions to rank 0, which evaluates (and writes the results file); other ranks return {}.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detframe.registry import EVALUATOR_REGISTRY
from detframe.structures import BitMasks, Instances, bitmask_to_rle, xyxy_to_xywh
from detframe.utils.comm import gather_to_main_process

__all__ = ["COCO_METRIC_NAMES", "COCOEvaluator", "load_coco"]

logger = logging.getLogger(__name__)

# The names of pycocotools' 12 summary numbers (`COCOeval.stats`), in order.
COCO_METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
RESULTS_FILE_NAME = "coco_instances_results.json"

T = TypeVar("T")


def _captured(fn: Callable[[], T]) -> tuple[T, str]:
    """Calls `fn`, returning its result and what it printed (pycocotools prints to stdout)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn()
    return result, buffer.getvalue()


def load_coco(ground_truth: str | os.PathLike | COCO) -> COCO:
    """A pycocotools COCO object from a path to a COCO json, or the object itself."""
    if isinstance(ground_truth, COCO):
        return ground_truth
    coco, printed = _captured(lambda: COCO(os.fspath(ground_truth)))
    logger.debug(printed.strip())
    return coco


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO object with no detections (`COCO.loadRes` fails on an empty list)."""
    results = COCO()
    results.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    _captured(results.createIndex)
    return results


def _ground_truth_file(metadata: Mapping[str, Any], evaluator: str) -> str:
    """The COCO json of a dataset's metadata; ValueError naming the dataset without one."""
    json_file = metadata.get("json_file")
    if not json_file:
        raise ValueError(
            f"{evaluator} needs COCO ground truth, but dataset {metadata.get('name', '?')!r} "
            "has no json_file in its metadata; choose another TEST.EVALUATOR"
        )
    return str(json_file)


@EVALUATOR_REGISTRY.register()
class COCOEvaluator:
    """COCO AP / AR of detections ("bbox") and instance masks ("segm") with pycocotools.

    Use: `reset()`, then `process(inputs, outputs)` for every batch, then `evaluate()`. After
    `evaluate()`, `summary` holds the printed report (pycocotools' 12 numbers and a per-category
    AP table for every task).
    """

    def __init__(
        self,
        ground_truth: str | os.PathLike | COCO,
        tasks: Sequence[str] = ("bbox",),
        contiguous_to_dataset_id: dict[int, int] | None = None,
        output_dir: str | None = None,
    ) -> None:
        """
        Args:
            ground_truth: path to a COCO-format json, or a pycocotools COCO object.
            tasks: any of "bbox" and "segm".
            contiguous_to_dataset_id: model class index -> COCO category id; None maps index i
                to the i-th smallest category id of the ground truth.
            output_dir: where `evaluate` writes `coco_instances_results.json`; None writes
                nothing.

        Raises:
            ValueError: an unknown task, or a mapping to a category id the ground truth lacks.
        """
        unknown = sorted(set(tasks) - {"bbox", "segm"})
        if unknown or not tasks:
            raise ValueError(f"COCOEvaluator tasks must be 'bbox' and/or 'segm', got {tasks!r}")
        self.coco_gt = load_coco(ground_truth)
        self.source = "the ground truth" if isinstance(ground_truth, COCO) else str(ground_truth)
        self.tasks = tuple(tasks)
        category_ids = sorted(self.coco_gt.getCatIds())
        if contiguous_to_dataset_id is None:
            contiguous_to_dataset_id = dict(enumerate(category_ids))
        missing = sorted(set(contiguous_to_dataset_id.values()) - set(category_ids))
        if missing:
            raise ValueError(
                f"contiguous_to_dataset_id maps to category ids {missing} that the ground "
                f"truth does not have (it has {category_ids})"
            )
        self.contiguous_to_dataset_id = dict(contiguous_to_dataset_id)
        self.output_dir = output_dir
        self.summary = ""
        self._predictions: list[dict[str, Any]] = []

    @classmethod
    def from_config(
        cls, cfg: Any, metadata: Mapping[str, Any], output_dir: str | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for a dataset: its metadata's "json_file" and
        "contiguous_id_to_dataset_id"; "bbox", and "segm" with MODEL.MASK_ON.

        Raises:
            ValueError: the metadata has no "json_file" (no COCO ground truth).
        """
        return {
            "ground_truth": _ground_truth_file(metadata, cls.__name__),
            "tasks": ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
            "contiguous_to_dataset_id": metadata.get("contiguous_id_to_dataset_id"),
            "output_dir": output_dir,
        }

    def reset(self) -> None:
        """Forgets the processed predictions (call before a new evaluation)."""
        self._predictions = []
        self.summary = ""

    def process(
        self, inputs: Sequence[dict[str, Any]], outputs: Sequence[Mapping[str, Instances]]
    ) -> None:
        """Converts one batch of detections to COCO results and keeps them (on the CPU).

        Args:
            inputs: per image, a dict with "image_id".
            outputs: per image, {"instances": Instances} with pred_boxes, scores,
                pred_classes and, for "segm", pred_masks (see the module docstring).

        Raises:
            ValueError: an output without "instances" (e.g. a proposal network's: evaluate
                it with ProposalEvaluator), or "segm" is evaluated but an image with
                detections has no pred_masks.
            KeyError: a class index has no entry in `contiguous_to_dataset_id`.
        """
        for input_dict, output in zip(inputs, outputs, strict=True):
            image_id = int(input_dict["image_id"])
            if "instances" not in output:
                raise ValueError(
                    f"COCOEvaluator needs detections {{'instances': ...}}; the output of image "
                    f"{image_id} has {sorted(output)} (for proposals, use ProposalEvaluator)"
                )
            instances = output["instances"]
            self._predictions.append(
                {"image_id": image_id, "results": self._to_coco_results(image_id, instances)}
            )

    def _to_coco_results(self, image_id: int, instances: Instances) -> list[dict[str, Any]]:
        """The COCO results (see the module docstring) of one image's detections."""
        if len(instances) == 0:
            return []
        boxes = xyxy_to_xywh(instances.pred_boxes.tensor.detach().cpu().double()).tolist()
        scores = instances.scores.detach().cpu().tolist()
        classes = instances.pred_classes.detach().cpu().tolist()
        rles: list[dict[str, Any]] | None = None
        if instances.has("pred_masks"):
            masks = instances.pred_masks
            masks = masks.tensor if isinstance(masks, BitMasks) else masks
            rles = [bitmask_to_rle(mask) for mask in masks.detach().cpu()]
        elif "segm" in self.tasks:
            raise ValueError(f"'segm' is evaluated but image {image_id} has no pred_masks")
        results = []
        for i, (box, score, cls) in enumerate(zip(boxes, scores, classes, strict=True)):
            if cls not in self.contiguous_to_dataset_id:
                raise KeyError(
                    f"class index {cls} of image {image_id} is not in contiguous_to_dataset_id "
                    f"(indices {sorted(self.contiguous_to_dataset_id)})"
                )
            result = {
                "image_id": image_id,
                "category_id": self.contiguous_to_dataset_id[cls],
                "bbox": box,
                "score": float(score),
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
        return results

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Evaluates every task on the processed images.

        Returns:
            {task: {"AP", "AP50", ..., "ARl", "AP-<category name>", ...}} in percent on rank 0
            (NaN where undefined), {} on the other ranks.
        """
        predictions = gather_to_main_process(self._predictions)
        if predictions is None:
            return {}
        results = [r for p in predictions for r in p["results"]]
        if self.output_dir is not None:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, RESULTS_FILE_NAME)
            with open(path, "w") as f:
                json.dump(results, f)
            logger.info("Saved %d COCO results to %s", len(results), path)
        image_ids = sorted({p["image_id"] for p in predictions})
        summaries = []
        metrics = {}
        for task in self.tasks:
            metrics[task], summary = self._evaluate_task(task, results, image_ids)
            summaries.append(summary)
            logger.info(summary)
        self.summary = "\n".join(summaries)
        return metrics

    def _evaluate_task(
        self, task: str, results: list[dict[str, Any]], image_ids: list[int]
    ) -> tuple[dict[str, float], str]:
        """The metrics of one task and its printed report."""
        categories = self.coco_gt.loadCats(sorted(self.coco_gt.getCatIds()))
        undefined = {
            name: math.nan
            for name in [*COCO_METRIC_NAMES, *(f"AP-{c['name']}" for c in categories)]
        }
        if not image_ids:
            logger.warning("COCOEvaluator: no images were processed; %s metrics are NaN", task)
            return undefined, f"{task}: no images were processed"
        if not self.coco_gt.getAnnIds(imgIds=image_ids):
            message = (
                f"{task}: {self.source} has no annotations for the {len(image_ids)} evaluated "
                "images, so AP and AR are undefined (NaN): evaluate on a split with annotations"
            )
            logger.warning("COCOEvaluator: %s", message)
            return undefined, message
        # "bbox" is evaluated on boxes with box areas, "segm" on masks with mask areas.
        dropped = "segmentation" if task == "bbox" else "bbox"
        task_results = [{k: v for k, v in r.items() if k != dropped} for r in results]
        if task_results:
            coco_dt, _ = _captured(lambda: self.coco_gt.loadRes(task_results))
        else:
            logger.warning("COCOEvaluator: there are no detections; %s AP is 0", task)
            coco_dt = _empty_results(self.coco_gt)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=task)
        coco_eval.params.imgIds = image_ids
        _captured(lambda: (coco_eval.evaluate(), coco_eval.accumulate()))
        _, printed = _captured(coco_eval.summarize)
        metrics = {
            name: float(value * 100) if value >= 0 else math.nan
            for name, value in zip(COCO_METRIC_NAMES, coco_eval.stats, strict=True)
        }
        # precision: [IoU thresholds, recall thresholds, categories, areas, max detections].
        precision = coco_eval.eval["precision"]
        rows = []
        for k, category in enumerate(categories):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            ap = float(values.mean() * 100) if values.size else math.nan
            metrics[f"AP-{category['name']}"] = ap
            rows.append(f"{category['name']:<24} {category['id']:>6} {ap:8.3f}")
        table = "\n".join([f"{'category':<24} {'id':>6} {'AP':>8}", *rows])
        summary = f"COCO {task} evaluation:\n{printed.rstrip()}\nPer-category {task} AP:\n{table}"
        return metrics, summary
