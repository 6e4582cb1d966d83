"""Tests of the synthetic shapes dataset generator (detframe.data.shapes)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from detframe.data import shapes
from detframe.data.shapes import (
    SHAPE_CLASSES,
    SHAPE_KINDS,
    ShapesConfig,
    default_shapes_root,
    generate_shapes,
    render_image,
    shapes_split,
)

# Not square, so that a height/width mix-up shows.
SMALL = ShapesConfig(num_images=10, image_size=(72, 88), seed=3)
EVERY_KIND = ShapesConfig(
    num_images=12, image_size=(96, 112), min_instances=3, max_instances=5, classes=SHAPE_KINDS
)


def _mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


@pytest.fixture(scope="module", params=[SMALL, EVERY_KIND], ids=["small", "every_kind"])
def small_dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "small", request.param)


def test_coco_json_matches_masks_and_images(small_dataset: Path) -> None:
    coco = COCO(str(small_dataset))
    config = ShapesConfig(**json.loads(small_dataset.read_text())["info"]["config"])
    num_classes = len(config.classes)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(config.classes)
    assert sorted(coco.getCatIds()) == list(range(1, num_classes + 1))
    assert sorted(coco.getImgIds()) == list(range(1, config.num_images + 1))
    assert sorted(coco.anns) == list(range(1, len(coco.anns) + 1))
    assert len(coco.anns) >= config.num_images
    assert {a["category_id"] for a in coco.anns.values()} == set(range(1, num_classes + 1))
    kinds = set()
    for ann in coco.anns.values():
        info = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann).astype(bool)
        assert mask.shape == config.image_size == (info["height"], info["width"])
        assert ann["iscrowd"] == 0
        assert np.allclose(ann["bbox"], _mask_bbox(mask), atol=1)
        assert ann["area"] == mask.sum()
        kinds.add(type(ann["segmentation"]))
        if isinstance(ann["segmentation"], dict):
            assert isinstance(ann["segmentation"]["counts"], str)
        # The visible mask is exactly the pixels painted in the instance's single colour.
        image = cv2.imread(str(small_dataset.parent / "images" / info["file_name"]))
        assert image.shape == (*config.image_size, 3)
        assert len(np.unique(image[mask], axis=0)) == 1
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
        assert not (image[ring] == image[mask][0]).all(axis=1).all()
    assert kinds == {list, dict}  # unoccluded instances get polygons, occluded ones RLE


# Computed with detframe.data.shapes before the kinds beyond circle, square and triangle were
# added: the first 3 images of the default splits (128 x 128) must not change, since the
# quickstart's figures and every cached dataset depend on them. sha256 of annotations.json,
# and of the decoded BGR pixels of images 0, 1, 2 concatenated.
DEFAULT_SPLIT_HASHES = {
    "shapes_train": (
        "de8f401bec79be36320b4d58ab43d44217f8f342e29e2343a83272957301bc6a",
        "30d3fd59fadea0b743160fb9bb0e6b28923d45c8e4b79ed4abf4bc71aba4fd77",
    ),
    "shapes_val": (
        "77eba50cc87c23fae783e39d783d324d0ba5e99dee2b4d7c1581e0d98d0355d5",
        "9362714ee73f5b001187b17a3f3c875fb09a17af08d7415187c2980110d6ca26",
    ),
}


@pytest.mark.parametrize("split", sorted(DEFAULT_SPLIT_HASHES))
def test_default_splits_are_unchanged(tmp_path: Path, split: str) -> None:
    json_file = generate_shapes(tmp_path / split, shapes_split(split, num_images=3))
    pixels = hashlib.sha256()
    for i in range(3):
        image = cv2.imread(str(json_file.parent / "images" / f"{i:06d}.png"), cv2.IMREAD_COLOR)
        pixels.update(np.ascontiguousarray(image).tobytes())
    digests = (hashlib.sha256(json_file.read_bytes()).hexdigest(), pixels.hexdigest())
    assert digests == DEFAULT_SPLIT_HASHES[split]


def _shoelace_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# Area of each kind over its squared circumradius R, from its geometry: regular n-gons
# n/2 sin(2 pi/n); a five-pointed star with inner radius r = 0.45 R: 10 triangles of area
# R r sin(36 deg) / 2; an ellipse with semi-axes R and R/2 (as a polygon of >= 16 vertices,
# within 2.6 %); a cross of two bars 2a x 2b, b = a/3, a^2 + b^2 = R^2, overlapping in a
# 2b x 2b square.
_HALF_BAR = 1 / math.hypot(1, 1 / 3)
_AREA_OVER_R2 = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "pentagon": 2.5 * math.sin(math.radians(72)),
    "hexagon": 3 * math.sqrt(3) / 2,
    "star": 5 * 0.45 * math.sin(math.radians(36)),
    "ellipse": math.pi / 2,
    "cross": 2 * (2 * _HALF_BAR) * (2 * _HALF_BAR / 3) - (2 * _HALF_BAR / 3) ** 2,
}
_VERTICES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star": 10, "cross": 12}


def test_every_kind_has_its_geometry() -> None:
    assert SHAPE_CLASSES == ("circle", "square", "triangle") == SHAPE_KINDS[:3]
    assert set(SHAPE_KINDS) == set(_AREA_OVER_R2)
    seen = set()
    for i in range(EVERY_KIND.num_images):
        for s in render_image(EVERY_KIND, i).shapes:
            kind = EVERY_KIND.classes[s.category_id - 1]
            seen.add(kind)
            centre = s.polygon.mean(axis=0)  # every kind is point-symmetric or regular
            radius = np.linalg.norm(s.polygon - centre, axis=1).max()
            area = _shoelace_area(s.polygon)
            assert area == pytest.approx(_AREA_OVER_R2[kind] * radius**2, rel=0.026), kind
            if kind in _VERTICES:
                assert len(s.polygon) == _VERTICES[kind]
            else:
                assert len(s.polygon) >= 16
            convex = cv2.isContourConvex(s.polygon.astype(np.float32)[:, None, :])
            assert convex == (kind not in ("star", "cross")), kind
    assert seen == set(SHAPE_KINDS)


def test_same_config_gives_identical_bytes(tmp_path: Path) -> None:
    config = ShapesConfig(num_images=6, image_size=64, seed=5)
    a = generate_shapes(tmp_path / "a", config).parent
    b = generate_shapes(tmp_path / "b", config).parent
    assert (a / "annotations.json").read_bytes() == (b / "annotations.json").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(6)]
    for name in pngs:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    other = generate_shapes(tmp_path / "c", ShapesConfig(num_images=6, image_size=64, seed=6))
    assert (other.parent / "images" / pngs[0]).read_bytes() != (a / "images" / pngs[0]).read_bytes()


def test_image_does_not_depend_on_dataset_length(tmp_path: Path) -> None:
    four = generate_shapes(tmp_path / "four", ShapesConfig(num_images=4, image_size=64))
    eight = generate_shapes(tmp_path / "eight", ShapesConfig(num_images=8, image_size=64))
    for i in range(4):
        name = f"images/{i:06d}.png"
        assert (four.parent / name).read_bytes() == (eight.parent / name).read_bytes()
    anns4 = json.loads(four.read_text())["annotations"]
    anns8 = json.loads(eight.read_text())["annotations"]
    assert anns4 == [a for a in anns8 if a["image_id"] <= 4]


def test_classes_and_instance_counts() -> None:
    config = ShapesConfig(num_images=12, image_size=64, min_instances=2, max_instances=3)
    counts, labels = [], set()
    for i in range(config.num_images):
        rendered = render_image(config, i)
        assert rendered.image.shape == (64, 64, 3) and rendered.image.dtype == np.uint8
        counts.append(len(rendered.shapes))
        labels |= {s.category_id for s in rendered.shapes if s.annotated}
    assert min(counts) >= 2 and max(counts) <= 3 and len(set(counts)) == 2
    assert labels == {1, 2, 3}
    only = ShapesConfig(num_images=4, image_size=64, classes=("triangle",))
    assert {s.category_id for i in range(4) for s in render_image(only, i).shapes} == {1}


def test_later_shapes_occlude_earlier_ones() -> None:
    config = ShapesConfig(num_images=1, image_size=64, min_instances=3, max_instances=4)
    overlaps = 0
    for i in range(20):
        rendered = render_image(config, i)
        kept = [s for s in rendered.shapes if s.annotated]
        for j, early in enumerate(rendered.shapes):
            assert early.visible.sum() <= early.mask.sum()
            for late in rendered.shapes[j + 1 :]:
                assert not (early.visible & late.mask).any()
                shown = early.mask & late.visible  # where `late` covers `early` and shows
                if shown.any() and early.annotated and late.annotated:
                    overlaps += 1
                    assert (rendered.image[shown] == late.color).all()
        for j, a in enumerate(kept):
            for b in kept[j + 1 :]:
                assert not (a.visible & b.visible).any()
    assert overlaps >= 3


def test_too_occluded_instances_are_not_annotated(tmp_path: Path) -> None:
    config = ShapesConfig(
        num_images=8, image_size=64, min_instances=4, max_instances=4, min_visible_fraction=0.9
    )
    anns = json.loads(generate_shapes(tmp_path / "d", config).read_text())["annotations"]
    dropped = 0
    for i in range(config.num_images):
        shapes_i = render_image(config, i).shapes
        for s in shapes_i:
            fraction = s.visible.sum() / s.mask.sum()
            assert s.annotated == (fraction >= 0.9 and s.visible.sum() >= 16)
        dropped += sum(not s.annotated for s in shapes_i)
        expected = [s.category_id for s in shapes_i if s.annotated]
        assert [a["category_id"] for a in anns if a["image_id"] == i + 1] == expected
    assert dropped > 0


def test_shape_colours_stand_out_from_what_lies_under_them() -> None:
    for i in range(SMALL.num_images):
        rendered = render_image(SMALL, i)
        canvas = rendered.background.copy()
        for s in rendered.shapes:
            under = canvas[s.mask].astype(np.float64)
            distance = np.linalg.norm(under - np.array(s.color), axis=1)
            assert np.percentile(distance, 5) >= 60
            canvas[s.mask] = s.color
        assert (canvas == rendered.image).all()


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_reuses_same_config_and_regenerates_other(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    config = ShapesConfig(num_images=6, image_size=64)
    path = generate_shapes(root, config)
    assert root.stat().st_mode & 0o777 == 0o755
    before = _mtimes(root)
    assert generate_shapes(str(root), ShapesConfig(num_images=6, image_size=(64, 64))) == path
    assert _mtimes(root) == before
    smaller = ShapesConfig(num_images=3, image_size=64, seed=9)
    generate_shapes(root, smaller)
    assert json.loads(path.read_text())["info"]["config"] == smaller.to_json()
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folders left
    (root / "images" / "000001.png").unlink()  # an incomplete dataset is regenerated
    generate_shapes(root, smaller)
    assert (root / "images" / "000001.png").is_file()


def test_interrupted_generation_leaves_no_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    old = ShapesConfig(num_images=2, image_size=64)
    generate_shapes(root, old)
    before = _mtimes(root)

    def fail(config: ShapesConfig, index: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "render_image", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(root, ShapesConfig(num_images=5, image_size=64))
    assert _mtimes(root) == before  # the previous dataset is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "fresh", old)
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_shapes_dataset(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        generate_shapes(tmp_path, ShapesConfig(num_images=1, image_size=64))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    [
        ("num_images", 0, {}),
        ("num_images", 2.5, {}),
        ("image_size", 8, {}),
        ("image_size", (64, 64, 3), {}),
        ("min_instances", -1, {}),
        ("max_instances", 1, {"min_instances": 2}),
        ("min_size", 0.5, {}),
        ("max_size", 4, {"min_size": 8}),
        ("max_size", 60, {}),
        ("max_size", 65, {"classes": ("circle",)}),
        ("classes", ("circle", "heptagon"), {}),
        ("classes", "circle", {}),
        ("classes", (), {}),
        ("classes", ("square", "square"), {}),
        ("seed", -3, {}),
        ("seed", True, {}),
        ("min_visible_fraction", 1.5, {}),
        ("min_visible_pixels", 0, {}),
    ],
)
def test_validation_names_the_field(field: str, value: object, extra: dict) -> None:
    kwargs = {"num_images": 4, "image_size": 64, **extra, field: value}
    with pytest.raises(ValueError, match=f"ShapesConfig.{field}=") as info:
        ShapesConfig(**kwargs)
    assert repr(value) in str(info.value)


def test_config_defaults_follow_image_size() -> None:
    config = ShapesConfig(num_images=1, image_size=64)
    assert config.image_size == (64, 64)
    assert (config.min_size, config.max_size) == (8.0, 24.0)
    assert config == ShapesConfig(num_images=1, image_size=(64, 64), min_size=8, max_size=24)


def test_largest_size_fits_the_widest_kind_drawn() -> None:
    # A square's circumradius is side / sqrt(2); every other kind's is at most size / 2.
    ShapesConfig(num_images=1, image_size=64, max_size=64, classes=("circle", "star"))
    ShapesConfig(num_images=1, image_size=64, max_size=45, classes=("square",))
    with pytest.raises(ValueError, match=r"a square .* max_size \* 1.414 <= min\(image_size\)"):
        ShapesConfig(num_images=1, image_size=64, max_size=46, classes=("star", "square"))


def test_splits_and_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    train, val = shapes_split("shapes_train"), shapes_split("shapes_val")
    assert (train.num_images, train.seed, val.num_images, val.seed) == (800, 0, 200, 1)
    small = shapes_split("shapes_val", num_images=5, image_size=96)
    assert (small.num_images, small.image_size, small.seed) == (5, (96, 96), 1)
    with pytest.raises(ValueError, match="shapes_train"):
        shapes_split("shapes_test")
    monkeypatch.setenv("DETFRAME_DATA", str(tmp_path))
    assert default_shapes_root() == tmp_path / "shapes"
    monkeypatch.delenv("DETFRAME_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_shapes_root() == tmp_path / ".cache" / "detframe" / "shapes"
