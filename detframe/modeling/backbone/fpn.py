"""Feature Pyramid Network (Lin et al. 2017) on a bottom-up backbone, laid out like torchvision.

Shapes: x [N, 3, H, W] (N images, H and W multiples of `size_divisibility`); bottom-up maps
C_i [N, C_in_i, H / s_i, W / s_i] for the L `in_features` (strides s_i doubling); outputs
"p{log2 s_i}" [N, C, H / s_i, W / s_i] (C = out_channels), plus with the "maxpool" top block
"p{log2 s_L + 1}" [N, C, H / 2 s_L, W / 2 s_L] (e.g. "p2".."p6" on ResNet res2..res5).

P_L = output_conv(lateral(C_L)); going down, the inner map is lateral(C_i) + the inner map
above, upsampled (nearest) to C_i's size, and P_i = output_conv(inner_i). The "maxpool" top
block is P6 = max_pool2d(P5, kernel 1, stride 2). torchvision's `FeaturePyramidNetwork`
weights map as fpn.inner_blocks.i.0 -> lateral_convs.i, fpn.layer_blocks.i.0 ->
output_convs.i, and body -> bottom_up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec, get_norm
from detframe.registry import BACKBONE_REGISTRY, build

from .backbone import Backbone
from .resnet import conv_norm

__all__ = ["FPN"]

_NORMS = ("", "FrozenBN", "BN", "SyncBN", "GN")
_TOP_BLOCKS = ("maxpool", "")

declare("MODEL.FPN.BOTTOM_UP", str, "ResNet", "bottom-up backbone, a name in BACKBONE_REGISTRY")
declare(
    "MODEL.FPN.IN_FEATURES",
    list[str],
    ["res2", "res3", "res4", "res5"],
    "bottom-up feature maps the FPN uses, finest first",
)
declare("MODEL.FPN.OUT_CHANNELS", int, 256, "channels of every FPN output")
declare("MODEL.FPN.NORM", str, "", "normalisation after the FPN convs ('' none)", choices=_NORMS)
declare(
    "MODEL.FPN.TOP_BLOCK",
    str,
    "maxpool",
    "extra coarsest level: 'maxpool' (P6 = max_pool2d(P5, 1, 2)) or '' (none)",
    choices=_TOP_BLOCKS,
)


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
        top_block: "maxpool" adds the coarser level P_{L+1} = max_pool2d(P_L, 1, 2); ""
            adds none.
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
        top_block: str = "maxpool",
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
        if top_block not in _TOP_BLOCKS:
            raise ValueError(f"top_block must be one of {_TOP_BLOCKS}, got {top_block!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.top_block = top_block
        self.lateral_convs = nn.ModuleList(
            _ConvNorm(shapes[f].channels, out_channels, 1, norm) for f in in_features
        )
        self.output_convs = nn.ModuleList(
            _ConvNorm(out_channels, out_channels, 3, norm) for _ in in_features
        )
        if top_block:
            strides.append(2 * strides[-1])
        self._shapes = {f"p{int(math.log2(s))}": ShapeSpec(out_channels, s) for s in strides}
        self._size_divisibility = max(shapes[f].stride for f in in_features)
        self.lateral_convs.to(memory_format=memory_format)
        self.output_convs.to(memory_format=memory_format)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        f = cfg.MODEL.FPN
        return {
            "bottom_up": build(BACKBONE_REGISTRY, f.BOTTOM_UP, cfg),
            "in_features": list(f.IN_FEATURES),
            "out_channels": f.OUT_CHANNELS,
            "norm": f.NORM,
            "top_block": f.TOP_BLOCK,
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] -> {"p2": [N, C, H/4, W/4], ..., "p6": [N, C, H/64, W/64]} (names
        and strides as in `output_shape()`)."""
        bottom_up = self.bottom_up(x)
        features = [bottom_up[f] for f in self.in_features]
        inner = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output_convs[i](inner))
        if self.top_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self._shapes, results, strict=True))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)
