"""Weights from files: detframe checkpoints, and torchvision's detection and ImageNet models.

`load_weights(model, path_or_url, strict=...)` reads a state dict (with `weights_only=True`,
so a file cannot run code), recognises its layout (`state_dict_format`), converts it when it
is torchvision's, checks that it fits the model, and loads it:

- "detframe": a state dict in detframe's names (any other layout is read as this one), also
  wrapped as {"model": ...};
- "torchvision_detection": torchvision's `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn`
  (v1 layout) and `retinanet_resnet50_fpn` (v1, and the head of v2 with its GroupNorms; both
  the key names of the published files and those of the current modules), converted by
  `convert_torchvision_detection`;
- "torchvision_classifier": an ImageNet classifier of torchvision (`resnet50-*.pth`,
  `vgg16-*.pth`), taken by the modules of the model that implement `imagenet_key_map`
  (`TakesImageNetWeights` in detframe/modeling/backbone/backbone.py: the ResNet of a
  ResNet backbone), by `convert_torchvision_classifier`. A module whose class sets
  `LOADS_OWN_WEIGHTS = True` (a trained part that loads its own checkpoint, such as
  `DeepMaskProposals`) is not searched: neither it nor its submodules take the classifier.

When a file fits (shorthand: a model tensor *loads* when the file has its key, after
conversion, with the same shape; `num_batches_tracked` counters are never required):

- always: at least half of the model's tensors load. Less means the file is another
  architecture's, or a layout not recognised: an error that names the format the file was
  read as and the first keys on each side, never a model left silently at random.
- strict=True (evaluation, the demo, the benchmark: the model must be the file's): every
  tensor of the model loads. A missing key or another shape is an error naming the keys and
  both shapes (e.g. a box head trained with another FC_DIM). Keys of the file the model lacks
  are only reported (a Mask R-CNN checkpoint evaluated as a Faster R-CNN).
- strict=False (initialising a training run, as detectron2 does): keys the file lacks are
  left as initialised and keys of another shape are skipped, both reported in a warning;
  this is fine-tuning on another number of classes (the box and mask predictor layers) or
  with a new head.
- an ImageNet classifier initialises only the modules that take it, so it needs
  strict=False; each of those modules must load completely, and every key of the file must
  be read or deliberately left out by one of them (a VGG file for a ResNet, or a ResNet-101
  for a ResNet-50, is an error naming the keys).

torchvision's detectors put the background at class 0 of K+1 logits and predict boxes and
masks for it too; detframe puts it last and predicts none for it. The conversion moves the
background logit to the end and drops its box deltas and mask channel, which changes no
result (softmax does not care about order, and torchvision never uses the background's
deltas or mask): detframe's class c is torchvision's label c + 1.

torchvision's RetinaNet has sigmoid logits for its K+1 labels, A x (K+1) channels anchor by
anchor ([A, K+1]); label 0, the background, is never a positive, so its logit only ever
scores detections of class "background". detframe's RetinaNet has A x K channels ([A, K]):
the conversion drops channel 0 of every anchor (A is the box regression's channels / 4), and
detframe's class c is again torchvision's label c + 1.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backbone.backbone import ImageNetKeyMap, TakesImageNetWeights
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

# Below this share of the model's tensors loading, a file is not a checkpoint of the model.
_MIN_LOADED_FRACTION = 0.5
# Keys named in a message, per list.
_SHOWN_KEYS = 8

# A key rename: a pattern and its replacement, a string (re.sub template) or a function of the
# match.
_Rename = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _retinanet_subnet_renames(theirs: str, ours: str) -> list[_Rename]:
    """The four convs of torchvision's RetinaNet `{theirs}_head` -> detframe's `{ours}_convs`
    and `{ours}_norms`: conv.{i}.0 is the conv and conv.{i}.1 the GroupNorm (v2) of today's
    modules (Conv2dNormActivation); conv.{2i} the conv of the published v1 file's
    Sequential(conv, ReLU, ...)."""
    conv = rf"^head\.{theirs}_head\.conv\."
    return [
        (re.compile(conv + r"(\d+)\.0\.(weight|bias)$"), rf"head.{ours}_convs.\1.\2"),
        (re.compile(conv + r"(\d+)\.1\.(weight|bias)$"), rf"head.{ours}_norms.\1.\2"),
        (
            re.compile(conv + r"(\d*[02468])\.(weight|bias)$"),
            lambda m: f"head.{ours}_convs.{int(m[1]) // 2}.{m[2]}",
        ),
    ]


# torchvision detection key -> detframe key. Optional groups cover both the published files'
# names and today's.
_TV_DETECTION_RENAMES: list[_Rename] = [
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
        re.compile(r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)$"),
        r"backbone.top_block.\1.\2",
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
    *_retinanet_subnet_renames("classification", "cls"),
    *_retinanet_subnet_renames("regression", "bbox"),
    (re.compile(r"^head\.classification_head\.cls_logits\.(weight|bias)$"), r"head.cls_score.\1"),
    (re.compile(r"^head\.regression_head\.bbox_reg\.(weight|bias)$"), r"head.bbox_pred.\1"),
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
    """What `load_weights` loaded: `loaded` of the model's `total` tensors (see the module
    docstring), and the keys it could not: missing from the file (left as initialised), in
    the file but not in the model (ignored), and of another shape (skipped; each entry is
    "key (file shape, model shape)")."""

    source: str
    format: str
    loaded: int = 0
    total: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} of {self.total} tensors from {self.source} ({self.format})"]
        for name, keys in (
            ("missing from the file (left as initialised)", self.missing),
            ("in the file but not in the model (ignored)", self.unexpected),
            ("with a different shape (skipped)", self.mismatched),
        ):
            if keys:
                lines.append(f"  {len(keys)} keys {name}: {', '.join(keys)}")
        return "\n".join(lines)


def _first(keys: Sequence[str]) -> str:
    """The first keys of a list, for a message."""
    if not keys:
        return "none"
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def state_dict_format(state_dict: Mapping[str, Tensor]) -> str:
    """The layout a state dict is in: "torchvision_detection" (keys under backbone.body.),
    "torchvision_classifier" (a classification head: fc.* as ResNet's, classifier.* as
    VGG's) or "detframe" (anything else)."""
    keys = state_dict.keys()
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision_detection"
    if any(k.startswith(("fc.", "classifier.")) for k in keys):
        return "torchvision_classifier"
    return "detframe"


def convert_torchvision_detection(state_dict: Mapping[str, Tensor]) -> StateDict:
    """torchvision's Faster / Mask R-CNN R50-FPN v1 or RetinaNet R50-FPN state dict ->
    detframe's key names, with detframe's class layout (see the module docstring).

    Raises:
        ValueError: keys that belong to no known part of these layouts (e.g. a Faster R-CNN
            v2 model), or a RetinaNet classifier whose channels are not A x (K + 1).
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
            "not a torchvision Faster/Mask R-CNN v1 or RetinaNet state dict: "
            f"{len(unknown)} unknown keys, e.g. {unknown[:5]}"
        )
    _move_background_last(converted)
    _drop_retinanet_background(converted)
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


def _drop_retinanet_background(sd: StateDict) -> None:
    """torchvision RetinaNet's A x (K+1) logits -> detframe's A x K, without label 0 (see the
    module docstring)."""
    if "head.cls_score.weight" not in sd:
        return
    if "head.bbox_pred.weight" not in sd:
        raise ValueError(
            "head.classification_head.cls_logits without head.regression_head.bbox_reg: the "
            "number of anchors per cell, and so of classes, is unknown"
        )
    num_anchors = sd["head.bbox_pred.weight"].size(0) // 4
    channels = sd["head.cls_score.weight"].size(0)
    if num_anchors == 0 or channels % num_anchors != 0:
        raise ValueError(
            f"head.classification_head.cls_logits has {channels} channels, not a multiple of "
            f"the {num_anchors} anchors per cell of head.regression_head.bbox_reg "
            f"({4 * num_anchors} channels / 4)"
        )
    for name in ("weight", "bias"):
        key = f"head.cls_score.{name}"
        logits = sd[key].unflatten(0, (num_anchors, channels // num_anchors))
        sd[key] = logits[:, 1:].flatten(0, 1)


def _imagenet_parts(model: nn.Module) -> list[tuple[str, ImageNetKeyMap]]:
    """(prefix of the module's keys in the model, its key map) of every module of `model`
    that takes ImageNet weights, in `named_modules` order, leaving out the modules whose
    class sets `LOADS_OWN_WEIGHTS = True` and everything inside them."""
    parts = []
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen or getattr(module, "LOADS_OWN_WEIGHTS", False):
            return
        seen.add(id(module))
        if isinstance(module, TakesImageNetWeights):
            key_map = module.imagenet_key_map()
            if key_map is not None:
                parts.append((f"{name}." if name else "", key_map))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return parts


def convert_torchvision_classifier(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """An ImageNet classifier's state dict -> {key of `model`: tensor}, through the
    `imagenet_key_map` of each module of `model` that takes ImageNet weights (e.g. the
    ResNet of an FPN backbone: "layer1.0.conv1.weight" -> "backbone.bottom_up.layer1...").

    Raises:
        ValueError: no module of `model` takes ImageNet weights; keys those modules need are
            not in the file; or keys of the file that none of them reads or leaves out on
            purpose (another architecture, depth or width). The keys and modules are named.
    """
    parts = _imagenet_parts(model)
    if not parts:
        raise ValueError(
            "the file looks like an ImageNet classifier (torchvision_classifier), but no "
            f"module of the {type(model).__name__} takes ImageNet weights (none has an "
            "imagenet_key_map)"
        )
    converted: StateDict = {}
    missing, read = [], set()
    for prefix, key_map in parts:
        for own, theirs in key_map.keys.items():
            if theirs in state_dict:
                converted[prefix + own] = state_dict[theirs]
                read.add(theirs)
            else:
                missing.append(theirs)
    ignored = tuple(p for _, key_map in parts for p in key_map.ignored)
    unread = [
        k
        for k in state_dict
        if k not in read and not k.startswith(ignored) and not k.endswith("num_batches_tracked")
    ]
    if missing or unread:
        modules = ", ".join(
            f"{prefix[:-1] or 'the model'} ({type(model.get_submodule(prefix[:-1])).__name__})"
            for prefix, _ in parts
        )
        needed = sum(len(key_map.keys) for _, key_map in parts)
        raise ValueError(
            f"the file looks like an ImageNet classifier (torchvision_classifier) but does "
            f"not fit the modules that take one, {modules}: {len(missing)} of the {needed} "
            f"tensors they need are not in it ({_first(missing)}); {len(unread)} of its keys "
            f"fit none of them ({_first(unread)})"
        )
    return converted


def load_weights(model: nn.Module, path_or_url: str, *, strict: bool = True) -> LoadReport:
    """Loads weights from a file or URL into `model`, if they fit it (see the module
    docstring for the formats and the rules).

    Args:
        model: the model, with its own key names (detframe's).
        path_or_url: a local file, or an http(s) or file URL (through torch.hub's cache).
        strict: the model must be the file's (evaluation); False when initialising a
            training run (fine-tuning, ImageNet initialisation).

    Returns:
        What was loaded and what was not; also logged (a warning if any key was skipped).

    Raises:
        FileNotFoundError, RuntimeError: see `read_state_dict`.
        ValueError: the file does not fit the model, naming its format, the keys and the
            shapes (see the module docstring).
    """
    source = str(path_or_url)
    state_dict = read_state_dict(source)
    kind = state_dict_format(state_dict)
    try:
        if kind == "torchvision_detection":
            state_dict = convert_torchvision_detection(state_dict)
        elif kind == "torchvision_classifier":
            if strict:
                raise ValueError(
                    "the file looks like an ImageNet classifier (torchvision_classifier), "
                    "which initialises a backbone for training (strict=False), not a model "
                    "to evaluate"
                )
            state_dict = convert_torchvision_classifier(state_dict, model)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None

    # BatchNorm's step counters are bookkeeping, not weights: neither loaded nor reported.
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if kind == "torchvision_classifier":
        # Only the modules that take it, which the conversion checked are all in the file,
        # and all of those must load; the rest of the model keeps its initialisation.
        own = {k: v for k, v in own.items() if k in state_dict}
    report = LoadReport(source, kind, total=len(own))
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
    report.loaded = len(loadable)
    report.missing = [k for k in own if k not in state_dict]
    _check_fit(report, strict=strict or kind == "torchvision_classifier")
    model.load_state_dict(loadable, strict=False)
    clean = not (report.missing or report.unexpected or report.mismatched)
    logger.log(logging.INFO if clean else logging.WARNING, "%s", report)
    return report


def _check_fit(report: LoadReport, strict: bool) -> None:
    """Raises ValueError if `report` breaks the rules of the module docstring."""
    where = f"{report.source} ({report.format})"
    missing = f"{len(report.missing)} keys of the model are not in the file"
    shapes = f"{len(report.mismatched)} keys of another shape"
    if report.loaded < _MIN_LOADED_FRACTION * report.total:
        raise ValueError(
            f"{where} is not a checkpoint of this model: only {report.loaded} of its "
            f"{report.total} tensors are in the file with their shape. {missing}: "
            f"{_first(report.missing)}; {len(report.unexpected)} keys of the file are not in "
            f"the model: {_first(report.unexpected)}; {shapes}: {_first(report.mismatched)}"
        )
    if strict and (report.missing or report.mismatched):
        problems = [
            f"{what}: {_first(keys)}"
            for what, keys in ((missing, report.missing), (shapes, report.mismatched))
            if keys
        ]
        raise ValueError(f"{where} does not fit the model (strict loading): {'; '.join(problems)}")
