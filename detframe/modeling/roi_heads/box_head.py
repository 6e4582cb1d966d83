"""Box heads: pooled ROI features -> one feature vector per ROI, for the box predictor.

Shapes: R ROIs (all images together), C input channels, S x S pooled resolution
(MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION), D output features.

    input   [R, C, S, S]   pooled by the ROI heads' box pooler
    output  [R, D]         D = fc_dims[-1]; without fc layers [R, C', S, S] (C' = conv_dims[-1]
                           or C), which the predictor flattens; `output_size` is D = C' * S * S

`FastRCNNConvFCHead` is detectron2's head of that name: 3x3 convs (`conv1..convN`, each with an
optional norm and a ReLU), then fully connected layers (`fc1..fcN`, each with a ReLU). Its
two-fc form (NUM_CONV 0, NUM_FC 2) is torchvision's `TwoMLPHead` (fc6, fc7 -> fc1, fc2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.layers.batch_norm import get_norm
from detframe.registry import ROI_BOX_HEAD_REGISTRY

__all__ = ["FastRCNNConvFCHead"]

declare("MODEL.ROI_BOX_HEAD.NUM_CONV", int, 0, "3x3 conv layers of FastRCNNConvFCHead", min=0)
declare("MODEL.ROI_BOX_HEAD.CONV_DIM", int, 256, "output channels of each box-head conv", min=1)
declare("MODEL.ROI_BOX_HEAD.NUM_FC", int, 2, "fully connected layers of FastRCNNConvFCHead", min=0)
declare("MODEL.ROI_BOX_HEAD.FC_DIM", int, 1024, "output size of each box-head fc layer", min=1)
declare(
    "MODEL.ROI_BOX_HEAD.NORM",
    str,
    "",
    "norm after each box-head conv; empty for none",
    choices=("", "FrozenBN", "BN", "SyncBN", "GN"),
)


@ROI_BOX_HEAD_REGISTRY.register()
class FastRCNNConvFCHead(nn.Module):
    """Convs then fully connected layers on pooled ROI features (see the module docstring).

    Args:
        in_channels: C, channels of the pooled features.
        pooler_resolution: S, side of the pooled features.
        conv_dims: output channels of each 3x3 conv (padding 1), in order; may be empty.
        fc_dims: output size of each fc layer, in order; may be empty.
        norm: norm after each conv ("" for none; see `detframe.layers.batch_norm.get_norm`);
            convs with a norm have no bias.

    Initialisation as detectron2: convs MSRA (kaiming normal, fan_out), fcs "Xavier" as
    Caffe2 (kaiming uniform with a=1), biases 0.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        pooler_resolution: int,
        conv_dims: Sequence[int] = (),
        fc_dims: Sequence[int] = (1024, 1024),
        norm: str = "",
    ) -> None:
        super().__init__()
        if in_channels <= 0 or pooler_resolution <= 0:
            raise ValueError(
                f"in_channels and pooler_resolution must be positive, got {in_channels} and "
                f"{pooler_resolution}"
            )
        if len(conv_dims) + len(fc_dims) == 0:
            raise ValueError("FastRCNNConvFCHead needs at least one conv or fc layer")
        channels = in_channels
        self.convs: list[nn.Module] = []
        for i, dim in enumerate(conv_dims, start=1):
            norm_layer = get_norm(norm, dim, 1e-5)
            conv = nn.Conv2d(channels, dim, 3, padding=1, bias=norm_layer is None)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layer = conv if norm_layer is None else nn.Sequential(conv, norm_layer)
            self.add_module(f"conv{i}", layer)
            self.convs.append(layer)
            channels = dim
        size = channels * pooler_resolution * pooler_resolution
        self.fcs: list[nn.Linear] = []
        for i, dim in enumerate(fc_dims, start=1):
            fc = nn.Linear(size, dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{i}", fc)
            self.fcs.append(fc)
            size = dim
        self._output_size = size

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: ShapeSpec) -> dict[str, Any]:
        """`input_shape`: the feature maps the box pooler reads (their channels are C)."""
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "in_channels": input_shape.channels,
            "pooler_resolution": head.POOLER_RESOLUTION,
            "conv_dims": [head.CONV_DIM] * head.NUM_CONV,
            "fc_dims": [head.FC_DIM] * head.NUM_FC,
            "norm": head.NORM,
        }

    @property
    def output_size(self) -> int:
        """D: features per ROI of the output, flattened."""
        return self._output_size

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> [R, D] (or [R, C', S, S] without fc layers)."""
        for conv in self.convs:
            x = F.relu(conv(x))
        if self.fcs:
            x = x.flatten(1)
            for fc in self.fcs:
                x = F.relu(fc(x))
        return x
