"""FPN top blocks against torchvision's LastLevelP6P7 (the block alone and inside
torchvision's BackboneWithFPN, weights copied), and building them from the config.

The FPN with LastLevelMaxPool against torchvision's `_resnet_fpn_extractor` is in
tests/test_backbone.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7 as TvLastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from detframe.config import load_config
from detframe.modeling.backbone import FPN, ResNet, build_backbone
from detframe.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detframe.registry import FPN_TOP_BLOCK_REGISTRY, UnknownNameError


def make_config(tmp_path: Path, *overrides: str):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return load_config(path, overrides)


def copy_p6p7(theirs: TvLastLevelP6P7, ours: LastLevelP6P7) -> None:
    """Random weights and biases in torchvision's block, copied into ours by name."""
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-0.1, 0.1)
    ours.load_state_dict(theirs.state_dict())  # strict: p6.weight, p6.bias, p7.*


@pytest.mark.parametrize(
    ("in_feature", "in_channels"), [("res5", 12), ("p5", 8)], ids=["from_c5", "from_p5"]
)
def test_p6p7_matches_torchvision(in_feature: str, in_channels: int) -> None:
    # torchvision reads P5 when in_channels == out_channels, C5 otherwise.
    theirs = TvLastLevelP6P7(in_channels, 8).double()
    ours = LastLevelP6P7(in_feature=in_feature, in_channels=in_channels, out_channels=8).double()
    copy_p6p7(theirs, ours)
    g = torch.Generator().manual_seed(0)
    p5 = torch.randn(2, 8, 7, 10, generator=g, dtype=torch.float64)
    c5 = torch.randn(2, 12, 7, 10, generator=g, dtype=torch.float64)
    expected, names = theirs([p5], [c5], ["p5"])
    assert names == ["p5", "p6", "p7"]
    got = ours(c5 if in_feature == "res5" else p5)
    assert [tuple(t.shape) for t in got] == [(2, 8, 4, 5), (2, 8, 2, 3)]
    for a, b in zip(got, expected[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_p6p7_init_like_torchvision() -> None:
    torch.manual_seed(0)
    theirs = TvLastLevelP6P7(64, 32)
    torch.manual_seed(0)
    ours = LastLevelP6P7(in_channels=64, out_channels=32)
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert bool((ours.p6.bias == 0).all()) and ours.p6.weight.abs().max() > 0


def tv_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with FrozenBatchNorm2d (eps 0) and random statistics."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=lambda c: TVFrozenBN(c, eps=0.0))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TVFrozenBN):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def tv_to_detframe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision BackboneWithFPN keys -> detframe FPN keys."""
    out = {}
    for key, value in state.items():
        key = key.replace("body.", "bottom_up.", 1).replace("fpn.extra_blocks.", "top_block.")
        for tv_name, name in (
            ("fpn.inner_blocks.", "lateral_convs."),
            ("fpn.layer_blocks.", "output_convs."),
        ):
            if key.startswith(tv_name):
                key = name + key[len(tv_name) :].replace(".0.", ".", 1)
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("in_feature", "in_channels"), [("res5", 512), ("p5", 256)], ids=["from_c5", "from_p5"]
)
def test_fpn_with_p6p7_matches_torchvision_retinanet_layout(
    in_feature: str, in_channels: int
) -> None:
    """RetinaNet's pyramid: C3..C5 -> P3..P5, P6 and P7 from C5 (v1) or from P5 (v2)."""
    tv = _resnet_fpn_extractor(
        tv_resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=TvLastLevelP6P7(in_channels, 256)
    ).double()
    with torch.no_grad():  # non-zero biases, so that a missing bias shows
        for m in tv.fpn.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    stages = ["res3", "res4", "res5"]
    bottom_up = ResNet(depth=18, norm_eps=0.0, stride_in_1x1=False, out_features=stages)
    top_block = LastLevelP6P7(in_feature=in_feature, in_channels=in_channels, out_channels=256)
    ours = FPN(bottom_up=bottom_up, in_features=stages, out_channels=256, top_block=top_block)
    ours.double().eval()
    ours.load_state_dict(tv_to_detframe(tv.state_dict()))  # strict
    x = torch.randn(1, 3, 96, 130, dtype=torch.float64)
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    assert list(got) == ["p3", "p4", "p5", "p6", "p7"]
    assert list(expected) == ["0", "1", "2", "p6", "p7"]
    for a, b in zip(got.values(), expected.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert {k: (s.channels, s.stride) for k, s in ours.output_shape().items()} == {
        f"p{i}": (256, 2**i) for i in range(3, 8)
    }
    assert [tuple(t.shape[-2:]) for t in got.values()] == [(12, 17), (6, 9), (3, 5), (2, 3), (1, 2)]


def test_top_blocks_are_registered() -> None:
    assert FPN_TOP_BLOCK_REGISTRY.get("LastLevelMaxPool") is LastLevelMaxPool
    assert FPN_TOP_BLOCK_REGISTRY.get("LastLevelP6P7") is LastLevelP6P7


def test_build_from_config(tmp_path: Path) -> None:
    base = ("MODEL.RESNETS.DEPTH=18", "MODEL.FPN.OUT_CHANNELS=16")
    default = build_backbone(make_config(tmp_path, *base))
    assert isinstance(default.top_block, LastLevelMaxPool)
    assert list(default.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]

    retina = (
        *base,
        "MODEL.RESNETS.OUT_FEATURES=[res3, res4, res5]",
        "MODEL.FPN.IN_FEATURES=[res3, res4, res5]",
        "MODEL.FPN.TOP_BLOCK=LastLevelP6P7",
    )
    from_c5 = build_backbone(make_config(tmp_path, *retina, "MODEL.FPN.TOP_BLOCK_IN_FEATURE=res5"))
    assert isinstance(from_c5, FPN) and from_c5.top_block.p6.in_channels == 512
    shapes = from_c5.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
        "p7": 128,
    }
    out = from_c5(torch.randn(1, 3, 128, 128))
    assert [tuple(t.shape) for t in out.values()] == [
        (1, 16, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)
    ]
    from_p5 = build_backbone(make_config(tmp_path, *retina, "MODEL.FPN.TOP_BLOCK_IN_FEATURE=p5"))
    assert from_p5.top_block.p6.in_channels == 16

    none = build_backbone(make_config(tmp_path, *base, "MODEL.FPN.TOP_BLOCK=''"))
    assert none.top_block is None and list(none.output_shape()) == ["p2", "p3", "p4", "p5"]


def test_bad_top_blocks(tmp_path: Path) -> None:
    base = ("MODEL.RESNETS.DEPTH=18", "MODEL.FPN.OUT_CHANNELS=16")
    with pytest.raises(UnknownNameError, match="LastLevelP6P7"):
        build_backbone(make_config(tmp_path, *base, "MODEL.FPN.TOP_BLOCK=LastLevelP6P8"))
    with pytest.raises(ValueError, match=r"LastLevelMaxPool keeps the channels .* not 512"):
        build_backbone(make_config(tmp_path, *base, "MODEL.FPN.TOP_BLOCK_IN_FEATURE=res5"))
    with pytest.raises(ValueError, match=r"TOP_BLOCK_IN_FEATURE.*'p5'.*'res5'"):
        build_backbone(make_config(tmp_path, *base, "MODEL.FPN.TOP_BLOCK_IN_FEATURE=p4"))
