"""ResNet, FPN, FrozenBatchNorm2d and build_backbone against torchvision's modules.

References are independent: torchvision's `resnet*` with its own `FrozenBatchNorm2d` (random
statistics, so that a wrong fold or eps shows), its `_resnet_fpn_extractor` (FPN with
LastLevelMaxPool) with the weights mapped by name, and autograd through torchvision's unfused
conv + norm for gradients. Comparisons run in float64 on small images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from detframe.engine.setup import load_config
from detframe.layers import FrozenBatchNorm2d, get_norm
from detframe.modeling import load_weights
from detframe.modeling.backbone import FPN, Backbone, ResNet, build_backbone
from detframe.modeling.backbone.fpn import LastLevelMaxPool

STAGES = ["res2", "res3", "res4", "res5"]
FORMATS = [torch.contiguous_format, torch.channels_last]


def randomise_norms(model: nn.Module) -> nn.Module:
    """Random affine parameters and statistics in every frozen / batch norm of `model`."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TVFrozenBN | FrozenBatchNorm2d | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def tv_resnet(name: str, eps: float = 1e-5, **kwargs: object) -> nn.Module:
    """torchvision's ResNet `name` with FrozenBatchNorm2d(eps), random statistics, float64."""
    norm = lambda c: TVFrozenBN(c, eps=eps)  # noqa: E731
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(norm_layer=norm, **kwargs)
    return randomise_norms(model).double().eval()


def tv_stages(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i, name in enumerate(STAGES):
        x = getattr(model, f"layer{i + 1}")(x)
        out[name] = x
    return out


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def make_config(tmp_path: Path, *overrides: str):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return load_config(path, overrides)


# --- FrozenBatchNorm2d and get_norm ------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_frozen_bn_matches_torchvision(eps: float) -> None:
    tv = randomise_norms(TVFrozenBN(8, eps=eps)).double()
    ours = FrozenBatchNorm2d(8, eps=eps).double()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-12, atol=1e-12)


def test_frozen_bn_loads_batchnorm_state_and_computes_its_eval_output() -> None:
    bn = randomise_norms(nn.BatchNorm2d(6, eps=1e-3)).double().eval()
    ours = FrozenBatchNorm2d(6, eps=1e-3).double()
    ours.load_state_dict(bn.state_dict())  # strict, although it has num_batches_tracked
    assert "num_batches_tracked" in bn.state_dict()
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(ours.parameters())
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12)


def test_get_norm_types_and_errors() -> None:
    assert get_norm("", 64) is None
    assert type(get_norm("FrozenBN", 64, 0.0)) is FrozenBatchNorm2d
    assert get_norm("FrozenBN", 64, 0.0).eps == 0.0
    assert type(get_norm("BN", 64)) is nn.BatchNorm2d
    assert type(get_norm("SyncBN", 64)) is nn.SyncBatchNorm
    gn = get_norm("GN", 64, 1e-6)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32 and gn.eps == 1e-6
    with pytest.raises(ValueError, match="'LayerNorm'"):
        get_norm("LayerNorm", 64)
    with pytest.raises(ValueError, match="channels=48"):
        get_norm("GN", 48)
    with pytest.raises(ValueError, match="eps"):
        FrozenBatchNorm2d(4, eps=-1.0)


# --- ResNet ------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_resnet50_matches_torchvision(eps: float, memory_format: torch.memory_format) -> None:
    tv = tv_resnet("resnet50", eps)
    ours = ResNet(depth=50, norm_eps=eps, stride_in_1x1=False, memory_format=memory_format)
    ours.double().load_state_dict(backbone_state(tv))  # strict
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected, got = tv_stages(tv, x), ours(x)
    assert list(got) == STAGES
    for name in STAGES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10)


def test_resnet18_basic_blocks_match_torchvision() -> None:
    tv = tv_resnet("resnet18", 0.0)
    ours = ResNet(depth=18, norm_eps=0.0, out_features=["conv1", "stem", *STAGES]).double()
    ours.load_state_dict(backbone_state(tv))
    x = torch.randn(2, 3, 70, 90, dtype=torch.float64)  # not a multiple of 32
    with torch.no_grad():
        expected, got = tv_stages(tv, x), ours(x)
        conv1 = tv.relu(tv.bn1(tv.conv1(x)))
    torch.testing.assert_close(got["conv1"], conv1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["stem"], tv.maxpool(conv1), rtol=1e-10, atol=1e-10)
    for name in STAGES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10)
    assert {k: (s.channels, s.stride) for k, s in ours.output_shape().items()} == {
        "conv1": (64, 2),
        "stem": (64, 4),
        "res2": (64, 4),
        "res3": (128, 8),
        "res4": (256, 16),
        "res5": (512, 32),
    }


def test_resnext_widths_match_torchvision_resnext50_32x4d() -> None:
    tv = tv_resnet("resnext50_32x4d")
    ours = ResNet(depth=50, num_groups=32, width_per_group=4, stride_in_1x1=False).double()
    ours.load_state_dict(backbone_state(tv))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["res5"], tv_stages(tv, x)["res5"])


def test_output_shape_matches_outputs_and_unbuilt_stages() -> None:
    model = ResNet(depth=50, out_features=["res3", "stem"])
    assert {k: (s.channels, s.stride) for k, s in model.output_shape().items()} == {
        "stem": (64, 4),
        "res3": (512, 8),
    }
    out = model(torch.randn(1, 3, 64, 96))
    assert list(out) == ["stem", "res3"]
    assert out["res3"].shape == (1, 512, 8, 12) and out["stem"].shape == (1, 64, 16, 24)
    assert not hasattr(model, "layer3") and model.size_divisibility == 1  # any size
    assert ResNet(depth=50, res2_out_channels=128).output_shape()["res5"].channels == 1024


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_stride_in_1x1_places_the_stride(stride_in_1x1: bool) -> None:
    model = ResNet(depth=50, stride_in_1x1=stride_in_1x1)
    for layer in (model.layer2, model.layer3, model.layer4):
        first = layer[0]
        expected = ((2, 2), (1, 1)) if stride_in_1x1 else ((1, 1), (2, 2))
        assert (first.conv1.stride, first.conv2.stride) == expected
        assert first.downsample[0].stride == (2, 2)
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in layer[1:])
    assert model.layer1[0].conv1.stride == model.layer1[0].conv2.stride == (1, 1)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at_sets_requires_grad_and_frozen_norms(freeze_at: int) -> None:
    model = ResNet(depth=18, norm="BN", freeze_at=freeze_at)
    parts = [("stem", [model.conv1, model.bn1])] + [
        (f"res{i + 2}", [getattr(model, f"layer{i + 1}")]) for i in range(4)
    ]
    for stage, (_, modules) in enumerate(parts, start=1):
        frozen = stage <= freeze_at
        params = [p for m in modules for p in m.parameters()]
        assert params and all(p.requires_grad != frozen for p in params)
        norms = [type(n) for m in modules for n in m.modules()]
        assert (FrozenBatchNorm2d in norms, nn.BatchNorm2d in norms) == (frozen, not frozen)


def test_gradients_through_folded_convs_match_unfused_reference() -> None:
    tv = tv_resnet("resnet18", 1e-5)
    ours = ResNet(depth=18, freeze_at=0).double()
    ours.load_state_dict(backbone_state(tv))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    weights = {name: torch.randn_like(t) for name, t in tv_stages(tv, x).items()}

    def grads(outputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        loss = sum((outputs[k] * w).sum() for k, w in weights.items())
        params = {k: v for k, v in model.named_parameters() if not k.startswith("fc.")}
        g = torch.autograd.grad(loss, [x, *params.values()])
        return {"input": g[0], **dict(zip(params, g[1:], strict=True))}

    expected, got = grads(tv_stages(tv, x), tv), grads(ours(x), ours)
    assert set(got) == set(expected)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("norm", ["GN", "BN", "SyncBN"])
def test_other_norms(norm: str) -> None:
    model = ResNet(depth=50, norm=norm, freeze_at=0, norm_eps=1e-4)
    kind = {"GN": nn.GroupNorm, "BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}[norm]
    assert type(model.layer3[1].bn2) is kind and model.layer3[1].bn2.eps == 1e-4
    assert type(model.layer1[0].downsample[1]) is kind
    if norm != "SyncBN":  # SyncBatchNorm needs a process group to run in training mode
        model.train()(torch.randn(2, 3, 64, 64))["res5"].sum().backward()
        assert model.layer3[1].bn2.weight.grad is not None


def test_init_like_torchvision() -> None:
    torch.manual_seed(0)
    model = ResNet(depth=18, norm="BN")
    w = model.layer4[1].conv2.weight  # 512 x 512 x 3 x 3, fan out 512 * 9
    assert abs(w.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.02
    assert abs(w.mean().item()) < 1e-3
    assert torch.equal(model.layer2[0].bn1.weight, torch.ones(128))
    assert torch.equal(model.layer2[0].bn1.bias, torch.zeros(128))


def test_bad_arguments_raise_naming_them() -> None:
    with pytest.raises(ValueError, match=r"depth .* got 42"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match=r"norm .* 'LN'"):
        ResNet(norm="LN")
    with pytest.raises(ValueError, match=r"out_features .*'res6'"):
        ResNet(out_features=["res6"])
    with pytest.raises(ValueError, match=r"freeze_at .* 6"):
        ResNet(freeze_at=6)
    with pytest.raises(ValueError, match="num_groups=1"):
        ResNet(depth=34, num_groups=32, width_per_group=4)


# --- ImageNet weights (through load_weights and ResNet.imagenet_key_map) --------------------


def test_imagenet_weights_from_a_torchvision_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = randomise_norms(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)  # with fc.* and num_batches_tracked
    for norm in ("FrozenBN", "BN"):
        ours = ResNet(depth=18, norm=norm)
        report = load_weights(ours, str(path), strict=False)
        assert report.format == "torchvision_classifier" and report.loaded == report.total
        state = ours.state_dict()
        for key, value in backbone_state(tv).items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(state[key], value), key
    partial = ResNet(depth=18, out_features=["res3"])  # no layer3, layer4: left out
    assert partial.imagenet_key_map().ignored == ("fc.", "layer3.", "layer4.")
    load_weights(partial, str(path), strict=False)
    assert torch.equal(partial.layer2[0].conv1.weight, tv.layer2[0].conv1.weight)


def test_imagenet_weights_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such\.pth"):
        load_weights(ResNet(depth=18), str(tmp_path / "no_such.pth"), strict=False)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"not in it \(layer1\.2\.conv1\.weight"):
        load_weights(ResNet(depth=34), str(path), strict=False)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match=r"fit none of them \(layer1\.0\.conv3\.weight"):
        load_weights(ResNet(depth=18), str(path), strict=False)
    with pytest.raises(
        ValueError,
        match=r"another shape: layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\), "
        r"model \(32, 64, 1, 1\)\)",
    ):
        load_weights(ResNet(depth=50, width_per_group=32), str(path), strict=False)
    torch.save({"model": [1, 2]}, path)
    with pytest.raises(ValueError, match="state dict"):
        load_weights(ResNet(depth=18), str(path), strict=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="could not download"):
        load_weights(ResNet(depth=18), (tmp_path / "missing.pth").as_uri(), strict=False)


def test_imagenet_url_goes_through_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    source = tmp_path / "resnet18-test.pth"
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), source)
    ours = ResNet(depth=18)
    load_weights(ours, source.as_uri(), strict=False)
    assert torch.equal(ours.conv1.weight, tv.conv1.weight)
    assert (tmp_path / "hub" / "checkpoints" / "resnet18-test.pth").is_file()


# --- FPN -----------------------------------------------------------------------------------


def tv_fpn_to_detframe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision BackboneWithFPN keys -> detframe FPN keys."""
    out = {}
    for key, value in state.items():
        key = key.replace("body.", "bottom_up.", 1)
        key = key.replace("fpn.inner_blocks.", "lateral_convs.").replace(
            "fpn.layer_blocks.", "output_convs."
        )
        out[
            key.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
            if key.startswith(("lateral_convs", "output_convs"))
            else key
        ] = value
    return out


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])
def test_fpn_matches_torchvision(size: tuple[int, int]) -> None:
    tv = _resnet_fpn_extractor(tv_resnet("resnet50", 0.0), 3).double().eval()
    with torch.no_grad():  # non-zero biases, so that a missing bias shows
        for m in tv.fpn.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    bottom_up = ResNet(depth=50, norm_eps=0.0, stride_in_1x1=False)
    top_block = LastLevelMaxPool(in_feature="p5", in_channels=256, out_channels=256)
    ours = FPN(
        bottom_up=bottom_up, in_features=STAGES, out_channels=256, top_block=top_block
    ).double()
    ours.load_state_dict(tv_fpn_to_detframe(tv.state_dict()))  # strict
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"]
    for name, tv_name in zip(got, ["0", "1", "2", "3", "pool"], strict=True):
        torch.testing.assert_close(got[name], expected[tv_name], rtol=1e-10, atol=1e-10)
    assert {k: (s.channels, s.stride) for k, s in ours.output_shape().items()} == {
        f"p{i}": (256, 2**i) for i in range(2, 7)
    }
    assert ours.size_divisibility == 32


def test_fpn_options_init_and_errors() -> None:
    torch.manual_seed(0)
    bottom_up = ResNet(depth=18, out_features=["res3", "res4", "res5"])
    fpn = FPN(bottom_up=bottom_up, in_features=["res3", "res4"], out_channels=64)
    assert list(fpn.output_shape()) == ["p3", "p4"] and fpn.size_divisibility == 16
    assert list(fpn(torch.randn(1, 3, 64, 64))) == ["p3", "p4"]
    w = fpn.output_convs[0].weight  # kaiming_uniform a=1: U(-b, b), b = sqrt(3 / fan_in)
    bound = math.sqrt(3 / (64 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert torch.equal(fpn.lateral_convs[1].bias, torch.zeros(64))
    gn = FPN(bottom_up=bottom_up, in_features=["res3"], out_channels=64, norm="GN")
    assert gn.lateral_convs[0].bias is None and isinstance(gn.lateral_convs[0].norm, nn.GroupNorm)
    assert list(gn(torch.randn(1, 3, 32, 32))) == ["p3"]  # no top block by default
    frozen = FPN(bottom_up=bottom_up, in_features=["res3"], out_channels=64, norm="FrozenBN")
    conv = frozen.output_convs[0].double()
    randomise_norms(conv)
    reference = TVFrozenBN(64).double()
    reference.load_state_dict(conv.norm.state_dict())
    x = torch.randn(1, 64, 6, 5, dtype=torch.float64)
    expected = reference(torch.nn.functional.conv2d(x, conv.weight, padding=1))
    torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"in_features .*'res2'"):
        FPN(bottom_up=bottom_up, in_features=["res2"], out_channels=64)
    with pytest.raises(ValueError, match="doubling"):
        FPN(bottom_up=bottom_up, in_features=["res3", "res5"], out_channels=64)
    with pytest.raises(ValueError, match="coarsest output 'p4' or the coarsest input 'res4'"):
        top_block = LastLevelMaxPool(in_feature="p3", in_channels=64, out_channels=64)
        FPN(bottom_up=bottom_up, in_features=["res3", "res4"], out_channels=64, top_block=top_block)


# --- config ----------------------------------------------------------------------------------


def test_build_backbone_from_config(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        "MODEL.RESNETS.DEPTH=18",
        "MODEL.RESNETS.NORM_EPS=0.0",
        "MODEL.RESNETS.FREEZE_AT=3",
        "MODEL.FPN.OUT_CHANNELS=32",
    )
    model = build_backbone(cfg)
    assert isinstance(model, FPN) and isinstance(model.bottom_up, ResNet)
    assert model.bottom_up.layer1[0].bn1.eps == 0.0
    assert not any(p.requires_grad for p in model.bottom_up.layer2.parameters())
    assert all(p.requires_grad for p in model.bottom_up.layer3.parameters())
    assert model.bottom_up.layer2[0].conv1.stride == (2, 2)  # STRIDE_IN_1X1 defaults True
    out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out.values()] == [
        (1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)
    ]
    resnet = build_backbone(make_config(tmp_path, "MODEL.BACKBONE.NAME=ResNet"))
    assert isinstance(resnet, Backbone) and resnet.output_shape()["res5"].channels == 2048


def test_build_backbone_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="Did you mean 'ResNet'"):
        build_backbone(make_config(tmp_path, "MODEL.BACKBONE.NAME=ResNett"))
