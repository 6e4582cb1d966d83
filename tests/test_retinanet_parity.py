"""detframe's RetinaNet R50-FPN against torchvision's `retinanet_resnet50_fpn`, converted.

torchvision's model is built as its v1 COCO checkpoint is (FrozenBatchNorm with eps 0, P6/P7
from P5) with random weights; its state dict goes through detframe's converter into a model
built from `configs/torchvision/retinanet_resnet50_fpn.yaml`, and both run on the same images
in float64:

- the same anchors, the same detections (count, boxes, scores, labels = detframe class + 1)
  on images of odd sizes, batched;
- the same classification (focal) and box (L1) losses on the same targets.

The random weights are adjusted as a trained model's would be: random frozen-BN statistics,
box deltas scaled down (random deltas decode to boxes far outside the image), and the logits
of torchvision's label 0 (background, never a positive, which the converter drops) pushed to
-100, where its focal loss and its probability are 0 in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_rcnn_parity import (
    MAX_SIZE,
    MEAN,
    MIN_SIZE,
    STD,
    random_image,
    randomise_frozen_bn,
    resize_like_torchvision,
)
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detframe.engine.setup import load_config
from detframe.modeling import build_model, convert_torchvision_detection
from detframe.structures import Boxes, Instances

CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "torchvision" / "retinanet_resnet50_fpn.yaml"
)


def torchvision_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(
        resnet50(norm_layer=FrozenBatchNorm2d),
        3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = TVRetinaNet(backbone, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE)
    overwrite_eps(model, 0.0)
    randomise_frozen_bn(model)
    with torch.no_grad():
        head = model.head
        head.regression_head.bbox_reg.weight.mul_(0.05)
        cls_logits = head.classification_head.cls_logits
        cls_logits.weight.mul_(30.0)  # spread the scores: some detections pass 0.05
        anchors = head.classification_head.num_anchors
        cls_logits.weight.view(anchors, 91, -1)[:, 0] = 0.0
        cls_logits.bias.view(anchors, 91)[:, 0] = -100.0
    return model.double()


def detframe_model(tv_model: nn.Module) -> nn.Module:
    overrides = [f"MODEL.PIXEL_MEAN={MEAN}", f"MODEL.PIXEL_STD={STD}", "MODEL.DEVICE=cpu"]
    model = build_model(load_config(CONFIG, overrides)).double()
    model.load_state_dict(convert_torchvision_detection(tv_model.state_dict()))
    return model


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    tv_model = torchvision_model()
    return tv_model, detframe_model(tv_model)


def test_same_anchors_and_detections(models: tuple[nn.Module, nn.Module]) -> None:
    tv_model, df_model = models
    tv_model.eval()
    df_model.eval()
    seen: dict[str, list] = {}

    def keep(name: str):  # a forward hook that returns None leaves the output as it is
        return lambda module, args, output: seen.__setitem__(name, output)

    hooks = [
        tv_model.anchor_generator.register_forward_hook(keep("torchvision")),
        df_model.anchor_generator.register_forward_hook(keep("detframe")),
    ]
    images = [random_image(203, 311, 1), random_image(257, 190, 2)]
    with torch.no_grad():
        tv_outputs = tv_model(images)
        inputs = [
            {"image": resize_like_torchvision(im), "height": im.shape[1], "width": im.shape[2]}
            for im in images
        ]
        df_outputs = [out["instances"] for out in df_model(inputs)]
    for hook in hooks:
        hook.remove()
    # torchvision's anchors are per image (all levels); detframe's per level (all images).
    torch.testing.assert_close(
        torch.cat(seen["detframe"]), seen["torchvision"][0].to(torch.float64), rtol=0, atol=0
    )
    assert sum(len(out["boxes"]) for out in tv_outputs) > 20, "too few detections to compare"
    for image, tv_out, df_out in zip(images, tv_outputs, df_outputs, strict=True):
        assert df_out.image_size == tuple(image.shape[-2:])
        assert len(df_out) == len(tv_out["boxes"])
        assert torch.equal(df_out.pred_classes + 1, tv_out["labels"])
        torch.testing.assert_close(df_out.scores, tv_out["scores"], rtol=0, atol=1e-12)
        # torchvision scales its boxes back to the image with float32 ratios: relative 2^-24.
        torch.testing.assert_close(
            df_out.pred_boxes.tensor, tv_out["boxes"], rtol=2**-23, atol=1e-9
        )


def test_same_training_losses(models: tuple[nn.Module, nn.Module]) -> None:
    tv_model, df_model = models
    tv_model.train()
    df_model.train()
    g = torch.Generator().manual_seed(3)
    sizes = [(MIN_SIZE, 288), (MIN_SIZE, 320)]
    images = [random_image(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    tv_targets, df_inputs = [], []
    for image, (h, w), count in zip(images, sizes, (5, 2), strict=True):
        xy = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor(
            [w - 90.0, h - 90.0], dtype=torch.float64
        )
        boxes = torch.cat([xy, xy + 16 + 70 * torch.rand(count, 2, generator=g)], dim=1)
        labels = torch.randint(1, 91, (count,), generator=g)
        tv_targets.append({"boxes": boxes, "labels": labels})
        instances = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=labels - 1)
        df_inputs.append({"image": image, "instances": instances})
    tv_losses = tv_model(images, tv_targets)
    df_losses = df_model(df_inputs)
    assert set(df_losses) == {"loss_cls", "loss_box_reg"}
    torch.testing.assert_close(
        df_losses["loss_cls"], tv_losses["classification"], rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(
        df_losses["loss_box_reg"], tv_losses["bbox_regression"], rtol=1e-9, atol=1e-12
    )
    sum(df_losses.values()).backward()
    assert df_model.head.cls_score.weight.grad.abs().sum() > 0
    assert df_model.head.bbox_convs[0].weight.grad.abs().sum() > 0
