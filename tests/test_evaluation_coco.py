"""COCOEvaluator against pycocotools run directly on hand-written results files.

The ground truth is a small COCO json written by hand: 3 images, 2 categories with
non-contiguous ids (3 "circle", 7 "square"), polygon masks, one crowd region (uncompressed
RLE) and one image without annotations.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detframe.evaluation import COCOEvaluator
from detframe.registry import EVALUATOR_REGISTRY
from detframe.structures import BitMasks, Boxes, Instances, polygons_to_bitmask

SIZES = {1: (64, 64), 2: (64, 64), 3: (48, 40)}  # image id -> (height, width)
CIRCLE, SQUARE = 3, 7


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _polygon_annotation(ann_id: int, image_id: int, category: int, polygon: list[float]):
    xs, ys = polygon[0::2], polygon[1::2]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    height, width = SIZES[image_id]
    area = float(polygons_to_bitmask([np.array(polygon)], height, width).sum())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": [polygon],
        "bbox": box,
        "area": area,
        "iscrowd": 0,
    }


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    crowd = np.zeros(SIZES[2], dtype=bool)
    crowd[40:64, 40:64] = True
    annotations = [
        _polygon_annotation(1, 1, CIRCLE, [10, 10, 30, 10, 30, 30, 10, 30]),
        _polygon_annotation(2, 1, SQUARE, [35, 5, 60, 5, 60, 40]),
        _polygon_annotation(3, 2, CIRCLE, [5, 5, 38, 5, 38, 38, 5, 38]),
        _polygon_annotation(4, 2, SQUARE, [50, 2, 62, 2, 62, 12, 50, 12]),
        {
            "id": 5,
            "image_id": 2,
            "category_id": SQUARE,
            "segmentation": _uncompressed_rle(crowd),
            "bbox": [40, 40, 24, 24],
            "area": float(crowd.sum()),
            "iscrowd": 1,
        },
    ]
    dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in SIZES.items()],
        "categories": [{"id": CIRCLE, "name": "circle"}, {"id": SQUARE, "name": "square"}],
        "annotations": annotations,
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def _rectangle_mask(box: list[float], image_id: int) -> torch.Tensor:
    mask = torch.zeros(SIZES[image_id], dtype=torch.bool)
    x1, y1, x2, y2 = (round(v) for v in box)
    mask[y1:y2, x1:x2] = True
    return mask


def _instances(image_id: int, boxes, scores, classes, masks, bitmasks: bool) -> Instances:
    masks = torch.stack(masks) if masks else torch.zeros(0, *SIZES[image_id], dtype=torch.bool)
    return Instances(
        SIZES[image_id],
        pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        scores=torch.tensor(scores, dtype=torch.float32),
        pred_classes=torch.tensor(classes, dtype=torch.int64),
        pred_masks=BitMasks(masks) if bitmasks else masks,
    )


def _ground_truth_as_detections(gt: COCO, class_of: dict[int, int]) -> list[Instances]:
    """Every non-crowd gt instance of every image as a detection of score 1."""
    outputs = []
    for image_id in SIZES:
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        masks = [torch.from_numpy(gt.annToMask(a).astype(bool)) for a in anns]
        classes = [class_of[a["category_id"]] for a in anns]
        outputs.append(_instances(image_id, boxes, [1.0] * len(anns), classes, masks, True))
    return outputs


def _run(evaluator: COCOEvaluator, outputs: list[Instances]) -> dict[str, dict[str, float]]:
    evaluator.reset()
    for image_id, instances in zip(SIZES, outputs, strict=True):
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()


def test_registered() -> None:
    assert EVALUATOR_REGISTRY.get("COCOEvaluator") is COCOEvaluator


def test_ground_truth_as_detections_gives_ap_100(gt_path: Path) -> None:
    evaluator = COCOEvaluator(str(gt_path), tasks=("bbox", "segm"))
    results = _run(evaluator, _ground_truth_as_detections(evaluator.coco_gt, {3: 0, 7: 1}))
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AP-circle", "AP-square"):
            assert results[task][name] == pytest.approx(100.0), (task, name)
        assert math.isnan(results[task]["APl"])  # no large objects
    assert "Average Precision" in evaluator.summary and "square" in evaluator.summary


# Hand-made detections per image: (XYXY box, score, contiguous class); masks are the boxes.
DETECTIONS = {
    1: [
        ([11, 10, 31, 30], 0.9, 0),  # true positive for ann 1
        ([10, 11, 30, 31], 0.8, 0),  # duplicate of ann 1
        ([10, 10, 30, 30], 0.7, 1),  # right place, wrong class
        ([35, 5, 55, 35], 0.6, 1),  # partial overlap with the triangle (ann 2)
    ],
    2: [
        ([0, 55, 8, 63], 0.95, 0),  # a miss, scored highest
        ([42, 42, 60, 60], 0.85, 1),  # inside the crowd region: ignored
        ([6, 4, 38, 40], 0.5, 0),  # true positive for ann 3
        ([51, 2, 62, 13], 0.4, 1),  # true positive for ann 4 (small)
    ],
    3: [([1, 1, 20, 20], 0.3, 0)],  # a false positive on the image without annotations
}


def _expected_pycocotools(gt_path: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The 12 stats and per-category AP that pycocotools gives on a hand-written results file."""
    dataset_id = {0: CIRCLE, 1: SQUARE}
    results = []
    for image_id, detections in DETECTIONS.items():
        for (x1, y1, x2, y2), score, cls in detections:
            result = {"image_id": image_id, "category_id": dataset_id[cls], "score": score}
            if task == "bbox":
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                mask = _rectangle_mask([x1, y1, x2, y2], image_id).numpy()
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(result)
    results_path = gt_path.parent / f"hand_{task}.json"
    results_path.write_text(json.dumps(results))
    gt = COCO(str(gt_path))
    coco_eval = COCOeval(gt, gt.loadRes(str(results_path)), iouType=task)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    per_category = np.array([precision[..., k][precision[..., k] > -1].mean() for k in (0, 1)])
    return coco_eval.stats, per_category


def _hand_outputs() -> list[Instances]:
    outputs = []
    for image_id, detections in DETECTIONS.items():
        boxes = [d[0] for d in detections]
        masks = [_rectangle_mask(box, image_id) for box in boxes]
        outputs.append(
            _instances(
                image_id,
                boxes,
                [d[1] for d in detections],
                [d[2] for d in detections],
                masks,
                bitmasks=image_id != 2,  # image 2 gives a plain bool Tensor[N, H, W]
            )
        )
    return outputs


def test_matches_pycocotools_on_hand_made_detections(gt_path: Path) -> None:
    evaluator = COCOEvaluator(gt_path, tasks=("bbox", "segm"))
    results = _run(evaluator, _hand_outputs())
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for task in ("bbox", "segm"):
        stats, per_category = _expected_pycocotools(gt_path, task)
        expected = [s * 100 if s >= 0 else math.nan for s in stats]
        actual = [results[task][name] for name in names]
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9, err_msg=task)
        np.testing.assert_allclose(
            [results[task]["AP-circle"], results[task]["AP-square"]], per_category * 100
        )
        # Not everything is perfect, nor zero: the case exercises real matching.
        assert 0 < results[task]["AP"] < 100


def test_contiguous_id_mapping_is_applied(gt_path: Path, tmp_path: Path) -> None:
    swapped = {0: SQUARE, 1: CIRCLE}
    evaluator = COCOEvaluator(gt_path, contiguous_to_dataset_id=swapped, output_dir=str(tmp_path))
    outputs = _ground_truth_as_detections(evaluator.coco_gt, {SQUARE: 0, CIRCLE: 1})
    assert _run(evaluator, outputs)["bbox"]["AP"] == pytest.approx(100.0)
    saved = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert sorted(r["category_id"] for r in saved) == [CIRCLE, CIRCLE, SQUARE, SQUARE]
    # The same class indices under the default mapping (sorted ids) are all wrong classes.
    default = COCOEvaluator(gt_path)
    assert _run(default, outputs)["bbox"]["AP"] == pytest.approx(0.0)


def test_results_json_is_saved_and_loadable(gt_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    evaluator = COCOEvaluator(gt_path, tasks=("bbox", "segm"), output_dir=str(out))
    _run(evaluator, _hand_outputs())
    path = out / "coco_instances_results.json"
    saved = json.loads(path.read_text())
    assert len(saved) == sum(len(d) for d in DETECTIONS.values())
    first = saved[0]
    assert first["image_id"] == 1 and first["category_id"] == CIRCLE
    assert first["bbox"] == pytest.approx([11, 10, 20, 20])  # XYWH
    assert first["score"] == pytest.approx(0.9)
    assert isinstance(first["segmentation"]["counts"], str)
    loaded = COCO(str(gt_path)).loadRes(str(path))
    mask = loaded.annToMask(loaded.loadAnns(loaded.getAnnIds(imgIds=[1]))[0])
    assert mask.sum() == 400 and mask[10:30, 11:31].all()


def test_empty_predictions(gt_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    evaluator = COCOEvaluator(gt_path, tasks=("bbox", "segm"))
    empty = [_instances(i, [], [], [], [], bitmasks=True) for i in SIZES]
    with caplog.at_level(logging.WARNING):
        results = _run(evaluator, empty)
    assert "no detections" in caplog.text
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == 0.0 and results[task]["AR100"] == 0.0
        assert results[task]["AP-circle"] == 0.0
        assert math.isnan(results[task]["APl"])
    # Nothing processed at all: NaN, with a warning, and no crash.
    evaluator.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate()
    assert "no images" in caplog.text
    assert math.isnan(results["bbox"]["AP"]) and math.isnan(results["segm"]["AP-square"])


def test_only_processed_images_are_evaluated(gt_path: Path) -> None:
    evaluator = COCOEvaluator(gt_path)
    outputs = _ground_truth_as_detections(evaluator.coco_gt, {3: 0, 7: 1})
    evaluator.process([{"image_id": 1}], [{"instances": outputs[0]}])
    # Image 2's ground truth does not count as missed: it was not processed.
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_bad_arguments(gt_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks"):
        COCOEvaluator(gt_path, tasks=("keypoints",))
    with pytest.raises(ValueError, match="category ids"):
        COCOEvaluator(gt_path, contiguous_to_dataset_id={0: 99})
    evaluator = COCOEvaluator(gt_path, tasks=("segm",))
    no_masks = Instances(
        SIZES[1],
        pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]])),
        scores=torch.tensor([0.5]),
        pred_classes=torch.tensor([0]),
    )
    with pytest.raises(ValueError, match="pred_masks"):
        evaluator.process([{"image_id": 1}], [{"instances": no_masks}])
    no_masks.pred_classes = torch.tensor([5])
    with pytest.raises(KeyError, match="class index 5"):
        COCOEvaluator(gt_path).process([{"image_id": 1}], [{"instances": no_masks}])


def _distributed_worker(rank: int, world_size: int, gt_path: str, init_file: str, out: str):
    """One rank: processes every other image, then evaluates; writes what it got back."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        evaluator = COCOEvaluator(gt_path, tasks=("bbox", "segm"))
        for index, (image_id, instances) in enumerate(zip(SIZES, _hand_outputs(), strict=True)):
            if index % world_size == rank:
                evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        results = evaluator.evaluate()
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow  # two spawned processes: about 10 s
def test_distributed_ranks_gather_to_rank_0(gt_path: Path, tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        _distributed_worker,
        args=(2, str(gt_path), str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
    )
    single = _run(COCOEvaluator(gt_path, tasks=("bbox", "segm")), _hand_outputs())
    gathered = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
    for task in ("bbox", "segm"):
        np.testing.assert_allclose(
            [gathered[task][k] for k in sorted(single[task])],
            [single[task][k] for k in sorted(single[task])],
        )


def test_split_without_annotations_says_why_ap_is_undefined(
    gt_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = json.loads(gt_path.read_text())
    dataset["annotations"] = []
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps(dataset))
    evaluator = COCOEvaluator(unlabelled, tasks=("bbox", "segm"))
    box = [[10.0, 10.0, 30.0, 30.0]]
    outputs = [_instances(i, box, [0.9], [0], [_rectangle_mask(box[0], i)], True) for i in SIZES]
    with caplog.at_level(logging.WARNING, logger="detframe.evaluation.coco_evaluation"):
        for image_id, instances in zip(SIZES, outputs, strict=True):
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        results = evaluator.evaluate()
    assert all(math.isnan(v) for task in ("bbox", "segm") for v in results[task].values())
    assert set(results["bbox"]) >= {"AP", "AP50", "AR100", "AP-circle"}
    expected = f"{unlabelled} has no annotations for the {len(SIZES)} evaluated images"
    assert expected in caplog.text and "AP and AR are undefined" in caplog.text
    assert f"bbox: {expected}" in evaluator.summary
