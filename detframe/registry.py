"""The registries: one per pluggable kind of component, all defined here.

A component is registered under its class name and chosen by that name in the config:

    @BACKBONE_REGISTRY.register()
    class MyBackbone(nn.Module):
        def __init__(self, depth: int, out_channels: int = 256): ...

        @classmethod
        def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
            return {"depth": cfg.MODEL.MY_BACKBONE.DEPTH}

Conventions:

- Components are plain `nn.Module`s whose constructors take explicit keyword arguments, so
  `MyBackbone(depth=50)` works in a notebook with no config at all.
- Reading the config happens in one small, visible place per component: the classmethod
  `from_config(cfg)`, which returns the constructor's keyword arguments. A subclass changes
  how it is configured by overriding that one method.
- `build(registry, name, cfg, *inputs, **overrides)` looks the name up, calls
  `from_config(cfg, *inputs)` and then the constructor. `inputs` are what a component needs
  from the ones built before it, e.g. the backbone's `output_shape()` for a head, which
  `from_config` takes as extra positional parameters; `overrides` replace or add keyword
  arguments of the constructor.
- Looking up an unknown name raises `UnknownNameError` (a `KeyError`) that lists the
  registered names and suggests the closest one. A component that lives in a user's package
  is registered by importing that package: list it under `IMPORTS` in the config.
"""

from __future__ import annotations

import difflib
from typing import Any

from fvcore.common.registry import Registry as _FvcoreRegistry

__all__ = [
    "ANCHOR_GENERATOR_REGISTRY",
    "BACKBONE_REGISTRY",
    "BOX_PREDICTOR_REGISTRY",
    "DATASET_REGISTRY",
    "EVALUATOR_REGISTRY",
    "FPN_TOP_BLOCK_REGISTRY",
    "MAPPER_REGISTRY",
    "META_ARCH_REGISTRY",
    "OFFLINE_PROPOSAL_REGISTRY",
    "POOLER_REGISTRY",
    "PROPOSAL_GENERATOR_REGISTRY",
    "ROI_BOX_HEAD_REGISTRY",
    "ROI_HEADS_REGISTRY",
    "ROI_MASK_HEAD_REGISTRY",
    "RPN_HEAD_REGISTRY",
    "TRAIN_STEP_REGISTRY",
    "Registry",
    "UnknownNameError",
    "build",
]


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:
        # KeyError's own __str__ would print the message as a quoted repr.
        return str(self.args[0])


class Registry(_FvcoreRegistry):
    """fvcore's `Registry` with helpful errors for unknown and duplicate names."""

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._obj_map)

    def get(self, name: str) -> Any:
        """The object registered as `name`.

        Raises:
            UnknownNameError: `name` is not registered; the message lists the registered
                names and the closest one.
        """
        if name in self._obj_map:
            return self._obj_map[name]
        names = self.names()
        message = f"No {self._name} named {name!r}."
        close = difflib.get_close_matches(str(name), names, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        if names:
            message += f" Registered names: {', '.join(names)}."
        else:
            message += " Nothing is registered yet."
        message += " (A component from your own package is registered by listing the package"
        message += " under IMPORTS in the config.)"
        raise UnknownNameError(message)

    def _do_register(self, name: str, obj: Any) -> None:
        if name in self._obj_map:
            raise ValueError(
                f"{self._name}: {name!r} is already registered (by "
                f"{_qualname(self._obj_map[name])}); cannot register {_qualname(obj)}"
            )
        self._obj_map[name] = obj


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def build(registry: Registry, name: str, cfg: Any = None, *inputs: Any, **overrides: Any) -> Any:
    """Constructs the component registered as `name`.

    Args:
        registry: where to look `name` up.
        name: the registered name, usually read from the config.
        cfg: the config; when given, the component's `from_config(cfg, *inputs)` supplies
            the constructor's keyword arguments. None constructs from `overrides` alone.
        inputs: further positional arguments of `from_config`, such as the input shapes
            of a head (`dict[str, ShapeSpec]`); only with a config.
        overrides: keyword arguments that replace or add to those from `from_config`.

    Raises:
        UnknownNameError: `name` is not registered.
        TypeError: `cfg` is given but the component has no `from_config` classmethod, or
            `inputs` are given without a config.
    """
    component = registry.get(name)
    kwargs: dict[str, Any] = {}
    if cfg is None and inputs:
        raise TypeError(f"{registry._name} {name!r}: from_config inputs given without a config")
    if cfg is not None:
        from_config = getattr(component, "from_config", None)
        if from_config is None:
            raise TypeError(
                f"{registry._name} {name!r} ({_qualname(component)}) has no from_config "
                "classmethod, so it cannot be built from a config; construct it with keyword "
                "arguments instead"
            )
        kwargs = dict(from_config(cfg, *inputs))
    kwargs.update(overrides)
    return component(**kwargs)


# Meta-architectures: the whole detector (`MODEL.META_ARCHITECTURE`).
META_ARCH_REGISTRY = Registry("META_ARCH")
# Backbones: image -> dict of named feature maps.
BACKBONE_REGISTRY = Registry("BACKBONE")
# Proposal generators: RPN, DeepMask, precomputed, ...
PROPOSAL_GENERATOR_REGISTRY = Registry("PROPOSAL_GENERATOR")
# Offline proposal methods: an image -> class-agnostic boxes, computed once and written to a
# proposals file (`detframe proposals --method`), e.g. selective search.
OFFLINE_PROPOSAL_REGISTRY = Registry("OFFLINE_PROPOSAL")
# FPN top blocks: extra coarse levels above the pyramid (P6 by max-pool, P6/P7 by convs).
FPN_TOP_BLOCK_REGISTRY = Registry("FPN_TOP_BLOCK")
# RPN heads: feature maps -> objectness logits and box deltas.
RPN_HEAD_REGISTRY = Registry("RPN_HEAD")
# Anchor generators: feature maps -> anchors per level.
ANCHOR_GENERATOR_REGISTRY = Registry("ANCHOR_GENERATOR")
# ROI heads: features and proposals -> detections (and losses).
ROI_HEADS_REGISTRY = Registry("ROI_HEADS")
# Box heads: pooled ROI features -> box features.
ROI_BOX_HEAD_REGISTRY = Registry("ROI_BOX_HEAD")
# Box predictors: box features -> class scores and box deltas; losses and detections.
BOX_PREDICTOR_REGISTRY = Registry("BOX_PREDICTOR")
# Mask heads: pooled ROI features -> mask logits.
ROI_MASK_HEAD_REGISTRY = Registry("ROI_MASK_HEAD")
# ROI poolers: feature maps and boxes -> fixed-size ROI features.
POOLER_REGISTRY = Registry("POOLER")
# Dataset mappers: a dataset dict -> a model input (`DATALOADER.MAPPER`).
MAPPER_REGISTRY = Registry("MAPPER")
# Datasets: named in `DATASETS.TRAIN` / `DATASETS.TEST`.
DATASET_REGISTRY = Registry("DATASET")
# Evaluators: predictions and ground truth -> metrics.
EVALUATOR_REGISTRY = Registry("EVALUATOR")
# Training steps: one iteration's batch, losses, backward and update (`SOLVER.TRAIN_STEP`).
TRAIN_STEP_REGISTRY = Registry("TRAIN_STEP")
