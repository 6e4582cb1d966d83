"""build_backbone: the backbone a config names (`MODEL.BACKBONE.NAME`)."""

from __future__ import annotations

from omegaconf import DictConfig

from detframe.config import declare
from detframe.registry import BACKBONE_REGISTRY, build

from .backbone import Backbone

__all__ = ["build_backbone"]

declare("MODEL.BACKBONE.NAME", str, "FPN", "backbone, a name in BACKBONE_REGISTRY")


def build_backbone(cfg: DictConfig) -> Backbone:
    """Builds `MODEL.BACKBONE.NAME` from `cfg`.

    Raises:
        UnknownNameError: the name is not registered.
        TypeError: what was built is not a `Backbone`.
    """
    backbone = build(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, cfg)
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} built a "
            f"{type(backbone).__name__}, which is not a detframe Backbone"
        )
    return backbone
