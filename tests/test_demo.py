"""read_image, list_images and run_demo on a small random-weight Mask R-CNN (the Predictor
itself is checked in test_predictor.py)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_rcnn_model import ROOT, SMALL

from detframe.engine.demo import list_images, run_demo
from detframe.engine.predictor import Predictor, read_image
from detframe.engine.setup import load_config
from detframe.modeling import GeneralizedRCNN, build_model
from detframe.structures import Boxes, Instances
from detframe.utils.visualizer import draw_instances

CONFIG = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
TEST_SIZE = ["INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=128"]


@functools.cache
def config_and_model(image_format: str) -> tuple[object, GeneralizedRCNN]:
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [*SMALL, *TEST_SIZE, f"INPUT.FORMAT={image_format}"])
    return cfg, build_model(cfg)


def random_bgr(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def test_read_image_gives_three_bgr_channels(tmp_path: Path) -> None:
    color = random_bgr(12, 16)
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "color.png", color)), color)
    gray = color[:, :, 0]
    np.testing.assert_array_equal(
        read_image(write_png(tmp_path / "gray.png", gray)), np.repeat(gray[:, :, None], 3, -1)
    )
    bgra = np.concatenate([color, np.full((12, 16, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "bgra.png", bgra)), color)


def test_read_image_applies_the_exif_orientation(tmp_path: Path) -> None:
    pil_image = pytest.importorskip("PIL.Image")
    path = tmp_path / "rotated.jpg"
    exif = pil_image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    pil_image.new("RGB", (40, 20)).save(path, exif=exif)  # stored 20 rows x 40 columns
    assert read_image(path).shape == (40, 20, 3)


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        read_image(tmp_path / "broken.jpg")


def test_list_images_in_a_folder_or_one_file(tmp_path: Path) -> None:
    names = ["a.jpg", "B.PNG", "c.txt", "d.jpeg", "notes", "x.TIFF", "y.webp", "z.bmp", "w.tif"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()  # a folder is not an image, whatever its name
    expected = ["B.PNG", "a.jpg", "d.jpeg", "w.tif", "x.TIFF", "y.webp", "z.bmp"]
    assert list_images(tmp_path) == [tmp_path / name for name in expected]
    assert list_images(str(tmp_path / "a.jpg")) == [tmp_path / "a.jpg"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


def test_run_demo_writes_one_picture_per_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, model = config_and_model("RGB")
    predictor = Predictor.from_config(cfg, model)
    sizes = {
        "in/a.jpg": (40, 60),
        "in/a.png": (50, 30),
        "in/b.png": (30, 100),
        "in2/b.png": (20, 20),
        "in3/b.png-1.png": (24, 24),  # its own name is taken first
    }
    images = []
    for i, (name, size) in enumerate(sizes.items()):
        images.append(write_png(tmp_path / name, random_bgr(*size, seed=i)))
    output_dir = tmp_path / "out" / "nested"

    threshold = 0.2
    with caplog.at_level(logging.INFO, logger="detframe.engine.demo"):
        written = run_demo(
            predictor, images, output_dir, ["x", "y", "z"], score_threshold=threshold
        )

    # Shared stems keep the full name; the second b.png skips b.png-1, another input's name.
    expected_names = ["a.jpg.png", "a.png.png", "b.png.png", "b.png-2.png", "b.png-1.png"]
    assert written == [output_dir / name for name in expected_names]
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(expected_names)
    for path, size in zip(written, sizes.values(), strict=True):
        picture = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert picture.shape == (*size, 3)

    image = read_image(images[2])
    detections = predictor(image)
    np.testing.assert_array_equal(
        cv2.imread(str(written[2])),
        draw_instances(image, detections, ["x", "y", "z"], score_threshold=threshold),
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "detframe.engine.demo"]
    assert len(lines) == len(images)
    drawn = int((detections.scores >= threshold).sum())
    assert f"{drawn} detections drawn" in lines[2] and str(images[2]) in lines[2]


def test_run_demo_unreadable_image_is_named_and_earlier_pictures_stay(tmp_path: Path) -> None:
    cfg, model = config_and_model("BGR")
    predictor = Predictor.from_config(cfg, model)
    first = write_png(tmp_path / "first.png", random_bgr(20, 30))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    last = write_png(tmp_path / "last.png", random_bgr(20, 30))
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        run_demo(predictor, [first, broken, last], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.png"]


def test_run_demo_skips_and_counts_unreadable_images_under_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def predictor(image: np.ndarray) -> Instances:  # no detections: only reading matters here
        return Instances(
            image.shape[:2],
            pred_boxes=Boxes(torch.zeros(0, 4)),
            scores=torch.zeros(0),
            pred_classes=torch.zeros(0, dtype=torch.int64),
        )

    first = write_png(tmp_path / "first.png", random_bgr(20, 30))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    missing = tmp_path / "missing.png"
    last = write_png(tmp_path / "last.png", random_bgr(20, 30, seed=1))
    with caplog.at_level(logging.WARNING, logger="detframe.engine.demo"):
        written = run_demo(
            predictor, [first, broken, missing, last], tmp_path / "out", on_bad="skip"
        )
    assert written == [tmp_path / "out" / "first.png", tmp_path / "out" / "last.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.png", "last.png"]
    assert f"skipping {broken} (corrupt image)" in caplog.text
    assert f"skipping {missing} (missing image file)" in caplog.text
    assert "skipped 2 of 4 images (corrupt image: 1, missing image file: 1)" in caplog.text
    with pytest.raises(ValueError, match=r"none of the 2 images could be read \(corrupt image: 1"):
        run_demo(predictor, [broken, missing], tmp_path / "out2", on_bad="skip")
