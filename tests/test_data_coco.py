"""Tests of detframe.data.coco: a hand-written COCO file loads to hand-checked dicts, bad data
raises naming the file and the entry (or is counted and skipped), proposals are matched."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detframe.data.coco import DatasetError, coco_metadata, load_coco_json

H, W = 20, 30


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[3:7, 10:15] = 1
    return mask


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts: alternating run lengths in column-major order, 0s first."""
    flat = mask.ravel(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def _coco() -> dict[str, Any]:
    compressed = mask_util.encode(np.asfortranarray(_mask()))["counts"].decode("ascii")
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "b.jpg", "height": H, "width": W},
            {"id": 3, "file_name": "c.jpg", "height": H, "width": W},  # no annotations
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 5,
                "bbox": [1, 2, 3, 4],
                "segmentation": [[1, 2, 4, 2, 4, 6]],
                "iscrowd": 0,
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "bbox": [10, 3, 5, 4],
                "segmentation": {"size": [H, W], "counts": compressed},
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 2,
                "category_id": 2,
                "bbox": [10.0, 3.0, 5.0, 4.0],
                "segmentation": {"size": [H, W], "counts": _uncompressed_rle(_mask())},
                "iscrowd": 1,
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 5,
                "bbox": [0.5, 0.5, 2, 2],
                "segmentation": [[0.5, 0.5, 2.5, 0.5, 2.5, 2.5]],
            },
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def test_loads_every_annotation_kind(tmp_path: Path) -> None:
    path = _write(tmp_path, _coco())
    dataset = load_coco_json(path, tmp_path / "images")
    compressed = mask_util.encode(np.asfortranarray(_mask()))["counts"].decode("ascii")
    assert dataset == [
        {
            "file_name": str(tmp_path / "images" / "a.jpg"),
            "height": H,
            "width": W,
            "image_id": 1,
            "annotations": [
                {
                    "bbox": [1.0, 2.0, 4.0, 6.0],
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": [[1.0, 2.0, 4.0, 2.0, 4.0, 6.0]],
                },
                {
                    "bbox": [10.0, 3.0, 15.0, 7.0],
                    "category_id": 0,
                    "iscrowd": 0,
                    "segmentation": {"size": [H, W], "counts": compressed},
                },
            ],
        },
        {
            "file_name": str(tmp_path / "images" / "b.jpg"),
            "height": H,
            "width": W,
            "image_id": 2,
            "annotations": [
                {
                    "bbox": [10.0, 3.0, 15.0, 7.0],
                    "category_id": 0,
                    "iscrowd": 1,
                    "segmentation": {"size": [H, W], "counts": compressed},
                },
                {
                    "bbox": [0.5, 0.5, 2.5, 2.5],
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": [[0.5, 0.5, 2.5, 0.5, 2.5, 2.5]],
                },
            ],
        },
        {
            "file_name": str(tmp_path / "images" / "c.jpg"),
            "height": H,
            "width": W,
            "image_id": 3,
            "annotations": [],
        },
    ]
    decoded = mask_util.decode({"size": [H, W], "counts": compressed.encode("ascii")})
    np.testing.assert_array_equal(decoded, _mask())


def test_category_id_round_trip(tmp_path: Path) -> None:
    meta = coco_metadata(_write(tmp_path, _coco()))
    assert meta["thing_classes"] == ["dog", "cat"]
    assert meta["dataset_id_to_contiguous_id"] == {2: 0, 5: 1}
    back = meta["contiguous_id_to_dataset_id"]
    assert {back[c]: c for c in back} == meta["dataset_id_to_contiguous_id"]


def test_filter_empty_drops_images_without_non_crowd_annotations(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"] = data["annotations"][:3]  # image 2 keeps only its crowd region
    dataset = load_coco_json(_write(tmp_path, data), tmp_path / "images", filter_empty=True)
    assert [r["image_id"] for r in dataset] == [1]
    kept = load_coco_json(tmp_path / "ann.json", tmp_path / "images")
    assert [r["image_id"] for r in kept] == [1, 2, 3]


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [,\n')
    for on_bad in ("error", "skip"):
        with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON: .* line 2"):
            load_coco_json(path, tmp_path, on_bad=on_bad)


def test_missing_top_level_key(tmp_path: Path) -> None:
    data = _coco()
    del data["categories"]
    with pytest.raises(DatasetError, match=r"ann\.json: missing key 'categories'"):
        load_coco_json(_write(tmp_path, data), tmp_path / "images", on_bad="skip")


def _ann(data: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _no_bbox(d: dict[str, Any]) -> None:
    del _ann(d, 10)["bbox"]


def _zero_width(d: dict[str, Any]) -> None:
    _ann(d, 10)["bbox"][2] = 0


def _nan_box(d: dict[str, Any]) -> None:
    _ann(d, 10)["bbox"][1] = float("nan")


def _two_point_polygon(d: dict[str, Any]) -> None:
    _ann(d, 10)["segmentation"] = [[1, 2, 4, 2]]


def _empty_segmentation(d: dict[str, Any]) -> None:
    _ann(d, 10)["segmentation"] = []


def _unknown_category(d: dict[str, Any]) -> None:
    _ann(d, 10)["category_id"] = 99


def _unknown_image(d: dict[str, Any]) -> None:
    _ann(d, 10)["image_id"] = 77


# (mutation of the COCO dict, what the error says after the file name, skip kind)
ANNOTATION_CASES = [
    (_no_bbox, r"annotation id 10 \(image id 1\): missing key 'bbox'", "missing key"),
    (_zero_width, r"annotation id 10 \(image id 1\): bbox \[1, 2, 0, 4\]", "degenerate box"),
    (_nan_box, r"annotation id 10 \(image id 1\): bbox \[1, nan, 3, 4\]", "degenerate box"),
    (_two_point_polygon, r"annotation id 10 .*at least three points", "bad polygon"),
    (
        _empty_segmentation,
        r"annotation id 10 \(image id 1\): the segmentation is missing or empty",
        "no segmentation",
    ),
    (_unknown_category, r"annotation id 10 .*category id 99 is not in categories", "unknown"),
    (_unknown_image, r"annotation id 10 \(image id 77\): image id 77 is not in images", "unknown"),
]


@pytest.mark.parametrize(("mutate", "message", "kind"), ANNOTATION_CASES)
def test_bad_annotation_raises_or_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mutate: Any, message: str, kind: str
) -> None:
    data = _coco()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=rf"ann\.json: {message}"):
        load_coco_json(path, tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="detframe.data.coco"):
        dataset = load_coco_json(path, tmp_path / "images", dataset_name="mine", on_bad="skip")
    assert [len(r["annotations"]) for r in dataset] == [1, 2, 0]  # annotation 10 dropped
    assert dataset[0]["annotations"][0]["category_id"] == 0
    assert re.search(
        rf"dataset 'mine' .*ann\.json: skipped bad entries \({kind}[a-z ]*: 1\)", caplog.text
    )


def test_box_only_annotations_have_no_segmentation(tmp_path: Path) -> None:
    """Without any segmentation in the file, a missing or empty one is a box-only annotation."""
    data = _coco()
    for ann in data["annotations"]:
        ann["segmentation"] = []
    del _ann(data, 13)["segmentation"]
    dataset = load_coco_json(_write(tmp_path, data), tmp_path / "images")
    assert [len(r["annotations"]) for r in dataset] == [2, 2, 0]
    assert not any("segmentation" in a for r in dataset for a in r["annotations"])


def test_duplicate_image_id_names_both_entries_or_drops_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _coco()
    data["images"][2]["id"] = 2  # c.jpg claims b.jpg's id, so b.jpg's boxes would be ambiguous
    path = _write(tmp_path, data)
    with pytest.raises(
        DatasetError,
        match=r"ann\.json: image id 2 is used by images\[1\] \('b\.jpg'\) and images\[2\] "
        r"\('c\.jpg'\)",
    ):
        load_coco_json(path, tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="detframe.data.coco"):
        dataset = load_coco_json(path, tmp_path / "images", on_bad="skip")
    assert [(r["image_id"], r["file_name"]) for r in dataset] == [
        (1, str(tmp_path / "images" / "a.jpg"))
    ]
    assert "skipped bad entries (duplicate image id: 2)" in caplog.text


def _no_file_name(d: dict[str, Any]) -> None:
    del d["images"][0]["file_name"]


@pytest.mark.parametrize(
    ("mutate", "message", "kind"),
    [
        (_no_file_name, r"ann\.json: image id 1: missing key 'file_name'", "missing key"),
        (None, r"ann\.json: image id 1: image file not found: .*a\.jpg", "missing image file"),
    ],
)
def test_bad_image_raises_or_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mutate: Any, message: str, kind: str
) -> None:
    data = _coco()
    if mutate is not None:
        mutate(data)
    path = _write(tmp_path, data)
    if mutate is None:
        (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=message):
        load_coco_json(path, tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="detframe.data.coco"):
        dataset = load_coco_json(path, tmp_path / "images", on_bad="skip")
    assert [r["image_id"] for r in dataset] == [2, 3]
    assert f"skipped bad entries ({kind}: 1)" in caplog.text


def _proposals(tmp_path: Path, suffix: str, ids: list[int]) -> Path:
    boxes = [
        np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], dtype=np.float32) + i for i in ids
    ]
    scores = [np.array([0.1, 0.9, 0.5], dtype=np.float32) for _ in ids]
    path = tmp_path / f"proposals{suffix}"
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"ids": ids, "boxes": boxes, "objectness_logits": scores}, f)
    elif suffix == ".npz":
        ragged = np.empty(len(ids), dtype=object)
        ragged[:] = boxes
        np.savez(path, ids=np.array(ids), boxes=ragged, objectness=np.stack(scores))
    else:
        torch.save(
            {
                "ids": ids,
                "boxes": [torch.from_numpy(b) for b in boxes],
                "objectness": [torch.from_numpy(s) for s in scores],
            },
            path,
        )
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".npz", ".pt"])
def test_proposals_matched_by_image_id_top_k(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path, _coco())
    proposals = _proposals(tmp_path, suffix, [3, 1, 2])
    dataset = load_coco_json(path, tmp_path / "images", proposals_file=proposals, proposals_top_k=2)
    for record in dataset:
        i = record["image_id"]
        expected = np.array([[1, 1, 9, 9], [2, 2, 4, 4]], dtype=np.float32) + i
        np.testing.assert_array_equal(record["proposal_boxes"], expected)
        np.testing.assert_array_equal(record["proposal_objectness_logits"], np.float32([0.9, 0.5]))
        assert record["proposal_boxes"].dtype == np.float32


def test_image_without_proposals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, _coco())
    proposals = _proposals(tmp_path, ".pkl", [1, 3])
    with pytest.raises(DatasetError, match=r"proposals\.pkl: no proposals for image id 2"):
        load_coco_json(path, tmp_path / "images", proposals_file=proposals)
    with caplog.at_level(logging.WARNING, logger="detframe.data.coco"):
        dataset = load_coco_json(path, tmp_path / "images", proposals_file=proposals, on_bad="skip")
    assert [r["image_id"] for r in dataset] == [1, 3]
    assert len(dataset[1]["proposal_boxes"]) == 3
    assert "skipped bad entries (no proposals: 1)" in caplog.text


class _TouchesMarker:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _malicious_proposals(tmp_path: Path, suffix: str, marker: Path) -> Path:
    boxes = np.zeros((1, 4), np.float32)
    payload = {"ids": [1], "boxes": [boxes], "objectness": [_TouchesMarker(marker)]}
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload))
    elif suffix == ".npz":
        scores = np.empty(1, dtype=object)
        scores[0] = _TouchesMarker(marker)
        np.savez(path, ids=np.array([1]), boxes=np.zeros((1, 1, 4)), objectness=scores)
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".npz", ".pt"])
def test_proposals_file_that_runs_code_is_refused(tmp_path: Path, suffix: str) -> None:
    path = _malicious_proposals(tmp_path, suffix, tmp_path / "marker")
    # the payload works: an unrestricted load creates the marker
    if suffix == ".pkl":
        pickle.loads(path.read_bytes())
    elif suffix == ".npz":
        np.load(path, allow_pickle=True)["objectness"]
    else:
        torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()
    (tmp_path / "marker").unlink()

    data = _write(tmp_path, _coco())
    with pytest.raises(DatasetError, match=rf"evil\{suffix}: refused to load: .*(open|needs)"):
        load_coco_json(data, tmp_path / "images", proposals_file=path, on_bad="skip")
    assert not (tmp_path / "marker").exists()
