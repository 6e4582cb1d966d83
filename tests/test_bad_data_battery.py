"""The bad-data battery: unreadable images under DATALOADER.ON_BAD_DATA=skip are counted and
logged, never a silent hang; evaluation honours the policy; a worker's error is readable; the
model's number of classes is checked against the datasets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from tiny_run import QUICKSTART, tiny_model_overrides

from detframe.config import ConfigError, load_config
from detframe.data import DatasetCatalog, DatasetError, DatasetMapper, register_coco
from detframe.data.build import build_test_loader, build_train_loader
from detframe.data.catalog import check_num_classes
from detframe.data.samplers import TrainingSampler
from detframe.data.transforms import ResizeShortestEdge
from detframe.engine import Trainer, default_setup

SIZE = 32


def _coco(tmp_path: Path, kinds: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """A COCO file of one image per entry of `kinds` ("good", "corrupt", "missing",
    "wrong size"), three categories, one box per image; and its loaded dataset dicts."""
    images_dir = tmp_path / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, kind in enumerate(kinds, start=1):
        path = images_dir / f"{i}_{kind.replace(' ', '_')}.png"
        if kind == "corrupt":
            path.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
        elif kind == "wrong size":
            cv2.imwrite(str(path), np.full((SIZE // 2, SIZE, 3), 90, np.uint8))
        else:
            cv2.imwrite(str(path), np.full((SIZE, SIZE, 3), 30 * i, np.uint8))
        images.append({"id": i, "file_name": path.name, "height": SIZE, "width": SIZE})
        annotations.append(
            {"id": 10 + i, "image_id": i, "category_id": 1 + i % 3, "bbox": [4, 4, 10, 12]}
        )
    json_file = tmp_path / "ann.json"
    categories = [{"id": c, "name": name} for c, name in ((1, "a"), (2, "b"), (3, "c"))]
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    catalog = DatasetCatalog()
    register_coco("battery", json_file, images_dir, catalog=catalog)
    dataset = catalog.get("battery")
    for kind, record in zip(kinds, dataset, strict=True):
        if kind == "missing":  # deleted after loading, as if removed during training
            Path(record["file_name"]).unlink()
    return json_file, dataset


def _mapper(is_train: bool, on_bad: str) -> DatasetMapper:
    return DatasetMapper(is_train, [ResizeShortestEdge([SIZE], SIZE)], on_bad=on_bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_no_readable_training_image_is_an_error_not_a_hang(
    tmp_path: Path, num_workers: int
) -> None:
    _, dataset = _coco(tmp_path, ["corrupt", "missing", "wrong size", "corrupt"])
    loader = build_train_loader(
        dataset,
        _mapper(True, "skip"),
        2,
        num_workers,
        seed=0,
        source="DATASETS.TRAIN ['battery']",
    )
    with pytest.raises(
        DatasetError,
        match=r"DATASETS.TRAIN \['battery'\]: no training sample can be used: all 4 images "
        r"were skipped \(\d+ skips: corrupt image: \d+, missing image file: 1, wrong image size",
    ):
        next(iter(loader))


def test_training_skips_are_counted_by_kind_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kinds = ["good", "corrupt", "good", "wrong size", "good", "missing"]
    _, dataset = _coco(tmp_path, kinds)
    loader = build_train_loader(
        dataset, _mapper(True, "skip"), 2, 0, seed=3, aspect_ratio_grouping=False, source="T"
    )
    with caplog.at_level(logging.WARNING, logger="detframe.data.build"):
        batches = [batch for batch, _ in zip(loader, range(6), strict=False)]
    assert all(len(b) == 2 for b in batches)
    assert all(kinds[s["image_id"] - 1] == "good" for b in batches for s in b)
    # reference: the kinds of the indices the sampler drew up to where the loader stopped
    drawn = loader.state_dict()["next_position"]
    order = [i for i, _ in zip(TrainingSampler(6, seed=3), range(drawn), strict=False)]
    expected = {
        "corrupt image": sum(kinds[i] == "corrupt" for i in order),
        "wrong image size": sum(kinds[i] == "wrong size" for i in order),
        "missing image file": sum(kinds[i] == "missing" for i in order),
    }
    assert loader.skipped == {k: n for k, n in expected.items() if n}
    assert loader.num_skipped == sum(expected.values()) > 0
    for record, kind in zip(dataset, kinds, strict=True):
        if kind != "good":
            line = f"T: skipping {record['file_name']}"
            assert caplog.text.count(line) == 1  # once per file, however often it is drawn
    assert "T: skipped 3 of the 6 samples of the last pass" in caplog.text


def test_evaluation_honours_the_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, dataset = _coco(tmp_path, ["good", "corrupt", "good"])
    corrupt = dataset[1]["file_name"]
    with caplog.at_level(logging.WARNING, logger="detframe.data.build"):
        loader = build_test_loader(
            dataset, _mapper(False, "skip"), batch_size=2, on_bad="skip", dataset_name="val"
        )
        batches = list(loader)
    assert [[s["image_id"] for s in b] for b in batches] == [[1], [3]]
    assert loader.num_skipped == 1 and loader.skipped == {"corrupt image": 1}
    assert f"dataset 'val': skipping {corrupt} (corrupt image)" in caplog.text
    assert "skipped 1 of 3 test images (corrupt image: 1); the metrics are of the other 2" in (
        caplog.text
    )
    # the error policy names the file: raised by the mapper, or by the loader for a None
    with pytest.raises(DatasetError, match=rf"cannot decode image file: {corrupt}"):
        list(build_test_loader(dataset, _mapper(False, "error")))
    with pytest.raises(DatasetError, match=rf"skipped test sample 1 \({corrupt}: corrupt image"):
        list(build_test_loader(dataset, _mapper(False, "skip"), on_bad="error"))
    _, unreadable = _coco(tmp_path / "all_bad", ["corrupt", "missing"])
    with pytest.raises(DatasetError, match=r"no test sample can be used: all 2 images"):
        list(build_test_loader(unreadable, _mapper(False, "skip"), on_bad="skip"))


def _failing_mapper(record: dict[str, Any]) -> dict[str, Any]:
    return {"area": record["annotations"][0]["area"]}  # KeyError: the dicts have no area


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_worker_error_keeps_its_type_message_sample_and_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, num_workers: int
) -> None:
    _, dataset = _coco(tmp_path, ["good", "good"])
    loader = build_test_loader(dataset, _failing_mapper, num_workers=num_workers)
    with caplog.at_level(logging.ERROR, logger="detframe.data.build"), pytest.raises(KeyError) as e:
        list(loader)
    raised = e
    assert raised.value.args == ("area",)  # the original exception, not a copy in a string
    notes = "\n".join(raised.value.__notes__)
    assert f"test sample 0 (dataset index 0, file {dataset[0]['file_name']})" in notes
    if num_workers:
        assert "in DataLoader worker 0" in notes
        assert "the worker's traceback:\nTraceback (most recent call last):\n" in notes
        assert '    return {"area": record["annotations"][0]["area"]}' in notes
        assert "DataLoader worker 0 failed on test sample 0" in caplog.text
        assert "\nKeyError: 'area'" in caplog.text


def test_num_classes_must_match_every_dataset(tmp_path: Path) -> None:
    json_file, _ = _coco(tmp_path, ["good"])
    catalog = DatasetCatalog()
    register_coco("three", json_file, tmp_path / "images", catalog=catalog)
    check_num_classes(3, ["three"], catalog=catalog)
    for wrong in (1, 2, 5):
        with pytest.raises(
            ConfigError,
            match=rf"MODEL.ROI_HEADS.NUM_CLASSES is {wrong} but dataset 'three' has 3 categories "
            r"\('a', 'b', 'c'\): set MODEL.ROI_HEADS.NUM_CLASSES=3",
        ):
            check_num_classes(wrong, ["three"], catalog=catalog)


def test_the_trainer_checks_num_classes_before_building_anything(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    overrides = [*tiny_shapes, *tiny_model_overrides(tmp_path), "MODEL.ROI_HEADS.NUM_CLASSES=2"]
    cfg = default_setup(load_config(QUICKSTART, overrides))
    with pytest.raises(ConfigError, match=r"is 2 but dataset 'tiny_train' has 3 categories"):
        Trainer(cfg)
