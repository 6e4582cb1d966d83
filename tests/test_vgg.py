"""VGG backbone and VGGFCHead against torchvision's `vgg11` / `vgg16` / `vgg16_bn`.

The reference is torchvision's seeded model, built with weights=None (the norms of the BN
variant given random statistics, so that a wrong fold, eps or index shows), saved to a file
that enters detframe through `detframe.modeling.load_weights`, the path of a user's ImageNet
file. vgg16's file is the whole model (its fc6 / fc7 go into the box head); the vgg11 and
vgg16_bn files are torchvision's `features` (built by torchvision's `make_layers`) with the
classifier's keys and shapes held by constant, stride-0 tensors, which the backbone leaves
out anyway: writing 400 MB of random classifier would dominate the test's time.

Inputs are small (64 x 96 images) so that the full-width networks run in a fraction of a
second. Structure-only checks of full-width models build them on the meta device.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers
from torchvision.ops import roi_pool

from detframe.engine.setup import load_config
from detframe.layers import FrozenBatchNorm2d
from detframe.modeling import build_model, load_weights
from detframe.modeling.backbone import VGG, build_backbone
from detframe.modeling.roi_heads import VGGFCHead
from detframe.structures import Boxes, Instances

ROOT = Path(__file__).resolve().parents[1]
FAST_RCNN = ROOT / "configs" / "COCO-Detection" / "fast_rcnn_vgg16.yaml"
FASTER_RCNN = ROOT / "configs" / "COCO-Detection" / "faster_rcnn_vgg16.yaml"
CPU = ["MODEL.DEVICE=cpu", "MODEL.WEIGHTS=''"]
# (x1, y1, x2, y2) ROIs in a 64 x 96 image: the whole, inside, across the border, one
# cell of conv5_3, smaller than a cell.
ROIS = [[0.0, 0.0, 95.0, 63.0], [10.0, 5.0, 40.0, 50.0], [50.5, 20.2, 120.0, 70.0]]
ROIS += [[16.0, 16.0, 31.0, 31.0], [3.0, 60.0, 4.0, 61.0]]
# float32 tolerance of channels-last convolutions against torchvision's contiguous ones.
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def tv_vgg16(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """torchvision's vgg16 (seed 0, eval mode) and its whole state dict in a file."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("torchvision_vgg") / "vgg16.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def tv_features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """{"vgg11" / "vgg16_bn": (torchvision's `features` in eval mode, a file with its keys
    and the classifier's, see the module docstring)}."""
    root = tmp_path_factory.mktemp("torchvision_vgg_features")
    with torch.device("meta"):
        classifier = torchvision.models.vgg11(weights=None).classifier.state_dict()
    files = {}
    for seed, (name, letter, bn) in enumerate((("vgg11", "A", False), ("vgg16_bn", "D", True))):
        torch.manual_seed(seed)
        features = make_layers(cfgs[letter], batch_norm=bn).eval()
        with torch.no_grad():
            for m in features.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
        state |= {f"classifier.{k}": torch.zeros(()).expand(v.shape) for k, v in classifier.items()}
        path = root / f"{name}.pth"
        torch.save(state, path)
        files[name] = (features, path)
    return files


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


def vgg_config(*overrides: str):
    return load_config(FAST_RCNN, [*CPU, *overrides])


def on_meta(config: Path, *overrides: str) -> nn.Module:
    """The model of `config` with its parameters on the meta device: structure, no cost."""
    with torch.device("meta"):
        return build_model(
            load_config(config, ["MODEL.DEVICE=meta", "MODEL.WEIGHTS=''", *overrides])
        )


# --- parity with torchvision through load_weights -----------------------------------------


def test_vgg16_conv5_3_and_fc7_match_torchvision(tv_vgg16) -> None:
    tv, path = tv_vgg16
    model = build_model(vgg_config())
    report = load_weights(model, str(path), strict=False)
    assert report.format == "torchvision_classifier"
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.loaded == report.total == 13 * 2 + 2 * 2  # 13 convs, fc6 and fc7
    assert str(report) == f"loaded 30 of 30 tensors from {path} (torchvision_classifier)"
    model.eval()

    x = image()
    with torch.no_grad():
        expected = tv.features[:30](x)  # conv1_1 .. conv5_3 and its ReLU, no pool5
        conv5_3 = model.backbone(x)["conv5_3"]
    assert conv5_3.shape == (1, 512, 4, 6)
    torch.testing.assert_close(conv5_3, expected, **CLOSE)

    rois = torch.tensor(ROIS)
    with torch.no_grad():
        tv_pooled = roi_pool(expected, [rois], output_size=7, spatial_scale=1 / 16)
        expected_fc7 = tv.classifier[:5](tv_pooled.flatten(1))  # fc6, ReLU, drop, fc7, ReLU
        pooled = model.roi_heads.box_pooler([expected], [Boxes(rois)])
        fc7 = model.roi_heads.box_head(pooled)
    assert torch.equal(pooled, tv_pooled)  # RoIPool 7x7 at 1/16
    assert fc7.shape == (len(ROIS), 4096)
    torch.testing.assert_close(fc7, expected_fc7, rtol=1e-5, atol=1e-6)
    # fc6 and fc7 are exactly the file's.
    assert torch.equal(model.roi_heads.box_head.fc6.weight, tv.classifier[0].weight)
    assert torch.equal(model.roi_heads.box_head.fc7.bias, tv.classifier[3].bias)

    # In torchvision's memory format the same convolutions give the same numbers.
    contiguous = VGG(depth=16, out_features=["conv5_3"], memory_format=torch.contiguous_format)
    contiguous.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        assert torch.equal(contiguous(x)["conv5_3"], expected)


@pytest.mark.parametrize(
    ("name", "overrides", "ends"),
    [
        ("vgg11", ["MODEL.VGG.DEPTH=11", "MODEL.VGG.OUT_FEATURES=[conv3_2,conv5_2]"], [10, 20]),
        ("vgg16_bn", ["MODEL.VGG.NORM=FrozenBN", "MODEL.VGG.OUT_FEATURES=[conv5_3]"], [43]),
        ("vgg16_bn", ["MODEL.VGG.NORM=BN", "MODEL.VGG.FREEZE_AT=0"], [43]),
    ],
)
def test_vgg11_and_vgg16_bn_features_match_torchvision(
    tv_features, name: str, overrides: list[str], ends: list[int]
) -> None:
    tv, path = tv_features[name]
    backbone = build_backbone(vgg_config("MODEL.BACKBONE.NAME=VGG", *overrides))
    report = load_weights(backbone, str(path), strict=False)
    assert report.loaded == report.total == len(backbone.imagenet_key_map().keys)
    assert report.missing == report.unexpected == report.mismatched == []
    backbone.eval()
    x = image(1)
    with torch.no_grad():
        out = backbone(x)
        for output, end in zip(backbone.output_shape(), ends, strict=True):
            torch.testing.assert_close(out[output], tv[:end](x), **CLOSE)


def test_a_vgg_built_to_conv4_2_takes_the_first_blocks_of_the_file(tv_features) -> None:
    tv, path = tv_features["vgg11"]
    backbone = VGG(depth=11, out_features=["conv4_2"])
    assert not hasattr(backbone, "conv5_1")
    report = load_weights(backbone, str(path), strict=False)
    assert report.loaded == report.total == 6 * 2
    x = image(2)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["conv4_2"], tv[:15](x), **CLOSE)


# --- files that do not fit ----------------------------------------------------------------


def test_a_vgg11_file_for_a_vgg16_is_an_error_naming_the_keys(tv_features) -> None:
    _, path = tv_features["vgg11"]
    # vgg16's convs are features 0, 2, 5, 7, 10, ...; vgg11's 0, 3, 6, 8, 11, ...
    with pytest.raises(
        ValueError,
        match=r"vgg11\.pth: .*does not fit the modules that take one, backbone \(VGG\), "
        r"roi_heads\.box_head \(VGGFCHead\): 24 of the 30 tensors they need are not in it "
        r"\(features\.2\.weight, features\.2\.bias, features\.5\.weight, .*"
        r"14 of its keys fit none of them \(features\.3\.weight, features\.3\.bias, ",
    ):
        load_weights(on_meta(FAST_RCNN), str(path), strict=False)


def test_a_plain_file_for_a_bn_model_and_another_width_are_errors(tv_features) -> None:
    _, path = tv_features["vgg11"]
    with torch.device("meta"):
        bn = VGG(depth=11, norm="FrozenBN", out_features=["conv5_2"])
    with pytest.raises(ValueError, match=r"not in it \(features\.1\.weight, features\.1\.bias, "):
        load_weights(bn, str(path), strict=False)
    narrow = build_model(
        vgg_config(
            "MODEL.VGG.DEPTH=11",
            "MODEL.VGG.OUT_FEATURES=[conv5_2]",
            "MODEL.ROI_HEADS.IN_FEATURES=[conv5_2]",
            "MODEL.VGG.WIDTH_MULTIPLIER=0.5",
        )
    )
    before = narrow.backbone.conv1_1.weight.clone()
    # 20: the 8 convs' and fc6 / fc7's weights and biases.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "20 keys of another shape: backbone.conv1_1.weight (file (64, 3, 3, 3), model (32, 3, "
        ),
    ):
        load_weights(narrow, str(path), strict=False)
    assert torch.equal(narrow.backbone.conv1_1.weight, before)


# --- structure: outputs, widths, freezing -------------------------------------------------


def test_output_shapes_strides_and_names() -> None:
    backbone = VGG(out_features=["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"])
    expected = {"conv1_2": (64, 1), "conv2_2": (128, 2), "conv3_3": (256, 4)}
    expected |= {"conv4_3": (512, 8), "conv5_3": (512, 16)}
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == expected
    x = torch.randn(1, 3, 50, 70)  # pools round down: 50 -> 25 -> 12 -> 6 -> 3
    with torch.no_grad():
        out = backbone(x)
    sizes = {"conv1_2": (50, 70), "conv2_2": (25, 35), "conv3_3": (12, 17)}
    sizes |= {"conv4_3": (6, 8), "conv5_3": (3, 4)}
    assert {k: (v.shape[1], *v.shape[2:]) for k, v in out.items()} == {
        k: (expected[k][0], *sizes[k]) for k in sizes
    }
    vgg11 = VGG(depth=11, out_features=["conv1_1", "conv5_2"])
    assert list(vgg11.output_shape()) == ["conv1_1", "conv5_2"]
    with pytest.raises(ValueError, match="VGG11's block outputs conv1_1, conv2_1, conv3_2, "):
        VGG(depth=11, out_features=["conv5_3"])


def test_width_multiplier_scales_every_layer() -> None:
    cfg = vgg_config("MODEL.VGG.WIDTH_MULTIPLIER=0.1", "MODEL.VGG.OUT_FEATURES=[conv3_3,conv5_3]")
    model = build_model(cfg)
    # 64, 128, 256, 512 x 0.1 = 6.4, 12.8, 25.6, 51.2, rounded to the nearest integer.
    assert model.backbone.conv1_1.weight.shape == (6, 3, 3, 3)
    assert model.backbone.conv2_1.weight.shape == (13, 6, 3, 3)
    assert model.backbone.conv3_3.weight.shape == (26, 26, 3, 3)
    assert model.backbone.conv5_3.weight.shape == (51, 51, 3, 3)
    assert {k: s.channels for k, s in model.backbone.output_shape().items()} == {
        "conv3_3": 26,
        "conv5_3": 51,
    }
    head = model.roi_heads.box_head
    assert head.fc6.weight.shape == (410, 51 * 7 * 7)  # 4096 x 0.1 = 409.6
    assert head.fc7.weight.shape == (410, 410) and head.output_size == 410
    tiny = VGG(width_multiplier=0.001)
    assert tiny.conv5_3.weight.shape == (1, 1, 3, 3)  # at least one channel


def test_full_width_head_has_torchvision_shapes() -> None:
    with torch.device("meta"):
        head = VGGFCHead(in_channels=512, pooler_resolution=7, dropout=0.5)
        classifier = torchvision.models.vgg16(weights=None).classifier
    assert head.fc6.weight.shape == classifier[0].weight.shape == (4096, 25088)
    assert head.fc7.weight.shape == classifier[3].weight.shape == (4096, 4096)


def test_dropout_as_torchvision_classifier_in_training_only() -> None:
    torch.manual_seed(0)
    head = VGGFCHead(in_channels=4, pooler_resolution=2, fc_dim=64, dropout=0.3)
    # torchvision's classifier[:6] layout around the same linear layers.
    layout = nn.Sequential(
        head.fc6, nn.ReLU(), nn.Dropout(0.3), head.fc7, nn.ReLU(), nn.Dropout(0.3)
    )
    x = torch.randn(8, 4, 2, 2)
    for training in (True, False):
        head.train(training)
        layout.train(training)
        torch.manual_seed(1)
        out = head(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, layout(x.flatten(1)), rtol=0, atol=0)
    head.train()
    assert (head(x) != out).any()  # dropout draws in training
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        VGGFCHead(in_channels=4, pooler_resolution=2, dropout=1.0)


@pytest.mark.parametrize(("freeze_at", "norm"), [(0, ""), (2, ""), (3, "BN"), (5, "BN")])
def test_freezing(freeze_at: int, norm: str) -> None:
    backbone = VGG(norm=norm, freeze_at=freeze_at)
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        frozen = block <= freeze_at
        for c in range(1, convs + 1):
            conv = getattr(backbone, f"conv{block}_{c}")
            assert all(p.requires_grad is not frozen for p in conv.parameters()), conv
            if norm:
                bn = getattr(backbone, f"bn{block}_{c}")
                assert isinstance(bn, FrozenBatchNorm2d) is frozen
                assert all(p.requires_grad for p in bn.parameters())


# --- the two COCO configs, and a narrow model training ------------------------------------


def test_the_coco_configs_build_the_papers_models() -> None:
    fast, faster = on_meta(FAST_RCNN), on_meta(FASTER_RCNN)
    for model in (fast, faster):
        assert isinstance(model.backbone, VGG)
        assert list(model.backbone.output_shape()) == ["conv5_3"]
        assert not model.backbone.conv2_2.weight.requires_grad
        assert model.backbone.conv3_1.weight.requires_grad
        heads = model.roi_heads
        assert isinstance(heads.box_head, VGGFCHead)
        assert heads.box_head.fc6.weight.shape == (4096, 25088)
        assert heads.box_in_features == ["conv5_3"]
        assert heads.box_predictor.cls_score.out_features == 81
    assert type(fast.proposal_generator).__name__ == "PrecomputedProposals"
    assert (fast.roi_heads.batch_size_per_image, fast.roi_heads.positive_fraction) == (64, 0.25)
    assert type(faster.proposal_generator).__name__ == "RPN"
    rpn = faster.proposal_generator
    assert rpn.head.objectness_logits.out_channels == 9  # 3 sizes x 3 aspect ratios
    assert rpn.head.conv.out_channels == 512
    assert (rpn.post_nms_topk[False], rpn.pre_nms_topk[False]) == (300, 6000)


@pytest.mark.parametrize("config", [FAST_RCNN, FASTER_RCNN])
def test_a_narrow_model_trains_a_step(config: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        config,
        [
            *CPU,
            "MODEL.VGG.WIDTH_MULTIPLIER=0.125",
            "MODEL.ROI_HEADS.NUM_CLASSES=3",
            "MODEL.ANCHOR_GENERATOR.SIZES=[[16,32,64]]",
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN=200",
        ],
    )
    model = build_model(cfg).train()
    batch = []
    for i in range(2):
        boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]))
        instances = Instances((64, 96), gt_boxes=boxes, gt_classes=torch.tensor([0, 2]))
        g = torch.Generator().manual_seed(i)
        proposals = torch.rand(50, 2, generator=g) * torch.tensor([60.0, 40.0])
        proposals = torch.cat([proposals, proposals + 4 + 30 * torch.rand(50, 2, generator=g)], 1)
        given = Instances(
            (64, 96), proposal_boxes=Boxes(proposals), objectness_logits=torch.zeros(50)
        )
        image = torch.randint(0, 256, (3, 64, 96), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "proposals": given})
    before = {k: v.clone() for k, v in model.named_parameters()}
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01).step()
    after = dict(model.named_parameters())
    assert torch.equal(after["backbone.conv1_1.weight"], before["backbone.conv1_1.weight"])
    for key in ("backbone.conv5_3.weight", "roi_heads.box_head.fc6.weight"):
        assert not torch.equal(after[key], before[key]), key
