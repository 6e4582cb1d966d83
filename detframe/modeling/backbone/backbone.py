"""Backbone: the interface every backbone implements, and how it takes ImageNet weights.

Shapes: x [N, 3, H, W] (N images, H x W padded to a multiple of `size_divisibility`); each
output feature map [N, C_f, H / s_f, W / s_f] with C_f channels and stride s_f as given by
`output_shape()[f]`.

ImageNet initialisation: a backbone designed after an ImageNet classifier (torchvision's
ResNet, VGG) says, in `imagenet_key_map()`, which tensors of that classifier's state dict it
takes and which it leaves out on purpose (the classification layer, stages it did not
build). `detframe.modeling.load_weights` asks every module of a model that has the method
(`TakesImageNetWeights`): a backbone wrapping another (FPN) answers None and lets the inner
one answer, and a head initialised from the same classifier (a VGG box head's fc6/fc7) may
answer for its own keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from detframe.layers import ShapeSpec

__all__ = ["Backbone", "ImageNetKeyMap", "TakesImageNetWeights"]


@dataclass(frozen=True)
class ImageNetKeyMap:
    """Which tensors of an ImageNet classifier's state dict a module takes.

    Attributes:
        keys: {key of the module's state dict: key of the classifier's state dict it is
            read from}; every one must be in the file, with the module's shape.
        ignored: prefixes of classifier keys the module leaves out on purpose (e.g. "fc."
            for torchvision's ResNet classifier, "layer4." for a ResNet built up to res4).
            A classifier key that no module reads or ignores is an error: the file is of
            another architecture, depth or width.
    """

    keys: dict[str, str]
    ignored: tuple[str, ...] = ()


@runtime_checkable
class TakesImageNetWeights(Protocol):
    """A module that can be initialised from an ImageNet classifier's state dict."""

    def imagenet_key_map(self) -> ImageNetKeyMap | None:
        """The tensors this module takes from the classifier, or None if it takes none."""


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
        """Input height and width must be multiples of this (1, the default: any size works,
        feature sizes round at each stride); a detector pads its batch to a multiple of it."""
        return 1

    def imagenet_key_map(self) -> ImageNetKeyMap | None:
        """The tensors this backbone takes from the ImageNet classifier it was designed
        after (see `ImageNetKeyMap`); None (the default): none, e.g. a backbone that wraps
        another, which answers for itself."""
        return None
