"""Weights from files: detframe checkpoints, and torchvision's detection and ImageNet models.

`load_weights(model, path_or_url)` reads a state dict (with `weights_only=True`, so a file
cannot run code), recognises its layout, converts it when it is torchvision's, and loads it,
reporting missing, unexpected and mismatched keys:

- detframe (or any state dict already in detframe's names), also wrapped as {"model": ...};
- torchvision's `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn` (v1 layout; both the key
  names of its published files and those of its current modules), converted by
  `convert_torchvision_detection`;
- torchvision's ImageNet ResNet classifiers (`resnet50-*.pth`), loaded into the model's
  ResNet by `convert_torchvision_classifier`.

torchvision's detectors put the background at class 0 of K+1 logits and predict boxes and
masks for it too; detframe puts it last and predicts none for it. The conversion moves the
background logit to the end and drops its box deltas and mask channel, which changes no
result (softmax does not care about order, and torchvision never uses the background's
deltas or mask): detframe's class c is torchvision's label c + 1.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backbone.resnet import ResNet
from .checkpoint_io import read_state_dict

__all__ = [
    "LoadReport",
    "convert_torchvision_classifier",
    "convert_torchvision_detection",
    "load_weights",
    "read_state_dict",
    "state_dict_format",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

# torchvision detection key -> detframe key. A replacement is a string (re.sub template) or a
# function of the match. Optional groups cover both the published files' names and today's.
_TV_DETECTION_RENAMES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^backbone\.body\.(.+)$"), r"backbone.bottom_up.\1"),
    (
        re.compile(r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$"),
        r"backbone.lateral_convs.\1.\2",
    ),
    (
        re.compile(r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$"),
        r"backbone.output_convs.\1.\2",
    ),
    (
        re.compile(r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$"),
        r"proposal_generator.head.conv.\1",
    ),
    (
        re.compile(r"^rpn\.head\.cls_logits\.(weight|bias)$"),
        r"proposal_generator.head.objectness_logits.\1",
    ),
    (
        re.compile(r"^rpn\.head\.bbox_pred\.(weight|bias)$"),
        r"proposal_generator.head.anchor_deltas.\1",
    ),
    (re.compile(r"^roi_heads\.box_head\.fc6\.(weight|bias)$"), r"roi_heads.box_head.fc1.\1"),
    (re.compile(r"^roi_heads\.box_head\.fc7\.(weight|bias)$"), r"roi_heads.box_head.fc2.\1"),
    (
        re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"),
        r"roi_heads.box_predictor.\1.\2",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
        r"roi_heads.mask_head.mask_fcn\1.\2",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$"),
        r"roi_heads.mask_head.deconv.\1",
    ),
    (
        re.compile(r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$"),
        r"roi_heads.mask_head.predictor.\1",
    ),
]


@dataclass
class LoadReport:
    """What `load_weights` could not load: keys missing from the file, keys of the file the
    model does not have, and keys whose shapes differ (those are skipped)."""

    source: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} ({self.format})"]
        for name, keys in (
            ("missing from the file (left as initialised)", self.missing),
            ("in the file but not in the model (ignored)", self.unexpected),
            ("with a different shape (skipped)", self.mismatched),
        ):
            if keys:
                lines.append(f"  {len(keys)} keys {name}: {', '.join(keys)}")
        return "\n".join(lines)


def state_dict_format(state_dict: Mapping[str, Tensor]) -> str:
    """ "torchvision_detection", "torchvision_classifier" or "detframe"."""
    keys = state_dict.keys()
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision_detection"
    if "fc.weight" in keys and "conv1.weight" in keys:
        return "torchvision_classifier"
    return "detframe"


def convert_torchvision_detection(state_dict: Mapping[str, Tensor]) -> StateDict:
    """torchvision's Faster / Mask R-CNN R50-FPN v1 state dict -> detframe's key names.

    Raises:
        ValueError: keys that belong to no known part of the v1 layout (e.g. a v2 model).
    """
    converted: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in _TV_DETECTION_RENAMES:
            match = pattern.match(key)
            if match:
                new = replacement(match) if callable(replacement) else match.expand(replacement)
                converted[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a torchvision Faster/Mask R-CNN v1 state dict: {len(unknown)} unknown keys, "
            f"e.g. {unknown[:5]}"
        )
    _move_background_last(converted)
    return converted


def _move_background_last(sd: StateDict) -> None:
    """torchvision's class 0 (background) -> detframe's layout (see the module docstring)."""
    for name in ("weight", "bias"):
        key = f"roi_heads.box_predictor.cls_score.{name}"
        if key in sd:
            sd[key] = torch.cat([sd[key][1:], sd[key][:1]])
        key = f"roi_heads.box_predictor.bbox_pred.{name}"
        if key in sd:
            sd[key] = sd[key][4:]
        key = f"roi_heads.mask_head.predictor.{name}"
        if key in sd:
            sd[key] = sd[key][1:]


def convert_torchvision_classifier(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """torchvision ImageNet ResNet -> keys of the ResNet at `prefix` (e.g.
    "backbone.bottom_up."); the classifier (fc) is dropped."""
    return {
        prefix + k: v
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _resnet_prefix(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, ResNet)]
    if len(names) != 1:
        raise ValueError(
            f"an ImageNet ResNet checkpoint needs exactly one ResNet in the model, found "
            f"{len(names)}"
        )
    return f"{names[0]}." if names[0] else ""


def load_weights(model: nn.Module, path_or_url: str) -> LoadReport:
    """Loads weights from a file or URL into `model` (see the module docstring).

    Keys whose shapes differ from the model's are skipped (fine-tuning on another number of
    classes is the usual reason); they and the missing and unexpected keys are in the
    returned report, which is also logged. For an ImageNet classifier, only keys of the
    model's ResNet count as missing.
    """
    state_dict = read_state_dict(path_or_url)
    kind = state_dict_format(state_dict)
    scope = ""  # the part of the model the file is meant for
    if kind == "torchvision_detection":
        state_dict = convert_torchvision_detection(state_dict)
    elif kind == "torchvision_classifier":
        scope = _resnet_prefix(model)
        state_dict = convert_torchvision_classifier(state_dict, scope)
    report = LoadReport(str(path_or_url), kind)
    own = model.state_dict()
    loadable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(
                f"{key} (file {tuple(value.shape)}, model {tuple(own[key].shape)})"
            )
        else:
            loadable[key] = value
    result = model.load_state_dict(loadable, strict=False)
    report.missing = sorted(k for k in result.missing_keys if k.startswith(scope))
    logger.info("%s", report)
    return report
