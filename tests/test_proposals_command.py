"""`detframe proposals` (detframe.engine.proposals) and the COCO protocol of ProposalEvaluator.

The references: the proposal method called directly on each image read by cv2, a
ProposalNetwork run directly on the mapped images, `detframe.data.load_proposals` reading the
written files, and pycocotools' COCOeval called directly (useCats=0, maxDets 10/100/1000,
`summarize()`'s stats) for the recall.
"""

from __future__ import annotations

import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tiny_run import QUICKSTART

from detframe import cli
from detframe.data import DATASETS, load_proposals
from detframe.engine import Trainer, load_config, load_datasets
from detframe.engine.proposals import (
    ImageProposals,
    ResumeError,
    save_proposals,
    write_proposals,
)
from detframe.evaluation import ProposalEvaluator, inference_context
from detframe.modeling.proposal_generator import OfflineProposalMethod, SelectiveSearch
from detframe.registry import OFFLINE_PROPOSAL_REGISTRY


def checksum(image: np.ndarray) -> int:
    return zlib.crc32(image.tobytes())


@OFFLINE_PROPOSAL_REGISTRY.register()
class CountingProposals(OfflineProposalMethod):
    """A test method: square windows on a grid, scored by their mean brightness (unsorted).
    It records the checksum of every image it computes and, when `interrupt_after` is set,
    raises KeyboardInterrupt on the image after that many."""

    seen: ClassVar[list[int]] = []
    interrupt_after: ClassVar[int | None] = None

    def __init__(self, topk: int = 1000) -> None:
        self.topk = topk

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        return {"topk": cfg.MODEL.SELECTIVE_SEARCH.TOPK}

    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.interrupt_after is not None and len(self.seen) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.seen.append(checksum(image))
        gray = image.mean(axis=2)
        boxes, scores = [], []
        for size in (8, 16, 32):
            for y in range(0, image.shape[0] - size + 1, 8):
                for x in range(0, image.shape[1] - size + 1, 8):
                    boxes.append([x, y, x + size, y + size])
                    scores.append(gray[y : y + size, x : x + size].mean() + 1e-3 * len(scores))
        order = np.argsort(-np.array(scores), kind="stable")[: self.topk]
        return np.array(boxes)[order[::-1]], np.array(scores)[order[::-1]]  # ascending on purpose


@pytest.fixture(autouse=True)
def fresh_counter() -> None:
    CountingProposals.seen = []
    CountingProposals.interrupt_after = None


@pytest.fixture
def cfg(tiny_shapes: list[str]) -> DictConfig:
    """The quickstart config on the 6-image 64 x 64 "tiny_val" split (DATASETS.TEST[0])."""
    return load_config(QUICKSTART, tiny_shapes)


def dataset(name: str = "tiny_val") -> list[dict[str, Any]]:
    return load_datasets([name])[name]


def expected_counting(records: list[dict[str, Any]], topk: int) -> dict[int, np.ndarray]:
    """Image id -> the boxes of CountingProposals on the image, best first."""
    expected = {}
    for record in records:
        boxes, scores = CountingProposals(topk)(cv2.imread(record["file_name"]))
        expected[record["image_id"]] = boxes[np.argsort(-scores, kind="stable")]
    CountingProposals.seen = []
    return expected


@pytest.mark.parametrize("suffix", [".pkl", ".npz", ".pt"])
def test_written_file_is_read_by_load_proposals(
    cfg: DictConfig, tmp_path: Path, suffix: str
) -> None:
    output = tmp_path / f"proposals{suffix}"
    report = write_proposals(cfg, output, method="counting_proposals", num_workers=0)
    records = dataset()
    expected = expected_counting(records, topk=2000)
    loaded = load_proposals(output)
    assert list(loaded) == [r["image_id"] for r in records]  # every image, dataset order
    for image_id, (boxes, objectness) in loaded.items():
        np.testing.assert_array_equal(boxes, expected[image_id])
        assert boxes.dtype == np.float32 and np.all(np.diff(objectness) <= 0)
    assert not (tmp_path / f"proposals{suffix}.partial").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert (report.num_images, report.computed, report.method) == (6, 6, "CountingProposals")


def read_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def assert_same_file(a: Path, b: Path) -> None:
    first, second = read_pickle(a), read_pickle(b)
    assert first.keys() == second.keys() == {"ids", "boxes", "objectness"}
    assert first["ids"] == second["ids"]
    for key in ("boxes", "objectness"):
        for x, y in zip(first[key], second[key], strict=True):
            np.testing.assert_array_equal(x, y)


def test_interrupted_run_continues_where_it_stopped(cfg: DictConfig, tmp_path: Path) -> None:
    records = dataset()
    checksums = [checksum(cv2.imread(r["file_name"])) for r in records]
    whole = tmp_path / "whole.pkl"
    write_proposals(cfg, whole, method="CountingProposals", num_workers=0)
    assert CountingProposals.seen == checksums

    output = tmp_path / "resumed.pkl"
    partial = tmp_path / "resumed.pkl.partial"
    CountingProposals.seen = []
    CountingProposals.interrupt_after = 3
    with pytest.raises(KeyboardInterrupt):
        write_proposals(cfg, output, method="CountingProposals", num_workers=0, chunk_size=2)
    assert CountingProposals.seen == checksums[:3]
    assert not output.exists()
    # a chunk after 2 images, and the third image saved when the run was interrupted
    assert sorted(p.name for p in partial.iterdir()) == [
        "chunk_000000.pt",
        "chunk_000001.pt",
        "manifest.json",
    ]

    CountingProposals.seen = []
    CountingProposals.interrupt_after = None
    report = write_proposals(cfg, output, method="CountingProposals", num_workers=0)
    assert CountingProposals.seen == checksums[3:]  # the first 3 are not computed again
    assert (report.computed, report.num_images) == (3, 6)
    assert not partial.exists()
    assert_same_file(output, whole)


def test_other_arguments_refuse_to_continue_unless_restart(
    cfg: DictConfig, tiny_shapes: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "p.pkl"
    CountingProposals.interrupt_after = 2
    with pytest.raises(KeyboardInterrupt):
        write_proposals(cfg, output, method="CountingProposals", num_workers=0)
    CountingProposals.interrupt_after = None
    CountingProposals.seen = []

    fewer = load_config(QUICKSTART, [*tiny_shapes, "MODEL.SELECTIVE_SEARCH.TOPK=5"])
    with pytest.raises(ResumeError, match=r"settings\.topk: 2000 -> 5.*--restart"):
        write_proposals(fewer, output, method="CountingProposals", num_workers=0)
    with pytest.raises(ResumeError, match="method: 'CountingProposals' -> 'SelectiveSearch'"):
        write_proposals(cfg, output, method="selective_search", num_workers=0)
    with pytest.raises(ResumeError, match="dataset: 'tiny_val' -> 'tiny_train'"):
        write_proposals(cfg, output, method="CountingProposals", dataset="tiny_train")
    assert CountingProposals.seen == [] and not output.exists()

    write_proposals(fewer, output, method="CountingProposals", num_workers=0, restart=True)
    assert len(CountingProposals.seen) == 6  # started over
    expected = expected_counting(dataset(), topk=5)
    for image_id, (boxes, _) in load_proposals(output).items():
        np.testing.assert_array_equal(boxes, expected[image_id])


def test_model_proposals_of_a_detector_are_its_proposal_networks(
    cfg: DictConfig, tiny_shapes: list[str], tmp_path: Path
) -> None:
    small = ["MODEL.FPN.OUT_CHANNELS=16", "MODEL.RPN.POST_NMS_TOPK_TEST=30"]
    small += ["INPUT.MIN_SIZE_TEST=96", "INPUT.MAX_SIZE_TEST=96"]  # boxes are scaled back
    torch.manual_seed(0)
    detector = Trainer.build_model(load_config(QUICKSTART, [*tiny_shapes, *small]))
    weights = tmp_path / "detector.pth"
    torch.save(detector.state_dict(), weights)
    overrides = [*tiny_shapes, *small, f"MODEL.WEIGHTS={weights}"]
    output = tmp_path / "rpn.pt"
    write_proposals(load_config(QUICKSTART, overrides), output, method="rpn", num_workers=0)

    proposal_cfg = load_config(QUICKSTART, [*overrides, "MODEL.META_ARCHITECTURE=ProposalNetwork"])
    network = Trainer.build_model(proposal_cfg)
    mapper = Trainer.build_mapper(proposal_cfg, is_train=False)
    loaded = load_proposals(output)
    records = dataset()
    assert list(loaded) == [r["image_id"] for r in records]
    with inference_context(network), torch.no_grad():
        for record in records:
            (output_dict,) = network([mapper(record)])
            proposals = output_dict["proposals"]
            boxes, objectness = loaded[record["image_id"]]
            torch.testing.assert_close(torch.from_numpy(boxes), proposals.proposal_boxes.tensor)
            torch.testing.assert_close(torch.from_numpy(objectness), proposals.objectness_logits)
            assert boxes[:, 2].max() <= record["width"] and boxes[:, 3].max() <= record["height"]


def cocoeval_stats(
    coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: list[int]
) -> np.ndarray:
    """pycocotools' own summary: stats[6:9] AR@10/100/1000, stats[9:12] ARs/m/l@1000."""
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
    coco_eval.params.useCats = 0
    coco_eval.params.maxDets = [10, 100, 1000]
    coco_eval.params.imgIds = image_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def test_printed_recall_is_pycocotools_on_the_written_file(
    tiny_shapes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "ss.npz"
    argv = ["proposals", str(QUICKSTART), *tiny_shapes, "--output", str(output)]
    assert cli.main([*argv, "--method", "selective_search", "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"speed: 6 images in [\d.]+ s, [\d.]+ images/s \(2 workers\)", printed)

    records = dataset()
    loaded = load_proposals(output)
    method = SelectiveSearch()  # in this process: the workers' ranking is the same
    for record in records:
        boxes, _ = method(cv2.imread(record["file_name"]))
        np.testing.assert_array_equal(loaded[record["image_id"]][0], boxes)

    coco_gt = COCO(DATASETS.metadata("tiny_val")["json_file"])
    results = [
        {"image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for i, (boxes, scores) in loaded.items()
        for (x1, y1, x2, y2), s in zip(boxes.tolist(), scores, strict=True)
    ]
    stats = cocoeval_stats(coco_gt, results, "bbox", list(loaded)) * 100
    capsys.readouterr()
    rows = {
        area: [float("nan") if c == "-" else float(c) for c in cells.split(" | ")]
        for area, cells in re.findall(r"\| box \| (\w+) \| (.*) \|", printed)
    }
    np.testing.assert_allclose(rows["all"], stats[6:9], atol=0.051)
    for area, value in zip(("small", "medium", "large"), stats[9:12], strict=True):
        expected = value if value >= 0 else float("nan")
        np.testing.assert_allclose(rows[area][2], expected, atol=0.051)
    assert rows["all"][2] > 0


def test_command_errors_name_the_problem(
    tiny_shapes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["proposals", str(QUICKSTART), *tiny_shapes]
    cases = [
        (["--output", str(tmp_path / "p.json")], "p.json: unknown proposals file type '.json'"),
        (["--output", str(tmp_path / "p.pkl"), "--method", "edge_boxes"], "'edge_boxes'"),
        (
            ["--output", str(tmp_path / "p.pkl"), "--method", "selective_search", "--weights", "w"],
            "--weights is for --method model",
        ),
        (["--output", str(tmp_path / "p.pkl"), "--dataset", "nope"], "No DATASET named 'nope'"),
    ]
    for argv, message in cases:
        assert cli.main([*base, *argv]) == 1
        assert message in capsys.readouterr().err

    CountingProposals.interrupt_after = 1
    output = ["--output", str(tmp_path / "p.pkl")]
    assert cli.main([*base, *output, "--method", "counting_proposals"]) == 130
    CountingProposals.interrupt_after = None
    assert cli.main([*base, *output, "--method", "selective_search"]) == 1
    assert "--restart" in capsys.readouterr().err
    assert cli.main([*base, *output, "--method", "selective_search", "--restart"]) == 0
    assert len(load_proposals(tmp_path / "p.pkl")) == 6


def rectangle_rle(box: list[float], height: int, width: int) -> dict[str, Any]:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    x1, y1, x2, y2 = (round(v) for v in box)
    mask[y1:y2, x1:x2] = 1
    rle = mask_util.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_coco_protocol_equals_pycocotools(tmp_path: Path) -> None:
    """Hand-built ground truth (small, medium and large objects and a crowd region on three
    200 x 200 images) and 150 ranked proposals per image, some near the objects."""
    rng = np.random.default_rng(0)
    size = 200
    gt_boxes = {
        1: [[10, 10, 30, 28], [50, 40, 120, 110], [0, 100, 190, 200]],
        2: [[5, 5, 25, 15], [100, 100, 150, 160], [60, 0, 100, 40]],
        3: [[20, 150, 70, 190]],
    }
    crowd = {2: [150, 10, 200, 60]}
    images = [{"id": i, "file_name": f"{i}.png", "height": size, "width": size} for i in gt_boxes]
    annotations = []
    for image_id, boxes in gt_boxes.items():
        entries = [(box, 0) for box in boxes] + (
            [(crowd[image_id], 1)] if image_id in crowd else []
        )
        for (x1, y1, x2, y2), iscrowd in entries:
            rle = rectangle_rle([x1, y1, x2, y2], size, size)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1 + len(annotations) % 2,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "segmentation": rle,
                    "iscrowd": iscrowd,
                }
            )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file = tmp_path / "gt.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    coco_gt = COCO(str(json_file))

    evaluator = ProposalEvaluator(coco_gt, ("box_proposals", "segm_proposals"), protocol="coco")
    box_results, segm_results = [], []
    for image_id, boxes in gt_boxes.items():
        near = np.repeat(np.array(boxes + list(crowd.values()), dtype=np.float64), 20, axis=0)
        near += rng.normal(0, 6, near.shape)
        corners = rng.uniform(0, size, (150 - len(near), 2, 2))
        anywhere = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 2], axis=1)
        proposals = np.clip(np.round(np.concatenate([near, anywhere])), 0, size)
        scores = rng.permutation(len(proposals)).astype(np.float32)
        masks = [rectangle_rle(box, size, size) for box in proposals.tolist()]
        evaluator.add_proposals(
            image_id, torch.from_numpy(proposals), torch.from_numpy(scores), masks
        )
        for box, score, rle in zip(proposals.tolist(), scores.tolist(), masks, strict=True):
            x1, y1, x2, y2 = box
            common = {"image_id": image_id, "category_id": 1, "score": score}
            box_results.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            segm_results.append({**common, "segmentation": rle})
    ours = evaluator.evaluate()
    for task, iou_type, results in (
        ("box_proposals", "bbox", box_results),
        ("segm_proposals", "segm", segm_results),
    ):
        stats = cocoeval_stats(coco_gt, results, iou_type, sorted(gt_boxes)) * 100
        metrics = ours[task]
        got = [metrics["AR@10"], metrics["AR@100"], metrics["AR@1000"]]
        got += [metrics["ARs@1000"], metrics["ARm@1000"], metrics["ARl@1000"]]
        np.testing.assert_allclose(got, stats[6:12], rtol=1e-12, atol=1e-12)
        assert metrics["AR@10"] < metrics["AR@100"]  # the limits matter on this data


@pytest.mark.parametrize("suffix", [".pkl", ".npz", ".pt"])
def test_segment_proposals_keep_their_masks(tmp_path: Path, suffix: str) -> None:
    boxes = [np.array([[0, 0, 4, 3], [1, 1, 5, 5]], np.float32), np.zeros((0, 4), np.float32)]
    masks = [[rectangle_rle(b, 6, 6) for b in boxes[0].tolist()], []]
    proposals = [
        ImageProposals(7, boxes[0], np.array([2.0, 1.0], np.float32), masks[0]),
        ImageProposals(9, boxes[1], np.zeros(0, np.float32), masks[1]),
    ]
    path = tmp_path / f"segments{suffix}"
    save_proposals(path, proposals)
    loaded = load_proposals(path)  # reads it without running code from the file
    assert list(loaded) == [7, 9]
    np.testing.assert_array_equal(loaded[7][0], boxes[0])
    assert loaded[9][0].shape == (0, 4)
    if suffix == ".pkl":
        stored = read_pickle(path)["masks"]
    elif suffix == ".npz":
        stored = list(np.load(path, allow_pickle=True)["masks"])
    else:
        stored = torch.load(path, weights_only=True)["masks"]
    assert [list(m) for m in stored] == masks
    with pytest.raises(ValueError, match="some images have proposal masks"):
        save_proposals(path, [proposals[0], ImageProposals(9, boxes[1], np.zeros(0, np.float32))])
