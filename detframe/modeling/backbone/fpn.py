"""Feature Pyramid Network (Lin et al. 2017) on a bottom-up backbone, laid out like torchvision.

Shapes: x [N, 3, H, W] (N images, H and W multiples of `size_divisibility`); bottom-up maps
C_i [N, C_in_i, H / s_i, W / s_i] for the L `in_features` (strides s_i doubling); outputs
"p{log2 s_i}" [N, C, H / s_i, W / s_i] (C = out_channels), then the top block's T levels
"p{log2 s_L + t}" [N, C, ~H / (2^t s_L), ~W / (2^t s_L)], t = 1..T (e.g. "p2".."p6" on ResNet
res2..res5 with LastLevelMaxPool, "p3".."p7" on res3..res5 with LastLevelP6P7).

P_L = output_conv(lateral(C_L)); going down, the inner map is lateral(C_i) + the inner map
above, upsampled (nearest) to C_i's size, and P_i = output_conv(inner_i).

Top blocks (FPN_TOP_BLOCK_REGISTRY) add the coarser levels from the coarsest pyramid output
P_L or the coarsest bottom-up input C_L, the block's `in_feature`:

- `LastLevelMaxPool`: P6 = max_pool2d(P5, kernel 1, stride 2) (Mask R-CNN; a side of n
  cells becomes ceil(n / 2));
- `LastLevelP6P7`: P6 = conv3x3/2(C5 or P5), P7 = conv3x3/2(relu(P6)) (RetinaNet).

A top block is constructed with the keyword arguments `in_feature`, `in_channels` (the
channels of that feature) and `out_channels` (C), and has attributes `in_feature` and
`num_levels` (T); it maps [N, C_in, h, w] to a list of T maps, each halving the stride.

torchvision's `BackboneWithFPN` weights map as body -> bottom_up, fpn.inner_blocks.i.0 ->
lateral_convs.i, fpn.layer_blocks.i.0 -> output_convs.i and fpn.extra_blocks -> top_block
(detectron2's names: fpn_lateral{k}, fpn_output{k}, top_block).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec, conv_norm, get_norm
from detframe.registry import BACKBONE_REGISTRY, FPN_TOP_BLOCK_REGISTRY, build

from .backbone import Backbone

__all__ = ["FPN", "LastLevelMaxPool", "LastLevelP6P7"]

_NORMS = ("", "FrozenBN", "BN", "SyncBN", "GN")

declare("MODEL.FPN.BOTTOM_UP", str, "ResNet", "bottom-up backbone, a name in BACKBONE_REGISTRY")
declare(
    "MODEL.FPN.IN_FEATURES",
    list[str],
    ["res2", "res3", "res4", "res5"],
    "bottom-up feature maps the FPN uses, finest first",
)
declare("MODEL.FPN.OUT_CHANNELS", int, 256, "channels of every FPN output", min=1)
declare("MODEL.FPN.NORM", str, "", "normalisation after the FPN convs ('' none)", choices=_NORMS)
declare(
    "MODEL.FPN.TOP_BLOCK",
    str,
    "LastLevelMaxPool",
    "coarser levels above the pyramid: a name in FPN_TOP_BLOCK_REGISTRY, or '' for none",
)
declare(
    "MODEL.FPN.TOP_BLOCK_IN_FEATURE",
    str,
    "p5",
    "what the top block reads: the coarsest FPN output (p5) or bottom-up input (res5)",
)


@FPN_TOP_BLOCK_REGISTRY.register()
class LastLevelMaxPool(nn.Module):
    """One level: P6 = max_pool2d(P5, kernel 1, stride 2) (torchvision's and detectron2's).

    Args:
        in_feature: the map it pools, an FPN output (e.g. "p5").
        in_channels: its channels; must equal `out_channels` (pooling keeps channels).
        out_channels: C, the FPN's channels.
    """

    num_levels = 1

    def __init__(self, *, in_feature: str = "p5", in_channels: int, out_channels: int) -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(
                f"LastLevelMaxPool keeps the channels of its input, so in_feature "
                f"{in_feature!r} needs the FPN's {out_channels} channels, not {in_channels} "
                "(pool an FPN output, e.g. 'p5')"
            )
        self.in_feature = in_feature

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [N, C, h, w] -> [P6 [N, C, ceil(h / 2), ceil(w / 2)]]."""
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


@FPN_TOP_BLOCK_REGISTRY.register()
class LastLevelP6P7(nn.Module):
    """Two levels by stride-2 3x3 convs (RetinaNet): P6 = p6(x), P7 = p7(relu(P6)), with x
    C5 (`in_feature` "res5": torchvision's RetinaNet v1, detectron2) or P5 ("p5":
    torchvision's v2). Weights as torchvision's `LastLevelP6P7`: kaiming_uniform (a=1),
    bias 0.

    Args:
        in_feature: the map it reads, the coarsest bottom-up input or FPN output.
        in_channels: its channels (e.g. 2048 for ResNet-50's res5, C for p5).
        out_channels: C, the channels of P6 and P7.
    """

    num_levels = 2

    def __init__(self, *, in_feature: str = "res5", in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [N, C_in, h, w] -> [P6 [N, C, ceil(h / 2), ceil(w / 2)], P7 (half of P6)]."""
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


class _ConvNorm(nn.Conv2d):
    """A convolution with an optional norm after it, kept as attribute `norm` (so that the
    weights of a convolution without norm keep the keys weight and bias)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, norm: str) -> None:
        super().__init__(c_in, c_out, kernel, padding=kernel // 2, bias=not norm)
        self.norm = get_norm(norm, c_out, 1e-5)
        nn.init.kaiming_uniform_(self.weight, a=1)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm(x, self, self.norm, relu=False)


@BACKBONE_REGISTRY.register()
class FPN(Backbone):
    """A feature pyramid over `in_features` of `bottom_up`.

    Args:
        bottom_up: the backbone whose maps the pyramid combines (module `bottom_up`).
        in_features: names of its maps, finest first, strides doubling; `lateral_convs[i]`
            (1x1) and `output_convs[i]` (3x3) belong to `in_features[i]`.
        out_channels: C, channels of every output.
        norm: "" (convs with bias) or a `get_norm` name (convs without bias, norm after).
        top_block: adds the coarser levels (see the module docstring), reading its
            `in_feature`: the coarsest output "p{log2 s_L}" or the coarsest input
            `in_features[-1]`; None adds none.
        memory_format: memory format of the FPN's convs (match the bottom-up's; channels-last
            is faster with oneDNN on CPU).
    """

    def __init__(
        self,
        *,
        bottom_up: Backbone,
        in_features: list[str] | tuple[str, ...],
        out_channels: int,
        norm: str = "",
        top_block: nn.Module | None = None,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        super().__init__()
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing or not in_features:
            raise ValueError(
                f"in_features must be a non-empty list of the bottom-up's outputs "
                f"{list(shapes)}; got {list(in_features)}"
            )
        strides = [shapes[f].stride for f in in_features]
        finest = strides[0]
        if finest & (finest - 1) or strides != [finest * 2**i for i in range(len(strides))]:
            raise ValueError(
                f"in_features {list(in_features)} must have strides that are powers of 2, "
                f"doubling from one to the next; got {strides}"
            )
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.lateral_convs = nn.ModuleList(
            _ConvNorm(shapes[f].channels, out_channels, 1, norm) for f in in_features
        )
        self.output_convs = nn.ModuleList(
            _ConvNorm(out_channels, out_channels, 3, norm) for _ in in_features
        )
        coarsest_output = f"p{int(math.log2(strides[-1]))}"
        self.top_block = top_block
        # Whether the top block reads the coarsest bottom-up input (else the coarsest output).
        self._top_block_reads_input = False
        if top_block is not None:
            if top_block.in_feature not in (coarsest_output, in_features[-1]):
                raise ValueError(
                    f"top_block {type(top_block).__name__} reads in_feature "
                    f"{top_block.in_feature!r} (MODEL.FPN.TOP_BLOCK_IN_FEATURE in a config); "
                    f"it must be the coarsest output {coarsest_output!r} or the coarsest "
                    f"input {in_features[-1]!r}"
                )
            self._top_block_reads_input = top_block.in_feature == in_features[-1]
            for _ in range(top_block.num_levels):
                strides.append(2 * strides[-1])
            top_block.to(memory_format=memory_format)
        self._shapes = {f"p{int(math.log2(s))}": ShapeSpec(out_channels, s) for s in strides}
        self._size_divisibility = max(shapes[f].stride for f in in_features)
        self.lateral_convs.to(memory_format=memory_format)
        self.output_convs.to(memory_format=memory_format)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        """Reads MODEL.FPN.*; builds the bottom-up backbone (MODEL.FPN.BOTTOM_UP) and the top
        block (MODEL.FPN.TOP_BLOCK, reading MODEL.FPN.TOP_BLOCK_IN_FEATURE)."""
        f = cfg.MODEL.FPN
        bottom_up = build(BACKBONE_REGISTRY, f.BOTTOM_UP, cfg)
        top_block = None
        if f.TOP_BLOCK:
            source = f.TOP_BLOCK_IN_FEATURE
            shapes = bottom_up.output_shape()
            from_input = source == f.IN_FEATURES[-1] and source in shapes
            top_block = build(
                FPN_TOP_BLOCK_REGISTRY,
                f.TOP_BLOCK,
                None,
                in_feature=source,
                in_channels=shapes[source].channels if from_input else f.OUT_CHANNELS,
                out_channels=f.OUT_CHANNELS,
            )
        return {
            "bottom_up": bottom_up,
            "in_features": list(f.IN_FEATURES),
            "out_channels": f.OUT_CHANNELS,
            "norm": f.NORM,
            "top_block": top_block,
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] -> {"p2": [N, C, H/4, W/4], ..., "p6": [N, C, H/64, W/64]} (names
        and strides as in `output_shape()`; the top block's levels last)."""
        bottom_up = self.bottom_up(x)
        features = [bottom_up[f] for f in self.in_features]
        inner = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output_convs[i](inner))
        if self.top_block is not None:
            source = features[-1] if self._top_block_reads_input else results[-1]
            results.extend(self.top_block(source))
        return dict(zip(self._shapes, results, strict=True))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)
