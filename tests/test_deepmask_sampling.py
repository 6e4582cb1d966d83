"""Tests of detframe.data.deepmask_sampling: DeepMask's training patches.

The statistics are checked over many draws against the geometry recomputed here from the
boxes (positives: centre within +-SHIFT, size within +-SCALE_JITTER octaves of the canonical
size; negatives: off every object by the paper's margins), labels and pixels against values
worked out by hand, and the release's traps (80 hard-coded categories, polygons only, an
endless loop without a valid annotation) each by a test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detframe.data.build import build_train_loader
from detframe.data.catalog import register_from_config
from detframe.data.coco import DatasetError, load_coco_json
from detframe.data.deepmask_sampling import (
    DeepMaskPatchMapper,
    Patch,
    PatchGeometry,
    category_balance,
    invalid_reason,
)
from detframe.data.mapper import DatasetMapper
from detframe.engine.setup import load_config
from detframe.registry import MAPPER_REGISTRY, build

P, W, OBJ, L = 192, 160, 92, 112  # the release's sizes, the defaults
SHIFT, JITTER = 16.0, 0.25
NEG_SHIFT, NEG_SCALE = 32.0, 1.0


def take(iterable: object, n: int) -> list:
    """The first n items of an iterable."""
    return list(itertools.islice(iter(iterable), n))


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A rectangle as a COCO polygon."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(box: tuple[float, float, float, float], category: int = 0, **extra: object) -> dict:
    """A non-crowd annotation (box XYXY) whose segmentation is its box, unless given."""
    return {
        "bbox": list(box),
        "category_id": category,
        "iscrowd": 0,
        "segmentation": [_rect(*box)],
    } | extra


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _record(
    annotations: list[dict], height: int = 200, width: int = 240, name: str = "x.png"
) -> dict:
    return {
        "file_name": name,
        "height": height,
        "width": width,
        "image_id": 1,
        "annotations": annotations,
    }


def _records() -> list[dict]:
    """Images with objects of several sizes, plus annotations no positive may use."""
    return [
        _record([_ann((10, 20, 60, 50)), _ann((100, 100, 220, 190), 1)]),
        _record([_ann((5, 5, 25, 40), 1), _ann((30, 30, 35, 120)), _ann((50, 50, 52, 53))]),
        _record([_ann((0, 0, 200, 200), 0, iscrowd=1), _ann((120, 10, 180, 90), 2)], 200, 300),
    ]


def _object_offsets(patch: Patch, box: list[float]) -> tuple[np.ndarray, float]:
    """(dx, dy) of the box centre from the patch centre in patch pixels, through the patch
    mapping u = s (x - cx) + P / 2; and log2 of the box's larger side over the canonical."""
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    in_patch = patch.scale * (centre - np.array(patch.center)) + P / 2
    size = max(box[2] - box[0], box[3] - box[1]) * patch.scale
    return in_patch - P / 2, float(np.log2(size / OBJ))


def test_positives_are_centred_within_the_shift_and_scale_jitter() -> None:
    mapper = DeepMaskPatchMapper(True)
    records = _records()
    rng = np.random.default_rng(0)
    offsets, octaves = [], []
    for i in range(2000):
        record = records[i % len(records)]
        patch = mapper.sample_positive(record, rng)
        annotation = record["annotations"][patch.annotation]
        box = annotation["bbox"]
        assert not annotation["iscrowd"] and min(box[2] - box[0], box[3] - box[1]) >= 5
        offset, octave = _object_offsets(patch, box)
        offsets.append(offset)
        octaves.append(octave)
    offsets, octaves = np.array(offsets), np.array(octaves)
    assert np.abs(offsets).max() <= SHIFT + 1e-9
    assert np.abs(octaves).max() <= JITTER + 1e-9
    # uniform over the whole range: its ends are reached, its middle is the mean
    assert offsets.min(axis=0).max() < -15 and offsets.max(axis=0).min() > 15
    assert octaves.min() < -0.24 and octaves.max() > 0.24
    assert np.abs(offsets.mean(axis=0)).max() < 1.0 and abs(octaves.mean()) < 0.02


def _is_off_every_object(patch: Patch, annotations: list[dict]) -> bool:
    for annotation in annotations:
        offset, octave = _object_offsets(patch, annotation["bbox"])
        if np.abs(offset).max() < NEG_SHIFT and abs(octave) < NEG_SCALE:
            return False
    return True


def test_negatives_are_off_every_object_by_the_margins() -> None:
    mapper = DeepMaskPatchMapper(True)
    records = _records()
    rng = np.random.default_rng(1)
    scales = []
    for i in range(2000):
        record = records[i % len(records)]
        patch = mapper.sample_negative(
            record["annotations"], record["height"], record["width"], rng
        )
        assert patch.annotation is None
        assert _is_off_every_object(patch, record["annotations"])  # crowds included
        assert 0 <= patch.center[0] <= record["width"] and 0 <= patch.center[1] <= record["height"]
        scales.append(np.log2(patch.scale))
    assert min(scales) >= -3 and max(scales) <= 2
    assert min(scales) < -2.9 and max(scales) > 1.9


def test_a_negative_from_an_image_full_of_objects_zooms_out() -> None:
    # At scale 1, 92-pixel objects every 40 pixels: every centre is near an object's.
    centres = [20, 60, 100]
    annotations = [_ann((x - 46, y - 46, x + 46, y + 46)) for x in centres for y in centres]
    mapper = DeepMaskPatchMapper(True, negative_log2_scales=(0.0, 0.0))
    rng = np.random.default_rng(2)
    for _ in range(20):
        patch = mapper.sample_negative(annotations, 120, 120, rng)
        assert patch.scale == pytest.approx(0.5)  # the largest object is one octave small
        assert _is_off_every_object(patch, annotations)


def _balanced_dataset() -> list[dict]:
    """Category 7: 40 valid objects; 3: 4; 11: 1; 5: only a crowd and a tiny object."""
    records = [
        _record([_ann((10, 10, 60, 60), 7), _ann((100, 100, 150, 150), 7)]) for _ in range(20)
    ]
    records += [
        _record([_ann((10, 10, 60, 60), 3), _ann((70, 70, 90, 90), 7, iscrowd=1)]) for _ in range(4)
    ]
    records.append(
        _record(
            [_ann((10, 10, 60, 60), 11), _ann((0, 0, 3, 3), 5), _ann((5, 5, 90, 90), 5, iscrowd=1)]
        )
    )
    return records


def test_category_balance_over_the_datasets_own_categories() -> None:
    records = _balanced_dataset()
    balance = category_balance(records)
    assert balance.category_weights == pytest.approx({7: 1 / 40, 3: 1 / 4, 11: 1.0})
    assert balance.image_weights.sum() == pytest.approx(1.0)  # a probability over images
    rng = np.random.default_rng(3)
    draws = 3000

    def shares(mapper: DeepMaskPatchMapper, image_p: np.ndarray | None) -> dict[int, float]:
        counts: dict[int, int] = {}
        for _ in range(draws):
            record = records[rng.choice(len(records), p=image_p)]
            patch = mapper.sample_positive(record, rng)
            category = record["annotations"][patch.annotation]["category_id"]
            counts[category] = counts.get(category, 0) + 1
        return {category: n / draws for category, n in counts.items()}

    mapper = DeepMaskPatchMapper(True, category_balance=True)
    image_weights = mapper.prepare_dataset(records)
    assert mapper.category_weights == balance.category_weights
    np.testing.assert_array_equal(image_weights, balance.image_weights)
    balanced = shares(mapper, image_weights)
    assert set(balanced) == {3, 7, 11}
    assert all(abs(share - 1 / 3) < 0.04 for share in balanced.values())
    # The same draws with neither weighting follow the instance counts instead.
    assert shares(DeepMaskPatchMapper(True), None)[7] > 0.75


def test_no_valid_annotation_raises_or_skips_instead_of_looping() -> None:
    record = _record(
        [
            _ann((0, 0, 100, 100), iscrowd=1),
            _ann((10, 10, 14, 40)),  # 4 pixels wide
            _ann((50, 50, 59, 59)),  # 81 pixels
            {"bbox": [100, 100, 150, 150], "category_id": 0, "iscrowd": 0},
        ],
        name="/data/no_valid.png",
    )
    mapper = DeepMaskPatchMapper(True, positive_fraction=1.0)
    with pytest.raises(
        DatasetError,
        match=r"no_valid\.png.*area < 100: 1.*box side < 5: 1.*crowd: 1.*no segmentation: 1",
    ):
        mapper(record, np.random.default_rng(0))
    skipping = DeepMaskPatchMapper(True, positive_fraction=1.0, on_bad="skip")
    assert skipping(record, np.random.default_rng(0)) is None
    assert skipping.skipped == {"no valid annotation for a positive patch": 1}
    with pytest.raises(
        DatasetError, match=r"DATASETS.TRAIN \['mine'\]: no annotation of its 1 images"
    ):
        category_balance([record], source="DATASETS.TRAIN ['mine']")


def _scene(height: int = 200, width: int = 240) -> np.ndarray:
    """A textured image, so that any misplaced pixel shows."""
    rng = np.random.default_rng(4)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("form", ["polygon", "rle"])
def test_label_is_the_centred_object_over_the_window(form: str) -> None:
    # Scale 160 / 112 with centre (100, 100): the window is image [44, 156)^2 and one label
    # cell is one image pixel, so label cell (r, c) is image pixel (44 + r, 44 + c).
    a_box, b_box = (70, 64, 130, 136), (132, 80, 170, 120)
    a_mask = np.zeros((200, 240), bool)
    a_mask[64:136, 70:130] = True
    a_segm = [_rect(*a_box)] if form == "polygon" else _rle(a_mask)
    b_mask = np.zeros((200, 240), bool)
    b_mask[80:120, 132:170] = True
    annotations = [_ann(a_box, segmentation=a_segm), _ann(b_box, 1, segmentation=_rle(b_mask))]
    mapper = DeepMaskPatchMapper(True)
    out = mapper.render(_scene(), annotations, Patch((100.0, 100.0), 160 / 112, 0))
    expected = -np.ones((L, L), np.float32)
    expected[64 - 44 : 136 - 44, 70 - 44 : 130 - 44] = 1
    assert out["patch_score"].dtype == torch.float32 and out["patch_score"].item() == 1.0
    assert out["patch_mask"].dtype == torch.float32 and out["patch_mask"].shape == (L, L)
    np.testing.assert_array_equal(out["patch_mask"].numpy(), expected)
    assert (out["patch_mask"][80 - 44 : 120 - 44, 132 - 44 :] == -1).all()  # object B
    negative = mapper.render(_scene(), annotations, Patch((100.0, 100.0), 160 / 112, None))
    assert negative["patch_score"].item() == -1.0 and (negative["patch_mask"] == -1).all()


def test_patch_pixels_are_the_image_and_padding_elsewhere() -> None:
    image = _scene(50, 60)
    mapper = DeepMaskPatchMapper(True, pad_value=7)
    out = mapper.render(image, [], Patch((30.0, 25.0), 1.0, None))
    # Scale 1, centre (30, 25): patch pixel (r, c) is image pixel (r - 71, c - 66).
    expected = np.full((P, P, 3), 7, np.uint8)
    expected[71:121, 66:126] = image
    assert out["image"].dtype == torch.uint8 and (out["height"], out["width"]) == (P, P)
    np.testing.assert_array_equal(out["image"].numpy(), expected.transpose(2, 0, 1))


def test_patch_resampling_is_bilinear_with_pixel_centres() -> None:
    # A 48-pixel image at scale 4 fills the patch: torch's bilinear resize to 192 with
    # align_corners=False (pixel centres at k + 0.5) is the reference, inside the border.
    image = _scene(48, 48)
    out = DeepMaskPatchMapper(True).render(image, [], Patch((24.0, 24.0), 4.0, None))
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(P, P), mode="bilinear"
    )[0]
    difference = (out["image"].float() - reference)[:, 4:-4, 4:-4].abs()
    assert difference.max() <= 1  # uint8 rounding


@pytest.mark.parametrize(
    ("scale", "centre"), [(1.7, (97.3, 101.1)), (0.6, (90.2, 99.7)), (3.1, (95.5, 92.25))]
)
def test_rle_and_polygon_labels_agree_at_any_scale(
    scale: float, centre: tuple[float, float]
) -> None:
    box = (70.0, 64.0, 130.0, 136.0)
    mask = np.zeros((200, 240), bool)
    mask[64:136, 70:130] = True
    mapper, patch = DeepMaskPatchMapper(True), Patch(centre, scale, 0)
    polygon = mapper.render(_scene(), [_ann(box)], patch)["patch_mask"]
    rle = mapper.render(_scene(), [_ann(box, segmentation=_rle(mask))], patch)["patch_mask"]
    assert (polygon > 0).sum() > 100
    assert (polygon != rle).sum() <= 4  # a cell whose centre is on the edge may differ


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_flip_mirrors_image_and_label_together(axis: str) -> None:
    annotations = [_ann((70, 64, 130, 136))]
    mapper = DeepMaskPatchMapper(True, flip=axis)
    plain = mapper.render(_scene(), annotations, Patch((90.0, 95.0), 1.3, 0))
    flipped = mapper.render(_scene(), annotations, Patch((90.0, 95.0), 1.3, 0, flip=True))
    dim = 1 if axis == "horizontal" else 0
    assert not torch.equal(plain["patch_mask"], plain["patch_mask"].flip(dim))  # off-centre
    torch.testing.assert_close(flipped["image"], plain["image"].flip(dim + 1), rtol=0, atol=0)
    torch.testing.assert_close(flipped["patch_mask"], plain["patch_mask"].flip(dim), rtol=0, atol=0)


def _write_images(root: Path) -> list[dict]:
    """Three PNGs, each one red rectangle on green, with its dataset dict."""
    records = []
    for i, box in enumerate([(40, 30, 100, 70), (10, 60, 50, 150), (120, 20, 220, 110)]):
        image = np.zeros((160, 240, 3), np.uint8)
        image[..., 1] = 255
        image[box[1] : box[3], box[0] : box[2]] = (0, 0, 255)  # BGR red
        cv2.imwrite(str(root / f"{i}.png"), image)
        records.append(_record([_ann(box)], 160, 240, str(root / f"{i}.png")) | {"image_id": i})
    return records


def test_mapped_patches_show_the_object_at_its_place_and_size(tmp_path: Path) -> None:
    records = _write_images(tmp_path)
    mapper = DeepMaskPatchMapper(True)
    scores = []
    for i in range(300):
        out = mapper(records[i % 3], np.random.default_rng(i))
        assert set(out) == {"image", "height", "width", "patch_score", "patch_mask"}
        scores.append(out["patch_score"].item())
        if scores[-1] < 0:
            continue
        pixels = out["image"].numpy()
        red = (pixels[2] > 200) & (pixels[1] < 50)  # BGR: red, not green
        rows, cols = np.nonzero(red)
        centre = ((cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2)
        assert max(abs(c - P / 2) for c in centre) <= SHIFT + 1.5
        side = max(cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        assert OBJ * 2**-JITTER - 2 <= side <= OBJ * 2**JITTER + 2
        # the label is the red region seen through the window, on the L x L grid
        offset = (P - W) // 2
        window = red[offset : offset + W, offset : offset + W].astype(np.uint8)
        seen = cv2.resize(window, (L, L), interpolation=cv2.INTER_NEAREST).astype(bool)
        label = out["patch_mask"].numpy() > 0
        assert (seen & label).sum() / (seen | label).sum() > 0.9
    assert 100 < sum(score > 0 for score in scores) < 200


class _Decision(DeepMaskPatchMapper):
    """Records whether `__call__` asked for a positive, without drawing the patch."""

    def patch(self, dataset_dict: dict, rng: np.random.Generator, positive: bool) -> dict:
        return {"positive": positive}


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_positive_fraction(fraction: float) -> None:
    mapper = _Decision(True, positive_fraction=fraction)
    rng = np.random.default_rng(5)
    share = np.mean([mapper(_records()[0], rng)["positive"] for _ in range(4000)])
    assert abs(share - fraction) < 0.03  # 4 standard deviations at most


def test_same_rng_same_patch(tmp_path: Path) -> None:
    records = _write_images(tmp_path)
    mapper = DeepMaskPatchMapper(True)
    first = [mapper(records[0], np.random.default_rng(seed)) for seed in range(6)]
    again = [mapper(records[0], np.random.default_rng(seed)) for seed in range(6)]
    for a, b in zip(first, again, strict=True):
        for key in ("image", "patch_score", "patch_mask"):
            assert torch.equal(a[key], b[key])
    assert len({a["image"].numpy().tobytes() for a in first}) == 6


def _coco_folder(root: Path) -> Path:
    """A COCO file over the PNGs of `_write_images`, one red rectangle each (category 1)."""
    records = _write_images(root)
    data = {
        "images": [
            {
                "id": r["image_id"] + 1,
                "file_name": Path(r["file_name"]).name,
                "height": 160,
                "width": 240,
            }
            for r in records
        ],
        "annotations": [
            {
                "id": r["image_id"] + 1,
                "image_id": r["image_id"] + 1,
                "category_id": 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "segmentation": [_rect(x0, y0, x1, y1)],
            }
            for r in records
            for x0, y0, x1, y1 in [r["annotations"][0]["bbox"]]
        ],
        "categories": [{"id": 1, "name": "red"}],
    }
    json_file = root / "annotations.json"
    json_file.write_text(json.dumps(data))
    return json_file


def test_from_config_training_patches_and_evaluation_images(tmp_path: Path) -> None:
    json_file = _coco_folder(tmp_path)
    config = tmp_path / "deepmask.yaml"
    config.write_text(
        f"DATASETS:\n  COCO: ['deepmask_sampling_test, {json_file}, {tmp_path}']\n"
        "  TRAIN: [deepmask_sampling_test]\nDATALOADER:\n  MAPPER: DeepMaskPatchMapper\n"
    )
    cfg = load_config(config)
    register_from_config(cfg)
    records = load_coco_json(json_file, tmp_path)
    train = build(MAPPER_REGISTRY, cfg.DATALOADER.MAPPER, cfg, True)
    assert train.geometry == PatchGeometry(P, W, OBJ, L)
    assert train.category_balance and not train.alternate_batches
    np.testing.assert_allclose(train.prepare_dataset(records), [1 / 3] * 3)
    assert train.category_weights == {0: 1 / 3}
    out = train(records[0], np.random.default_rng(0))
    assert out["image"].shape == (3, P, P) and out["patch_mask"].shape == (L, L)
    # the paper's sizes: a 224 patch whose mask covers all of it, 128-pixel objects
    paper = [
        f"INPUT.DEEPMASK.{k}={v}"
        for k, v in (("INPUT_SIZE", 224), ("WINDOW_SIZE", 224), ("OBJECT_SIZE", 128))
    ]
    mapper = build(MAPPER_REGISTRY, "DeepMaskPatchMapper", load_config(config, paper), True)
    assert mapper(records[1], np.random.default_rng(0))["image"].shape == (3, 224, 224)
    # evaluation: the full image, as DatasetMapper maps it
    evaluation = build(MAPPER_REGISTRY, "DeepMaskPatchMapper", cfg, False)
    expected = DatasetMapper(**DatasetMapper.from_config(cfg, False))(records[2])
    got = evaluation(records[2])
    assert set(got) == set(expected) and torch.equal(got["image"], expected["image"])
    assert (got["height"], got["width"], got["image_id"]) == (160, 240, expected["image_id"])


class _Chosen(DeepMaskPatchMapper):
    """Returns the image and annotation a positive patch centres, without rendering it."""

    def patch(self, dataset_dict: dict, rng: np.random.Generator, positive: bool) -> dict:
        placed = self.sample_positive(dataset_dict, rng)
        return {"image_id": dataset_dict["image_id"], "annotation": placed.annotation}


def test_the_training_loader_draws_a_category_uniformly_then_an_instance() -> None:
    """The release's choice (DataSampler.lua maskSampling), through the training loader:
    the mapper's image weights and its in-image choice together."""
    records = [r | {"image_id": i} for i, r in enumerate(_balanced_dataset())]
    # no valid annotation (too small, not a crowd, so not filtered): must never be drawn
    records.append(_record([_ann((0, 0, 4, 4), 7)]) | {"image_id": len(records)})
    mapper = _Chosen(True, positive_fraction=1.0, category_balance=True)
    loader = build_train_loader(records, mapper, 30, 0, 3, aspect_ratio_grouping=False)
    draws = [(s["image_id"], s["annotation"]) for batch in take(loader, 150) for s in batch]
    assert len(draws) == 4500 and all(i != len(records) - 1 for i, _ in draws)
    counts: dict[tuple[int, int], int] = {}
    for draw in draws:
        counts[draw] = counts.get(draw, 0) + 1
    # every valid instance: probability 1 / (3 categories x its category's instances)
    instances = {
        (i, a): ann["category_id"]
        for i, r in enumerate(records)
        for a, ann in enumerate(r["annotations"])
        if invalid_reason(ann, r["height"], r["width"], 100, 5) is None
    }
    assert set(counts) == set(instances)
    per_category = {c: list(instances.values()).count(c) for c in (3, 7, 11)}
    assert per_category == {3: 4, 7: 40, 11: 1}
    expected = {k: len(draws) / 3 / per_category[c] for k, c in instances.items()}
    chi_square = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi_square < 79.0  # the 0.999 quantile of chi-square with 44 degrees of freedom


def test_without_category_balance_every_image_with_a_valid_object_weighs_one() -> None:
    records = [*_balanced_dataset(), _record([_ann((0, 0, 4, 4))])]
    mapper = DeepMaskPatchMapper(True)
    np.testing.assert_array_equal(mapper.prepare_dataset(records), [1.0] * 25 + [0.0])
    assert mapper.category_weights is None
    assert DeepMaskPatchMapper(False).prepare_dataset(records) is None  # evaluation
    with pytest.raises(RuntimeError, match="call prepare_dataset"):
        DeepMaskPatchMapper(True, category_balance=True).sample_positive(
            records[0], np.random.default_rng(0)
        )
    with pytest.raises(DatasetError, match=r"DATASETS.TRAIN \['mine'\]: no annotation"):
        mapper.prepare_dataset(records[-1:], "DATASETS.TRAIN ['mine']")


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_alternating_batches_are_all_mask_or_all_score(tmp_path: Path, fraction: float) -> None:
    records = _write_images(tmp_path)
    mapper = DeepMaskPatchMapper(True, alternate_batches=True, score_batch_fraction=fraction)
    loader = build_train_loader(records, mapper, 4, 0, 1, aspect_ratio_grouping=False)
    batches = take(loader, 40)
    heads = []
    for batch in batches:
        kinds = {s["patch_head"] for s in batch}
        assert len(kinds) == 1
        heads.append(kinds.pop())
        if heads[-1] == "mask":
            assert all(s["patch_score"].item() == 1.0 for s in batch)
    scores = [
        s["patch_score"].item()
        for b, h in zip(batches, heads, strict=True)
        if h == "score"
        for s in b
    ]
    if fraction == 0.0:
        assert set(heads) == {"mask"}
    else:
        assert 10 <= heads.count("score") <= 30
        assert 0.3 < np.mean(np.array(scores) > 0) < 0.7  # 1:1
    # the same stream again, e.g. after a restart
    again = take(build_train_loader(records, mapper, 4, 0, 1, aspect_ratio_grouping=False), 40)
    assert [b[0]["patch_head"] for b in again] == heads
    assert all(
        torch.equal(a["image"], b["image"])
        for x, y in zip(batches, again, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    # joint mode (the default): no step condition, no "patch_head"
    assert DeepMaskPatchMapper(True).step_condition(np.random.default_rng(0)) is None
