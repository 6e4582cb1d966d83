"""Predictor, read_image, list_images and run_demo on a small random-weight Mask R-CNN.

The Predictor is checked against the model called directly on an image resized by hand
(cv2.INTER_LINEAR, as detframe's ResizeShortestEdge does, to the size worked out below).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_rcnn_model import ROOT, SMALL

from detframe.config import load_config
from detframe.engine.demo import list_images, run_demo
from detframe.engine.predictor import Predictor, read_image
from detframe.modeling import GeneralizedRCNN, build_model
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


# (H, W) -> (H', W') for min_size 64, max_size 128:
#   30 x 100: 64 / 30 would make the width 213 > 128, so the scale is 128 / 100 = 1.28:
#             38.4 -> 38 rows, 128 columns;
#   50 x 75:  64 / 50 = 1.28 gives a width of 96 <= 128: 64 x 96.
@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize(("size", "resized"), [((30, 100), (38, 128)), ((50, 75), (64, 96))])
def test_predictor_equals_the_model_on_a_hand_resized_image(
    image_format: str, size: tuple[int, int], resized: tuple[int, int]
) -> None:
    cfg, model = config_and_model(image_format)
    predictor = Predictor.from_config(cfg, model)
    image = random_bgr(*size)
    channels = image[:, :, ::-1] if image_format == "RGB" else image
    expected_input = cv2.resize(
        np.ascontiguousarray(channels), resized[::-1], interpolation=cv2.INTER_LINEAR
    )
    expected_tensor = torch.from_numpy(expected_input).permute(2, 0, 1).contiguous()

    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append((args[0], module.training, torch.is_grad_enabled()))
    )
    model.train()
    try:
        output = predictor(image)
    finally:
        hook.remove()
    assert model.training and all(m.training for m in model.modules())

    ((inputs,), training, grad_enabled) = seen[0]
    assert not training and not grad_enabled
    assert inputs["image"].dtype == torch.uint8
    assert torch.equal(inputs["image"], expected_tensor)
    assert (inputs["height"], inputs["width"]) == size

    model.eval()
    with torch.no_grad():
        (expected,) = model([{"image": expected_tensor, "height": size[0], "width": size[1]}])
    model.train()
    assert len(expected) > 0, "the comparison needs detections"
    assert output.image_size == size
    assert torch.equal(output.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(output.scores, expected.scores)
    assert torch.equal(output.pred_classes, expected.pred_classes)
    assert output.pred_masks.shape == (len(expected), *size)
    assert torch.equal(output.pred_masks, expected.pred_masks)


def test_predictor_keeps_evaluation_mode_and_reads_its_config() -> None:
    cfg, model = config_and_model("BGR")
    predictor = Predictor.from_config(cfg, model)
    assert predictor.image_format == "BGR"
    assert predictor.resize.short_edge_lengths == (64,) and predictor.resize.max_size == 128
    model.eval()
    predictor(random_bgr(40, 40))
    assert not model.training
    model.train()


def test_predictor_rejects_bad_images_and_formats() -> None:
    _, model = config_and_model("BGR")
    predictor = Predictor(model)
    with pytest.raises(ValueError, match="uint8"):
        predictor(np.zeros((20, 20, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(20, 20\)"):
        predictor(np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        Predictor(model, image_format="YUV")  # type: ignore[arg-type]


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
