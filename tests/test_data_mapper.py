"""Tests of detframe.data.mapper.DatasetMapper: image reading, bad files, consistent targets."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detframe.data.catalog import DatasetCatalog, register_shapes
from detframe.data.coco import DatasetError, load_coco_json
from detframe.data.mapper import DatasetMapper
from detframe.data.transforms import (
    RandomFlip,
    ResizeShortestEdge,
    TorchvisionResizeShortestEdge,
)
from detframe.registry import MAPPER_REGISTRY, build
from detframe.structures.masks import BitMasks


def _augs(lengths: tuple[int, ...] = (48, 64, 96)) -> list:
    return [ResizeShortestEdge(lengths, 200), RandomFlip()]


def _coco_dataset(root: Path) -> list[dict]:
    """Two PNGs: one with a polygon, a compressed RLE and a crowd RLE; one empty."""
    h, w = 40, 60
    for name in ("a.png", "empty.png"):
        cv2.imwrite(str(root / name), np.full((h, w, 3), 128, np.uint8))
    rle_mask = np.zeros((h, w), np.uint8)
    rle_mask[5:20, 30:50] = 1
    rle = mask_util.encode(np.asfortranarray(rle_mask))
    crowd = np.zeros((h, w), np.uint8)
    crowd[25:35, 2:12] = 1
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "empty.png", "height": h, "width": w},
        ],
        "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "bbox": [4, 6, 10, 12],
                "segmentation": [[4, 6, 14, 6, 14, 18, 4, 18]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "bbox": [30, 5, 20, 15],
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 3,
                "bbox": [2, 25, 10, 10],
                "iscrowd": 1,
                "segmentation": {"size": [h, w], "counts": counts},
            },
        ],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return load_coco_json(root / "ann.json", root)


def _shapes_dataset(root: Path) -> list[dict]:
    catalog = DatasetCatalog()
    register_shapes("shapes_train", num_images=8, image_size=64, root=root, catalog=catalog)
    return catalog.get("shapes_train")


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("source", ["shapes", "coco"])
def test_mask_boxes_follow_transformed_boxes(tmp_path: Path, source: str, mask_format: str) -> None:
    dataset = _shapes_dataset(tmp_path) if source == "shapes" else _coco_dataset(tmp_path)
    lengths = (48, 64, 96)
    if mask_format == "polygon":  # polygon format takes polygon segmentations only
        for record in dataset:
            record["annotations"] = [
                a for a in record["annotations"] if not isinstance(a["segmentation"], dict)
            ]
    mapper = DatasetMapper(True, _augs(lengths), mask_on=True, mask_format=mask_format, seed=0)
    sizes, counted = set(), 0
    for record in dataset:
        for _ in range(3):
            out = mapper(record)
            inst = out["instances"]
            assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
            assert inst.image_size == tuple(out["image"].shape[1:])
            assert (out["height"], out["width"]) == (record["height"], record["width"])
            assert len(inst) == sum(1 for a in record["annotations"] if not a["iscrowd"])
            masks = inst.gt_masks
            if mask_format == "polygon":
                masks = BitMasks.from_polygon_masks(masks, *inst.image_size)
            assert masks.tensor.shape[1:] == out["image"].shape[1:]
            diff = (masks.get_bounding_boxes().tensor - inst.gt_boxes.tensor).abs()
            assert diff.numel() == 0 or diff.max() <= 1.0 + 1e-4, (record["file_name"], diff)
            counted += len(inst)
            sizes.add(inst.image_size)
    assert counted > 0 and len(sizes) == min(len(lengths), 3)


def test_coco_classes_and_crowd_dropped(tmp_path: Path) -> None:
    dataset = _coco_dataset(tmp_path)
    out = DatasetMapper(True, [], mask_on=True, mask_format="bitmask")(dataset[0])
    assert out["instances"].gt_classes.tolist() == [0, 1]
    assert out["instances"].gt_classes.dtype == torch.int64
    empty = DatasetMapper(True, _augs(), mask_on=True, mask_format="bitmask")(dataset[1])
    assert len(empty["instances"]) == 0 and empty["instances"].gt_masks.tensor.shape[0] == 0


def test_rle_with_polygon_format_raises_naming_the_file(tmp_path: Path) -> None:
    record = _coco_dataset(tmp_path)[0]
    with pytest.raises(DatasetError, match=r"a\.png.*RLE"):
        DatasetMapper(True, [], mask_on=True, mask_format="polygon")(record)


@pytest.mark.parametrize("segmentation", [None, []])
def test_mask_target_without_segmentation_raises_naming_the_annotation(
    tmp_path: Path, segmentation: list | None
) -> None:
    record = _coco_dataset(tmp_path)[0]
    annotation = dict(record["annotations"][0])
    if segmentation is None:
        del annotation["segmentation"]
    else:
        annotation["segmentation"] = segmentation
    record = {**record, "annotations": [annotation]}
    for mask_format in ("polygon", "bitmask"):
        mapper = DatasetMapper(True, [], mask_on=True, mask_format=mask_format)
        with pytest.raises(DatasetError, match=rf"{record['file_name']}: annotation .* has no seg"):
            mapper(record)
    # A box-only model does not need them.
    assert len(DatasetMapper(True, [], mask_on=False)(record)["instances"]) == 1


def test_eval_mode_has_no_instances_unless_asked(tmp_path: Path) -> None:
    record = _coco_dataset(tmp_path)[0]
    augs = [ResizeShortestEdge((80,), 1000)]
    out = DatasetMapper(False, augs)(record)
    assert "instances" not in out and out["image"].shape == (3, 80, 120)
    out = DatasetMapper(False, augs, instances_in_eval=True)(record)
    assert len(out["instances"]) == 2


def test_proposals_move_with_the_image(tmp_path: Path) -> None:
    record = _coco_dataset(tmp_path)[0]  # 40 x 60
    record["proposal_boxes"] = np.array(
        [[0, 0, 30, 20], [50, 10, 70, 30], [60, 0, 80, 10]], np.float32
    )  # the second sticks out, the third is outside the image
    record["proposal_objectness_logits"] = np.array([3.0, 2.0, 1.0], np.float32)
    flip = RandomFlip(prob=1.0)
    for is_train in (True, False):
        out = DatasetMapper(is_train, [ResizeShortestEdge((80,), 1000), flip])(record)
        proposals = out["proposals"]
        assert proposals.image_size == (80, 120)
        # x2 := 2 * (60 - x1), x1 := 2 * (60 - x2); y doubled; clipped to 120 x 80.
        expected = torch.tensor([[60.0, 0, 120, 40], [0, 20, 20, 60]])
        assert torch.equal(proposals.proposal_boxes.tensor, expected)
        assert torch.equal(proposals.objectness_logits, torch.tensor([3.0, 2.0]))


@pytest.mark.parametrize(
    ("thresh", "kept"),
    [(0.0, [0, 1, 2, 3]), (0.7, [2, 3]), (0.8, [1, 2, 3]), (0.5, [3]), (1.0, [0, 1, 2, 3])],
)
def test_training_drops_proposals_inside_crowd_regions(
    tmp_path: Path, thresh: float, kept: list[int]
) -> None:
    record = _coco_dataset(tmp_path)[0]  # crowd box XYWH [2, 25, 10, 10]: XYXY [2, 25, 12, 35]
    # Fractions of each proposal's area inside the crowd box, by hand: 100/100, 80/100
    # (x 2..10 of 0..10), 100/150 (y 25..35 of 20..35), 0.
    proposals = [[2, 25, 12, 35], [0, 25, 10, 35], [2, 20, 12, 35], [30, 0, 50, 20]]
    record["proposal_boxes"] = np.array(proposals, np.float32)
    record["proposal_objectness_logits"] = np.array([4.0, 3.0, 2.0, 1.0], np.float32)
    train = DatasetMapper(True, [], proposal_crowd_filter_thresh=thresh)(record)["proposals"]
    assert train.objectness_logits.tolist() == [4.0 - i for i in kept]
    evaluation = DatasetMapper(False, [], proposal_crowd_filter_thresh=thresh)(record)
    assert len(evaluation["proposals"]) == 4  # evaluation keeps every proposal
    del record["annotations"][2]  # no crowd region: nothing is dropped
    assert len(DatasetMapper(True, [], proposal_crowd_filter_thresh=0.7)(record)["proposals"]) == 4


def test_proposal_crowd_filter_thresh_is_checked() -> None:
    with pytest.raises(ValueError, match=r"proposal_crowd_filter_thresh must be in \[0, 1\]"):
        DatasetMapper(True, [], proposal_crowd_filter_thresh=1.5)


def test_rgb_format_reverses_channels(tmp_path: Path) -> None:
    image = np.zeros((8, 10, 3), np.uint8)
    image[..., 0] = 200  # blue in BGR
    cv2.imwrite(str(tmp_path / "b.png"), image)
    record = {"file_name": str(tmp_path / "b.png"), "height": 8, "width": 10, "image_id": 1}
    assert DatasetMapper(False, [], image_format="BGR")(record)["image"][0].min() == 200
    assert DatasetMapper(False, [], image_format="RGB")(record)["image"][2].min() == 200


@pytest.mark.parametrize("kind", ["gray", "rgba"])
def test_gray_and_rgba_give_three_channels(tmp_path: Path, kind: str) -> None:
    image = (
        np.full((12, 20), 90, np.uint8) if kind == "gray" else np.full((12, 20, 4), 90, np.uint8)
    )
    cv2.imwrite(str(tmp_path / "i.png"), image)
    assert cv2.imread(str(tmp_path / "i.png"), cv2.IMREAD_UNCHANGED).shape == image.shape
    record = {"file_name": str(tmp_path / "i.png"), "height": 12, "width": 20, "image_id": 1}
    out = DatasetMapper(False, [ResizeShortestEdge((24,), 100)])(record)
    assert out["image"].shape == (3, 24, 40)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image", reason="pillow is needed to write EXIF tags")
    stored = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40 as stored
    stored[:, :20] = 255
    exif = image_mod.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image_mod.fromarray(stored).save(tmp_path / "r.jpg", exif=exif)
    record = {"file_name": str(tmp_path / "r.jpg"), "height": 40, "width": 20, "image_id": 1}
    out = DatasetMapper(False, [])(record)
    assert out["image"].shape == (3, 40, 20)
    assert out["image"][:, :18].float().mean() > 200 and out["image"][:, 22:].float().mean() < 50
    with pytest.raises(DatasetError, match="20x40"):
        DatasetMapper(False, [])({**record, "height": 20, "width": 40})


def test_bad_files_raise_naming_the_file_or_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((10, 12, 3), np.uint8))
    missing = {"file_name": str(tmp_path / "missing.png"), "height": 10, "width": 12, "image_id": 1}
    corrupt = {**missing, "file_name": str(tmp_path / "corrupt.png")}
    wrong = {**missing, "file_name": str(tmp_path / "ok.png"), "height": 11}
    mapper = DatasetMapper(True, [])
    with pytest.raises(DatasetError, match=r"missing\.png"):
        mapper(missing)
    with pytest.raises(DatasetError, match=r"corrupt\.png"):
        mapper(corrupt)
    with pytest.raises(DatasetError, match=r"ok\.png.*10x12.*11x12"):
        mapper(wrong)
    skipping = DatasetMapper(True, [], on_bad="skip")
    assert skipping(missing) is None and skipping(corrupt) is None and skipping(wrong) is None
    assert sum(skipping.skipped.values()) == 3


def test_mapper_is_deterministic_given_rng(tmp_path: Path) -> None:
    record = _coco_dataset(tmp_path)[0]
    mapper = DatasetMapper(True, _augs((20, 40, 60, 80)))

    def boxes(seed: int) -> list:
        rng = np.random.default_rng(seed)
        return [mapper(record, rng)["instances"].gt_boxes.tensor.tolist() for _ in range(8)]

    assert boxes(1) == boxes(1)
    assert boxes(1) != boxes(2)


def test_unseeded_mapper_follows_numpy_global_state(tmp_path: Path) -> None:
    """The training loader seeds numpy's global state per worker; an unseeded mapper must
    draw from it, so workers differ from each other and runs with one SEED repeat."""
    record = _coco_dataset(tmp_path)[0]
    mapper = DatasetMapper(True, _augs((20, 40, 60, 80)))

    def boxes(seed: int) -> list:
        np.random.seed(seed)
        return [mapper(record)["instances"].gt_boxes.tensor.tolist() for _ in range(8)]

    assert boxes(1) == boxes(1)
    assert boxes(1) != boxes(2)


def _config(resize_method: str):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "INPUT": {
                "MIN_SIZE_TRAIN": [32, 40],
                "MAX_SIZE_TRAIN": 90,
                "MIN_SIZE_TEST": 36,
                "MAX_SIZE_TEST": 80,
                "FORMAT": "RGB",
                "RANDOM_FLIP": "none",
                "MASK_FORMAT": "bitmask",
                "RESIZE_METHOD": resize_method,
            },
            "MODEL": {"MASK_ON": True},
            "DATALOADER": {"ON_BAD_DATA": "skip", "PROPOSAL_CROWD_FILTER_THRESH": 0.7},
        }
    )


def test_from_config_builds_train_and_test_mappers() -> None:
    cfg = _config("opencv")
    train = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    assert train.is_train and train.mask_on and train.mask_format == "bitmask"
    assert train.on_bad == "skip" and train.proposal_crowd_filter_thresh == 0.7
    assert [type(a).__name__ for a in train.augmentations] == ["ResizeShortestEdge"]
    assert train.augmentations[0].short_edge_lengths == (32, 40)
    test = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    assert test.augmentations[0].short_edge_lengths == (36,) and test.image_format == "RGB"
    assert test.augmentations[0].max_size == 80 and not test.is_train
    # Registered under its class name, with the registry's protocol from_config(cfg, is_train).
    assert MAPPER_REGISTRY.get("DatasetMapper") is DatasetMapper
    built = build(MAPPER_REGISTRY, "DatasetMapper", cfg, True)
    assert isinstance(built, DatasetMapper) and built.is_train


def test_torchvision_resize_method_gives_torchvision_pixels_and_targets(tmp_path: Path) -> None:
    """INPUT.RESIZE_METHOD=torchvision: the image is torchvision's float resize of the file
    (float32 in training, float64 at test), boxes and masks follow it as torchvision's do."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    (record,) = [r for r in _coco_dataset(tmp_path) if r["annotations"]]
    rgb = torch.from_numpy(cv2.imread(record["file_name"])[:, :, ::-1].copy()).permute(2, 0, 1)
    cfg = _config("torchvision")
    test = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    assert [type(a) for a in test.augmentations] == [TorchvisionResizeShortestEdge]
    out = test(record)
    expected, _ = _resize_image_and_masks(rgb.double(), 36, 80)
    assert out["image"].dtype == torch.float64 and torch.equal(out["image"], expected)

    train = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True), seed=0)
    out = train(record)
    size = out["image"].shape[1]
    assert out["image"].dtype == torch.float32 and size in (32, 40)
    instances = out["instances"]
    rle = mask_util.decode(record["annotations"][1]["segmentation"])
    expected, target = _resize_image_and_masks(
        rgb.float(), size, 90, {"masks": torch.from_numpy(rle)[None]}
    )
    assert torch.equal(out["image"], expected)
    assert instances.image_size == tuple(expected.shape[1:])
    scale = torch.tensor([expected.shape[2] / 60, expected.shape[1] / 40] * 2)
    first = torch.tensor(record["annotations"][0]["bbox"], dtype=torch.float32)  # XYXY
    torch.testing.assert_close(instances.gt_boxes.tensor[0], first * scale)
    # The RLE annotation is resized as a bitmask, by torchvision's nearest interpolation.
    assert torch.equal(instances.gt_masks.tensor[1], target["masks"][0].bool())
