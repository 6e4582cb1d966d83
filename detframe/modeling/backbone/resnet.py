"""ResNet (He et al. 2016) and ResNeXt-style widths, laid out like torchvision's `resnet`.

Shapes: x [N, 3, H, W] (N images); outputs "conv1" [N, C_stem, H/2, W/2] (the stem's conv,
norm and ReLU before its max pool: SharpMask's stride-2 skip), "stem" [N, C_stem, H/4,
W/4], "res2" [N, C_2, H/4, W/4], "res3" [N, 2 C_2, H/8, W/8], "res4" [N, 4 C_2, H/16, W/16],
"res5" [N, 8 C_2, H/32, W/32] (C_2 = 256 for Bottleneck depths, 64 for BasicBlock ones;
sizes rounded up).

Module names mirror `torchvision.models.resnet` (conv1, bn1, layer1..layer4 of BasicBlock /
Bottleneck blocks with conv1, bn1, conv2, bn2[, conv3, bn3] and downsample = (conv, norm)),
so torchvision's ImageNet state dicts load as they are, less their classifier (fc.*) and the
stages not built: `imagenet_key_map` says so to `detframe.modeling.load_weights`
(MODEL.WEIGHTS). `make_stage` builds one stage: the ResNet's res2..res{k}, and the res5 that
a C4 model runs per ROI (`detframe.modeling.roi_heads.Res5ROIHeads`, which takes layer4.*).

Speed: a convolution followed by a `FrozenBatchNorm2d` runs as one convolution
(`detframe.layers.conv_norm`); ReLUs then run in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec, conv_norm, get_norm
from detframe.registry import BACKBONE_REGISTRY

from .backbone import Backbone, ImageNetKeyMap

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "init_resnet_weights", "make_stage"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
_BLOCKS_PER_STAGE[152] = [3, 8, 36, 3]
_STAGES = ("res2", "res3", "res4", "res5")
_OUTPUTS = ("conv1", "stem", *_STAGES)
_NORMS = ("FrozenBN", "BN", "SyncBN", "GN")

declare("MODEL.RESNETS.DEPTH", int, 50, "ResNet depth", choices=tuple(_BLOCKS_PER_STAGE))
declare("MODEL.RESNETS.NORM", str, "FrozenBN", "normalisation after each conv", choices=_NORMS)
declare(
    "MODEL.RESNETS.NORM_EPS", float, 1e-5, "eps of the norms (torchvision v1 detection: 0)", min=0
)
declare(
    "MODEL.RESNETS.OUT_FEATURES",
    list[str],
    list(_STAGES),
    "feature maps the ResNet returns",
    choices=_OUTPUTS,
)
declare(
    "MODEL.RESNETS.STRIDE_IN_1X1",
    bool,
    True,
    "bottleneck stride in its first 1x1 conv (MSRA, detectron2) rather than the 3x3 (torchvision)",
)
declare(
    "MODEL.RESNETS.FREEZE_AT",
    int,
    2,
    "stages frozen (no gradient, FrozenBN): 0 none, 1 the stem, 2 stem and res2, ... 5 all",
    min=0,
    max=5,
)
declare(
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    int | None,
    None,
    "output channels of res2, doubled per stage; null: 256 (depth >= 50) or 64 (18, 34)",
    min=1,
)
declare(
    "MODEL.RESNETS.WIDTH_PER_GROUP", int, 64, "bottleneck 3x3 channels per group in res2", min=1
)
declare(
    "MODEL.RESNETS.NUM_GROUPS", int, 1, "groups of the bottleneck 3x3 conv (ResNeXt: 32)", min=1
)
declare("MODEL.RESNETS.STEM_OUT_CHANNELS", int, 64, "output channels of the stem", min=1)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)


def _downsample(c_in: int, c_out: int, stride: int, norm: str, eps: float) -> nn.Sequential:
    return nn.Sequential(_conv(c_in, c_out, 1, stride), get_norm(norm, c_out, eps))


class _ResidualBlock(nn.Module):
    """What the blocks share: the shortcut, identity or `downsample` (1x1 conv, norm), and
    `out_channels`."""

    downsample: nn.Sequential | None
    out_channels: int

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.downsample is None:
            return x
        return conv_norm(x, self.downsample[0], self.downsample[1], relu=False)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs and a shortcut (ResNet-18/34): [N, C_in, H, W] -> [N, C_out, H/s, W/s]."""

    def __init__(
        self, *, in_channels: int, out_channels: int, stride: int, norm: str, eps: float
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = get_norm(norm, out_channels, eps)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = get_norm(norm, out_channels, eps)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _downsample(in_channels, out_channels, stride, norm, eps)

    def forward(self, x: Tensor) -> Tensor:
        out = conv_norm(x, self.conv1, self.bn1, relu=True)
        out = conv_norm(out, self.conv2, self.bn2, relu=False)
        return F.relu_(out.add_(self._shortcut(x)))


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (grouped), 1x1 expand, and a shortcut (ResNet-50 and deeper).

    [N, C_in, H, W] -> [N, C_out, H/s, W/s]; the stride sits in conv1 when `stride_in_1x1`
    (MSRA / detectron2), else in conv2 (torchvision).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        stride: int,
        num_groups: int,
        stride_in_1x1: bool,
        norm: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride_1x1)
        self.bn1 = get_norm(norm, bottleneck_channels, eps)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride_3x3, num_groups)
        self.bn2 = get_norm(norm, bottleneck_channels, eps)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1)
        self.bn3 = get_norm(norm, out_channels, eps)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _downsample(in_channels, out_channels, stride, norm, eps)

    def forward(self, x: Tensor) -> Tensor:
        out = conv_norm(x, self.conv1, self.bn1, relu=True)
        out = conv_norm(out, self.conv2, self.bn2, relu=True)
        out = conv_norm(out, self.conv3, self.bn3, relu=False)
        return F.relu_(out.add_(self._shortcut(x)))


def _check_depth_and_widths(depth: int, num_groups: int, width_per_group: int) -> None:
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    if depth < 50 and (num_groups != 1 or width_per_group != 64):
        raise ValueError(
            f"depth {depth} (BasicBlock) needs num_groups=1 and width_per_group=64, got "
            f"{num_groups} and {width_per_group}"
        )


def _default_res2_out_channels(depth: int) -> int:
    return 64 if depth < 50 else 256


def make_stage(
    depth: int,
    stage: str,
    *,
    in_channels: int,
    res2_out_channels: int | None = None,
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = True,
    norm: str = "FrozenBN",
    eps: float = 1e-5,
) -> nn.Sequential:
    """The blocks of one stage of a ResNet of `depth`, laid out as torchvision's layer{i}.

    Stage "res{i + 2}" (i = 0..3) has the depth's number of blocks (BasicBlock for 18 and 34,
    Bottleneck deeper) with C = res2_out_channels * 2**i output channels and, for
    Bottleneck, num_groups * width_per_group * 2**i channels in the 3x3 conv. Its first
    block has stride s = 2 (s = 1 in res2) and a projection shortcut when the stride or the
    channels change: [N, in_channels, H, W] -> [N, C, H / s, W / s] (sizes rounded up).

    ResNet builds res2..res{k} with this; a C4 model's ROI head builds res5 on pooled
    features. The convs keep PyTorch's default initialisation (see `init_resnet_weights`).

    Args:
        depth: 18, 34, 50, 101 or 152.
        stage: "res2", "res3", "res4" or "res5".
        in_channels: channels of the stage's input.
        res2_out_channels: channels out of res2; None: 256 for Bottleneck, 64 for BasicBlock.
        num_groups, width_per_group, stride_in_1x1: see `ResNet`.
        norm: the norm after every conv ("FrozenBN", "BN", "SyncBN" or "GN").
        eps: eps of those norms.
    """
    _check_depth_and_widths(depth, num_groups, width_per_group)
    if stage not in _STAGES:
        raise ValueError(f"stage must be one of {', '.join(_STAGES)}, got {stage!r}")
    if res2_out_channels is None:
        res2_out_channels = _default_res2_out_channels(depth)
    i = _STAGES.index(stage)
    out_channels = res2_out_channels * 2**i
    blocks: list[nn.Module] = []
    for b in range(_BLOCKS_PER_STAGE[depth][i]):
        common = {"stride": 2 if i > 0 and b == 0 else 1, "norm": norm, "eps": eps}
        if depth < 50:
            blocks.append(BasicBlock(in_channels=in_channels, out_channels=out_channels, **common))
        else:
            blocks.append(
                Bottleneck(
                    in_channels=in_channels,
                    bottleneck_channels=num_groups * width_per_group * 2**i,
                    out_channels=out_channels,
                    num_groups=num_groups,
                    stride_in_1x1=stride_in_1x1,
                    **common,
                )
            )
        in_channels = out_channels
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation of every conv and norm in `module`: He normal
    (fan out) convs, norms weight 1 and bias 0 (detectron2's MSRA fill is the same)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@BACKBONE_REGISTRY.register()
class ResNet(Backbone):
    """ResNet-18/34/50/101/152 returning the feature maps named in `out_features`.

    Args:
        depth: 18, 34 (BasicBlock), 50, 101, 152 (Bottleneck).
        norm: "FrozenBN", "BN", "SyncBN" or "GN" after every conv.
        norm_eps: eps of those norms (torchvision's v1 detection checkpoints: 0.0).
        out_features: names among "stem", "res2".."res5"; stages after the last are not built.
        stride_in_1x1: Bottleneck only: stride in conv1 (True) or conv2 (False, torchvision).
        freeze_at: 0 freezes nothing, 1 the stem, k >= 2 the stem and res2..res{k}: their
            parameters do not require grad and their batch norms are FrozenBatchNorm2d.
        res2_out_channels: channels out of res2, doubled per stage; None: 256 for Bottleneck,
            64 for BasicBlock.
        num_groups: groups of the Bottleneck 3x3 conv (ResNeXt); BasicBlock needs 1.
        width_per_group: Bottleneck 3x3 channels per group in res2 (doubled per stage);
            BasicBlock needs 64.
        stem_out_channels: channels out of the stem.
        memory_format: memory format the network runs in (torch.channels_last is faster
            with oneDNN on CPU; outputs are then channels-last too).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        norm: str = "FrozenBN",
        norm_eps: float = 1e-5,
        out_features: list[str] | tuple[str, ...] = _STAGES,
        stride_in_1x1: bool = True,
        freeze_at: int = 0,
        res2_out_channels: int | None = None,
        num_groups: int = 1,
        width_per_group: int = 64,
        stem_out_channels: int = 64,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        super().__init__()
        _check_depth_and_widths(depth, num_groups, width_per_group)
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {', '.join(_NORMS)}, got {norm!r}")
        unknown = [f for f in out_features if f not in _OUTPUTS]
        if unknown or not out_features:
            raise ValueError(
                f"out_features must be a non-empty list of {', '.join(_OUTPUTS)}; got "
                f"{list(out_features)}"
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(
                f"memory_format must be torch.contiguous_format or torch.channels_last, got "
                f"{memory_format}"
            )
        if res2_out_channels is None:
            res2_out_channels = _default_res2_out_channels(depth)
        self._out_features = [f for f in _OUTPUTS if f in out_features]
        self.memory_format = memory_format

        def norm_of(stage: int) -> str:  # stage 1 = stem, 2 = res2, ...
            frozen = stage <= freeze_at and norm in ("BN", "SyncBN")
            return "FrozenBN" if frozen else norm

        self.conv1 = nn.Conv2d(3, stem_out_channels, 7, 2, 3, bias=False)
        self.bn1 = get_norm(norm_of(1), stem_out_channels, norm_eps)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._shapes = {
            "conv1": ShapeSpec(stem_out_channels, 2),
            "stem": ShapeSpec(stem_out_channels, 4),
        }

        num_stages = max((_STAGES.index(f) + 1 for f in out_features if f in _STAGES), default=0)
        in_channels = stem_out_channels
        for i, stage in enumerate(_STAGES[:num_stages]):
            layer = make_stage(
                depth,
                stage,
                in_channels=in_channels,
                res2_out_channels=res2_out_channels,
                num_groups=num_groups,
                width_per_group=width_per_group,
                stride_in_1x1=stride_in_1x1,
                norm=norm_of(i + 2),
                eps=norm_eps,
            )
            self.add_module(f"layer{i + 1}", layer)
            in_channels = res2_out_channels * 2**i
            self._shapes[stage] = ShapeSpec(in_channels, 4 * 2**i)
        self._stages = [(f"layer{i + 1}", _STAGES[i]) for i in range(num_stages)]

        init_resnet_weights(self)
        self._freeze(freeze_at)
        self.to(memory_format=memory_format)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        r = cfg.MODEL.RESNETS
        return {
            "depth": r.DEPTH,
            "norm": r.NORM,
            "norm_eps": r.NORM_EPS,
            "out_features": list(r.OUT_FEATURES),
            "stride_in_1x1": r.STRIDE_IN_1X1,
            "freeze_at": r.FREEZE_AT,
            "res2_out_channels": r.RES2_OUT_CHANNELS,
            "num_groups": r.NUM_GROUPS,
            "width_per_group": r.WIDTH_PER_GROUP,
            "stem_out_channels": r.STEM_OUT_CHANNELS,
        }

    def _freeze(self, freeze_at: int) -> None:
        frozen: list[nn.Module] = [self.conv1, self.bn1] if freeze_at >= 1 else []
        frozen += [getattr(self, name) for name, _ in self._stages[: max(freeze_at - 1, 0)]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def imagenet_key_map(self) -> ImageNetKeyMap:
        """torchvision's ImageNet ResNet of the same depth and widths: every tensor under the
        same name (`num_batches_tracked` aside); its classifier (fc.*) and the stages this
        ResNet did not build are left out."""
        keys = {k: k for k in self.state_dict() if not k.endswith("num_batches_tracked")}
        unbuilt = [f"layer{i}." for i in range(len(self._stages) + 1, 5)]
        return ImageNetKeyMap(keys, ignored=("fc.", *unbuilt))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] -> {name: [N, C, ceil(H / stride), ceil(W / stride)]}."""
        x = x.contiguous(memory_format=self.memory_format)
        x = conv_norm(x, self.conv1, self.bn1, relu=True)
        outputs = {"conv1": x} if "conv1" in self._out_features else {}
        x = self.maxpool(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for layer, name in self._stages:
            x = getattr(self, layer)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: self._shapes[name] for name in self._out_features}
