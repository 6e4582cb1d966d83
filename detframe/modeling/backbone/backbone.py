"""Backbone: the interface every backbone implements.

Shapes: x [N, 3, H, W] (N images, H x W padded to a multiple of `size_divisibility` when it
is > 0); each output feature map [N, C_f, H / s_f, W / s_f] with C_f channels and stride s_f
as given by `output_shape()[f]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from detframe.layers import ShapeSpec

__all__ = ["Backbone"]


class Backbone(nn.Module, ABC):
    """Images -> named feature maps, with their channel counts and strides."""

    @abstractmethod
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] -> {name: [N, C, H / stride, W / stride]}, for each output name."""

    @abstractmethod
    def output_shape(self) -> dict[str, ShapeSpec]:
        """{name: ShapeSpec(channels, stride)} of the feature maps `forward` returns."""

    @property
    def size_divisibility(self) -> int:
        """Input height and width must be multiples of this (0: any size works)."""
        return 0
