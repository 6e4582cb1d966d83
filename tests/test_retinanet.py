"""RetinaNet's parts against hand computations and torchvision's ops: the head's
initialisation, anchor labelling, both loss normalisers, and detectron2's anchors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from detframe.engine.setup import load_config
from detframe.modeling import build_model
from detframe.modeling.box_coder import Box2BoxTransform
from detframe.modeling.meta_arch import RetinaNet, RetinaNetHead
from detframe.structures import Boxes, Instances

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = [
    "MODEL.DEVICE=cpu",
    "MODEL.WEIGHTS=''",
    "MODEL.RESNETS.DEPTH=18",
    "MODEL.FPN.OUT_CHANNELS=32",
]


def small_retinanet(*overrides: str) -> RetinaNet:
    torch.manual_seed(0)
    config = CONFIGS / "COCO-Detection" / "retinanet_R_50_FPN_1x.yaml"
    return build_model(load_config(config, [*SMALL, *overrides]))


def test_head_initialisation_and_shapes() -> None:
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=5, prior_prob=0.01)
    assert torch.allclose(head.cls_score.bias, torch.full((45,), -math.log(99.0)))
    assert float(head.cls_convs[0].weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert not head.bbox_pred.bias.any()
    features = [torch.randn(2, 32, 8, 12), torch.randn(2, 32, 4, 6)]
    logits, deltas = head(features)
    assert [tuple(x.shape) for x in logits] == [(2, 45, 8, 12), (2, 45, 4, 6)]
    assert [tuple(x.shape) for x in deltas] == [(2, 36, 8, 12), (2, 36, 4, 6)]
    gn = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=5, norm="GN")
    assert isinstance(gn.cls_norms[0], torch.nn.GroupNorm) and gn.cls_convs[0].bias is None
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNetHead(in_channels=32, num_anchors=9, num_classes=0)


def test_detectron2_anchors_are_exact_and_size_major() -> None:
    model = small_retinanet()
    base = model.anchor_generator.cell_anchors[0]  # p3: 3 sizes x 3 ratios, size-major
    expected = []
    for size in (32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)):
        for ratio in (0.5, 1.0, 2.0):
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
    torch.testing.assert_close(base, torch.tensor(expected), rtol=0, atol=1e-5)
    assert model.head.num_anchors == 9


def test_anchor_labels_foreground_ignored_background_and_empty_images() -> None:
    model = small_retinanet("MODEL.RETINANET.NUM_CLASSES=3")
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with the gt: foreground
            [0.0, 0.0, 10.0, 8.0],  # IoU 0.8: foreground
            [0.0, 0.0, 10.0, 4.5],  # IoU 0.45: ignored
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2: background
            [50.0, 50.0, 60.0, 60.0],  # IoU 0: background
        ]
    )
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]])))
    gt.gt_classes = torch.tensor([2])
    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0))
    classes, boxes = model.label_anchors(anchors, [gt, empty])
    assert classes.tolist() == [[2, 2, -1, 3, 3], [3, 3, 3, 3, 3]]
    assert boxes[0, 0].tolist() == [0.0, 0.0, 10.0, 10.0] and not boxes[1].any()


def _loss_inputs() -> tuple:
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(6, 2, generator=g, dtype=torch.float64) * 20
    anchors = torch.cat([anchors, anchors + 5 + 10 * torch.rand(6, 2, generator=g)], dim=1)
    logits = [torch.randn(2, 6, 3, generator=g, dtype=torch.float64)]
    deltas = [0.1 * torch.randn(2, 6, 4, generator=g, dtype=torch.float64)]
    gt_classes = torch.tensor([[0, 2, -1, 3, 3, 1], [3, 3, 3, 3, 3, 3]])
    gt_boxes = anchors[None].expand(2, 6, 4) + torch.rand(2, 6, 4, generator=g) * 2
    return anchors, logits, deltas, gt_classes, gt_boxes


def _reference_sums(model: RetinaNet, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: focal loss summed over valid anchors (torchvision's op), smooth L1 summed
    over foreground anchors (torch's), from the formulas."""
    anchors, (logits,), (deltas,), gt_classes, gt_boxes = inputs
    cls, box = [], []
    for i in range(2):
        valid = gt_classes[i] >= 0
        target = F.one_hot(gt_classes[i].clamp(min=0), 4)[:, :3].to(logits.dtype)
        cls.append(tv_focal_loss(logits[i][valid], target[valid], 0.25, 2.0, reduction="sum"))
        fg = valid & (gt_classes[i] < 3)
        target_deltas = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).get_deltas(
            anchors[fg], gt_boxes[i][fg]
        )
        box.append(F.smooth_l1_loss(deltas[i][fg], target_deltas, beta=0.1, reduction="sum"))
    return torch.stack(cls), torch.stack(box)


def test_per_image_normaliser_is_torchvisions() -> None:
    model = small_retinanet(
        "MODEL.RETINANET.NUM_CLASSES=3", "MODEL.RETINANET.LOSS_NORMALIZER=per_image"
    )
    inputs = _loss_inputs()
    losses = model.losses(*inputs)
    cls, box = _reference_sums(model, inputs)
    foreground = torch.tensor([3.0, 1.0])  # image 1 has none: divided by 1
    torch.testing.assert_close(losses["loss_cls"], (cls / foreground).mean())
    torch.testing.assert_close(losses["loss_box_reg"], (box / foreground).mean())


def test_moving_average_normaliser_is_detectron2s() -> None:
    model = small_retinanet("MODEL.RETINANET.NUM_CLASSES=3")
    inputs = _loss_inputs()
    cls, box = _reference_sums(model, inputs)
    model.train()
    first = model.losses(*inputs)
    normalizer = 0.9 * 100 + 0.1 * 3  # 3 foreground anchors in the batch
    torch.testing.assert_close(first["loss_cls"], cls.sum() / normalizer)
    torch.testing.assert_close(first["loss_box_reg"], box.sum() / normalizer)
    second = model.losses(*inputs)
    torch.testing.assert_close(second["loss_cls"], cls.sum() / (0.9 * normalizer + 0.1 * 3))
    model.eval()  # evaluation: the batch's own count, the average untouched
    torch.testing.assert_close(model.losses(*inputs)["loss_cls"], cls.sum() / 3)
    assert model.normalizer_average == pytest.approx(0.9 * normalizer + 0.1 * 3)


def test_a_training_step_and_detections_from_a_config() -> None:
    model = small_retinanet("MODEL.RETINANET.NUM_CLASSES=3", "MODEL.RETINANET.NORM=GN")
    image = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8)  # P7: 2 x 3 (GN)
    gt = Instances((200, 260), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 60.0, 70.0]])))
    gt.gt_classes = torch.tensor([1])
    model.train()
    losses = model([{"image": image, "instances": gt}])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert model.head.cls_convs[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 400, "width": 520}])
    detections = output["instances"]
    assert detections.image_size == (400, 520)
    assert len(detections) <= 100 and (detections.scores > 0.05).all()
    assert set(detections.pred_classes.tolist()) <= {0, 1, 2}
