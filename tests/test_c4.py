"""ResNet-C4 R-CNN (Res5ROIHeads) against detectron2's published R50-C4 and torchvision.

References are independent of detframe's code: detectron2's R50-C4 state dict (names and
shapes) written out below from its model code (detectron2/modeling/backbone/resnet.py
`BasicStem` / `BottleneckBlock`, modeling/roi_heads/roi_heads.py `Res5ROIHeads`,
modeling/proposal_generator/rpn.py `StandardRPNHead`, `FastRCNNOutputLayers`,
`MaskRCNNConvUpsampleHead`; FrozenBatchNorm2d holds four buffers); torchvision's ImageNet
`resnet50` state dict for the weight loading; and, for the box branch, torchvision's
`roi_align` and `Bottleneck` blocks with the box decoding written out in PyTorch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck as TVBottleneck
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from detframe.engine.setup import load_config
from detframe.layers import FrozenBatchNorm2d, ShapeSpec
from detframe.modeling import GeneralizedRCNN, ResNet, build_model, load_weights
from detframe.modeling.roi_heads import Res5ROIHeads, Res5Stage, build_roi_heads
from detframe.structures import BitMasks, Boxes, Instances

ROOT = Path(__file__).resolve().parents[1]
FASTER = ROOT / "configs" / "COCO-Detection" / "faster_rcnn_R_50_C4_1x.yaml"
MASK = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_C4_1x.yaml"
FULL = ["MODEL.DEVICE=cpu", "MODEL.WEIGHTS=''"]
# A narrow ResNet-50-C4 (res4 128 channels, res5 256) on 64 x 96 images: well under a second.
NARROW = [
    *FULL,
    "MODEL.RESNETS.RES2_OUT_CHANNELS=32",
    "MODEL.RESNETS.WIDTH_PER_GROUP=8",
    "MODEL.RESNETS.STEM_OUT_CHANNELS=16",
    "MODEL.RESNETS.FREEZE_AT=0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN=200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN=100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST=100",
    "MODEL.RPN.POST_NMS_TOPK_TEST=50",
    "MODEL.ROI_HEADS.NUM_CLASSES=3",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM=16",
]
NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def build(config: Path, *overrides: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(load_config(config, list(overrides)))


def randomise_norms(model: nn.Module) -> nn.Module:
    """Random affine parameters and statistics in every frozen norm of `model`."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TVFrozenBN | FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def sample(h: int, w: int, boxes: list[list[float]], seed: int) -> dict:
    """An input dict: a uint8 image [3, h, w] and instances with box-shaped masks."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, box_tensor.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = True
    instances = Instances(
        (h, w),
        gt_boxes=Boxes(box_tensor),
        gt_classes=torch.arange(len(boxes)) % 3,
        gt_masks=BitMasks(masks),
    )
    return {"image": image, "height": h, "width": w, "instances": instances}


# --- structure parity with detectron2's R50-C4 --------------------------------------------


def detectron2_r50_c4(mask_on: bool) -> dict[str, tuple[int, ...]]:
    """detectron2's R50-C4 state dict for COCO (80 classes): {name: shape}."""
    table: dict[str, tuple[int, ...]] = {}

    def conv_norm(name: str, c_out: int, c_in: int, k: int) -> None:
        table[f"{name}.weight"] = (c_out, c_in, k, k)
        table.update({f"{name}.norm.{b}": (c_out,) for b in NORM_BUFFERS})

    conv_norm("backbone.stem.conv1", 64, 3, 7)
    # (stage, blocks, input channels, bottleneck channels, output channels)
    stages = [
        ("backbone.res2", 3, 64, 64, 256),
        ("backbone.res3", 4, 256, 128, 512),
        ("backbone.res4", 6, 512, 256, 1024),
        ("roi_heads.res5", 3, 1024, 512, 2048),
    ]
    for stage, blocks, c_in, width, c_out in stages:
        for b in range(blocks):
            if b == 0:
                conv_norm(f"{stage}.0.shortcut", c_out, c_in, 1)
            conv_norm(f"{stage}.{b}.conv1", width, c_in if b == 0 else c_out, 1)
            conv_norm(f"{stage}.{b}.conv2", width, width, 3)
            conv_norm(f"{stage}.{b}.conv3", c_out, width, 1)
    table.update(
        {
            "proposal_generator.rpn_head.conv.weight": (1024, 1024, 3, 3),
            "proposal_generator.rpn_head.conv.bias": (1024,),
            "proposal_generator.rpn_head.objectness_logits.weight": (15, 1024, 1, 1),
            "proposal_generator.rpn_head.objectness_logits.bias": (15,),
            "proposal_generator.rpn_head.anchor_deltas.weight": (60, 1024, 1, 1),
            "proposal_generator.rpn_head.anchor_deltas.bias": (60,),
            "roi_heads.box_predictor.cls_score.weight": (81, 2048),
            "roi_heads.box_predictor.cls_score.bias": (81,),
            "roi_heads.box_predictor.bbox_pred.weight": (320, 2048),
            "roi_heads.box_predictor.bbox_pred.bias": (320,),
        }
    )
    if mask_on:
        table.update(
            {
                "roi_heads.mask_head.deconv.weight": (2048, 256, 2, 2),
                "roi_heads.mask_head.deconv.bias": (256,),
                "roi_heads.mask_head.predictor.weight": (80, 256, 1, 1),
                "roi_heads.mask_head.predictor.bias": (80,),
            }
        )
    return table


def detectron2_name(key: str) -> str:
    """detframe's key (torchvision's ResNet names) -> detectron2's."""
    key = re.sub(r"^backbone\.conv1\.", "backbone.stem.conv1.", key)
    key = re.sub(r"^backbone\.bn1\.", "backbone.stem.conv1.norm.", key)
    key = re.sub(r"^backbone\.layer(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}.", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key.replace("proposal_generator.head.", "proposal_generator.rpn_head.")


@pytest.mark.parametrize("config", [FASTER, MASK], ids=["faster", "mask"])
def test_structure_matches_detectron2_r50_c4(config: Path) -> None:
    model = build(config, *FULL)
    assert isinstance(model.backbone, ResNet) and isinstance(model.roi_heads, Res5ROIHeads)
    expected = detectron2_r50_c4(mask_on=config == MASK)
    ours = {detectron2_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    mismatched = {k: (ours[k], shape) for k, shape in expected.items() if ours[k] != shape}
    assert not mismatched
    # Every tensor but the FrozenBN buffers is a parameter, in both.
    num_params = sum(math.prod(shape) for k, shape in expected.items() if ".norm." not in k)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert model.backbone.output_shape() == {"res4": ShapeSpec(1024, 16)}
    # FREEZE_AT 2 freezes the stem and res2 of the backbone; res5 in the head trains.
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k in frozen if k.startswith(("backbone.conv1", "backbone.layer1"))}
    assert frozen and all(p.requires_grad for p in model.roi_heads.parameters())


def test_imagenet_resnet50_initialises_backbone_and_res5_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = randomise_norms(torchvision.models.resnet50(norm_layer=TVFrozenBN))
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    model = build(MASK, *FULL)
    report = load_weights(model, str(path), strict=False)
    file_keys = [k for k in tv.state_dict() if not k.startswith("fc.")]
    assert report.format == "torchvision_classifier"
    assert report.loaded == report.total == len(file_keys)
    assert not (report.missing or report.unexpected or report.mismatched)
    ours = model.state_dict()
    for key in file_keys:
        own = re.sub(r"^layer4\.", "roi_heads.res5.", key)
        own = own if own.startswith("roi_heads.") else f"backbone.{key}"
        assert torch.equal(ours[own], tv.state_dict()[key]), key
    # Without layer4 the res5 head cannot be initialised: an error naming its keys.
    torch.save({k: v for k, v in tv.state_dict().items() if "layer4" not in k}, path)
    with pytest.raises(
        ValueError, match=r"roi_heads\.res5 \(Res5Stage\).*not in it \(layer4\.0\.conv1\.weight"
    ):
        load_weights(model, str(path), strict=False)


# --- the narrow model end to end ------------------------------------------------------------


def count_calls(module: nn.Module) -> list[torch.Tensor]:
    """The outputs of every forward of `module` from now on."""
    outputs: list[torch.Tensor] = []
    module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    return outputs


def test_training_losses_share_res5_between_box_and_mask() -> None:
    model = build(MASK, *NARROW)
    model.train()
    res5_outputs = count_calls(model.roi_heads.res5)
    mask_logits = count_calls(model.roi_heads.mask_head)
    batch = [
        sample(64, 96, [[10.0, 10.0, 50.0, 40.0], [40.0, 20.0, 90.0, 60.0]], seed=0),
        sample(64, 80, [[5.0, 8.0, 30.0, 50.0]], seed=1),
    ]
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # One res5 pass on the 2 x 32 sampled proposals; the mask head reads its foreground rows.
    assert len(res5_outputs) == 1 and res5_outputs[0].shape == (64, 256, 7, 7)
    (logits,) = mask_logits
    assert logits.shape[1:] == (3, 14, 14) and 3 <= logits.shape[0] <= 16
    # The mask loss alone trains res5 (the shared features), not the box predictor.
    losses["loss_mask"].backward()
    assert model.roi_heads.res5[0].conv1.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None


def test_evaluation_gives_instances_with_masks() -> None:
    model = build(MASK, *NARROW)
    model.eval()
    res5_outputs = count_calls(model.roi_heads.res5)
    mask_logits = count_calls(model.roi_heads.mask_head)
    batch = [sample(64, 96, [[10.0, 10.0, 50.0, 40.0]], seed=2), sample(48, 64, [], seed=3)]
    with torch.no_grad():
        (first, second) = [out["instances"] for out in model.inference(batch)]
    # res5 on the proposals, then on the detections for their masks.
    assert len(res5_outputs) == 2
    assert len(mask_logits) == 1 and mask_logits[0].shape == (len(first) + len(second), 3, 14, 14)
    for d, size in ((first, (64, 96)), (second, (48, 64))):
        assert d.image_size == size and len(d) > 0
        assert d.pred_masks.dtype == torch.bool and d.pred_masks.shape == (len(d), *size)
        assert d.scores.shape == d.pred_classes.shape == (len(d),)


def tv_res5(res5: Res5Stage) -> nn.Sequential:
    """torchvision's layer4 of a ResNet-50 as narrow as `res5` (in 128, out 256, 3x3 width
    64; stride in the 3x3 conv), with FrozenBatchNorm2d, holding `res5`'s weights."""
    norm = TVFrozenBN
    downsample = nn.Sequential(nn.Conv2d(128, 256, 1, stride=2, bias=False), norm(256))
    blocks = nn.Sequential(
        TVBottleneck(128, 64, stride=2, downsample=downsample, norm_layer=norm),
        TVBottleneck(256, 64, norm_layer=norm),
        TVBottleneck(256, 64, norm_layer=norm),
    )
    blocks.load_state_dict(res5.state_dict())
    return blocks.double().eval()


def decode(deltas: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """detectron2's Box2BoxTransform.apply_deltas with weights (10, 10, 5, 5), clipped.

    deltas [R, K, 4], boxes [R, 4] -> [R, K, 4]."""
    widths, heights = boxes[:, 2:3] - boxes[:, 0:1], boxes[:, 3:4] - boxes[:, 1:2]
    cx, cy = boxes[:, 0:1] + 0.5 * widths, boxes[:, 1:2] + 0.5 * heights
    dx, dy = deltas[..., 0] / 10, deltas[..., 1] / 10
    dw = (deltas[..., 2] / 5).clamp(max=math.log(1000.0 / 16))
    dh = (deltas[..., 3] / 5).clamp(max=math.log(1000.0 / 16))
    pcx, pcy = cx + dx * widths, cy + dy * heights
    pw, ph = widths * dw.exp(), heights * dh.exp()
    x = torch.stack([pcx - 0.5 * pw, pcx + 0.5 * pw], dim=-1).clamp(0, size[1])
    y = torch.stack([pcy - 0.5 * ph, pcy + 0.5 * ph], dim=-1).clamp(0, size[0])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def test_box_branch_matches_a_pure_torch_pipeline() -> None:
    # Every (ROI, class) pair is a detection: no score threshold, no suppression.
    model = build(
        FASTER,
        *NARROW,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
        "MODEL.ROI_HEADS.NMS_THRESH_TEST=1.0",
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=1000",
    )
    heads, predictor = model.roi_heads, model.roi_heads.box_predictor
    randomise_norms(heads.res5)
    model.double().eval()
    size = (128, 192)
    boxes = torch.tensor([[9.0, 12.0, 80.0, 101.0], [60.0, 24.5, 180.0, 70.0]], dtype=torch.float64)
    with torch.no_grad():
        res4 = model.backbone(torch.randn(1, 3, *size, dtype=torch.float64))["res4"]
        rois = torch.cat([torch.zeros(2, 1, dtype=torch.float64), boxes], dim=1)
        pooled = roi_align(res4, rois, 14, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
        features = tv_res5(heads.res5)(pooled).mean(dim=(2, 3))  # [2, 256]
        # Predictor weights that make logits and deltas of order 1 on these features, so
        # that a wrong feature, class or delta shows in the scores and boxes.
        scale = features.norm(dim=1).mean()
        predictor.cls_score.weight.normal_(std=2 / scale)
        predictor.bbox_pred.weight.normal_(std=2 / scale)
        logits = F.linear(features, predictor.cls_score.weight, predictor.cls_score.bias)
        probs = logits.softmax(dim=1)[:, :3]  # [2, 3]; the background is last
        deltas = F.linear(features, predictor.bbox_pred.weight, predictor.bbox_pred.bias)
        expected_boxes = decode(deltas.view(2, 3, 4), boxes, size)  # [2, 3, 4]

        (detections,) = heads.inference(
            {"res4": res4}, [Instances(size, proposal_boxes=Boxes(boxes))]
        )
    assert probs.min() > 0.01 and probs.max() < 0.99
    order = probs.flatten().argsort(descending=True)
    assert len(detections) == 6
    torch.testing.assert_close(detections.scores, probs.flatten()[order])
    assert torch.equal(detections.pred_classes, torch.arange(3).repeat(2)[order])
    torch.testing.assert_close(detections.pred_boxes.tensor, expected_boxes.view(6, 4)[order])


# --- configs and errors -----------------------------------------------------------------------


def test_configs_mirror_detectron2_c4_defaults() -> None:
    cfg = load_config(MASK, FULL).MODEL
    assert cfg.BACKBONE.NAME == "ResNet" and list(cfg.RESNETS.OUT_FEATURES) == ["res4"]
    assert list(cfg.RPN.IN_FEATURES) == list(cfg.ROI_HEADS.IN_FEATURES) == ["res4"]
    assert [list(s) for s in cfg.ANCHOR_GENERATOR.SIZES] == [[32, 64, 128, 256, 512]]
    assert [list(r) for r in cfg.ANCHOR_GENERATOR.ASPECT_RATIOS] == [[0.5, 1.0, 2.0]]
    rpn = cfg.RPN
    assert (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST) == (12000, 6000)
    assert (rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST) == (2000, 1000)
    assert cfg.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512 and cfg.ROI_HEADS.POSITIVE_FRACTION == 0.25
    box = cfg.ROI_BOX_HEAD
    assert (box.POOLER_RESOLUTION, box.POOLER_TYPE, box.POOLER_SAMPLING_RATIO) == (
        14,
        "ROIAlignV2",
        0,
    )
    assert cfg.ROI_MASK_HEAD.NUM_CONV == 0 and cfg.MASK_ON
    assert not load_config(FASTER, FULL).MODEL.MASK_ON


def test_res5_stage_is_torchvision_layer4_for_any_depth() -> None:
    for depth, in_channels in ((18, 256), (34, 256), (50, 1024)):
        ours = Res5Stage(depth=depth, in_channels=in_channels)
        theirs = getattr(torchvision.models, f"resnet{depth}")().layer4
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items() if "num_batches" not in k
        }
        key_map = ours.imagenet_key_map()
        assert key_map.keys == {k: f"layer4.{k}" for k in ours.state_dict()}


def test_res5_roi_heads_pool_one_feature_map() -> None:
    cfg = load_config(FASTER, [*NARROW, "MODEL.ROI_HEADS.IN_FEATURES=[res3,res4]"])
    shapes = {"res3": ShapeSpec(128, 8), "res4": ShapeSpec(128, 16)}
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.IN_FEATURES: Res5ROIHeads pools one"):
        build_roi_heads(cfg, shapes)
