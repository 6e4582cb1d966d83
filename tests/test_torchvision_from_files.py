"""torchvision's Mask R-CNN weights give torchvision's detections from image FILES.

torchvision's `maskrcnn_resnet50_fpn` (v1 layout, FrozenBatchNorm eps 0, seeded random weights
adjusted as in test_rcnn_parity.py) is converted into the model of
configs/torchvision/maskrcnn_resnet50_fpn.yaml; both run in float64 on PNG files of shapes
whose sizes need resizing (333 x 517 and 600 x 400, shorter side to 320, longer at most 512,
set alike in both). torchvision gets the file's RGB pixels as a float tensor in 0..1 and
resizes inside the model; detframe gets the file through `Predictor.from_config`, whose
test-time mapper resizes with INPUT.RESIZE_METHOD=torchvision. Expected: the same detections.

Boxes are compared twice. torchvision scales its boxes back to the original size by ratios
computed in float32 (`resize_boxes`), detframe by exact ones; so detframe's boxes are checked
against torchvision's boxes in the resized image scaled by the exact ratios (within 1e-6 px),
and against torchvision's returned boxes within that float32 rounding (2^-24 relative).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_rcnn_parity import torchvision_model
from torch import nn

from detframe.config import load_config
from detframe.data.shapes import ShapesConfig, render_image
from detframe.data.transforms import TorchvisionResizeShortestEdge
from detframe.engine.predictor import Predictor
from detframe.modeling import build_model, convert_torchvision_detection

CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "torchvision" / "maskrcnn_resnet50_fpn.yaml"
)
MIN_SIZE, MAX_SIZE = 320, 512
# The mask head's convolutions on each detection dominate the time (float64 convolutions are
# slow on the CPU); both models keep this many detections.
DETECTIONS = 32


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, Predictor]:
    tv_model = torchvision_model(mask_on=True).eval()
    with torch.no_grad():
        # On these images the random RPN deltas send most proposals to the whole image, and
        # NMS leaves a handful; small deltas keep 1000 proposals near their anchors. Class
        # logits centred per class and scaled down give scores spread over 0.7..0.95 (the
        # scaled-up ones of test_rcnn_parity saturate here, leaving no detection).
        tv_model.rpn.head.bbox_pred.weight.mul_(0.01)
        cls_score = tv_model.roi_heads.box_predictor.cls_score.weight
        cls_score.sub_(cls_score.mean(1, keepdim=True)).mul_(0.003)
    tv_model.transform.min_size = (MIN_SIZE,)
    tv_model.transform.max_size = MAX_SIZE
    tv_model.roi_heads.detections_per_img = DETECTIONS
    cfg = load_config(
        CONFIG,
        [
            "MODEL.DEVICE=cpu",
            f"INPUT.MIN_SIZE_TEST={MIN_SIZE}",
            f"INPUT.MAX_SIZE_TEST={MAX_SIZE}",
            f"MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE={DETECTIONS}",
        ],
    )
    df_model = build_model(cfg).double()
    df_model.load_state_dict(convert_torchvision_detection(tv_model.state_dict()))
    return tv_model, Predictor.from_config(cfg, df_model)


def shapes_file(tmp_path: Path, height: int, width: int, seed: int) -> Path:
    """A PNG of `height` x `width` with textured background and 4 to 8 shapes."""
    config = ShapesConfig(
        num_images=1, image_size=(height, width), min_instances=4, max_instances=8, seed=seed
    )
    path = tmp_path / f"shapes_{height}x{width}.png"
    assert cv2.imwrite(str(path), render_image(config, 0).image)
    return path


@pytest.mark.parametrize(("height", "width", "seed"), [(333, 517, 1), (600, 400, 2)])
def test_same_detections_from_an_image_file(
    models: tuple[nn.Module, Predictor], tmp_path: Path, height: int, width: int, seed: int
) -> None:
    tv_model, predictor = models
    assert [type(a) for a in predictor.augmentations] == [TorchvisionResizeShortestEdge]
    path = shapes_file(tmp_path, height, width, seed)

    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
    tv_image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).double() / 255
    seen = {}

    def record(name: str, value: object) -> None:  # a hook returning None keeps the output
        seen[name] = value

    hooks = [
        tv_model.transform.register_forward_hook(
            lambda m, i, out: record("size", out[0].image_sizes[0])
        ),
        tv_model.roi_heads.register_forward_hook(
            lambda m, i, out: record("boxes", out[0][0]["boxes"])
        ),
    ]
    try:
        with torch.no_grad():
            (tv_out,) = tv_model([tv_image])
    finally:
        for hook in hooks:
            hook.remove()
    df_out = predictor(cv2.imread(str(path), cv2.IMREAD_COLOR))

    resized_height, resized_width = seen["size"]
    assert (resized_height, resized_width) != (height, width), "the file must need resizing"
    assert len(tv_out["boxes"]) == DETECTIONS, "the comparison needs detections"
    assert len(df_out) == len(tv_out["boxes"])
    assert df_out.image_size == (height, width)
    assert torch.equal(df_out.pred_classes + 1, tv_out["labels"])
    torch.testing.assert_close(df_out.scores, tv_out["scores"], rtol=0, atol=1e-9)

    ratio = torch.tensor([width / resized_width, height / resized_height] * 2, dtype=torch.float64)
    exact = seen["boxes"] * ratio
    exact[:, 0::2] = exact[:, 0::2].clamp(0, width)
    exact[:, 1::2] = exact[:, 1::2].clamp(0, height)
    boxes = df_out.pred_boxes.tensor
    torch.testing.assert_close(boxes, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes, tv_out["boxes"], rtol=2.0**-24, atol=1e-6)

    tv_masks = tv_out["masks"][:, 0] >= 0.5
    assert df_out.pred_masks.shape == tv_masks.shape
    inter = (tv_masks & df_out.pred_masks).flatten(1).sum(1)
    union = (tv_masks | df_out.pred_masks).flatten(1).sum(1)
    iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
    assert iou.min() >= 0.99, iou.min()
    assert np.mean((iou == 1).numpy()) >= 0.9
