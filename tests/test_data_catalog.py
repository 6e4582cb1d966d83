"""Tests of detframe.data.catalog: registering, loading and errors; shapes splits are lazy."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from detframe.config import ConfigError
from detframe.data import DatasetError
from detframe.data.catalog import (
    DATASETS,
    DatasetCatalog,
    parse_shapes_entry,
    register_coco,
    register_from_config,
    register_from_config_entry,
    register_shapes,
    register_shapes_dataset,
)
from detframe.data.shapes import ShapesConfig
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


LARGE_CLASSES = ("circle", "square", "triangle", "pentagon", "hexagon", "star")


def _shapes_config(tmp_path: Path, *entries: str, on_bad: str = "error") -> DictConfig:
    """A config whose DATASETS.SHAPES lists `entries`."""
    path = tmp_path / "shapes.yaml"
    path.write_text(f"DATASETS:\n  SHAPES: {json.dumps(list(entries))}\n")
    return load_config(path, [f"DATALOADER.ON_BAD_DATA={on_bad}"])


def test_shapes_dataset_from_the_config_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFRAME_DATA", str(tmp_path))
    entry = (
        "shapes_large, num_images=10, image_size=320x384, min_size=16, max_size=200, "
        f"min_instances=3, max_instances=7, classes={';'.join(LARGE_CLASSES)}, seed=4"
    )
    cfg = _shapes_config(tmp_path, entry)
    cat = DatasetCatalog()
    assert register_from_config(cfg, catalog=cat) == ["shapes_large"]
    assert register_from_config(cfg, catalog=cat) == ["shapes_large"]  # again: a no-op
    root = tmp_path / "shapes" / "shapes_large"
    assert not root.exists()  # generated when first loaded
    meta = cat.metadata("shapes_large")
    assert meta["thing_classes"] == list(LARGE_CLASSES)
    assert meta["json_file"] == str(root / "annotations.json")
    assert meta["proposals_file"] is None
    dataset = cat.get("shapes_large")
    assert json.loads((root / "annotations.json").read_text())["info"]["config"]["seed"] == 4
    assert [r["image_id"] for r in dataset] == list(range(1, 11))
    assert all((r["height"], r["width"]) == (320, 384) for r in dataset)
    counts = [len(r["annotations"]) for r in dataset]
    assert max(counts) == 7 and min(counts) >= 1  # up to 7 drawn; occluded ones dropped
    annotations = [a for r in dataset for a in r["annotations"]]
    assert {a["category_id"] for a in annotations} == set(range(len(LARGE_CLASSES)))
    # A shape of size s spans at most s * sqrt(2) (a square's diagonal); an unoccluded one
    # (a polygon) at least s / sqrt(2) along one axis.
    sides = np.array(
        [[a["bbox"][2] - a["bbox"][0], a["bbox"][3] - a["bbox"][1]] for a in annotations]
    )
    assert sides.max() <= 200 * math.sqrt(2) + 1 and sides.max() > 3 * 320 / 8 * math.sqrt(2)
    whole = [
        s.max()
        for s, a in zip(sides, annotations, strict=True)
        if isinstance(a["segmentation"], list)
    ]
    assert min(whole) >= 16 / math.sqrt(2) - 1 and min(whole) < 320 / 8


def test_shapes_dataset_reads_its_proposals_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFRAME_DATA", str(tmp_path))
    proposals = tmp_path / "ss.pkl"
    boxes = [np.array([[0, 0, 10, 10], [5, 5, 30, 40]], np.float32), np.zeros((0, 4), np.float32)]
    scores = [np.array([0.1, 0.9], np.float32), np.zeros(0, np.float32)]
    proposals.write_bytes(pickle.dumps({"ids": [1, 2], "boxes": boxes, "objectness": scores}))
    entry = f"shapes_props,num_images=2,image_size=64,proposals={proposals}"
    cat = DatasetCatalog()
    register_from_config(_shapes_config(tmp_path, entry), catalog=cat)
    assert cat.metadata("shapes_props")["proposals_file"] == str(proposals)
    first, second = cat.get("shapes_props")
    np.testing.assert_array_equal(first["proposal_boxes"], boxes[0][::-1])  # highest first
    np.testing.assert_array_equal(first["proposal_objectness_logits"], scores[0][::-1])
    assert second["proposal_boxes"].shape == (0, 4)
    # An image missing from the file is an error, or skipped per DATALOADER.ON_BAD_DATA.
    short = tmp_path / "short.pkl"
    short.write_bytes(pickle.dumps({"ids": [2], "boxes": boxes[1:], "objectness": scores[1:]}))
    entry = f"shapes_short,num_images=2,image_size=64,proposals={short}"
    for on_bad, expected in (("error", None), ("skip", [2])):
        cfg = _shapes_config(tmp_path, entry, on_bad=on_bad)
        cat = DatasetCatalog()
        register_from_config(cfg, catalog=cat)
        if expected is None:
            with pytest.raises(DatasetError, match=r"short\.pkl: no proposals for image id 1"):
                cat.get("shapes_short")
        else:
            assert [r["image_id"] for r in cat.get("shapes_short")] == expected


def test_shapes_entry_registered_again_must_match(tmp_path: Path) -> None:
    cat = DatasetCatalog()
    register_shapes("shapes_val", catalog=cat)
    same = _shapes_config(tmp_path, "shapes_val,num_images=200,seed=1")
    assert register_from_config(same, catalog=cat) == ["shapes_val"]  # the built-in split
    other = _shapes_config(tmp_path, "shapes_val,num_images=200,seed=2")
    with pytest.raises(
        ValueError,
        match=r"'shapes_val' is already registered from .*'seed': 1.*"
        r"registered again from .*'seed': 2",
    ):
        register_from_config(other, catalog=cat)
    config = ShapesConfig(num_images=2, image_size=32)
    register_shapes_dataset("mine", config, catalog=cat)
    register_shapes_dataset("mine", ShapesConfig(num_images=2, image_size=(32, 32)), catalog=cat)
    with pytest.raises(ValueError, match=r"'proposals_file': 'p\.pkl'"):
        register_shapes_dataset("mine", config, proposals_file="p.pkl", catalog=cat)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("num_images=3", r"must start with the dataset's name"),
        (",num_images=3", r"must start with the dataset's name"),
        ("a,num_images", r"'num_images' is not KEY=VALUE"),
        ("a,num_images=", r"'num_images=' is not KEY=VALUE"),
        ("a,num_image=3", r"unknown key 'num_image'; did you mean 'num_images'\?"),
        ("a,num_images=3,seed=1,seed=2", r"key 'seed' is given twice"),
        ("a,seed=1", r"num_images=N is required"),
        ("a,num_images=2.5", r"num_images='2.5' is not an int"),
        ("a,num_images=3,image_size=64x", r"image_size='64x' is not an int S or HxW"),
        ("a,num_images=3,max_size=big", r"max_size='big' is not a number"),
        ("a,num_images=3,classes=circle;heptagon", r"ShapesConfig.classes=\('circle', 'heptag"),
        ("a,num_images=3,image_size=64,max_size=60", r"ShapesConfig.max_size=60.0 is invalid"),
        ("a,num_images=3,min_instances=3,max_instances=2", r"ShapesConfig.max_instances=2 is"),
    ],
)
def test_bad_shapes_entries_name_the_entry_and_the_problem(
    tmp_path: Path, entry: str, message: str
) -> None:
    cfg = _shapes_config(tmp_path, entry)
    with pytest.raises(
        ConfigError, match=rf"^DATASETS.SHAPES: entry '{re.escape(entry)}'.*{message}"
    ):
        register_from_config(cfg, catalog=DatasetCatalog())
    with pytest.raises(ConfigError, match=message):
        parse_shapes_entry(entry)


def test_parse_shapes_entry() -> None:
    name, config, proposals = parse_shapes_entry(
        " big , num_images = 5 ,image_size=320x480, classes=star; cross ,min_visible_fraction=0.5"
    )
    assert (name, proposals) == ("big", None)
    assert config == ShapesConfig(
        num_images=5, image_size=(320, 480), classes=("star", "cross"), min_visible_fraction=0.5
    )
    assert parse_shapes_entry("s,num_images=1,image_size=64,proposals=a/b.npz")[2] == "a/b.npz"
