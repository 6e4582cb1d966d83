"""build_model: the detector a config describes, on its device, with its weights."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from detframe.registry import META_ARCH_REGISTRY, build

from .weights import load_weights

__all__ = ["build_model"]

logger = logging.getLogger(__name__)


def build_model(cfg: DictConfig, *, strict_weights: bool = True) -> nn.Module:
    """Builds `MODEL.META_ARCHITECTURE`, moves it to `MODEL.DEVICE` and loads `MODEL.WEIGHTS`
    (a detframe checkpoint, or a torchvision detection or ImageNet file; see
    `detframe.modeling.weights`). The model is in training mode.

    Args:
        strict_weights: the weights must be the model's, every key and shape (a model to
            evaluate); False when they initialise a training run (fine-tuning with another
            number of classes, an ImageNet backbone), where what does not fit is skipped
            with a warning.
    """
    model = build(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS, strict=strict_weights)
    return model
