"""RegionCNN (R-CNN 2014): the warp against torchvision's RoIAlign, grid_sample and the
pixels themselves, pool5 against torchvision's VGG16, and the model end to end against a
computation by hand, on a narrow ResNet-18 (64 x 64 regions) so that each test is quick.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from detframe.engine.setup import load_config
from detframe.modeling import build_model
from detframe.modeling.box_coder import Box2BoxTransform
from detframe.modeling.matcher import Matcher
from detframe.modeling.meta_arch import RegionCNN
from detframe.modeling.meta_arch.region_cnn import (
    RegionCNNOutputLayers,
    context_boxes,
    warp_regions,
)
from detframe.modeling.proposal_generator import PrecomputedProposals
from detframe.modeling.roi_heads import FastRCNNConvFCHead, ROIHeads
from detframe.structures import Boxes, Instances

ROOT = Path(__file__).resolve().parents[1]
K = 3  # classes of the small model
SMALL = [
    "MODEL.META_ARCHITECTURE=RegionCNN",
    "MODEL.DEVICE=cpu",
    "MODEL.BACKBONE.NAME=ResNet",
    "MODEL.RESNETS.DEPTH=18",
    "MODEL.RESNETS.FREEZE_AT=0",
    "MODEL.RESNETS.STEM_OUT_CHANNELS=8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS=8",
    "MODEL.RESNETS.OUT_FEATURES=[res4]",
    "MODEL.REGION_CNN.IN_FEATURE=res4",
    "MODEL.REGION_CNN.WARP_SIZE=64",  # res4: 4 x 4, pooled 2 x 2 to pool5 (P = 2)
    "MODEL.REGION_CNN.CONTEXT_PADDING=8",
    "MODEL.ROI_BOX_HEAD.NAME=FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.FC_DIM=32",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION=2",
    f"MODEL.ROI_HEADS.NUM_CLASSES={K}",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=8",
]


def small_model(tmp_path: Path, *overrides: str) -> RegionCNN:
    torch.manual_seed(0)
    path = tmp_path / "config.yaml"
    path.write_text("")
    model = build_model(load_config(path, [*SMALL, *overrides]))
    assert isinstance(model, RegionCNN)
    return model


def sample(h: int, w: int, boxes: list[list[float]], count: int, seed: int) -> dict:
    """An input: a uint8 image, gt instances, and `count` random proposals."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    gt = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([w - 12.0, h - 12.0])
    proposals = torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=g) * 30], dim=1)
    proposals = proposals.clamp(max=torch.tensor([w, h, w, h], dtype=torch.float32))
    return {
        "image": image,
        "instances": Instances((h, w), gt_boxes=Boxes(gt), gt_classes=torch.arange(len(boxes)) % K),
        "proposals": Instances(
            (h, w),
            proposal_boxes=Boxes(proposals),
            objectness_logits=torch.linspace(1, 0, count),
        ),
    }


# ---------------------------------------------------------------------------------------
# Context padding and warping


def test_context_padding_dilates_by_s_over_s_minus_2p() -> None:
    boxes = torch.tensor([[10.0, 20.0, 70.0, 140.0], [0.0, 0.0, 195.0, 390.0]])
    # 224 / (224 - 32) = 7 / 6: the 60 x 120 box centred at (40, 80) becomes 70 x 140.
    torch.testing.assert_close(
        context_boxes(boxes[:1], 224, 16), torch.tensor([[5.0, 10.0, 75.0, 150.0]])
    )
    # 227 / 195 (the paper's sizes): the 195 x 390 box becomes 227 x 454.
    torch.testing.assert_close(
        context_boxes(boxes[1:], 227, 16), torch.tensor([[-16.0, -32.0, 211.0, 422.0]])
    )
    # In the warped frame, the proposal spans [p, S - p] on both axes.
    regions = context_boxes(boxes, 224, 16)
    size = regions[:, 2:] - regions[:, :2]
    torch.testing.assert_close(
        (boxes[:, :2] - regions[:, :2]) / size * 224, torch.full((2, 2), 16.0)
    )
    torch.testing.assert_close(
        (boxes[:, 2:] - regions[:, :2]) / size * 224, torch.full((2, 2), 208.0)
    )


def test_warped_proposal_with_context_is_the_pixels_around_it() -> None:
    image = torch.randn(3, 80, 90, dtype=torch.float64)
    # A 48 x 48 proposal with p = 8 and S = 64: its region is the 64 x 64 pixels around it.
    proposal = torch.tensor([[20.0, 14.0, 68.0, 62.0]], dtype=torch.float64)
    warped = warp_regions(image, context_boxes(proposal, 64, 8), 64, sampling_ratio=1)
    torch.testing.assert_close(warped[0], image[:, 6:70, 12:76], rtol=0, atol=1e-12)


def grid_sample_warp(image: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """Bilinear samples at the centres of a size x size grid over `box`, by grid_sample."""
    x1, y1, x2, y2 = box
    steps = (torch.arange(size, dtype=image.dtype) + 0.5) / size
    xs = x1 + steps * (x2 - x1)  # continuous pixel coordinates, pixel k spans [k, k + 1]
    ys = y1 + steps * (y2 - y1)
    height, width = image.shape[1:]
    grid = torch.stack(torch.meshgrid(2 * xs / width - 1, 2 * ys / height - 1, indexing="xy"), -1)
    return F.grid_sample(image[None], grid[None], mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(
    "box", [[10.3, 7.7, 31.1, 42.9], [5.0, 5.0, 12.0, 9.0], [2.6, 3.1, 37.4, 26.8]]
)
def test_warp_is_bilinear_resampling_inside_the_image(box: list[float]) -> None:
    image = torch.randn(3, 30, 40, dtype=torch.float64)
    warped = warp_regions(image, torch.tensor([box], dtype=torch.float64), 16, sampling_ratio=1)
    torch.testing.assert_close(warped[0], grid_sample_warp(image, box, 16))


@pytest.mark.parametrize("sampling_ratio", [1, 0])
def test_warp_beyond_the_border_matches_torchvision(sampling_ratio: int) -> None:
    image = torch.randn(3, 30, 40, dtype=torch.float64)
    boxes = torch.tensor(
        [[-12.0, -5.5, 20.0, 18.0], [25.0, 10.0, 61.5, 44.0], [-30.0, -40.0, 70.0, 80.0]],
        dtype=torch.float64,
    )
    warped = warp_regions(image, boxes, 16, sampling_ratio)
    expected = torchvision.ops.roi_align(image[None], [boxes], 16, 1.0, sampling_ratio, True)
    torch.testing.assert_close(warped, expected)
    # More than a pixel out of the image the region is 0: the image mean once normalised.
    assert (warped[2, :, :3] == 0).all() and (warped[2, :, -3:] == 0).all()
    assert warped[2, :, 6:10, 6:10].abs().sum() > 0


def test_adaptive_warp_averages_the_pixels_when_shrinking() -> None:
    image = torch.randn(3, 30, 40, dtype=torch.float64)
    box = torch.tensor([[4.0, 6.0, 20.0, 22.0]], dtype=torch.float64)  # 16 x 16 -> 8 x 8
    warped = warp_regions(image, box, 8, sampling_ratio=0)
    torch.testing.assert_close(warped[0], F.avg_pool2d(image[None, :, 6:22, 4:20], 2)[0])


# ---------------------------------------------------------------------------------------
# pool5 against torchvision's VGG16


def test_pool5_is_torchvision_vgg16_pool5() -> None:
    vgg_module = pytest.importorskip("detframe.modeling.backbone.vgg")
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    backbone = vgg_module.VGG(depth=16, out_features=["conv5_3"], freeze_at=0)
    state = features.state_dict()
    backbone.load_state_dict(
        {k: state[v.removeprefix("features.")] for k, v in backbone.imagenet_key_map().keys.items()}
    )
    model = RegionCNN(
        backbone=backbone,
        in_feature="conv5_3",
        box_head=FastRCNNConvFCHead(in_channels=512, pooler_resolution=7, fc_dims=[8]),
        box_predictor=RegionCNNOutputLayers(
            input_size=8,
            bbox_input_size=512 * 7 * 7,
            num_classes=2,
            box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        ),
        proposal_selector=PrecomputedProposals(topk=(10, 10)),
        sampler=ROIHeads(
            num_classes=2,
            proposal_matcher=Matcher([0.5], [0, 1]),
            batch_size_per_image=8,
            positive_fraction=0.25,
        ),
        pool_size=7,
        warp_size=224,
        context_padding=16,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    ).eval()
    image = torch.randn(3, 240, 250)
    proposal = torch.tensor([[20.0, 20.0, 212.0, 212.0]])  # 192 = 224 - 2 * 16
    with torch.no_grad():
        regions = warp_regions(image, context_boxes(proposal, 224, 16), 224, 1)
        pool5 = model.pool5(regions)
        expected = features(image[None, :, 4:228, 4:228])  # the region: 16 px around
    assert pool5.shape == expected.shape == (1, 512, 7, 7)
    torch.testing.assert_close(pool5, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------
# The model end to end


def test_training_step_samples_and_trains_every_part(tmp_path: Path) -> None:
    model = small_model(tmp_path)
    model.train()
    rows = []
    model.box_predictor.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
    batch = [
        sample(60, 70, [[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 66.0, 30.0]], 20, seed=0),
        sample(50, 64, [], 12, seed=1),  # no ground truth: all background
    ]
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    assert sum(rows) == 2 * 8  # BATCH_SIZE_PER_IMAGE regions of each image
    sum(losses.values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    # The box regressor reads pool5 (32 channels x 2 x 2), the classifier fc7 (32).
    assert model.box_predictor.bbox_pred.in_features == 32 * 2 * 2
    assert model.box_predictor.cls_score.in_features == 32


def reference_detections(
    model: RegionCNN, x: dict, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, boxes, classes) of every (proposal, class) pair, computed by hand with
    torchvision's RoIAlign, F.max_pool2d, F.linear and the delta formulas; boxes clipped to
    the image and multiplied by `scale` (the reported size over the image's)."""
    h, w = x["image"].shape[1:]
    image = (x["image"].float() - model.pixel_mean.float()) / model.pixel_std.float()
    boxes = x["proposals"].proposal_boxes.tensor
    centres, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    half = sizes * 64 / (64 - 2 * 8) / 2  # the region: p = 8 pixels of context at S = 64
    regions = torch.cat([centres - half, centres + half], dim=1)
    crops = torchvision.ops.roi_align(image[None], [regions], 64, 1.0, 1, aligned=True)
    pool5 = F.max_pool2d(model.backbone(crops)["res4"], 2)  # 4 x 4 -> P x P = 2 x 2
    predictor = model.box_predictor
    fc7 = model.box_head(pool5)
    probs = F.softmax(F.linear(fc7, predictor.cls_score.weight, predictor.cls_score.bias), 1)
    deltas = F.linear(pool5.flatten(1), predictor.bbox_pred.weight, predictor.bbox_pred.bias)
    dx, dy, dw, dh = (deltas.view(-1, K, 4) / torch.tensor([10.0, 10.0, 5.0, 5.0])).unbind(-1)
    cx = centres[:, None, 0] + dx * sizes[:, None, 0]
    cy = centres[:, None, 1] + dy * sizes[:, None, 1]
    bw = torch.exp(dw.clamp(max=math.log(1000 / 16))) * sizes[:, None, 0]
    bh = torch.exp(dh.clamp(max=math.log(1000 / 16))) * sizes[:, None, 1]
    decoded = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    decoded[..., 0::2] = decoded[..., 0::2].clamp(0, w)
    decoded[..., 1::2] = decoded[..., 1::2].clamp(0, h)
    classes = torch.arange(K).expand(len(boxes), K)
    return probs[:, :K].flatten(), decoded.view(-1, 4) * scale, classes.flatten()


def test_evaluation_gives_every_detection_in_original_coordinates(tmp_path: Path) -> None:
    # Score threshold 0 and NMS at IoU 1 keep every (proposal, class) pair.
    model = small_model(
        tmp_path,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
        "MODEL.ROI_HEADS.NMS_THRESH_TEST=1.0",
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE=1000",
        "MODEL.REGION_CNN.CHUNK_SIZE=4",
    ).eval()
    batch = [sample(60, 70, [[10.0, 12.0, 40.0, 50.0]], 9, seed=2), sample(40, 52, [], 5, seed=3)]
    batch[0]["height"], batch[0]["width"] = 120, 140  # report at twice the size
    with torch.no_grad():
        outputs, losses = model.outputs_and_losses(batch)
        references = [
            reference_detections(model, x, s) for x, s in zip(batch, (2.0, 1.0), strict=True)
        ]
    assert set(losses) == {"loss_cls", "loss_box_reg"}  # validation losses with targets
    assert [out["instances"].image_size for out in outputs] == [(120, 140), (40, 52)]
    for output, (scores, boxes, classes) in zip(outputs, references, strict=True):
        detections = output["instances"]
        order = torch.argsort(scores, descending=True)
        torch.testing.assert_close(detections.scores, scores[order], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(detections.pred_boxes.tensor, boxes[order], rtol=1e-4, atol=1e-3)
        assert torch.equal(detections.pred_classes, classes[order])


def test_chunking_does_not_change_the_result(tmp_path: Path) -> None:
    batch = [sample(60, 70, [], 11, seed=4), sample(48, 50, [], 3, seed=5)]
    results = []
    for chunk_size in (1, 5, 64):
        model = small_model(tmp_path, f"MODEL.REGION_CNN.CHUNK_SIZE={chunk_size}").eval()
        with torch.no_grad():
            results.append([out["instances"] for out in model.inference(batch)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert len(a) == len(b) > 0
            # Convolutions of other batch sizes may round differently (float32).
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=1e-3)


def test_inputs_without_proposals_are_named(tmp_path: Path) -> None:
    model = small_model(tmp_path).eval()
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="RegionCNN needs 'proposals' in every input"):
        model([{"image": image}])
    with pytest.raises(ValueError, match=r"inputs \[1\] have no 'proposals'"):
        proposals = sample(32, 32, [], 3, seed=0)["proposals"]
        model([{"image": image, "proposals": proposals}, {"image": image}])


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MODEL.REGION_CNN.IN_FEATURE 'conv5_3'.*\['res4'\]"):
        small_model(tmp_path, "MODEL.REGION_CNN.IN_FEATURE=conv5_3")
    with pytest.raises(ValueError, match=r"context_padding 32 .* warp_size 64"):
        small_model(tmp_path, "MODEL.REGION_CNN.CONTEXT_PADDING=32")


def test_config_builds_vgg16_rcnn() -> None:
    pytest.importorskip("detframe.modeling.backbone.vgg")
    pytest.importorskip("detframe.modeling.roi_heads.vgg_head")
    config = ROOT / "configs" / "COCO-Detection" / "rcnn_vgg16.yaml"
    model = build_model(load_config(config, ["MODEL.DEVICE=cpu", "MODEL.WEIGHTS=''"]))
    assert isinstance(model, RegionCNN)
    assert type(model.backbone).__name__ == "VGG" and type(model.box_head).__name__ == "VGGFCHead"
    assert (model.warp_size, model.context_padding, model.pool_size) == (224, 16, 7)
    assert model.box_predictor.cls_score.weight.shape == (81, 4096)
    assert model.box_predictor.bbox_pred.weight.shape == (80 * 4, 512 * 7 * 7)
