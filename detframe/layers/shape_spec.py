"""ShapeSpec: what a component needs to know about a feature map it will be given."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShapeSpec"]


@dataclass(frozen=True)
class ShapeSpec:
    """A feature map's channel count and stride (input pixels per feature cell)."""

    channels: int
    stride: int
