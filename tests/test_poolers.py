"""The poolers against torchvision's MultiScaleRoIAlign / roi_align / roi_pool, levels and
context regions by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.ops
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from detframe.modeling.poolers import (
    MultiLevelROIPooler,
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
    scale_boxes_about_centre,
)
from detframe.registry import POOLER_REGISTRY, build
from detframe.structures import Boxes

STRIDES = [4, 8, 16, 32]
SCALES = [1 / s for s in STRIDES]
IMAGE = 256


def features(channels: int = 3, num_images: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_images, channels, IMAGE // s, IMAGE // s, generator=g, dtype=torch.float64)
        for s in STRIDES
    ]


def square(cx: float, cy: float, size: float, aspect: float = 1.0) -> list[float]:
    w, h = size / math.sqrt(aspect), size * math.sqrt(aspect)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def varied_boxes(seed: int) -> list[Boxes]:
    """Two images' boxes of sizes 20..600 (every level), in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    per_image = []
    for count in (9, 6):
        sizes = torch.rand(count, generator=g) * 580 + 20
        centres = torch.rand(count, 2, generator=g) * IMAGE
        aspects = torch.rand(count, generator=g) * 1.5 + 0.5
        rows = [
            square(float(c[0]), float(c[1]), float(s), float(a))
            for c, s, a in zip(centres, sizes, aspects, strict=True)
        ]
        per_image.append(Boxes(torch.tensor(rows, dtype=torch.float64)))
    return per_image


@pytest.mark.parametrize("seed", [0, 1])
def test_multiscale_roi_align_matches_torchvision(seed):
    feats = [f.requires_grad_() for f in features(seed=seed)]
    boxes = varied_boxes(seed)
    pooler = ROIPooler(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlign")
    ours = pooler(feats, boxes)

    names = ["p2", "p3", "p4", "p5"]
    reference = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    theirs = reference(
        dict(zip(names, feats, strict=True)), [b.tensor for b in boxes], [(IMAGE, IMAGE)] * 2
    )
    assert ours.shape == (15, 3, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    levels = assign_boxes_to_levels(boxes, 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level is exercised

    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), feats)
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), feats)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_level_assignment_at_canonical_sizes():
    sizes = [28.0, 56.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 896.0]
    expected = [0, 0, 0, 1, 1, 2, 2, 3, 3]  # levels 2..5, clamped at both ends
    boxes = [Boxes(torch.tensor([square(100.0, 100.0, s) for s in sizes]))]
    assert assign_boxes_to_levels(boxes, 2, 5).tolist() == expected
    # Non-square boxes are assigned by sqrt(area).
    boxes = [Boxes(torch.tensor([[0.0, 0.0, 448.0, 112.0], [0.0, 0.0, 56.0, 224.0]]))]
    assert assign_boxes_to_levels(boxes, 2, 5).tolist() == [2, 1]
    # Other canonical settings: 224 -> canonical level 3 (index 1 of levels 2..5).
    boxes = [Boxes(torch.tensor([square(0.0, 0.0, 224.0)]))]
    assert assign_boxes_to_levels(boxes, 2, 5, canonical_level=3).tolist() == [1]
    assert assign_boxes_to_levels(boxes, 2, 5, canonical_box_size=112).tolist() == [3]
    assert assign_boxes_to_levels([Boxes(torch.zeros(0, 4))], 2, 5).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_level_assignment_matches_torchvision_level_mapper(dtype):
    g = torch.Generator().manual_seed(0)
    sizes = torch.cat([torch.rand(2000, generator=g) * 1000 + 1, torch.tensor([112.0, 224.0])])
    sizes = torch.cat([sizes, sizes * (1 + 1e-7), sizes * (1 - 1e-7)]).to(dtype)
    xy = torch.rand(len(sizes), 2, generator=g, dtype=dtype) * 100
    aspects = (torch.rand(len(sizes), generator=g, dtype=dtype) + 0.5).sqrt()
    wh = torch.stack([sizes / aspects, sizes * aspects], dim=1)
    boxes = torch.cat([xy, xy + wh], dim=1)
    halves = [Boxes(boxes[:3000]), Boxes(boxes[3000:])]
    ours = assign_boxes_to_levels(halves, 2, 5)
    theirs = LevelMapper(2, 5)([b.tensor for b in halves])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("pooler_type", "reference"),
    [
        ("ROIAlignV2", lambda x, r: torchvision.ops.roi_align(x, r, 5, 1 / 8, 2, aligned=True)),
        ("ROIAlign", lambda x, r: torchvision.ops.roi_align(x, r, 5, 1 / 8, 2, aligned=False)),
        ("ROIPool", lambda x, r: torchvision.ops.roi_pool(x, r, 5, 1 / 8)),
    ],
)
def test_single_level_types_match_torchvision(pooler_type, reference):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=g, dtype=torch.float64)
    boxes = varied_boxes(3)
    boxes = [Boxes(b.tensor.clamp(0, 255) / 2) for b in boxes]  # keep most of them inside
    pooler = ROIPooler(output_size=5, scales=[1 / 8], sampling_ratio=2, pooler_type=pooler_type)
    ours = pooler([x], boxes)
    theirs = reference(x, [b.tensor for b in boxes])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_results_follow_box_order():
    feats = features()
    boxes = varied_boxes(4)
    pooler = ROIPooler(output_size=4, scales=SCALES, sampling_ratio=0, pooler_type="ROIAlignV2")
    out = pooler(feats, boxes)
    reversed_boxes = [Boxes(b.tensor.flip(0)) for b in boxes]
    out_reversed = pooler(feats, reversed_boxes)
    torch.testing.assert_close(out_reversed[:9], out[:9].flip(0), rtol=0, atol=0)
    torch.testing.assert_close(out_reversed[9:], out[9:].flip(0), rtol=0, atol=0)


def test_empty_boxes():
    feats = features(channels=5)
    pooler = ROIPooler(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlign")
    empty = Boxes(torch.zeros(0, 4, dtype=torch.float64))
    out = pooler(feats, [empty, empty])
    assert out.shape == (0, 5, 7, 7) and out.dtype == torch.float64
    # One image without boxes, one with.
    boxes = [empty, Boxes(torch.tensor([square(50.0, 50.0, 150.0)], dtype=torch.float64))]
    assert pooler(feats, boxes).shape == (1, 5, 7, 7)


def test_convert_boxes_to_pooler_format():
    boxes = [
        Boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])),
        Boxes(torch.zeros(0, 4)),
        Boxes(torch.tensor([[9.0, 10.0, 11.0, 12.0]])),
    ]
    rois = convert_boxes_to_pooler_format(boxes)
    expected = [[0, 1, 2, 3, 4], [0, 5, 6, 7, 8], [2, 9, 10, 11, 12]]
    torch.testing.assert_close(rois, torch.tensor(expected, dtype=torch.float32))


def scaled_by_hand(boxes: list[Boxes], factor: float) -> list[torch.Tensor]:
    """Each box with its centre kept and its width and height times `factor`."""
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b.tensor.unbind(1)
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * factor, (y2 - y1) * factor
        out.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1))
    return out


def test_scale_boxes_about_centre_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [-4.0, 0.0, 4.0, 2.0]])
    expected = torch.tensor([[5.0, 10.0, 35.0, 70.0], [-6.0, -0.5, 6.0, 2.5]])
    torch.testing.assert_close(scale_boxes_about_centre(boxes, 1.5), expected, rtol=0, atol=0)
    assert scale_boxes_about_centre(torch.zeros(0, 4), 2.0).shape == (0, 4)


@pytest.mark.parametrize("box_scale", [1.5, 4.0])
def test_context_regions_match_torchvision_on_scaled_boxes(box_scale):
    """FPN pooling of the scaled boxes: both the level and the region follow the scaled box."""
    feats = features(seed=5)
    boxes = varied_boxes(5)
    boxes = [Boxes(b.tensor / box_scale) for b in boxes]  # scaled back into 20..600 px
    pooler = ROIPooler(
        output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlign", box_scale=box_scale
    )
    names = ["p2", "p3", "p4", "p5"]
    reference = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    theirs = reference(
        dict(zip(names, feats, strict=True)), scaled_by_hand(boxes, box_scale), [(IMAGE, IMAGE)] * 2
    )
    torch.testing.assert_close(pooler(feats, boxes), theirs, rtol=1e-12, atol=1e-12)
    # The unscaled boxes give something else.
    unscaled = ROIPooler(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlign")
    assert not torch.allclose(unscaled(feats, boxes), theirs)


# VGG16's conv3_3, conv4_3 and conv5_3 (strides 4, 8, 16), with fewer channels.
VGG_STRIDES = [4, 8, 16]
VGG_CHANNELS = [4, 6, 5]


def vgg_features(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, c, IMAGE // s, IMAGE // s, generator=g, dtype=torch.float64)
        for c, s in zip(VGG_CHANNELS, VGG_STRIDES, strict=True)
    ]


@pytest.mark.parametrize("box_scale", [1.0, 2.0])
@pytest.mark.parametrize("pooler_type", ["ROIAlign", "ROIAlignV2", "ROIPool"])
def test_multi_level_pooler_matches_torchvision_per_level(pooler_type, box_scale):
    feats = [f.requires_grad_() for f in vgg_features(6)]
    boxes = varied_boxes(6)
    pooler = MultiLevelROIPooler(
        output_size=5,
        scales=[1 / s for s in VGG_STRIDES],
        sampling_ratio=2,
        pooler_type=pooler_type,
        box_scale=box_scale,
    )
    ours = pooler(feats, boxes)
    rois = scaled_by_hand(boxes, box_scale)
    per_level = []
    for x, stride in zip(feats, VGG_STRIDES, strict=True):
        if pooler_type == "ROIPool":
            per_level.append(torchvision.ops.roi_pool(x, rois, 5, 1 / stride))
        else:
            aligned = pooler_type == "ROIAlignV2"
            per_level.append(torchvision.ops.roi_align(x, rois, 5, 1 / stride, 2, aligned))
    theirs = torch.cat(per_level, dim=1)
    assert ours.shape == (15, sum(VGG_CHANNELS), 5, 5)
    assert pooler.output_channels(VGG_CHANNELS) == 15
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), feats)
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), feats)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_multi_level_pooler_any_scales_and_empty_boxes():
    x = [torch.randn(1, 2, 30, 30), torch.randn(1, 3, 5, 5)]
    pooler = MultiLevelROIPooler(
        output_size=3, scales=[1 / 3, 1 / 18], sampling_ratio=0, pooler_type="ROIAlignV2"
    )
    assert pooler([x[0], x[1]], [Boxes(torch.zeros(0, 4))]).shape == (0, 5, 3, 3)
    box = torch.tensor([[6.0, 9.0, 60.0, 81.0]])
    out = pooler(x, [Boxes(box)])
    rois = [box]
    expected_coarse = torchvision.ops.roi_align(x[1], rois, 3, 1 / 18, 0, aligned=True)
    torch.testing.assert_close(out[:, 2:], expected_coarse, rtol=0, atol=0)


def test_output_channels():
    fpn = ROIPooler(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlign")
    assert fpn.output_channels([256] * 4) == 256
    with pytest.raises(ValueError, match=r"one channel count; got \[256, 256, 512, 256\]"):
        fpn.output_channels([256, 256, 512, 256])
    with pytest.raises(ValueError, match="expected 4 channel counts"):
        fpn.output_channels([256] * 3)
    c4 = ROIPooler(output_size=14, scales=[1 / 16], sampling_ratio=0, pooler_type="ROIAlignV2")
    assert c4.output_channels([1024]) == 1024
    multi = MultiLevelROIPooler(
        output_size=7, scales=[1 / 4, 1 / 8, 1 / 16], sampling_ratio=2, pooler_type="ROIPool"
    )
    assert multi.output_channels([256, 512, 512]) == 1280
    with pytest.raises(ValueError, match="expected 3 channel counts"):
        multi.output_channels([256, 512])


@pytest.mark.parametrize("name", ["ROIPooler", "MultiLevelROIPooler"])
def test_registered_and_buildable_with_the_common_arguments(name):
    assert name in POOLER_REGISTRY.names()
    pooler = build(
        POOLER_REGISTRY,
        name,
        None,
        output_size=7,
        scales=SCALES,
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        box_scale=1.5,
    )
    assert type(pooler).__name__ == name and pooler.box_scale == 1.5
    assert len(pooler.level_poolers) == 4


def test_bad_arguments():
    kwargs = {"output_size": 7, "sampling_ratio": 2, "pooler_type": "ROIAlign"}
    with pytest.raises(ValueError, match="powers of 2"):
        ROIPooler(scales=[1 / 4, 1 / 6], **kwargs)
    with pytest.raises(ValueError, match="consecutive"):
        ROIPooler(scales=[1 / 4, 1 / 16], **kwargs)
    with pytest.raises(ValueError, match="pooler_type"):
        ROIPooler(scales=[1 / 4], output_size=7, sampling_ratio=2, pooler_type="RoIAlign")
    with pytest.raises(ValueError, match="box_scale must be positive"):
        MultiLevelROIPooler(scales=[1 / 4], box_scale=0.0, **kwargs)
    with pytest.raises(ValueError, match="scales must be positive"):
        MultiLevelROIPooler(scales=[1 / 4, float("nan")], **kwargs)
    pooler = ROIPooler(scales=SCALES, **kwargs)
    with pytest.raises(ValueError, match="feature maps"):
        pooler(features()[:3], varied_boxes(0))
    with pytest.raises(ValueError, match="images"):
        pooler(features(), varied_boxes(0)[:1])
    multi = MultiLevelROIPooler(scales=[1 / 4, 1 / 16], **kwargs)
    with pytest.raises(ValueError, match=r"MultiLevelROIPooler: expected 2 feature maps"):
        multi(features()[:1], varied_boxes(0))
