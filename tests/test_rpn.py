"""RPN against torchvision's RegionProposalNetwork (float64), and hand-computed small cases.

Parity setup: 2 images (128x180 and 96x128, padded to 128x192), random FPN-like features p2..p6
(16 channels, strides 4..64, maps 32x48 .. 2x3), torchvision's RPN settings expressed by config
(rounded anchors, MIN_SIZE 1e-3, SMOOTH_L1_BETA 1/9, LOSS_NORMALIZER "sampled", top-k 2000 / 1000),
the head's weights copied from torchvision's RPNHead. torch.randperm is replaced by arange in both
for training so that both sample the same anchors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList as TvImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.ops import box_iou, generalized_box_iou_loss

from detframe.engine.setup import load_config
from detframe.layers import ShapeSpec
from detframe.modeling.box_coder import Box2BoxTransform
from detframe.modeling.proposal_generator import (
    RPN,
    StandardRPNHead,
    build_proposal_generator,
    find_top_proposals,
)
from detframe.structures import Boxes, ImageList, Instances

CHANNELS = 16
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
PADDED = (128, 192)
IMAGE_SIZES = [(128, 180), (96, 128)]
TV_SETTINGS = [
    "MODEL.ANCHOR_GENERATOR.ROUND=true",
    "MODEL.RPN.MIN_SIZE=0.001",
    f"MODEL.RPN.SMOOTH_L1_BETA={1 / 9!r}",
    "MODEL.RPN.LOSS_NORMALIZER=sampled",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN=2000",
]
SHAPES = {name: ShapeSpec(channels=CHANNELS, stride=s) for name, s in STRIDES.items()}


def config(tmp_path: Path, overrides: list[str]):
    path = tmp_path / "config.yaml"
    path.write_text("")
    return load_config(path, overrides)


def features(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(2, CHANNELS, PADDED[0] // s, PADDED[1] // s, generator=g).double())
        for name, s in STRIDES.items()
    )


def gt_boxes(count: int, image_size: tuple[int, int], seed: int) -> torch.Tensor:
    """[count, 4] float64 boxes inside the image, 10..90 px wide."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    wh = 10 + torch.rand(count, 2, generator=g, dtype=torch.float64) * 80
    x1 = torch.rand(count, generator=g, dtype=torch.float64) * (w - wh[:, 0])
    y1 = torch.rand(count, generator=g, dtype=torch.float64) * (h - wh[:, 1])
    return torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)


def models(tmp_path: Path, overrides: tuple[str, ...] = ()) -> tuple[RegionProposalNetwork, RPN]:
    """torchvision's RPN (head weights ~ N(0, 0.1) for varied deltas) and detframe's RPN
    built from the config with the same head weights, both float64."""
    anchor_generator = AnchorGenerator(
        ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    )
    tv_head = RPNHead(CHANNELS, 3)
    torch.manual_seed(0)
    for p in tv_head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tv = RegionProposalNetwork(
        anchor_generator,
        tv_head,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    ).double()
    ours = build_proposal_generator(config(tmp_path, [*TV_SETTINGS, *overrides]), SHAPES).double()
    assert isinstance(ours, RPN)
    renames = {"conv.0.0": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}
    state = {}
    for key, value in tv.head.state_dict().items():
        module, param = key.rsplit(".", 1)
        state[f"{renames[module]}.{param}"] = value
    ours.head.load_state_dict(state)
    return tv, ours


def images() -> tuple[TvImageList, ImageList]:
    tensor = torch.zeros(2, 3, *PADDED, dtype=torch.float64)
    return TvImageList(tensor, IMAGE_SIZES), ImageList(tensor, IMAGE_SIZES)


def run_torchvision(tv: RegionProposalNetwork, feats, targets=None):
    """tv's proposals, sigmoid scores (captured from filter_proposals) and losses."""
    captured = {}
    filter_proposals = tv.filter_proposals

    def capture(*args, **kwargs):
        out = filter_proposals(*args, **kwargs)
        captured["scores"] = out[1]
        return out

    tv.filter_proposals = capture
    # torchvision makes the anchor labels float32 whatever the dtype; float64 keeps its
    # objectness loss in float64 (the labels are 1, 0 and -1: exact in both).
    assign_targets_to_anchors = tv.assign_targets_to_anchors

    def labels_in_float64(*args):
        labels, matched_gt_boxes = assign_targets_to_anchors(*args)
        return [label.double() for label in labels], matched_gt_boxes

    tv.assign_targets_to_anchors = labels_in_float64
    boxes, losses = tv(images()[0], feats, targets)
    return boxes, captured["scores"], losses


def assert_same_proposals(ours: list[Instances], tv_boxes, tv_scores) -> None:
    assert len(ours) == len(tv_boxes) == 2
    for i, (mine, boxes, scores) in enumerate(zip(ours, tv_boxes, tv_scores, strict=True)):
        assert mine.image_size == IMAGE_SIZES[i]
        # NMS removed something and min size dropped the padding's degenerate boxes.
        assert 50 < len(boxes) < 5000
        assert len(mine) == len(boxes)
        torch.testing.assert_close(mine.proposal_boxes.tensor, boxes, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(mine.objectness_logits.sigmoid(), scores, rtol=1e-12, atol=0)
        assert not mine.objectness_logits.requires_grad
        assert not mine.proposal_boxes.tensor.requires_grad


def test_eval_proposals_match_torchvision(tmp_path: Path) -> None:
    tv, ours = models(tmp_path)
    tv.eval()
    ours.eval()
    feats = features()
    tv_boxes, tv_scores, _ = run_torchvision(tv, feats)
    with torch.no_grad():
        proposals, losses = ours(images()[1], feats)
    assert losses == {}
    assert_same_proposals(proposals, tv_boxes, tv_scores)


GT_CASES = {"both_have_gt": (4, 3), "second_without_gt": (5, 0), "no_gt": (0, 0)}


@pytest.mark.parametrize("counts", GT_CASES.values(), ids=GT_CASES.keys())
def test_training_losses_and_proposals_match_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts: tuple[int, int]
) -> None:
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    tv, ours = models(tmp_path)
    tv.train()
    ours.train()
    feats = features(1)
    gts = [
        gt_boxes(c, size, seed=i)
        for i, (c, size) in enumerate(zip(counts, IMAGE_SIZES, strict=True))
    ]
    targets = [{"boxes": b} for b in gts]
    tv_boxes, tv_scores, tv_losses = run_torchvision(tv, feats, targets)
    gt_instances = [Instances(s, gt_boxes=Boxes(b)) for s, b in zip(IMAGE_SIZES, gts, strict=True)]
    proposals, losses = ours(images()[1], feats, gt_instances)

    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert losses["loss_rpn_cls"].item() > 0.1
    torch.testing.assert_close(
        losses["loss_rpn_cls"], tv_losses["loss_objectness"], rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        losses["loss_rpn_loc"], tv_losses["loss_rpn_box_reg"], rtol=0, atol=1e-10
    )
    if sum(counts) > 0:
        assert losses["loss_rpn_loc"].item() > 1e-3
    else:
        assert losses["loss_rpn_loc"].item() == 0.0
    assert_same_proposals(proposals, tv_boxes, tv_scores)

    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    for name, p in ours.head.named_parameters():
        # Without foreground the box loss is 0 and the delta layer gets no gradient.
        has_gradient = sum(counts) > 0 or not name.startswith("anchor_deltas")
        assert p.grad is not None and bool(p.grad.abs().sum() > 0) == has_gradient, name


def test_loss_normalizer_and_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "batch_size" divides by 256 * N instead of the sampled count; LOSS_WEIGHT scales both;
    losses are computed in evaluation mode too (same samples as in training)."""
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    _, sampled = models(tmp_path)
    _, by_batch = models(
        tmp_path, ("MODEL.RPN.LOSS_NORMALIZER=batch_size", "MODEL.RPN.LOSS_WEIGHT=2.0")
    )
    feats = features(2)
    gt = [Instances(s, gt_boxes=Boxes(gt_boxes(3, s, seed=7))) for s in IMAGE_SIZES]
    sampled.train()
    _, losses_sampled = sampled(images()[1], feats, gt)
    by_batch.eval()
    _, losses_batch = by_batch(images()[1], feats, gt)
    anchors = by_batch.anchor_generator([feats[f] for f in STRIDES])
    labels, _ = by_batch.label_and_sample_anchors(anchors, gt)
    num_sampled = sum(int((label >= 0).sum()) for label in labels)
    assert num_sampled == 2 * 256  # plenty of background in both images
    assert sum(int((label == 1).sum()) for label in labels) > 2
    for key in ("loss_rpn_cls", "loss_rpn_loc"):
        expected = losses_sampled[key] * num_sampled / (256 * 2) * 2.0
        torch.testing.assert_close(losses_batch[key], expected, rtol=1e-12, atol=0)


def test_giou_box_loss_matches_torchvision_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BBOX_REG_LOSS_TYPE=giou: torchvision's GIoU loss of the boxes decoded (BoxCoder) from
    the head's deltas (flattened by torchvision's concat_box_prediction_layers) at the
    sampled foreground anchors, divided by the sampled count."""
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    _, ours = models(tmp_path, ("MODEL.RPN.BBOX_REG_LOSS_TYPE=giou",))
    assert ours.box_reg_loss_type == "giou"
    ours.train()
    feats = features(6)
    gt = [Instances(s, gt_boxes=Boxes(gt_boxes(3, s, seed=11))) for s in IMAGE_SIZES]
    _, losses = ours(images()[1], feats, gt)

    maps = [feats[f] for f in STRIDES]
    anchors = torch.cat(ours.anchor_generator(maps, image_size=PADDED))
    labels, matched = ours.label_and_sample_anchors([anchors], gt)
    logits, deltas = ours.head(maps)
    _, deltas = concat_box_prediction_layers(logits, deltas)  # [N * A_total, 4]
    labels, matched = torch.cat(labels), torch.cat(matched)
    pos = labels == 1
    boxes = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas[pos], anchors.repeat(2, 1)[pos])
    expected = generalized_box_iou_loss(boxes, matched[pos], reduction="sum") / (labels >= 0).sum()
    assert int(pos.sum()) > 2
    torch.testing.assert_close(losses["loss_rpn_loc"], expected, rtol=1e-12, atol=0)


def test_l1_box_loss_ignores_beta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BBOX_REG_LOSS_TYPE=l1 with beta 1/9 is smooth_l1 with beta 0; smooth_l1 with 1/9 is not."""
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    feats = features(7)
    gt = [Instances(s, gt_boxes=Boxes(gt_boxes(3, s, seed=12))) for s in IMAGE_SIZES]
    results = {}
    for name, overrides in {
        "l1": ("MODEL.RPN.BBOX_REG_LOSS_TYPE=l1",),
        "beta0": ("MODEL.RPN.SMOOTH_L1_BETA=0.0",),
        "beta": (),
    }.items():
        _, rpn = models(tmp_path, overrides)
        results[name] = rpn(images()[1], feats, gt)[1]["loss_rpn_loc"]
    torch.testing.assert_close(results["l1"], results["beta0"], rtol=0, atol=0)
    assert not torch.allclose(results["l1"], results["beta"])


def test_all_anchors_ignored_gives_zero_losses_with_gradients(tmp_path: Path) -> None:
    """No gt and background labelled -1: nothing is sampled; the losses are 0, not NaN."""
    _, ours = models(tmp_path, ("MODEL.RPN.IOU_LABELS=[-1, -1, 1]",))
    ours.train()
    gt = [Instances(s, gt_boxes=Boxes(torch.zeros(0, 4, dtype=torch.float64))) for s in IMAGE_SIZES]
    feats = features(3)
    anchors = ours.anchor_generator([feats[f] for f in STRIDES])
    labels, _ = ours.label_and_sample_anchors(anchors, gt)
    assert all(bool((label == -1).all()) for label in labels)
    proposals, losses = ours(images()[1], feats, gt)
    assert losses["loss_rpn_cls"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()
    assert all(p.grad is not None for p in ours.head.parameters())
    assert all(len(p) > 0 for p in proposals)


def test_labels_sample_the_best_anchor_of_each_gt(tmp_path: Path) -> None:
    """A gt box far from every anchor shape still gets its best anchor(s) as foreground;
    the sample is at most batch_size_per_image per image, half of it foreground at most."""
    _, ours = models(tmp_path, ("MODEL.RPN.BATCH_SIZE_PER_IMAGE=8",))
    feats = features(4)
    anchors = ours.anchor_generator([feats[f] for f in STRIDES])
    all_anchors = torch.cat(anchors)
    thin = torch.tensor([[50.0, 40.0, 53.0, 100.0]], dtype=torch.float64)  # 3 x 60: IoU < 0.3
    gt = [Instances(s, gt_boxes=Boxes(thin)) for s in IMAGE_SIZES]
    labels, matched = ours.label_and_sample_anchors(anchors, gt)
    iou = box_iou(thin, all_anchors)
    assert iou.max() < 0.3
    for label, boxes in zip(labels, matched, strict=True):
        assert label.dtype == torch.int8 and label.shape == (len(all_anchors),)
        assert int((label >= 0).sum()) == 8 and int((label == 1).sum()) <= 4
        positives = torch.where(label == 1)[0]
        assert len(positives) >= 1
        torch.testing.assert_close(boxes[positives], thin.expand(len(positives), 4))


# --- find_top_proposals on hand-made inputs ----------------------------------------------


def top(anchors, logits, deltas=None, *, image_size=(100, 100), pre=10, post=10, min_size=0.0):
    deltas = deltas if deltas is not None else [torch.zeros(1, len(a), 4) for a in anchors]
    return find_top_proposals(
        anchors,
        logits,
        deltas,
        Box2BoxTransform((1.0, 1.0, 1.0, 1.0)),
        [image_size],
        pre_nms_topk=pre,
        post_nms_topk=post,
        nms_thresh=0.7,
        min_box_size=min_size,
    )[0]


def squares(xs: list[float], size: float = 10.0, y: float = 0.0) -> torch.Tensor:
    return torch.tensor([[x, y, x + size, y + size] for x in xs])


def test_topk_per_level_then_sorted_by_logit() -> None:
    level0 = squares([0, 20, 40, 60, 80])
    level1 = squares([0, 20, 40], size=15, y=50)
    logits0 = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0]])
    logits1 = torch.tensor([[1.0, -2.0, 0.5]])
    out = top([level0, level1], [logits0, logits1], pre=2)
    # level 0 keeps 5.0 and 3.0 (not 2.0, though above level 1's best), level 1 keeps 1.0, 0.5.
    assert out.objectness_logits.tolist() == [5.0, 3.0, 1.0, 0.5]
    expected = torch.stack([level0[4], level0[1], level1[0], level1[2]])
    torch.testing.assert_close(out.proposal_boxes.tensor, expected)
    assert len(top([level0, level1], [logits0, logits1], pre=2, post=3)) == 3


def test_deltas_decoded_clipped_and_min_size_with_ge() -> None:
    anchors = squares([0, 20, 40, 60])
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 0] = torch.tensor([0.5, 0.0, math.log(2.0), 0.0])  # centre 10, width 20 -> [0, 20]
    deltas[0, 1, 0] = -3.5  # centre 25 - 35 = -10: [-15, -5] clipped to width 0
    out = top([anchors], [logits], [deltas], image_size=(100, 65), min_size=5.0)
    # anchor 3 [60, 70] is clipped to [60, 65]: width 5 >= 5 is kept; anchor 1 is dropped.
    assert out.objectness_logits.tolist() == [4.0, 2.0, 1.0]
    expected = torch.tensor([[0.0, 0, 20, 10], [40, 0, 50, 10], [60, 0, 65, 10]])
    torch.testing.assert_close(out.proposal_boxes.tensor, expected)
    assert top(
        [anchors], [logits], [deltas], image_size=(100, 65), min_size=5.01
    ).objectness_logits.tolist() == [4.0, 2.0]


def test_non_finite_boxes_and_logits_are_dropped() -> None:
    anchors = squares([0, 20, 40, 60])
    logits = torch.tensor([[4.0, float("nan"), 2.0, 1.0]])
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 0, 0] = float("inf")
    deltas[0, 2, 3] = float("nan")
    out = top([anchors], [logits], [deltas])
    assert out.objectness_logits.tolist() == [1.0]
    torch.testing.assert_close(out.proposal_boxes.tensor, anchors[3:])


def test_nms_is_per_level() -> None:
    a = squares([0, 1])  # IoU 9/11 > 0.7
    same_level = top([a], [torch.tensor([[2.0, 1.0]])])
    assert same_level.objectness_logits.tolist() == [2.0]
    split = top([a[:1], a[1:]], [torch.tensor([[2.0]]), torch.tensor([[1.0]])])
    assert split.objectness_logits.tolist() == [2.0, 1.0]


# --- head, construction, errors -------------------------------------------------------------


def test_head_shapes_and_init() -> None:
    torch.manual_seed(0)
    head = StandardRPNHead(in_channels=32, num_anchors=3)
    x = [torch.randn(2, 32, 8, 10), torch.randn(2, 32, 4, 5)]
    logits, deltas = head(x)
    assert [t.shape for t in logits] == [(2, 3, 8, 10), (2, 3, 4, 5)]
    assert [t.shape for t in deltas] == [(2, 12, 8, 10), (2, 12, 4, 5)]
    assert abs(head.conv.weight.std().item() - 0.01) < 0.001
    assert all(bool((m.bias == 0).all()) for m in (head.conv, head.anchor_deltas))
    with pytest.raises(ValueError, match="one channel count"):
        StandardRPNHead.from_config(None, [ShapeSpec(8, 4), ShapeSpec(16, 8)])


def test_defaults_are_detectron2s(tmp_path: Path) -> None:
    rpn = build_proposal_generator(config(tmp_path, []), SHAPES)
    assert isinstance(rpn, RPN) and isinstance(rpn.head, StandardRPNHead)
    assert rpn.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert rpn.pre_nms_topk == {True: 2000, False: 1000}
    assert rpn.post_nms_topk == {True: 1000, False: 1000}
    assert (rpn.min_box_size, rpn.smooth_l1_beta, rpn.loss_normalizer) == (0.0, 0.0, "batch_size")
    assert rpn.box_reg_loss_type == "smooth_l1"
    assert rpn.head.objectness_logits.out_channels == 3
    # float32, evaluation mode with targets: validation losses and sorted, clipped proposals.
    rpn.eval()
    feats = {k: v.float() for k, v in features(5).items()}
    gt = [Instances(s, gt_boxes=Boxes(gt_boxes(2, s, 9).float())) for s in IMAGE_SIZES]
    proposals, losses = rpn(ImageList(torch.zeros(2, 3, *PADDED), IMAGE_SIZES), feats, gt)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    for p, (h, w) in zip(proposals, IMAGE_SIZES, strict=True):
        assert 0 < len(p) <= 1000
        assert bool((p.objectness_logits[:-1] >= p.objectness_logits[1:]).all())
        box = p.proposal_boxes.tensor
        assert box.dtype == torch.float32 and bool((box[:, 2:] <= torch.tensor([w, h])).all())


def test_called_with_images_features_and_gt_instances(tmp_path: Path) -> None:
    """The proposal generators' signature: (images, features, gt_instances=None)."""
    _, ours = models(tmp_path)
    feats = features()
    gt = [Instances(s, gt_boxes=Boxes(gt_boxes(2, s, seed=3))) for s in IMAGE_SIZES]
    proposals, losses = ours(images=images()[1], features=feats, gt_instances=gt)
    assert len(proposals) == 2 and set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    with pytest.raises(TypeError):
        ours(images()[1], feats, gt, [])  # no fourth (precomputed proposals) argument


def test_head_delta_width_follows_box_dim(tmp_path: Path) -> None:
    _, ours = models(tmp_path)
    assert ours.box2box_transform.box_dim == 4
    assert ours.head.anchor_deltas.out_channels == 3 * 4
    ours.head = StandardRPNHead(in_channels=CHANNELS, num_anchors=3, box_dim=5).double()
    with pytest.raises(ValueError, match=r"num_anchors \* box_dim = 3 \* 4 channels, got \[15"):
        ours(images()[1], features())


def test_bad_inputs(tmp_path: Path) -> None:
    _, ours = models(tmp_path)
    feats = features()
    with pytest.raises(ValueError, match="p6"):
        ours(images()[1], {k: v for k, v in feats.items() if k != "p6"})
    gt = [Instances(IMAGE_SIZES[0], gt_boxes=Boxes(gt_boxes(1, IMAGE_SIZES[0], 0)))]
    with pytest.raises(ValueError, match="1 gt_instances for 2 images"):
        ours(images()[1], feats, gt)
    with pytest.raises(ValueError, match="p7"):
        build_proposal_generator(config(tmp_path, ["MODEL.RPN.IN_FEATURES=[p7]"]), SHAPES)
    parts = {
        "in_features": ["p2"],
        "head": ours.head,
        "anchor_generator": ours.anchor_generator,
        "anchor_matcher": ours.anchor_matcher,
        "box2box_transform": ours.box2box_transform,
        "batch_size_per_image": 256,
        "positive_fraction": 0.5,
        "pre_nms_topk": (10, 10),
        "post_nms_topk": (10, 10),
    }
    with pytest.raises(ValueError, match="box_reg_loss_type"):
        RPN(**parts, box_reg_loss_type="diou")
    with pytest.raises(ValueError, match="loss_normalizer"):
        RPN(**parts, loss_normalizer="mean")
