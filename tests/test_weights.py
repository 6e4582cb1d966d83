"""Loading weights: torchvision detection and ImageNet checkpoints, detframe checkpoints,
and the files that do not fit a model (errors naming the format, keys and shapes).

The torchvision state dicts come from torchvision's own models (random weights, no
download); the key names of its published v1 files are made from them by the renames its
modules' `_load_from_state_dict` undo.
"""

from __future__ import annotations

import logging
import pickle
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50, vgg16
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from detframe.engine.setup import load_config
from detframe.modeling import (
    build_model,
    convert_torchvision_detection,
    load_weights,
)
from detframe.modeling.backbone.resnet import ResNet
from detframe.modeling.checkpoint_io import read_state_dict
from detframe.modeling.deepmask import DeepMaskProposals

QUICKSTART = (
    Path(__file__).resolve().parents[1] / "configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml"
)

ROOT = Path(__file__).resolve().parents[1]
TV_MASK_CONFIG = ROOT / "configs" / "torchvision" / "maskrcnn_resnet50_fpn.yaml"


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return MaskRCNN(backbone, num_classes=91).state_dict()


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names of torchvision's published maskrcnn_resnet50_fpn_coco file."""
    renames = [
        (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1."),
        (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
        (
            r"^roi_heads\.mask_head\.(\d+)\.0\.",
            lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.",
        ),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(load_config(TV_MASK_CONFIG, ["MODEL.DEVICE=cpu"]))


def test_conversion_covers_every_key_of_the_model(tv_state, model) -> None:
    converted = convert_torchvision_detection(tv_state)
    assert set(converted) == set(model.state_dict())
    assert set(convert_torchvision_detection(legacy_names(tv_state))) == set(converted)
    for key, value in convert_torchvision_detection(legacy_names(tv_state)).items():
        assert torch.equal(value, converted[key]), key


def test_background_moves_last_and_loses_its_deltas_and_mask(tv_state) -> None:
    converted = convert_torchvision_detection(tv_state)
    cls_w = tv_state["roi_heads.box_predictor.cls_score.weight"]  # [91, 1024], bg first
    assert torch.equal(converted["roi_heads.box_predictor.cls_score.weight"][:90], cls_w[1:])
    assert torch.equal(converted["roi_heads.box_predictor.cls_score.weight"][90], cls_w[0])
    box_b = tv_state["roi_heads.box_predictor.bbox_pred.bias"]  # [364]
    assert torch.equal(converted["roi_heads.box_predictor.bbox_pred.bias"], box_b[4:])
    mask_w = tv_state["roi_heads.mask_predictor.mask_fcn_logits.weight"]  # [91, 256, 1, 1]
    assert torch.equal(converted["roi_heads.mask_head.predictor.weight"], mask_w[1:])


def test_unknown_keys_are_named(tv_state) -> None:
    state = dict(tv_state)
    state["roi_heads.box_head.0.0.weight"] = torch.zeros(1)  # as in the v2 models
    with pytest.raises(ValueError, match=r"1 unknown keys.*box_head\.0\.0\.weight"):
        convert_torchvision_detection(state)


def test_load_weights_reads_torchvision_files_directly(tv_state, model, tmp_path) -> None:
    path = tmp_path / "maskrcnn_coco.pth"
    torch.save(legacy_names(tv_state), path)
    report = load_weights(model, str(path))
    assert report.format == "torchvision_detection"
    assert report.missing == report.unexpected == report.mismatched == []
    own = model.state_dict()
    assert torch.equal(
        own["backbone.lateral_convs.2.weight"], tv_state["backbone.fpn.inner_blocks.2.0.weight"]
    )
    assert torch.equal(
        own["proposal_generator.head.conv.weight"], tv_state["rpn.head.conv.0.0.weight"]
    )


def test_other_class_counts_are_skipped_for_fine_tuning_only(tv_state, tmp_path) -> None:
    model = build_model(
        load_config(TV_MASK_CONFIG, ["MODEL.DEVICE=cpu", "MODEL.ROI_HEADS.NUM_CLASSES=5"])
    )
    before = model.roi_heads.box_predictor.cls_score.weight.clone()
    path = tmp_path / "tv.pth"
    torch.save(tv_state, path)
    with pytest.raises(
        ValueError,
        match=r"strict loading.*roi_heads\.box_predictor\.cls_score\.weight \(file \(91, 1024\), "
        r"model \(6, 1024\)\)",
    ):
        load_weights(model, str(path))
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, before)
    report = load_weights(model, str(path), strict=False)
    assert any(
        m.startswith("roi_heads.box_predictor.cls_score.weight (file (91, 1024), model (6, 1024))")
        for m in report.mismatched
    )
    assert len(report.mismatched) == 6  # cls_score, bbox_pred, mask predictor: weight and bias
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, before)
    assert torch.equal(
        model.roi_heads.box_head.fc1.weight, tv_state["roi_heads.box_head.fc6.weight"]
    )
    assert "with a different shape (skipped)" in str(report)


def test_imagenet_resnet_goes_into_the_backbone(tmp_path) -> None:
    tv_resnet = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv_resnet.state_dict(), path)
    model = build_model(load_config(TV_MASK_CONFIG, ["MODEL.DEVICE=cpu", "MODEL.RESNETS.DEPTH=18"]))
    head_before = model.roi_heads.box_head.fc1.weight.clone()
    report = load_weights(model, str(path), strict=False)
    assert report.format == "torchvision_classifier"
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.loaded == report.total == 20 * 4 + 20  # 20 convs, 20 frozen norms (4 each)
    bottom_up = model.backbone.bottom_up.state_dict()
    for key, value in tv_resnet.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(bottom_up[key], value), key
    assert torch.equal(model.roi_heads.box_head.fc1.weight, head_before)
    # An ImageNet classifier is not a model to evaluate.
    with pytest.raises(ValueError, match=r"resnet18\.pth.*ImageNet classifier.*strict=False"):
        load_weights(model, str(path))


class _Part(nn.Module):
    """A part of a model with a ResNet inside (a trunk of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(ResNet(depth=18, out_features=["res2"]))


class _OwnWeights(_Part):
    """The same part, declaring that it loads its own checkpoint (as DeepMaskProposals)."""

    LOADS_OWN_WEIGHTS = True


@pytest.mark.parametrize("part", [_OwnWeights, _Part])
def test_imagenet_weights_leave_a_part_that_loads_its_own_alone(part, tmp_path) -> None:
    tv_resnet = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv_resnet.state_dict(), path)
    backbone = ResNet(depth=18, out_features=["res2"])
    model = nn.ModuleDict({"backbone": backbone, "proposals": part()})
    before = {k: v.clone() for k, v in model["proposals"].state_dict().items()}
    report = load_weights(model, str(path), strict=False)
    assert torch.equal(backbone.conv1.weight, tv_resnet.conv1.weight)
    trunk = model["proposals"].trunk[0]
    if part is _OwnWeights:
        assert report.loaded == report.total == len(backbone.state_dict())
        for key, value in model["proposals"].state_dict().items():
            assert torch.equal(value, before[key]), key
    else:  # without the declaration the file goes into the part's trunk too
        assert report.loaded == report.total == 2 * len(backbone.state_dict())
        assert torch.equal(trunk.conv1.weight, tv_resnet.conv1.weight)
    assert DeepMaskProposals.LOADS_OWN_WEIGHTS


def test_a_file_that_fits_nothing_is_an_error(model, tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(2)}}, path)
    for strict in (True, False):
        with pytest.raises(
            ValueError,
            match=r"other\.pth \(detframe\) is not a checkpoint of this model: only 0 of its "
            r"\d+ tensors.*not in the file: backbone\.bottom_up\.conv1\.weight, .*"
            r"2 keys of the file are not in the model: encoder\.weight, decoder\.bias",
        ):
            load_weights(model, str(path), strict=strict)


def test_a_vgg_classifier_for_a_resnet_model_is_an_error(model, tmp_path) -> None:
    with torch.device("meta"):  # torchvision's vgg16 keys and shapes, without the cost
        layout = vgg16(weights=None).state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in layout.items()}, path)
    before = model.backbone.bottom_up.conv1.weight.clone()
    with pytest.raises(
        ValueError,
        match=r"vgg16\.pth: the file looks like an ImageNet classifier \(torchvision_classifier\) "
        r"but does not fit the modules that take one, backbone\.bottom_up \(ResNet\): "
        r"\d+ of the \d+ tensors they need are not in it \(conv1\.weight, bn1\.weight, .*"
        r"32 of its keys fit none of them \(features\.0\.weight, features\.0\.bias",
    ):
        load_weights(model, str(path), strict=False)
    assert torch.equal(model.backbone.bottom_up.conv1.weight, before)
    with pytest.raises(ValueError, match="no module of the Sequential takes ImageNet weights"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), str(path), strict=False)


def test_an_imagenet_resnet_of_another_depth_is_an_error(tmp_path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    model = build_model(load_config(TV_MASK_CONFIG, ["MODEL.DEVICE=cpu", "MODEL.RESNETS.DEPTH=18"]))
    with pytest.raises(ValueError, match=r"keys fit none of them \(layer1\.2\.conv1\.weight"):
        load_weights(model, str(path), strict=False)


def test_another_fc_dim_is_an_error_for_evaluation(model, tmp_path) -> None:
    narrow = build_model(
        load_config(TV_MASK_CONFIG, ["MODEL.DEVICE=cpu", "MODEL.ROI_BOX_HEAD.FC_DIM=128"])
    )
    path = tmp_path / "model_final.pth"
    torch.save({"model": narrow.state_dict()}, path)
    before = model.roi_heads.box_head.fc1.weight.clone()
    with pytest.raises(
        ValueError,
        match=r"model_final\.pth \(detframe\) does not fit the model \(strict loading\): "
        r"6 keys of another shape: roi_heads\.box_head\.fc1\.weight \(file \(128, 12544\), "
        r"model \(1024, 12544\)\), roi_heads\.box_head\.fc1\.bias \(file \(128,\), model "
        r"\(1024,\)\), roi_heads\.box_head\.fc2\.weight \(file \(128, 128\), model "
        r"\(1024, 1024\)\)",
    ):
        load_weights(model, str(path))
    assert torch.equal(model.roi_heads.box_head.fc1.weight, before)


def test_missing_heads_are_an_error_for_evaluation_only(tv_state, model, tmp_path, caplog) -> None:
    path = tmp_path / "fasterrcnn.pth"
    torch.save({k: v for k, v in tv_state.items() if "mask" not in k}, path)
    with pytest.raises(
        ValueError,
        match=r"12 keys of the model are not in the file: roi_heads\.mask_head\.mask_fcn1\.weight",
    ):
        load_weights(model, str(path))
    with caplog.at_level(logging.WARNING, logger="detframe.modeling.weights"):
        report = load_weights(model, str(path), strict=False)
    assert len(report.missing) == 12 and report.loaded == report.total - 12
    assert "12 keys missing from the file (left as initialised)" in caplog.text


def test_detframe_checkpoints_round_trip(model, tmp_path) -> None:
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    report = load_weights(model, str(path))
    assert report.format == "detframe"
    assert report.missing == report.unexpected == report.mismatched == []


def test_a_trained_batch_norm_model_round_trips_without_a_warning(tmp_path, caplog) -> None:
    # The quickstart's BN layers keep num_batches_tracked counters: bookkeeping, not weights.
    cfg = load_config(QUICKSTART, ["MODEL.DEVICE=cpu"])
    model = build_model(cfg)
    assert any(k.endswith("num_batches_tracked") for k in model.state_dict())
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="detframe.modeling.weights"):
        report = load_weights(build_model(cfg), str(path))
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.loaded == report.total > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class _Payload:
    """Pickled objects other than tensors are refused: a file cannot run code on loading."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_files_are_read_without_running_code(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(str(tmp_path / "missing.pth"))
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        read_state_dict(str(path))


def test_convert_script_writes_a_checkpoint_load_weights_takes(tv_state, model, tmp_path) -> None:
    source, output = tmp_path / "tv.pth", tmp_path / "out" / "detframe.pth"
    torch.save(tv_state, source)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_torchvision.py"), str(source), str(output)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "torchvision_detection" in result.stdout
    report = load_weights(model, str(output))
    assert report.format == "detframe" and report.missing == report.unexpected == []
    missing = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_torchvision.py"),
            str(tmp_path / "no.pth"),
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_convert_script_refuses_an_imagenet_classifier(tmp_path, capsys) -> None:
    tool = runpy.run_path(str(ROOT / "tools" / "convert_torchvision.py"))
    source = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), source)
    assert tool["main"]([str(source), str(tmp_path / "out.pth")]) == 1
    assert "looks like torchvision_classifier" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()
