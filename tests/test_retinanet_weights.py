"""torchvision's RetinaNet checkpoints in detframe: key names (current modules, the published
v1 file's layout, the GroupNorm head of v2), the dropped background logit, and the model of
configs/torchvision/retinanet_resnet50_fpn.yaml taking the converted weights.

The torchvision state dicts come from torchvision's own modules (random weights, no
download), every tensor refilled with distinct random values so that a swapped key cannot
pass for the right one; the published file's names are made from them by the renames its
modules' `_load_from_state_dict` undo.
"""

from __future__ import annotations

import re
import runpy
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.retinanet import RetinaNetHead as TvRetinaNetHead

from detframe.engine.setup import load_config
from detframe.modeling import build_model, convert_torchvision_detection, load_weights
from detframe.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detframe.modeling.weights import state_dict_format

ROOT = Path(__file__).resolve().parents[1]
TV_RETINANET_CONFIG = ROOT / "configs" / "torchvision" / "retinanet_resnet50_fpn.yaml"

NUM_ANCHORS = 9  # 3 sizes x 3 ratios per cell
TV_LABELS = 91  # background (0) and COCO's category ids 1..90
NUM_CLASSES = 90  # detframe: class c is torchvision's label c + 1
SUBNETS = (("classification", "cls"), ("regression", "bbox"))


def randomised(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """`module`'s state dict with every float tensor refilled from N(0, 0.02^2) (a 3x3 conv
    of 256 channels then keeps activations near 1, so biases count), loaded back."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }
    module.load_state_dict(state)
    return state


@pytest.fixture(scope="module")
def tv_model() -> nn.Module:
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomised(model, seed=0)
    return model


@pytest.fixture(scope="module")
def tv_state(tv_model) -> dict[str, torch.Tensor]:
    return tv_model.state_dict()


def published_v1_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names of torchvision's published retinanet_resnet50_fpn_coco file (FPN and
    heads before their version 2; FrozenBatchNorm, so no step counters)."""
    renames = [
        (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1."),
        (
            r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.0\.",
            lambda m: f"{m[1]}.{2 * int(m[2])}.",
        ),
    ]
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def expected_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """detframe key -> torchvision key (current modules), written out part by part."""
    names = {
        "backbone.bottom_up." + k.removeprefix("backbone.body."): k
        for k in state
        if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")
    }
    for name in ("weight", "bias"):
        for i in range(3):  # res3, res4, res5
            names[f"backbone.lateral_convs.{i}.{name}"] = f"backbone.fpn.inner_blocks.{i}.0.{name}"
            names[f"backbone.output_convs.{i}.{name}"] = f"backbone.fpn.layer_blocks.{i}.0.{name}"
        for level in ("p6", "p7"):
            names[f"backbone.top_block.{level}.{name}"] = (
                f"backbone.fpn.extra_blocks.{level}.{name}"
            )
        for theirs, ours in SUBNETS:
            for i in range(4):
                names[f"head.{ours}_convs.{i}.{name}"] = f"head.{theirs}_head.conv.{i}.0.{name}"
        names[f"head.cls_score.{name}"] = f"head.classification_head.cls_logits.{name}"
        names[f"head.bbox_pred.{name}"] = f"head.regression_head.bbox_reg.{name}"
    return names


def test_torchvision_retinanet_is_recognised(tv_state) -> None:
    assert state_dict_format(tv_state) == "torchvision_detection"
    assert state_dict_format(published_v1_names(tv_state)) == "torchvision_detection"


def test_every_key_converts_to_its_detframe_name(tv_state) -> None:
    names = expected_names(tv_state)
    assert {k for k in tv_state if not k.endswith("num_batches_tracked")} == set(names.values())
    converted = convert_torchvision_detection(tv_state)
    assert set(converted) == set(names)
    for ours, theirs in names.items():
        if ours.startswith("head.cls_score."):
            continue  # one logit fewer per anchor, checked below
        assert torch.equal(converted[ours], tv_state[theirs]), ours
    assert converted["head.cls_score.weight"].shape == (NUM_ANCHORS * NUM_CLASSES, 256, 3, 3)
    assert converted["head.cls_score.bias"].shape == (NUM_ANCHORS * NUM_CLASSES,)
    assert converted["backbone.top_block.p6.weight"].shape == (256, 256, 3, 3)  # from P5


def test_published_v1_layout_converts_the_same(tv_state) -> None:
    legacy = published_v1_names(tv_state)
    assert "head.classification_head.conv.6.weight" in legacy  # the 4th conv, old name
    assert "backbone.fpn.inner_blocks.0.weight" in legacy
    converted = convert_torchvision_detection(tv_state)
    from_legacy = convert_torchvision_detection(legacy)
    assert set(from_legacy) == set(converted)
    for key, value in from_legacy.items():
        assert torch.equal(value, converted[key]), key


def test_background_logit_of_every_anchor_is_dropped(tv_state) -> None:
    converted = convert_torchvision_detection(tv_state)
    for name in ("weight", "bias"):
        theirs = tv_state[f"head.classification_head.cls_logits.{name}"]  # [A * 91, ...]
        ours = converted[f"head.cls_score.{name}"]  # [A * 90, ...]
        for a in range(NUM_ANCHORS):
            for c in range(NUM_CLASSES):
                assert torch.equal(ours[a * NUM_CLASSES + c], theirs[a * TV_LABELS + c + 1])


def test_background_drop_by_hand() -> None:
    # 2 anchors, 3 labels (background, 2 classes): channels [a0 bg, a0 c1, a0 c2, a1 bg, ...].
    state = {
        "head.classification_head.cls_logits.weight": torch.arange(6.0).view(6, 1, 1, 1),
        "head.classification_head.cls_logits.bias": torch.arange(6.0) * 10,
        "head.regression_head.bbox_reg.weight": torch.zeros(8, 1, 1, 1),
        "head.regression_head.bbox_reg.bias": torch.zeros(8),
    }
    converted = convert_torchvision_detection(state)
    assert converted["head.cls_score.weight"].flatten().tolist() == [1.0, 2.0, 4.0, 5.0]
    assert converted["head.cls_score.bias"].tolist() == [10.0, 20.0, 40.0, 50.0]


def test_logits_that_do_not_fit_the_anchors_are_an_error() -> None:
    state = {
        "head.classification_head.cls_logits.weight": torch.zeros(10, 1, 1, 1),
        "head.classification_head.cls_logits.bias": torch.zeros(10),
        "head.regression_head.bbox_reg.weight": torch.zeros(12, 1, 1, 1),
        "head.regression_head.bbox_reg.bias": torch.zeros(12),
    }
    with pytest.raises(ValueError, match=r"10 channels, not a multiple of the 3 anchors"):
        convert_torchvision_detection(state)
    del state["head.regression_head.bbox_reg.weight"], state["head.regression_head.bbox_reg.bias"]
    with pytest.raises(ValueError, match=r"cls_logits without head\.regression_head\.bbox_reg"):
        convert_torchvision_detection(state)


def test_odd_index_of_the_published_layout_is_unknown(tv_state) -> None:
    legacy = published_v1_names(tv_state)
    legacy["head.regression_head.conv.1.weight"] = torch.zeros(1)  # a ReLU has no weight
    with pytest.raises(ValueError, match=r"1 unknown keys.*regression_head\.conv\.1\.weight"):
        convert_torchvision_detection(legacy)


def flat(x: torch.Tensor, width: int) -> torch.Tensor:
    """[N, A*width, H, W] -> [N, H*W*A, width], torchvision's head output order."""
    n, _, h, w = x.shape
    return x.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


def assert_heads_agree(tv_head: nn.Module, head: RetinaNetHead) -> None:
    """Both heads on the same two-level features: detframe's logits are torchvision's
    without label 0, the deltas are equal."""
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 256, 5, 7, generator=g), torch.randn(2, 256, 3, 4, generator=g)]
    with torch.no_grad():
        tv_logits = tv_head.classification_head(features)  # [N, R, 91]
        tv_deltas = tv_head.regression_head(features)  # [N, R, 4]
        logits, deltas = head(features)
    ours_logits = torch.cat([flat(x, NUM_CLASSES) for x in logits], dim=1)
    ours_deltas = torch.cat([flat(x, 4) for x in deltas], dim=1)
    assert 0.01 < float(tv_logits.std()) < 100 and 0.01 < float(tv_deltas.std()) < 100
    torch.testing.assert_close(ours_logits, tv_logits[..., 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_deltas, tv_deltas, rtol=1e-5, atol=1e-6)


def test_v2_group_norm_head_converts_and_computes_the_same() -> None:
    tv_head = TvRetinaNetHead(
        256, NUM_ANCHORS, TV_LABELS, norm_layer=partial(nn.GroupNorm, 32)
    ).eval()
    state = {f"head.{k}": v for k, v in randomised(tv_head, seed=2).items()}
    converted = convert_torchvision_detection(state)
    expected = {f"head.{ours}_convs.{i}.weight" for _, ours in SUBNETS for i in range(4)}
    expected |= {
        f"head.{ours}_norms.{i}.{name}"
        for _, ours in SUBNETS
        for i in range(4)
        for name in ("weight", "bias")
    }
    expected |= {
        f"head.{p}.{name}" for p in ("cls_score", "bbox_pred") for name in ("weight", "bias")
    }
    assert set(converted) == expected
    assert torch.equal(
        converted["head.bbox_norms.2.bias"], state["head.regression_head.conv.2.1.bias"]
    )
    head = RetinaNetHead(
        in_channels=256, num_anchors=NUM_ANCHORS, num_classes=NUM_CLASSES, norm="GN"
    ).eval()
    head.load_state_dict({k.removeprefix("head."): v for k, v in converted.items()})
    assert_heads_agree(tv_head, head)


# --- the model of configs/torchvision/retinanet_resnet50_fpn.yaml ---------------------------


@pytest.fixture(scope="module")
def model() -> nn.Module:
    model = build_model(
        load_config(TV_RETINANET_CONFIG, ["MODEL.DEVICE=cpu", "MODEL.WEIGHTS=''"])
    ).eval()
    assert isinstance(model, RetinaNet)
    return model


def test_conversion_covers_every_key_of_the_model(tv_state, model) -> None:
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    converted = convert_torchvision_detection(tv_state)
    assert set(converted) == set(own)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key


def test_model_loads_the_published_file_and_its_head_computes_torchvisions(
    tv_model, tv_state, model, tmp_path
) -> None:
    path = tmp_path / "retinanet_resnet50_fpn_coco.pth"
    torch.save(published_v1_names(tv_state), path)
    report = load_weights(model, str(path))
    assert report.format == "torchvision_detection"
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.loaded == report.total
    assert torch.equal(
        model.state_dict()["backbone.top_block.p7.weight"],
        tv_state["backbone.fpn.extra_blocks.p7.weight"],
    )
    assert_heads_agree(tv_model.head, model.head)


def test_convert_script_takes_a_retinanet_file(tv_state, model, tmp_path, capsys) -> None:
    tool = runpy.run_path(str(ROOT / "tools" / "convert_torchvision.py"))
    source, output = tmp_path / "retinanet.pth", tmp_path / "out" / "detframe.pth"
    torch.save(published_v1_names(tv_state), source)
    assert tool["main"]([str(source), str(output)]) == 0
    assert "torchvision_detection" in capsys.readouterr().out
    report = load_weights(model, str(output))
    assert report.format == "detframe"
    assert report.missing == report.unexpected == report.mismatched == []
    assert torch.equal(
        model.state_dict()["head.cls_score.bias"][:NUM_CLASSES],
        tv_state["head.classification_head.cls_logits.bias"][1:TV_LABELS],
    )
