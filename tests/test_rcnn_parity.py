"""detframe's Faster / Mask R-CNN R50-FPN against torchvision's, with converted weights.

torchvision's `maskrcnn_resnet50_fpn` and `fasterrcnn_resnet50_fpn` (v1 layout: FrozenBatchNorm
with eps 0, as its COCO checkpoints) are built with random weights, their state dicts go
through detframe's converter into models built from `configs/torchvision/*.yaml`, and both
run on the same images in float64, so that the comparison is not blurred by rounding:

- evaluation: the same detections (count, boxes, scores, labels = detframe class + 1, masks
  pasted at the original size with IoU >= 0.99), for images of several sizes, batched, and an
  image with nothing above the score threshold; the same RPN proposals;
- training: the same losses on the same batch, with sampling made deterministic
  (torch.randperm -> arange in both models).

Random weights are adjusted to behave like a trained model's: the frozen-BN statistics are
random; the RPN's objectness logits are scaled down (random weights give logits of 50 and
more, whose probabilities are exactly 1, so that torchvision's ranking of proposals by
probability orders them arbitrarily); the class logits are scaled up so that a realistic
number of detections pass the 0.05 score threshold; the mask logits are scaled down
(random weights give logits in the thousands, probabilities of exactly 0 and 1, and ties
with the 0.5 threshold where masks are pasted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from detframe.engine.setup import load_config
from detframe.modeling import build_model, convert_torchvision_detection
from detframe.structures import BitMasks, Boxes, Instances

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "torchvision"
MIN_SIZE, MAX_SIZE = 224, 352
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LOSS_NAMES = {
    "loss_rpn_cls": "loss_objectness",
    "loss_rpn_loc": "loss_rpn_box_reg",
    "loss_cls": "loss_classifier",
    "loss_box_reg": "loss_box_reg",
    "loss_mask": "loss_mask",
}


@torch.no_grad()
def randomise_frozen_bn(model: nn.Module) -> None:
    """Random frozen-BN statistics and affine parameters, as a trained model has."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)


def torchvision_model(mask_on: bool, seed: int = 0) -> nn.Module:
    """torchvision's R50-FPN detector as its COCO checkpoints are built, random weights."""
    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    cls = MaskRCNN if mask_on else FasterRCNN
    model = cls(backbone, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE)
    overwrite_eps(model, 0.0)
    randomise_frozen_bn(model)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(40.0)
        model.rpn.head.cls_logits.weight.mul_(0.1)
        if mask_on:
            model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.01)
            # Where the features are all 0 (ReLU), the logit is the bias: not exactly 0,
            # which would make probabilities tie with the 0.5 threshold.
            model.roi_heads.mask_predictor.mask_fcn_logits.bias.uniform_(-2.0, 2.0)
    return model.double()


def detframe_model(mask_on: bool, tv_model: nn.Module) -> nn.Module:
    name = "maskrcnn_resnet50_fpn.yaml" if mask_on else "fasterrcnn_resnet50_fpn.yaml"
    overrides = [f"MODEL.PIXEL_MEAN={MEAN}", f"MODEL.PIXEL_STD={STD}", "MODEL.DEVICE=cpu"]
    model = build_model(load_config(CONFIGS / name, overrides)).double()
    model.load_state_dict(convert_torchvision_detection(tv_model.state_dict()))
    return model


def resize_like_torchvision(image: torch.Tensor) -> torch.Tensor:
    """torchvision's GeneralizedRCNNTransform resize of one [3, H, W] image."""
    h, w = image.shape[-2:]
    scale = min(MIN_SIZE / min(h, w), MAX_SIZE / max(h, w))
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True
    )[0]


def random_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random RGB image [3, h, w] in 0..1, float64."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g, dtype=torch.float64)
    return F.interpolate(coarse, size=(h, w), mode="bilinear")[0]


@pytest.fixture(scope="module", params=[True, False], ids=["mask_rcnn", "faster_rcnn"])
def models(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, bool]:
    tv_model = torchvision_model(request.param)
    return tv_model, detframe_model(request.param, tv_model), request.param


def capture_proposals(tv_model: nn.Module, df_model: nn.Module) -> dict[str, list]:
    """Records the proposals each model's proposal generator returns."""
    seen: dict[str, list] = {"torchvision": [], "detframe": []}
    tv_model.rpn.register_forward_hook(lambda m, i, out: seen["torchvision"].append(out[0]))
    df_model.proposal_generator.register_forward_hook(
        lambda m, i, out: seen["detframe"].append([p.proposal_boxes.tensor for p in out[0]])
    )
    return seen


def assert_same_detections(tv_out: dict, df_out: Instances, mask_on: bool) -> None:
    assert len(df_out) == len(tv_out["boxes"])
    torch.testing.assert_close(df_out.pred_boxes.tensor, tv_out["boxes"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(df_out.scores, tv_out["scores"], rtol=0, atol=1e-4)
    assert torch.equal(df_out.pred_classes + 1, tv_out["labels"])
    if mask_on:
        tv_masks = tv_out["masks"][:, 0] >= 0.5
        assert df_out.pred_masks.shape == tv_masks.shape
        inter = (tv_masks & df_out.pred_masks).flatten(1).sum(1)
        union = (tv_masks | df_out.pred_masks).flatten(1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
        assert iou.min() >= 0.99, iou.min()


def test_same_detections_and_proposals(models: tuple[nn.Module, nn.Module, bool]) -> None:
    tv_model, df_model, mask_on = models
    tv_model.eval()
    df_model.eval()
    seen = capture_proposals(tv_model, df_model)
    images = [random_image(200, 260, 1), random_image(240, 180, 2)]
    with torch.no_grad():
        tv_outputs = tv_model(images)
        inputs = [
            {"image": resize_like_torchvision(im), "height": im.shape[1], "width": im.shape[2]}
            for im in images
        ]
        df_outputs = [out["instances"] for out in df_model(inputs)]
    assert sum(len(out["boxes"]) for out in tv_outputs) > 0, "random weights gave no detections"
    for tv_props, df_props in zip(seen["torchvision"][0], seen["detframe"][0], strict=True):
        assert df_props.shape == tv_props.shape
        torch.testing.assert_close(df_props, tv_props, rtol=1e-6, atol=1e-8)
    for image, tv_out, df_out in zip(images, tv_outputs, df_outputs, strict=True):
        assert df_out.image_size == tuple(image.shape[-2:])
        assert_same_detections(tv_out, df_out, mask_on)


def test_nothing_above_the_threshold(models: tuple[nn.Module, nn.Module, bool]) -> None:
    tv_model, df_model, mask_on = models
    tv_model.eval()
    df_model.eval()
    image = random_image(160, 300, 3)
    tv_model.roi_heads.score_thresh = 1.0
    df_model.roi_heads.box_predictor.test_score_thresh = 1.0
    try:
        with torch.no_grad():
            tv_out = tv_model([image])[0]
            df_out = df_model(
                [{"image": resize_like_torchvision(image), "height": 160, "width": 300}]
            )[0]["instances"]
    finally:
        tv_model.roi_heads.score_thresh = 0.05
        df_model.roi_heads.box_predictor.test_score_thresh = 0.05
    assert len(tv_out["boxes"]) == 0
    assert len(df_out) == 0 and df_out.image_size == (160, 300)
    if mask_on:
        assert df_out.pred_masks.shape == (0, 160, 300)


def training_batch(mask_on: bool) -> tuple[list, list, list]:
    """Two images already at torchvision's size (no resize), with boxes, labels and masks;
    the second image has no objects. Returns torchvision's images and targets and
    detframe's inputs."""
    g = torch.Generator().manual_seed(7)
    sizes = [(MIN_SIZE, 288), (MIN_SIZE, 320)]
    images = [random_image(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    tv_targets, df_inputs = [], []
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        count = 4 if i == 0 else 0
        xy = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor(
            [w - 80.0, h - 80]
        )
        boxes = torch.cat([xy, xy + 20 + 60 * torch.rand(count, 2, generator=g)], dim=1)
        labels = torch.randint(1, 91, (count,), generator=g)
        masks = torch.zeros(count, h, w, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist(), strict=True):
            mask[y0:y1, x0 : (x0 + x1) // 2 + 1] = 1  # the left half of the box
        target = {"boxes": boxes, "labels": labels}
        instances = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=labels - 1)
        if mask_on:
            target["masks"] = masks
            instances.gt_masks = BitMasks(masks.bool())
        tv_targets.append(target)
        df_inputs.append({"image": image, "instances": instances})
    return images, tv_targets, df_inputs


def test_same_training_losses(
    models: tuple[nn.Module, nn.Module, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    tv_model, df_model, mask_on = models
    tv_model.train()
    df_model.train()
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    images, tv_targets, df_inputs = training_batch(mask_on)
    tv_losses = tv_model(images, tv_targets)
    df_losses = df_model(df_inputs)
    expected = {k: v for k, v in LOSS_NAMES.items() if mask_on or k != "loss_mask"}
    assert set(df_losses) == set(expected)
    for name, tv_name in expected.items():
        torch.testing.assert_close(
            df_losses[name], tv_losses[tv_name].to(df_losses[name]), rtol=1e-6, atol=1e-9, msg=name
        )
    # The losses reach the trainable weights (torchvision freezes the stem and res2, as does
    # the config), and the validation losses of an evaluation-mode model are the same.
    sum(df_losses.values()).backward()
    assert df_model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert df_model.backbone.bottom_up.layer1[0].conv1.weight.grad is None
    assert df_model.backbone.bottom_up.layer2[0].conv1.weight.grad.abs().sum() > 0
