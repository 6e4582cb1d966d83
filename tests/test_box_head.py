"""FastRCNNConvFCHead against torchvision's FastRCNNConvFCHead; FastRCNNOutputLayers' losses
and inference against torchvision's box coder, losses and NMS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead as TVConvFCHead
from torchvision.ops import batched_nms, generalized_box_iou_loss

from detframe.engine.setup import load_config
from detframe.layers import ShapeSpec
from detframe.modeling.box_coder import Box2BoxTransform
from detframe.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detframe.registry import ROI_BOX_HEAD_REGISTRY, build
from detframe.structures import Boxes, Instances


@pytest.mark.parametrize("norm", ["", "GN"])
def test_conv_fc_head_matches_torchvision(norm):
    torch.manual_seed(0)
    norm_layer = (lambda c: nn.GroupNorm(32, c)) if norm else None
    theirs = TVConvFCHead((8, 7, 7), [32, 32], [64, 16], norm_layer=norm_layer)
    ours = FastRCNNConvFCHead(
        in_channels=8, pooler_resolution=7, conv_dims=[32, 32], fc_dims=[64, 16], norm=norm
    )
    assert ours.output_size == 16
    # torchvision: 0, 1 = Conv2dNormActivation (conv [, norm]), 2 = Flatten, 3, 5 = Linear.
    renames = {"0": "conv1", "1": "conv2", "3": "fc1", "5": "fc2"}
    state = {}
    for key, value in theirs.state_dict().items():
        first, rest = key.split(".", 1)
        if not norm and first in ("0", "1"):
            rest = rest.split(".", 1)[1]  # conv without norm: "0.0.weight" -> "conv1.weight"
        state[f"{renames[first]}.{rest}"] = value
    ours.load_state_dict(state)
    x = torch.randn(5, 8, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).shape == (5, 16)


def test_conv_only_head_keeps_the_map_and_predictor_flattens():
    head = FastRCNNConvFCHead(in_channels=4, pooler_resolution=5, conv_dims=[6], fc_dims=[])
    x = torch.randn(3, 4, 5, 5)
    y = head(x)
    assert y.shape == (3, 6, 5, 5) and head.output_size == 150 and (y >= 0).all()
    predictor = FastRCNNOutputLayers(
        input_size=head.output_size, num_classes=2, box2box_transform=Box2BoxTransform((1,) * 4)
    )
    scores, deltas = predictor(y)
    assert scores.shape == (3, 3) and deltas.shape == (3, 8)
    with pytest.raises(ValueError, match="at least one"):
        FastRCNNConvFCHead(in_channels=4, pooler_resolution=5, conv_dims=[], fc_dims=[])


def test_box_head_from_config(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("MODEL:\n  ROI_BOX_HEAD:\n    NUM_CONV: 2\n    CONV_DIM: 8\n    FC_DIM: 32\n")
    cfg = load_config(path, ["MODEL.ROI_BOX_HEAD.NUM_FC=1", "MODEL.ROI_BOX_HEAD.NORM=BN"])
    head = build(ROI_BOX_HEAD_REGISTRY, "FastRCNNConvFCHead", cfg, ShapeSpec(channels=4, stride=4))
    names = [n for n, _ in head.named_children()]
    assert names == ["conv1", "conv2", "fc1"]
    assert head.conv1[0].bias is None and isinstance(head.conv1[1], nn.BatchNorm2d)
    assert head.fc1.in_features == 8 * 7 * 7 and head.output_size == 32


def sampled_proposals(num_classes: int, seed: int = 0) -> list[Instances]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (12, 7):
        xy = torch.rand(n, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], dim=1)
        gt = boxes + torch.randn(n, 4, generator=g)
        classes = torch.randint(0, num_classes + 1, (n,), generator=g)  # K = background
        out.append(
            Instances(
                (100, 90), proposal_boxes=Boxes(boxes), gt_classes=classes, gt_boxes=Boxes(gt)
            )
        )
    return out


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou"])
def test_losses_by_hand(agnostic, loss_type):
    k = 3
    torch.manual_seed(0)
    predictor = FastRCNNOutputLayers(
        input_size=10,
        num_classes=k,
        box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
        cls_agnostic_bbox_reg=agnostic,
        smooth_l1_beta=0.5,
        box_reg_loss_type=loss_type,
    )
    proposals = sampled_proposals(k)
    scores, deltas = predictor(torch.randn(19, 10))
    losses = predictor.losses((scores, deltas), proposals)
    classes = torch.cat([p.gt_classes for p in proposals])
    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    gt = torch.cat([p.gt_boxes.tensor for p in proposals])
    torch.testing.assert_close(losses["loss_cls"], F.cross_entropy(scores, classes))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    total = torch.zeros(())
    for i in torch.nonzero(classes < k).flatten().tolist():
        d = deltas[i] if agnostic else deltas[i, 4 * classes[i] : 4 * classes[i] + 4]
        if loss_type == "smooth_l1":
            target = coder.encode_single(gt[i : i + 1], boxes[i : i + 1])[0]
            total = total + F.smooth_l1_loss(d, target, beta=0.5, reduction="sum")
        else:
            pred = coder.decode_single(d[None], boxes[i : i + 1])
            total = total + generalized_box_iou_loss(pred, gt[i : i + 1], reduction="sum")
    torch.testing.assert_close(losses["loss_box_reg"], total / 19)


def test_losses_without_samples_are_zero_with_gradients():
    predictor = FastRCNNOutputLayers(
        input_size=4, num_classes=2, box2box_transform=Box2BoxTransform((10, 10, 5, 5))
    )
    empty = Instances(
        (10, 10),
        proposal_boxes=Boxes(torch.zeros(0, 4)),
        gt_classes=torch.zeros(0, dtype=torch.int64),
        gt_boxes=Boxes(torch.zeros(0, 4)),
    )
    losses = predictor.losses(predictor(torch.zeros(0, 4)), [empty])
    assert losses["loss_cls"].item() == 0 and losses["loss_box_reg"].item() == 0
    sum(losses.values()).backward()
    assert predictor.cls_score.weight.grad is not None


def test_inference_by_hand():
    """Softmax, per-class decoding, clipping, score and size filters, class-wise NMS, top-k:
    written out with torchvision's coder and batched_nms."""
    k = 4
    torch.manual_seed(1)
    predictor = FastRCNNOutputLayers(
        input_size=6,
        num_classes=k,
        box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
        test_score_thresh=0.2,
        test_nms_thresh=0.3,
        test_topk_per_image=7,
        test_min_size=4.0,
    )
    with torch.no_grad():
        predictor.cls_score.weight.mul_(300)
        predictor.bbox_pred.weight.mul_(500)
    proposals = sampled_proposals(k, seed=2)
    scores, deltas = predictor(torch.randn(19, 6))
    detections = predictor.inference((scores, deltas), proposals)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    probs = scores.softmax(-1)
    start = 0
    for p, det in zip(proposals, detections, strict=True):
        n = len(p)
        boxes = coder.decode_single(
            deltas[start : start + n].reshape(-1, 4),
            p.proposal_boxes.tensor.repeat_interleave(k, 0),
        )
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, 90)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 100)
        s = probs[start : start + n, :k].reshape(-1)
        classes = torch.arange(k).repeat(n)
        keep = (s > 0.2) & ((boxes[:, 2:] - boxes[:, :2]) >= 4.0).all(dim=1)
        boxes, s, classes = boxes[keep], s[keep], classes[keep]
        order = batched_nms(boxes, s, classes, 0.3)[:7]
        assert det.image_size == (100, 90) and 0 < len(det) <= 7
        torch.testing.assert_close(det.pred_boxes.tensor, boxes[order])
        torch.testing.assert_close(det.scores, s[order])
        assert torch.equal(det.pred_classes, classes[order])
        start += n
