"""Predictor on a small random-weight Mask R-CNN: what the model is given, and what it returns.

The model's input is checked against independent resizes of the same pixels: OpenCV's
cv2.resize (INTER_LINEAR) to the size worked out below for INPUT.RESIZE_METHOD=opencv, and
torchvision's own `_resize_image_and_masks` for "torchvision"; and against the test-time
DatasetMapper of the same config on the same image file, whose transforms the Predictor reuses.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from test_rcnn_model import ROOT, SMALL
from torch import nn
from torchvision.models.detection.transform import _resize_image_and_masks

from detframe.config import load_config
from detframe.data.mapper import DatasetMapper
from detframe.engine.predictor import Predictor
from detframe.modeling import build_model
from detframe.structures import Boxes, Instances

CONFIG = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
TEST_SIZE = ["INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=128"]


@functools.cache
def config_and_model(image_format: str, resize_method: str = "opencv") -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    overrides = [f"INPUT.FORMAT={image_format}", f"INPUT.RESIZE_METHOD={resize_method}"]
    cfg = load_config(CONFIG, [*SMALL, *TEST_SIZE, *overrides])
    return cfg, build_model(cfg)


def random_bgr(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def run_and_capture(predictor: Predictor, image: np.ndarray) -> tuple[Instances, dict]:
    """The predictor's output and the one input dict the model was called with."""
    seen = []
    hook = predictor.model.register_forward_pre_hook(
        lambda module, args: seen.append((args[0], module.training, torch.is_grad_enabled()))
    )
    try:
        output = predictor(image)
    finally:
        hook.remove()
    ((inputs,), training, grad_enabled) = seen[0]
    assert not training and not grad_enabled
    return output, inputs


def direct(model: nn.Module, inputs: dict) -> Instances:
    """The model called on `inputs` without the Predictor."""
    model.eval()
    with torch.no_grad():
        (output,) = model([inputs])
    model.train()
    return output["instances"]


def assert_same_instances(got: Instances, expected: Instances) -> None:
    assert len(expected) > 0, "the comparison needs detections"
    assert got.image_size == expected.image_size
    for name in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = got.get(name), expected.get(name)
        a, b = (a.tensor, b.tensor) if isinstance(a, Boxes) else (a, b)
        assert torch.equal(a, b), name


# (H, W) -> (H', W') for min_size 64, max_size 128:
#   30 x 100: 64 / 30 would make the width 213 > 128, so the scale is 128 / 100 = 1.28:
#             38.4 -> 38 rows (OpenCV rounds, torchvision floors), 128 columns;
#   50 x 75:  64 / 50 = 1.28 gives a width of 96 <= 128: 64 x 96.
#   25 x 70:  64 / 25 = 2.56 gives 179.2 > 128, so 128 / 70: 45.71 -> 46 (OpenCV), 45 (floor).
@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize(("size", "resized"), [((30, 100), (38, 128)), ((50, 75), (64, 96))])
def test_opencv_resize_and_the_model_output(
    image_format: str, size: tuple[int, int], resized: tuple[int, int]
) -> None:
    cfg, model = config_and_model(image_format)
    predictor = Predictor.from_config(cfg, model)
    image = random_bgr(*size)
    channels = np.ascontiguousarray(image[:, :, ::-1] if image_format == "RGB" else image)
    expected = cv2.resize(channels, resized[::-1], interpolation=cv2.INTER_LINEAR)
    expected_tensor = torch.from_numpy(expected).permute(2, 0, 1)

    model.train()
    output, inputs = run_and_capture(predictor, image)
    assert model.training and all(m.training for m in model.modules())
    assert inputs["image"].dtype == torch.uint8
    assert torch.equal(inputs["image"], expected_tensor)
    assert (inputs["height"], inputs["width"]) == size
    assert output.image_size == size
    expected_output = direct(model, {"image": expected_tensor, "height": size[0], "width": size[1]})
    assert_same_instances(output, expected_output)


@pytest.mark.parametrize(("size", "resized"), [((30, 100), (38, 128)), ((25, 70), (45, 128))])
def test_torchvision_resize_gives_torchvision_pixels(
    size: tuple[int, int], resized: tuple[int, int]
) -> None:
    cfg, model = config_and_model("RGB", "torchvision")
    predictor = Predictor.from_config(cfg, model)
    image = random_bgr(*size, seed=3)
    rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).double()
    expected, _ = _resize_image_and_masks(rgb, 64, 128)
    assert tuple(expected.shape[1:]) == resized

    output, inputs = run_and_capture(predictor, image)
    assert inputs["image"].dtype == torch.float64
    assert torch.equal(inputs["image"], expected)
    expected_output = direct(model, {"image": expected, "height": size[0], "width": size[1]})
    assert_same_instances(output, expected_output)


@pytest.mark.parametrize("resize_method", ["opencv", "torchvision"])
def test_predictor_gives_the_model_what_the_test_mapper_gives(
    resize_method: str, tmp_path: Path
) -> None:
    cfg, model = config_and_model("RGB", resize_method)
    predictor = Predictor.from_config(cfg, model)
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    assert repr(predictor.augmentations) == repr(mapper.augmentations)
    assert predictor.image_format == mapper.image_format == "RGB"
    image = random_bgr(45, 70, seed=4)
    path = tmp_path / "image.png"
    assert cv2.imwrite(str(path), image)
    mapped = mapper({"file_name": str(path), "height": 45, "width": 70, "image_id": 1})
    _, inputs = run_and_capture(predictor, image)
    assert inputs["image"].dtype == mapped["image"].dtype
    assert torch.equal(inputs["image"], mapped["image"])


def test_predictor_rejects_bad_images_formats_and_models() -> None:
    _, model = config_and_model("BGR")
    predictor = Predictor(model)
    assert predictor.augmentations == []  # the image at its size
    with pytest.raises(ValueError, match="uint8"):
        predictor(np.zeros((20, 20, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(20, 20\)"):
        predictor(np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        Predictor(model, image_format="YUV")  # type: ignore[arg-type]

    class ProposalsOnly(nn.Module):
        def forward(self, inputs: list[dict]) -> list[dict]:
            return [{"proposals": Instances((4, 4))} for _ in inputs]

    with pytest.raises(ValueError, match=r"detectors.*ProposalsOnly returned \['proposals'\]"):
        Predictor(ProposalsOnly())(np.zeros((4, 4, 3), np.uint8))
