"""Backbones: images -> named feature maps (ResNet, FPN), and `build_backbone`."""

from .backbone import Backbone
from .build import build_backbone
from .fpn import FPN
from .resnet import BasicBlock, Bottleneck, ResNet, conv_norm

__all__ = ["FPN", "Backbone", "BasicBlock", "Bottleneck", "ResNet", "build_backbone", "conv_norm"]
