"""MaskRCNNConvUpsampleHead against torchvision's MaskRCNNHeads + MaskRCNNPredictor; mask
targets against torchvision's roi_align; the loss and inference written out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import roi_align as tv_roi_align

from detframe.engine.setup import load_config
from detframe.layers import ShapeSpec
from detframe.modeling.roi_heads import (
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
    mask_targets,
)
from detframe.registry import ROI_MASK_HEAD_REGISTRY, build
from detframe.structures import BitMasks, Boxes, Instances, PolygonMasks, polygons_to_bitmask

H, W = 40, 50


def test_head_matches_torchvision():
    torch.manual_seed(0)
    fcn, predictor = MaskRCNNHeads(6, [8, 8, 8], 1), MaskRCNNPredictor(8, 10, 5)
    ours = MaskRCNNConvUpsampleHead(in_channels=6, num_classes=4, conv_dims=[8, 8, 8, 10])
    state = {
        f"mask_fcn{i + 1}.{n}": fcn.state_dict()[f"{i}.0.{n}"]
        for i in range(3)
        for n in ("weight", "bias")
    }
    for n in ("weight", "bias"):
        state[f"deconv.{n}"] = predictor.conv5_mask.state_dict()[n]
        state[f"predictor.{n}"] = predictor.mask_fcn_logits.state_dict()[n][1:]
    ours.load_state_dict(state)
    x = torch.randn(3, 6, 14, 14)
    logits = ours(x)
    assert logits.shape == (3, 4, 28, 28)
    torch.testing.assert_close(logits, predictor(fcn(x))[:, 1:])


def test_from_config(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    cfg = load_config(
        path,
        [
            "MODEL.ROI_MASK_HEAD.NUM_CONV=2",
            "MODEL.ROI_MASK_HEAD.CONV_DIM=8",
            "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK=true",
            "MODEL.ROI_MASK_HEAD.TARGET_ALIGNED=false",
            "MODEL.ROI_HEADS.NUM_CLASSES=3",
        ],
    )
    head = build(ROI_MASK_HEAD_REGISTRY, "MaskRCNNConvUpsampleHead", cfg, ShapeSpec(5, 4))
    assert [n for n, _ in head.named_children()] == [
        "mask_fcn1",
        "mask_fcn2",
        "deconv",
        "predictor",
    ]
    assert head.mask_fcn1.in_channels == 5 and head.predictor.out_channels == 1
    assert not head.target_aligned and head.binary_targets
    assert head(torch.zeros(2, 5, 7, 7)).shape == (2, 1, 14, 14)


def random_bitmasks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, H, W, generator=g) > 0.6


def rois(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(9, 2, generator=g) * torch.tensor([W - 5.0, H - 5.0])
    boxes = torch.cat([xy, xy + 1 + torch.rand(9, 2, generator=g) * 30], dim=1)
    return boxes, torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 2])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_bitmask_targets_are_roi_align_of_the_gt_mask(aligned, binary):
    masks = random_bitmasks(3)
    boxes, indices = rois()
    targets = mask_targets(
        BitMasks(masks), boxes, indices, 14, (H, W), aligned=aligned, binary=binary
    )
    tv_rois = torch.cat([indices[:, None].float(), boxes], dim=1)
    expected = tv_roi_align(masks[:, None].float(), tv_rois, 14, 1.0, -1, aligned)[:, 0]
    if binary:
        expected = (expected >= 0.5).float()
        # detectron2's targets (aligned, thresholded) are BitMasks.crop_and_resize.
        if aligned:
            torch.testing.assert_close(targets, BitMasks(masks[indices]).crop_and_resize(boxes, 14))
    torch.testing.assert_close(targets, expected)
    assert targets.dtype == boxes.dtype


def square_polygons() -> PolygonMasks:
    return PolygonMasks(
        [
            [np.array([2.0, 3.0, 30.0, 3.0, 30.0, 20.0, 2.0, 20.0])],
            [np.array([10.0, 10.0, 45.0, 12.0, 20.0, 38.0])],
            [
                np.array([0.0, 0.0, 5.0, 0.0, 5.0, 5.0]),
                np.array([20.0, 20.0, 40.0, 20.0, 30.0, 35.0]),
            ],
        ]
    )


def test_polygon_targets():
    polygons = square_polygons()
    boxes, indices = rois()
    # Aligned and binary: the polygons' own rasterisation inside each ROI.
    targets = mask_targets(polygons, boxes, indices, 14, (H, W), aligned=True, binary=True)
    torch.testing.assert_close(targets, polygons[indices].crop_and_resize(boxes, 14))
    # Otherwise: rasterised to the image, then RoIAlign.
    raster = torch.stack(
        [torch.from_numpy(polygons_to_bitmask(p, H, W)) for p in polygons.polygons]
    )
    targets = mask_targets(polygons, boxes, indices, 14, (H, W), aligned=False, binary=False)
    tv_rois = torch.cat([indices[:, None].float(), boxes], dim=1)
    torch.testing.assert_close(
        targets, tv_roi_align(raster[:, None].float(), tv_rois, 14, 1.0, -1, False)[:, 0]
    )


def fg_proposals(
    boxes: torch.Tensor, indices: torch.Tensor, classes: torch.Tensor
) -> list[Instances]:
    return [
        Instances(
            (H, W), proposal_boxes=Boxes(boxes[:5]), gt_indices=indices[:5], gt_classes=classes[:5]
        ),
        Instances(
            (H, W), proposal_boxes=Boxes(boxes[5:]), gt_indices=indices[5:], gt_classes=classes[5:]
        ),
    ]


@pytest.mark.parametrize("agnostic", [False, True])
def test_loss_by_hand(agnostic):
    masks = [BitMasks(random_bitmasks(3, seed=2)), BitMasks(random_bitmasks(3, seed=3))]
    boxes, indices = rois()
    classes = torch.tensor([3, 0, 1, 1, 2, 0, 3, 3, 1])
    logits = torch.randn(9, 1 if agnostic else 4, 28, 28, requires_grad=True)
    loss = mask_rcnn_loss(
        logits,
        fg_proposals(boxes, indices, classes),
        masks,
        target_aligned=False,
        binary_targets=False,
    )
    total = torch.zeros(())
    for i in range(9):
        gt = masks[0 if i < 5 else 1].tensor[indices[i]].float()
        roi = torch.cat([torch.zeros(1), boxes[i]])[None]
        target = tv_roi_align(gt[None, None], roi, 28, 1.0, -1, False)[0, 0]
        p = logits[i, 0 if agnostic else classes[i]].sigmoid()
        total = total - (target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(loss, total / 9)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_loss_without_foreground():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    empty = Instances(
        (H, W),
        proposal_boxes=Boxes(torch.zeros(0, 4)),
        gt_indices=torch.zeros(0, dtype=torch.int64),
        gt_classes=torch.zeros(0, dtype=torch.int64),
    )
    loss = mask_rcnn_loss(logits, [empty], [BitMasks(torch.zeros(0, H, W))])
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(TypeError, match="BitMasks or PolygonMasks"):
        mask_targets(
            torch.zeros(1, H, W),
            torch.zeros(1, 4),
            torch.zeros(1, dtype=torch.int64),
            28,
            (H, W),
            aligned=True,
            binary=True,
        )


@pytest.mark.parametrize("agnostic", [False, True])
def test_inference_picks_the_predicted_class(agnostic):
    logits = torch.randn(5, 1 if agnostic else 3, 28, 28)
    detections = [
        Instances((H, W), pred_classes=torch.tensor([2, 0])),
        Instances((H, W), pred_classes=torch.zeros(0, dtype=torch.int64)),
        Instances((H, W), pred_classes=torch.tensor([1, 1, 2])),
    ]
    mask_rcnn_inference(logits, detections)
    classes = torch.tensor([2, 0, 1, 1, 2])
    expected = torch.stack([logits[i, 0 if agnostic else classes[i]] for i in range(5)]).sigmoid()
    assert [d.pred_masks.shape[0] for d in detections] == [2, 0, 3]
    got = torch.cat([d.pred_masks for d in detections])
    assert got.shape == (5, 1, 28, 28)
    torch.testing.assert_close(got[:, 0], expected)
