"""StandardROIHeads against torchvision's RoIHeads, and its training corner cases.

torchvision's `RoIHeads` (MultiScaleRoIAlign, TwoMLPHead, FastRCNNPredictor, MaskRCNNHeads,
MaskRCNNPredictor; 91 classes, background 0) is built with random weights, converted into
detframe's layout (background logit last, no background deltas or mask channel) and both run
in float64 on the same random FPN-like features and proposals: same detections and mask
probabilities in evaluation mode, same losses in training mode (torch.randperm replaced by
arange in both, so that the sampling is the same).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from detframe.engine.setup import load_config
from detframe.layers import ShapeSpec
from detframe.modeling.roi_heads import StandardROIHeads, build_roi_heads
from detframe.structures import BitMasks, Boxes, ImageList, Instances

C = 16  # channels of the features
PAD_H, PAD_W = 256, 320  # padded batch size
IMAGE_SIZES = [(256, 320), (240, 300)]
NAMES = ["p2", "p3", "p4", "p5"]
STRIDES = [4, 8, 16, 32]
TV_OVERRIDES = [
    "MODEL.MASK_ON=true",
    "MODEL.ROI_HEADS.NUM_CLASSES=90",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.05",
    "MODEL.ROI_HEADS.MIN_SIZE_TEST=0.01",
    "MODEL.ROI_BOX_HEAD.FC_DIM=64",
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE=ROIAlign",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO=2",
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA=0.1111111111111111",
    "MODEL.ROI_MASK_HEAD.CONV_DIM=16",
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE=ROIAlign",
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO=2",
    "MODEL.ROI_MASK_HEAD.TARGET_ALIGNED=false",
    "MODEL.ROI_MASK_HEAD.BINARY_TARGETS=false",
]
INPUT_SHAPE = {n: ShapeSpec(channels=C, stride=s) for n, s in zip(NAMES, STRIDES, strict=True)}


def make_cfg(tmp_path: Path, overrides: list[str]):
    path = tmp_path / "cfg.yaml"
    path.write_text("")
    return load_config(path, overrides)


def torchvision_heads(score_thresh: float = 0.05) -> RoIHeads:
    torch.manual_seed(0)
    box_head = TwoMLPHead(C * 49, 64)
    box_predictor = FastRCNNPredictor(64, 91)
    with torch.no_grad():
        box_predictor.cls_score.weight.normal_(std=3.0)  # confident random scores
        box_predictor.bbox_pred.weight.normal_(std=1.0)
    heads = RoIHeads(
        MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head,
        box_predictor,
        0.5,
        0.5,
        512,
        0.25,
        None,
        score_thresh,
        0.5,
        100,
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
        mask_head=MaskRCNNHeads(C, [16] * 4, 1),
        mask_predictor=MaskRCNNPredictor(16, 16, 91),
    )
    return heads.double()


def convert(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision RoIHeads state dict -> StandardROIHeads (written out, independently of
    detframe.modeling.weights)."""
    out = {}
    for key, value in tv_state.items():
        parts = key.split(".")
        if key.startswith("box_head.fc6."):
            out[f"box_head.fc1.{parts[-1]}"] = value
        elif key.startswith("box_head.fc7."):
            out[f"box_head.fc2.{parts[-1]}"] = value
        elif key.startswith("box_predictor.cls_score."):
            out[key] = torch.cat([value[1:], value[:1]])
        elif key.startswith("box_predictor.bbox_pred."):
            out[key] = value[4:]
        elif key.startswith("mask_head."):  # mask_head.{i}.0.weight
            out[f"mask_head.mask_fcn{int(parts[1]) + 1}.{parts[-1]}"] = value
        elif key.startswith("mask_predictor.conv5_mask."):
            out[f"mask_head.deconv.{parts[-1]}"] = value
        elif key.startswith("mask_predictor.mask_fcn_logits."):
            out[f"mask_head.predictor.{parts[-1]}"] = value[1:]
        else:
            raise AssertionError(f"unexpected torchvision key {key}")
    return out


def detframe_heads(tmp_path: Path, tv: RoIHeads, extra: list[str] = ()) -> StandardROIHeads:
    heads = build_roi_heads(make_cfg(tmp_path, TV_OVERRIDES + list(extra)), INPUT_SHAPE).double()
    heads.load_state_dict(convert(tv.state_dict()))
    return heads


def random_features(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, C, PAD_H // s, PAD_W // s, generator=g, dtype=torch.float64) for s in STRIDES
    ]


def random_boxes(n: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """n boxes inside an image of `size`, sides 4 .. ~250 px (all four pooled levels)."""
    h, w = size
    wh = torch.exp(torch.empty(n, 2, dtype=torch.float64).uniform_(1.4, 5.5, generator=g))
    wh = torch.minimum(wh, torch.tensor([w - 1.0, h - 1.0], dtype=torch.float64))
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * (
        torch.tensor([w, h], dtype=torch.float64) - wh
    )
    return torch.cat([xy, xy + wh], dim=1)


def gt_and_proposals(seed: int = 2, num_gt=(3, 2), num_random=150):
    """Per image: gt boxes [G, 4], classes [G] in [0, 90), masks [G, H, W] and proposals
    (random boxes plus jittered copies of the gt boxes, so that some match)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for size, count in zip(IMAGE_SIZES, num_gt, strict=True):
        gt = random_boxes(count, size, g)
        classes = torch.randint(0, 90, (count,), generator=g)
        masks = torch.zeros((count, *size), dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(gt.round().long().tolist()):
            blob = torch.rand(y2 - y1, x2 - x1, generator=g) > 0.3
            masks[i, y1:y2, x1:x2] = blob
        wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        jitter = gt.repeat(20, 1) + 0.15 * wh.repeat(20, 1) * torch.randn(
            20 * count, 4, generator=g, dtype=torch.float64
        )
        jitter = torch.cat([jitter[:, :2], torch.maximum(jitter[:, 2:], jitter[:, :2] + 1)], 1)
        jitter[:, 0::2] = jitter[:, 0::2].clamp(0, size[1])
        jitter[:, 1::2] = jitter[:, 1::2].clamp(0, size[0])
        proposals = torch.cat([random_boxes(num_random, size, g), jitter])
        data.append((gt, classes, masks, proposals))
    return data


def as_detframe(data):
    proposals = [
        Instances(size, proposal_boxes=Boxes(d[3]))
        for size, d in zip(IMAGE_SIZES, data, strict=True)
    ]
    targets = [
        Instances(size, gt_boxes=Boxes(gt), gt_classes=cls, gt_masks=BitMasks(masks))
        for size, (gt, cls, masks, _) in zip(IMAGE_SIZES, data, strict=True)
    ]
    return proposals, targets


def as_torchvision(data):
    proposals = [d[3] for d in data]
    targets = [
        {"boxes": gt, "labels": cls + 1, "masks": masks.to(torch.uint8)}
        for gt, cls, masks, _ in data
    ]
    return proposals, targets


def images() -> ImageList:
    return ImageList(torch.zeros(2, 3, PAD_H, PAD_W, dtype=torch.float64), IMAGE_SIZES)


@pytest.fixture
def arange_randperm(monkeypatch):
    def arange(n, *args, device=None, **kwargs):
        return torch.arange(n, device=device)

    monkeypatch.setattr(torch, "randperm", arange)


@pytest.mark.parametrize("score_thresh", [0.05, 0.7])
def test_evaluation_matches_torchvision(tmp_path, score_thresh):
    """Score threshold 0.05: DETECTIONS_PER_IMAGE (100) caps both images; 0.7: it does not."""
    tv = torchvision_heads(score_thresh).eval()
    heads = detframe_heads(
        tmp_path, tv, [f"MODEL.ROI_HEADS.SCORE_THRESH_TEST={score_thresh}"]
    ).eval()
    feats = random_features()
    data = gt_and_proposals()
    tv_features = OrderedDict((str(i), f) for i, f in enumerate(feats))
    with torch.no_grad():
        expected, _ = tv(tv_features, as_torchvision(data)[0], IMAGE_SIZES)
        detections, losses = heads(
            images(), dict(zip(NAMES, feats, strict=True)), as_detframe(data)[0]
        )
    assert losses == {}
    counts = [len(d) for d in detections]
    assert counts == [len(e["boxes"]) for e in expected]
    assert counts == [100, 100] if score_thresh < 0.5 else 0 < min(counts) <= max(counts) < 100
    for det, exp, size in zip(detections, expected, IMAGE_SIZES, strict=True):
        assert det.image_size == size
        torch.testing.assert_close(det.pred_boxes.tensor, exp["boxes"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(det.scores, exp["scores"], rtol=1e-9, atol=1e-12)
        assert torch.equal(det.pred_classes + 1, exp["labels"])
        assert det.pred_masks.shape == exp["masks"].shape == (len(det), 1, 28, 28)
        torch.testing.assert_close(det.pred_masks, exp["masks"], rtol=1e-9, atol=1e-12)


def test_training_losses_match_torchvision(tmp_path, arange_randperm):
    tv = torchvision_heads().train()
    heads = detframe_heads(tmp_path, tv).train()
    feats = random_features()
    data = gt_and_proposals()
    tv_features = OrderedDict((str(i), f) for i, f in enumerate(feats))
    expected = tv(tv_features, *_tv_inputs(data))[1]
    detections, losses = heads(images(), dict(zip(NAMES, feats, strict=True)), *as_detframe(data))
    assert detections == []
    names = {
        "loss_cls": "loss_classifier",
        "loss_box_reg": "loss_box_reg",
        "loss_mask": "loss_mask",
    }
    assert set(losses) == set(names)
    for ours, theirs in names.items():
        torch.testing.assert_close(losses[ours], expected[theirs], rtol=0, atol=1e-10)
    assert losses["loss_box_reg"] > 0 and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert heads.mask_head.mask_fcn1.weight.grad.abs().sum() > 0


def _tv_inputs(data):
    proposals, targets = as_torchvision(data)
    return proposals, IMAGE_SIZES, targets


def test_validation_losses_in_evaluation_mode(tmp_path, arange_randperm):
    """With targets in evaluation mode: torchvision's detections and its training losses."""
    tv = torchvision_heads()
    heads = detframe_heads(tmp_path, tv).eval()
    feats = random_features(3)
    data = gt_and_proposals(4)
    tv_features = OrderedDict((str(i), f) for i, f in enumerate(feats))
    expected_losses = tv.train()(tv_features, *_tv_inputs(data))[1]
    expected = tv.eval()(tv_features, as_torchvision(data)[0], IMAGE_SIZES)[0]
    with torch.no_grad():
        detections, losses = heads(
            images(), dict(zip(NAMES, feats, strict=True)), *as_detframe(data)
        )
    torch.testing.assert_close(losses["loss_cls"], expected_losses["loss_classifier"])
    torch.testing.assert_close(losses["loss_mask"], expected_losses["loss_mask"])
    torch.testing.assert_close(losses["loss_box_reg"], expected_losses["loss_box_reg"])
    for det, exp in zip(detections, expected, strict=True):
        torch.testing.assert_close(det.pred_boxes.tensor, exp["boxes"], rtol=1e-6, atol=1e-9)


def test_image_without_gt_matches_torchvision(tmp_path, arange_randperm):
    tv = torchvision_heads().train()
    heads = detframe_heads(tmp_path, tv).train()
    feats = random_features()
    data = gt_and_proposals(num_gt=(0, 2))
    tv_features = OrderedDict((str(i), f) for i, f in enumerate(feats))
    expected = tv(tv_features, *_tv_inputs(data))[1]
    _, losses = heads(images(), dict(zip(NAMES, feats, strict=True)), *as_detframe(data))
    torch.testing.assert_close(losses["loss_cls"], expected["loss_classifier"])
    torch.testing.assert_close(losses["loss_box_reg"], expected["loss_box_reg"])
    torch.testing.assert_close(losses["loss_mask"], expected["loss_mask"])


def test_no_foreground_at_all(tmp_path):
    """No gt in one image, gt that no proposal overlaps in the other, gt not appended: only
    background is sampled; box and mask losses are 0 and still backpropagate."""
    tv = torchvision_heads()
    heads = detframe_heads(tmp_path, tv, ["MODEL.ROI_HEADS.PROPOSAL_APPEND_GT=false"]).train()
    feats = [f.requires_grad_() for f in random_features()]
    g = torch.Generator().manual_seed(5)
    proposals = [
        Instances(s, proposal_boxes=Boxes(random_boxes(40, (s[0] // 2, s[1] // 2), g)))
        for s in IMAGE_SIZES
    ]
    far = torch.tensor([[200.0, 180.0, 290.0, 235.0]], dtype=torch.float64)
    masks = torch.zeros(1, *IMAGE_SIZES[1], dtype=torch.bool)
    targets = [
        Instances(
            IMAGE_SIZES[0],
            gt_boxes=Boxes(torch.zeros(0, 4, dtype=torch.float64)),
            gt_classes=torch.zeros(0, dtype=torch.int64),
            gt_masks=BitMasks(torch.zeros(0, *IMAGE_SIZES[0])),
        ),
        Instances(
            IMAGE_SIZES[1],
            gt_boxes=Boxes(far),
            gt_classes=torch.tensor([7]),
            gt_masks=BitMasks(masks),
        ),
    ]
    _, losses = heads(images(), dict(zip(NAMES, feats, strict=True)), proposals, targets)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    # All 80 proposals are sampled as background (class 90): plain cross-entropy.
    pooled = heads.box_pooler(feats, [p.proposal_boxes for p in proposals])
    scores, _ = heads.box_predictor(heads.box_head(pooled))
    expected = F.cross_entropy(scores, torch.full((80,), 90))
    torch.testing.assert_close(losses["loss_cls"], expected)
    sum(losses.values()).backward()
    assert feats[0].grad is not None and heads.mask_head.predictor.weight.grad is not None


def test_class_agnostic_box_regression(tmp_path, arange_randperm):
    """CLS_AGNOSTIC_BBOX_REG: 4 deltas per ROI; the loss uses them for every foreground ROI
    and detections of all classes of a ROI share one box."""
    cfg = make_cfg(tmp_path, [*TV_OVERRIDES, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG=true"])
    heads = build_roi_heads(cfg, INPUT_SHAPE).double()
    assert heads.box_predictor.bbox_pred.out_features == 4
    with torch.no_grad():
        heads.box_predictor.cls_score.weight.normal_(std=3.0)
        heads.box_predictor.bbox_pred.weight.normal_(std=1.0)
    feats = dict(zip(NAMES, random_features(), strict=True))
    proposals, targets = as_detframe(gt_and_proposals())
    losses = heads.train()(images(), feats, proposals, targets)[1]
    # Reference: torchvision's BoxCoder and smooth L1 over the sampled foreground.
    from torchvision.models.detection._utils import BoxCoder

    sampled = heads.label_and_sample_proposals(proposals, targets)
    pooled = heads.box_pooler([feats[n] for n in NAMES], [p.proposal_boxes for p in sampled])
    _, deltas = heads.box_predictor(heads.box_head(pooled))
    classes = torch.cat([p.gt_classes for p in sampled])
    fg = classes < 90
    boxes = torch.cat([p.proposal_boxes.tensor for p in sampled])
    gt = torch.cat([p.gt_boxes.tensor for p in sampled])
    target = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt[fg], boxes[fg])
    expected = F.smooth_l1_loss(deltas[fg], target, beta=1 / 9, reduction="sum") / len(classes)
    torch.testing.assert_close(losses["loss_box_reg"], expected)

    with torch.no_grad():
        detections = heads.eval()(images(), feats, proposals)[0]
    pooled = heads.box_pooler([feats[n] for n in NAMES], [p.proposal_boxes for p in proposals])
    deltas = heads.box_predictor(heads.box_head(pooled))[1][: len(proposals[0])]
    decoded = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(
        deltas, proposals[0].proposal_boxes.tensor
    )
    decoded[:, 0::2] = decoded[:, 0::2].clamp(0, IMAGE_SIZES[0][1])
    decoded[:, 1::2] = decoded[:, 1::2].clamp(0, IMAGE_SIZES[0][0])
    # Every detection's box is the single decoded box of one proposal.
    assert len(detections[0]) > 0
    difference = detections[0].pred_boxes.tensor[:, None] - decoded[None]
    distance = difference.abs().amax(dim=2).min(dim=1).values
    assert distance.max() < 1e-9


def test_from_config_checks_features(tmp_path):
    cfg = make_cfg(tmp_path, ["MODEL.ROI_HEADS.IN_FEATURES=[p2,p9]"])
    with pytest.raises(ValueError, match="p9"):
        build_roi_heads(cfg, INPUT_SHAPE)
    shapes = {**INPUT_SHAPE, "p3": ShapeSpec(channels=8, stride=8)}
    with pytest.raises(ValueError, match="channel"):
        build_roi_heads(make_cfg(tmp_path, []), shapes)
    heads = build_roi_heads(make_cfg(tmp_path, []), INPUT_SHAPE)
    assert heads.mask_head is None and heads.box_pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    with pytest.raises(ValueError, match="targets"):
        heads.train()(images(), {}, as_detframe(gt_and_proposals())[0])


def test_evaluation_with_an_image_without_proposals(tmp_path):
    heads = detframe_heads(tmp_path, torchvision_heads()).eval()
    feats = dict(zip(NAMES, random_features(), strict=True))
    proposals = as_detframe(gt_and_proposals())[0]
    proposals[0] = proposals[0][torch.zeros(len(proposals[0]), dtype=torch.bool)]
    with torch.no_grad():
        detections, _ = heads(images(), feats, proposals)
    assert len(detections[0]) == 0 and detections[0].pred_masks.shape == (0, 1, 28, 28)
    assert len(detections[1]) == 100
