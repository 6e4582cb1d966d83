"""Tests of detframe.data.catalog: registering, loading and errors; shapes splits are lazy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detframe.config import ConfigError
from detframe.data import DatasetError
from detframe.data.catalog import (
    DATASETS,
    DatasetCatalog,
    register_coco,
    register_from_config,
    register_from_config_entry,
    register_shapes,
)
from detframe.engine.setup import load_config
from detframe.registry import DATASET_REGISTRY


def _coco_folder(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 10, "width": 12}],
        "categories": [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, images


def test_register_coco_loads_lazily_with_metadata(tmp_path: Path) -> None:
    json_file, images = _coco_folder(tmp_path)
    cat = DatasetCatalog()
    register_coco("mine", tmp_path / "later.json", images, catalog=cat)  # nothing read yet
    register_coco("mine_ok", json_file, images, catalog=cat)
    assert cat.names() == ["mine", "mine_ok"] and "mine_ok" in cat
    with pytest.raises(FileNotFoundError):
        cat.get("mine")
    dataset = cat.get("mine_ok")
    assert [r["image_id"] for r in dataset] == [7]
    assert dataset[0]["annotations"] == [
        {"bbox": [1.0, 1.0, 3.0, 3.0], "category_id": 1, "iscrowd": 0}
    ]
    meta = cat.metadata("mine_ok")
    assert meta == {
        "thing_classes": ["a", "b"],
        "dataset_id_to_contiguous_id": {1: 0, 3: 1},
        "contiguous_id_to_dataset_id": {0: 1, 1: 3},
        "json_file": str(json_file),
        "image_root": str(images),
        "proposals_file": None,
        "evaluator_type": "coco",
    }


def test_unknown_and_duplicate_names() -> None:
    cat = DatasetCatalog()
    cat.register("shapes_val", list)
    with pytest.raises(KeyError, match=r"'shapes_vall'.*Did you mean 'shapes_val'.*shapes_val"):
        cat.get("shapes_vall")
    with pytest.raises(ValueError, match="already registered"):
        cat.register("shapes_val", list)
    with pytest.raises(KeyError, match=r"Registered names: .*shapes_train.*shapes_val"):
        DATASETS.metadata("coco_2017_train")


def test_default_catalog_is_the_dataset_registry() -> None:
    assert {"shapes_train", "shapes_val"} <= set(DATASET_REGISTRY.names())
    assert DATASETS.entry("shapes_val") is DATASET_REGISTRY.get("shapes_val")


def test_register_from_config_entry(tmp_path: Path) -> None:
    json_file, images = _coco_folder(tmp_path)
    cat = DatasetCatalog()
    register_from_config_entry("mine", str(json_file), str(images), catalog=cat)
    register_from_config_entry("mine", json_file, images, catalog=cat)  # same files: no-op
    assert cat.names() == ["mine"]
    assert len(cat.get("mine")) == 1
    with pytest.raises(ValueError, match="already registered"):
        register_from_config_entry("mine", tmp_path / "other.json", images, catalog=cat)


def test_coco_dataset_from_the_config_alone(tmp_path: Path) -> None:
    json_file, images = _coco_folder(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text(f"DATASETS:\n  COCO: ['mine, {json_file}, {images}']\n  TRAIN: [mine]\n")
    cfg = load_config(config)
    cat = DatasetCatalog()
    assert register_from_config(cfg, catalog=cat) == ["mine"]
    assert register_from_config(cfg, catalog=cat) == ["mine"]  # loading twice is fine
    assert [cat.get(name) for name in cfg.DATASETS.TRAIN] == [cat.get("mine")]
    assert cat.metadata("mine")["json_file"] == str(json_file)
    # DATALOADER.ON_BAD_DATA reaches the loader: a degenerate box is an error, or skipped.
    data = json.loads(json_file.read_text())
    data["annotations"].append({**data["annotations"][0], "id": 999, "bbox": [1, 1, 0, 5]})
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    entry = f"DATASETS.COCO=['broken, {broken}, {images}']"
    strict, lenient = DatasetCatalog(), DatasetCatalog()
    register_from_config(load_config(config, [entry]), catalog=strict)
    register_from_config(load_config(config, [entry, "DATALOADER.ON_BAD_DATA=skip"]), lenient)
    with pytest.raises(DatasetError, match=r"broken\.json"):
        strict.get("broken")
    assert lenient.get("broken") == cat.get("mine")
    bad = load_config(config, [f"DATASETS.COCO=['mine,{json_file}']"])
    with pytest.raises(ConfigError, match=r"DATASETS.COCO: entry 'mine,.*' must be 'NAME,"):
        register_from_config(bad, catalog=DatasetCatalog())


def test_shapes_split_is_generated_on_first_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFRAME_DATA", str(tmp_path))
    root = tmp_path / "shapes" / "shapes_val"
    meta = DATASETS.metadata("shapes_val")  # the default entry resolves its root now
    assert meta["json_file"] == str(root / "annotations.json")
    assert meta["thing_classes"] == ["circle", "square", "triangle"]
    cat = DatasetCatalog()
    register_shapes("shapes_val", num_images=2, image_size=32, catalog=cat)
    assert not (tmp_path / "shapes").exists()
    dataset = cat.get("shapes_val")
    assert (root / "annotations.json").is_file()
    assert [r["image_id"] for r in dataset] == [1, 2]
    assert all(Path(r["file_name"]).is_file() for r in dataset)
    assert all((r["height"], r["width"]) == (32, 32) for r in dataset)
    assert all(0 <= a["category_id"] < 3 for r in dataset for a in r["annotations"])
    assert cat.metadata("shapes_val") == meta
