"""DefaultAnchorGenerator against torchvision's AnchorGenerator, detectron2's cell-anchor
formula (written out here) and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detframe.config import ConfigError, load_config
from detframe.layers import ShapeSpec
from detframe.modeling.anchors import DefaultAnchorGenerator
from detframe.registry import ANCHOR_GENERATOR_REGISTRY, build

SIZES = [32, 64, 128, 256, 512]
STRIDES = [4, 8, 16, 32, 64]
RATIOS = [0.5, 1.0, 2.0]
PER_LEVEL = {"sizes": [[s] for s in SIZES], "aspect_ratios": [RATIOS]}


def fpn_features(height: int, width: int, dtype=torch.float32) -> list[torch.Tensor]:
    """p2..p6 of a padded batch: p6 = max_pool(p5, 1, 2), so ceil(p5 / 2) cells."""
    sizes = [(height // s, width // s) for s in STRIDES[:4]]
    sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return [torch.zeros(2, 3, h, w, dtype=dtype) for h, w in sizes]


def torchvision_anchors(features, height, width, dtype):
    reference = AnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * len(SIZES))
    images = ImageList(torch.zeros(2, 3, height, width, dtype=dtype), [(height, width)] * 2)
    return reference(images, features)[0].split([f.shape[-2] * f.shape[-1] * 3 for f in features])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounded_anchors_match_torchvision(dtype):
    # 128 x 192: every level's size divides exactly, so the declared strides are
    # torchvision's.
    height, width = 128, 192
    features = fpn_features(height, width, dtype)
    generator = DefaultAnchorGenerator(**PER_LEVEL, strides=STRIDES, offset=0.0, round_base=True)
    ours = generator(features)
    theirs = torchvision_anchors(features, height, width, dtype)
    assert generator.num_anchors == 3
    for level, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        h, w = features[level].shape[-2:]
        assert a.shape == (h * w * 3, 4) and a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strides_from_image_size_match_torchvision_at_odd_p6():
    # 96 x 160: p5 is 3 x 5, p6 2 x 3, so torchvision's p6 strides are 48 and 53.
    height, width = 96, 160
    features = fpn_features(height, width)
    theirs = torchvision_anchors(features, height, width, torch.float32)
    kwargs = {**PER_LEVEL, "strides": STRIDES, "round_base": True}
    generator = DefaultAnchorGenerator(strides_from_image_size=True, **kwargs)
    for a, b in zip(generator(features, image_size=(height, width)), theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The declared strides (detectron2) agree up to p5 and space p6 by 64.
    fixed = DefaultAnchorGenerator(**kwargs)(features, image_size=(height, width))
    for a, b in zip(fixed[:4], theirs[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cell_steps = fixed[4][3::3, 0] - fixed[4][0:-3:3, 0]
    assert cell_steps[:2].tolist() == [64.0, 64.0]
    with pytest.raises(ValueError, match="image_size"):
        generator(features)


def test_unrounded_anchors_by_hand_on_a_2x2_grid():
    generator = DefaultAnchorGenerator(
        sizes=[[8.0]], aspect_ratios=[[0.25, 1.0]], strides=[16], offset=0.5
    )
    (anchors,) = generator([torch.zeros(1, 1, 2, 2)])
    # ratio 0.25: w = 8 / 0.5 = 16, h = 8 * 0.5 = 4; ratio 1: 8 x 8. Centres at 8 and 24.
    base = [[-8.0, -2.0, 8.0, 2.0], [-4.0, -4.0, 4.0, 4.0]]
    expected = [
        [cx + b[0], cy + b[1], cx + b[2], cy + b[3]]
        for cy in (8.0, 24.0)
        for cx in (8.0, 24.0)
        for b in base
    ]
    torch.testing.assert_close(anchors, torch.tensor(expected), rtol=0, atol=0)


def test_unrounded_base_anchors_keep_area_and_ratio():
    generator = DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4])
    (anchors,) = generator([torch.zeros(1, 1, 1, 1)])
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(w * h, torch.full((3,), 1024.0))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0]))
    assert w[0].item() == pytest.approx(32 / math.sqrt(0.5))


# A batch of an 800 x 1199 and a 750 x 1000 image padded to 800 x 1216 (divisible by 32).
PADDED = (800, 1216)


@pytest.mark.parametrize(
    ("sizes", "ratios"),
    [
        (((32, 40, 50),) * 5, (tuple(RATIOS),) * 5),
        (
            tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in SIZES),
            ((1.0,), (0.5,), (2.0,), (1.0,), (0.25,)),
        ),
    ],
    ids=["three_sizes_everywhere", "per_level_sizes_and_ratios"],
)
def test_multi_size_anchors_match_torchvision_ratio_major(sizes, ratios):
    height, width = PADDED
    features = fpn_features(height, width)
    assert features[-1].shape[-2:] == (13, 19)  # p6 of an odd p5: stride 61 x 64
    reference = AnchorGenerator(sizes, ratios)
    images = ImageList(torch.zeros(2, 3, height, width), [(800, 1199), (750, 1000)])
    num_anchors = len(sizes[0]) * len(ratios[0])
    theirs = reference(images, features)[0].split(
        [f.shape[-2] * f.shape[-1] * num_anchors for f in features]
    )
    generator = DefaultAnchorGenerator(
        sizes=[list(s) for s in sizes],
        aspect_ratios=[list(r) for r in ratios],
        strides=STRIDES,
        round_base=True,
        strides_from_image_size=True,
        order="ratio_major",
    )
    assert generator.num_anchors == num_anchors == reference.num_anchors_per_location()[0]
    ours = generator(features, image_size=PADDED)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def detectron2_cell_anchors(sizes, aspect_ratios):
    """detectron2's DefaultAnchorGenerator.generate_cell_anchors: sizes outer, ratios inner."""
    anchors = []
    for size in sizes:
        area = size**2.0
        for aspect_ratio in aspect_ratios:
            w = math.sqrt(area / aspect_ratio)
            h = aspect_ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


def test_size_major_matches_detectron2_and_one_cell_permutes_ratio_major():
    sizes, ratios = [[32.0, 40.3, 50.8], [64.0, 80.6, 101.6]], [[0.5, 1.0, 2.0]]
    generator = DefaultAnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=[8, 16])
    assert generator.order == "size_major"  # detectron2's, the default
    features = [torch.zeros(1, 1, 3, 5), torch.zeros(1, 1, 2, 3)]
    for level, anchors in enumerate(generator(features)):
        cell = detectron2_cell_anchors(sizes[level], ratios[0])
        torch.testing.assert_close(generator.cell_anchors[level], cell)
        stride = [8, 16][level]
        h, w = features[level].shape[-2:]
        shifts = torch.tensor(
            [[x * stride, y * stride] * 2 for y in range(h) for x in range(w)], dtype=torch.float32
        )
        torch.testing.assert_close(anchors, (shifts[:, None] + cell[None]).reshape(-1, 4))
    ratio_major = DefaultAnchorGenerator(
        sizes=sizes, aspect_ratios=ratios, strides=[8, 16], order="ratio_major"
    )
    # ratio-major cell anchor r * S + s is size-major anchor s * R + r (S = R = 3).
    permutation = [s * 3 + r for r in range(3) for s in range(3)]
    torch.testing.assert_close(
        ratio_major.cell_anchors, generator.cell_anchors[:, permutation], rtol=0, atol=0
    )


def test_cached_per_grid_and_not_in_state_dict():
    generator = DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[8])
    first = generator([torch.zeros(1, 1, 3, 4)])[0]
    assert generator([torch.zeros(2, 5, 3, 4)])[0] is first
    other = generator([torch.zeros(1, 1, 4, 3)])[0]
    assert other is not first and other.shape == first.shape
    assert generator([torch.zeros(1, 1, 3, 4, dtype=torch.float64)])[0].dtype == torch.float64
    with torch.inference_mode():
        inference = generator([torch.zeros(1, 1, 3, 4)])[0]
    assert inference.is_inference() and not first.is_inference()
    assert generator([torch.zeros(1, 1, 3, 4)])[0] is first
    assert len(generator.state_dict()) == 0
    assert "cell_anchors" in dict(generator.named_buffers())


def test_build_from_config():
    cfg = OmegaConf.create(
        {
            "MODEL": {
                "ANCHOR_GENERATOR": {
                    "SIZES": [[32.0, 40.0], [64.0, 80.0]],
                    "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
                    "OFFSET": 0.0,
                    "ROUND": True,
                    "STRIDES_FROM_IMAGE_SIZE": False,
                    "ORDER": "ratio_major",
                }
            }
        }
    )
    shapes = [ShapeSpec(channels=8, stride=4), ShapeSpec(channels=8, stride=8)]
    generator = build(ANCHOR_GENERATOR_REGISTRY, "DefaultAnchorGenerator", cfg, shapes)
    assert generator.strides == [4, 8] and generator.round_base
    assert generator.sizes == [[32.0, 40.0], [64.0, 80.0]]
    assert generator.aspect_ratios == [[0.5, 1.0, 2.0]] * 2
    assert generator.order == "ratio_major" and generator.num_anchors == 6


def test_config_sizes_are_lists_of_lists(tmp_path):
    """A flat list (the old one-size-per-level form) is refused at load, not read as several
    sizes at every level."""
    path = tmp_path / "config.yaml"
    path.write_text("MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [32, 64, 128, 256, 512]\n")
    with pytest.raises(ConfigError, match="SIZES"):
        load_config(path)
    path.write_text("MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: [[32, 40, 50]]\n")
    cfg = load_config(path)
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32.0, 40.0, 50.0]]
    assert cfg.MODEL.ANCHOR_GENERATOR.ORDER == "size_major"


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes has 2 lists for 1 levels"):
        DefaultAnchorGenerator(sizes=[[32.0], [64.0]], aspect_ratios=[[1.0]], strides=[4])
    with pytest.raises(ValueError, match="sizes must be positive"):
        DefaultAnchorGenerator(sizes=[[0.0]], aspect_ratios=[[1.0]], strides=[4])
    with pytest.raises(ValueError, match="aspect_ratios must be positive"):
        DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[-1.0]], strides=[4])
    with pytest.raises(ValueError, match="sizes must be a list of non-empty lists"):
        DefaultAnchorGenerator(sizes=[32.0, 64.0], aspect_ratios=[[1.0]], strides=[4, 8])
    with pytest.raises(ValueError, match="aspect_ratios must be a list of non-empty lists"):
        DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[]], strides=[4])
    with pytest.raises(ValueError, match=r"same number of anchors .* got \[3, 6\]"):
        DefaultAnchorGenerator(sizes=[[32.0], [64.0, 80.0]], aspect_ratios=[RATIOS], strides=[4, 8])
    with pytest.raises(ValueError, match="strides"):
        DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[0])
    with pytest.raises(ValueError, match="order"):
        DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[4], order="size")
    with pytest.raises(ValueError, match="offset"):
        DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[4], offset=1.0)
    generator = DefaultAnchorGenerator(sizes=[[32.0]], aspect_ratios=[[1.0]], strides=[4])
    with pytest.raises(ValueError, match="expected 1 feature maps"):
        generator([torch.zeros(1, 1, 2, 2)] * 2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        generator([torch.zeros(2, 2)])
