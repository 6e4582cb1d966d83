"""build_proposal_generator: the proposal generator a config names."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import PROPOSAL_GENERATOR_REGISTRY, build

__all__ = ["build_proposal_generator"]

declare(
    "MODEL.PROPOSAL_GENERATOR.NAME",
    str,
    "RPN",
    "name in PROPOSAL_GENERATOR_REGISTRY: RPN, or PrecomputedProposals for Fast R-CNN",
)


def build_proposal_generator(cfg: DictConfig, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """Builds MODEL.PROPOSAL_GENERATOR.NAME with `from_config(cfg, input_shape)`.

    Args:
        cfg: the config.
        input_shape: the backbone's output shapes by feature name.

    Returns:
        A module called as `generator(images, features, gt_instances, **extra)` that
        returns (proposals: list[Instances], losses: dict[str, Tensor]); see this package's
        docstring.
    """
    return build(PROPOSAL_GENERATOR_REGISTRY, cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg, input_shape)
