"""Backbones: images -> named feature maps (ResNet, FPN), and `build_backbone`."""

from .backbone import Backbone, ImageNetKeyMap, TakesImageNetWeights
from .build import build_backbone
from .fpn import FPN
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG, vgg_width

__all__ = [
    "FPN",
    "VGG",
    "Backbone",
    "BasicBlock",
    "Bottleneck",
    "ImageNetKeyMap",
    "ResNet",
    "TakesImageNetWeights",
    "build_backbone",
    "vgg_width",
]
