"""detframe.registry: lookups with helpful errors, and the from_config / build convention.

Each test makes its own `Registry` and small dummy modules, so no global state is touched.
"""

from __future__ import annotations

from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detframe import registry as registry_module
from detframe.registry import Registry, UnknownNameError, build


class TinyHead(nn.Module):
    """A linear layer with explicit constructor arguments and a from_config."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes, bias=bias)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        return {"in_features": cfg.HEAD.IN_FEATURES, "num_classes": cfg.HEAD.NUM_CLASSES}


class NoConfigHead(nn.Module):
    """A component without from_config: only constructible with keyword arguments."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width


CFG = OmegaConf.create({"HEAD": {"IN_FEATURES": 4, "NUM_CLASSES": 3}})


@pytest.fixture
def heads() -> Registry:
    heads = Registry("HEAD")
    heads.register(TinyHead)
    heads.register(NoConfigHead)
    return heads


def test_registered_name_is_found(heads: Registry) -> None:
    assert heads.get("TinyHead") is TinyHead
    assert heads.names() == ["NoConfigHead", "TinyHead"]


def test_unknown_name_lists_names_and_suggests_closest(heads: Registry) -> None:
    with pytest.raises(KeyError) as info:
        heads.get("TinyHaed")
    assert isinstance(info.value, UnknownNameError)
    message = str(info.value)
    assert message.startswith("No HEAD named 'TinyHaed'. Did you mean 'TinyHead'?")
    assert "Registered names: NoConfigHead, TinyHead." in message
    assert "IMPORTS" in message


def test_unknown_name_far_from_all_has_no_suggestion(heads: Registry) -> None:
    with pytest.raises(UnknownNameError) as info:
        heads.get("ResNet")
    assert "Did you mean" not in str(info.value)
    assert "Registered names: NoConfigHead, TinyHead." in str(info.value)


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(UnknownNameError, match="Nothing is registered yet"):
        Registry("EMPTY").get("Anything")


def test_registering_a_name_twice_is_an_error(heads: Registry) -> None:
    class TinyHead(nn.Module):  # same name, different class
        pass

    with pytest.raises(ValueError, match="'TinyHead' is already registered"):
        heads.register(TinyHead)
    assert heads.get("TinyHead") is not TinyHead


def test_build_from_config(heads: Registry) -> None:
    head = build(heads, "TinyHead", CFG)
    assert isinstance(head, TinyHead)
    assert head.fc.in_features == 4 and head.fc.out_features == 3
    assert head.fc.bias is not None


def test_build_overrides_replace_and_add_arguments(heads: Registry) -> None:
    head = build(heads, "TinyHead", CFG, in_features=7, bias=False)
    assert head.fc.in_features == 7 and head.fc.out_features == 3
    assert head.fc.bias is None


class ShapedHead(TinyHead):
    """A head whose input width comes from the component built before it, not the config."""

    @classmethod
    def from_config(cls, cfg: DictConfig, input_width: int) -> dict[str, Any]:
        return {"in_features": input_width, "num_classes": cfg.HEAD.NUM_CLASSES}


def test_build_passes_inputs_to_from_config(heads: Registry) -> None:
    heads.register(ShapedHead)
    head = build(heads, "ShapedHead", CFG, 7)
    assert head.fc.in_features == 7 and head.fc.out_features == 3
    with pytest.raises(TypeError, match="from_config inputs given without a config"):
        build(heads, "ShapedHead", None, 7)


def test_build_without_config_uses_keyword_arguments(heads: Registry) -> None:
    assert build(heads, "NoConfigHead", width=5).width == 5
    assert build(heads, "TinyHead", in_features=2, num_classes=6).fc.out_features == 6


def test_direct_construction_needs_no_config() -> None:
    assert TinyHead(in_features=2, num_classes=9).fc.weight.shape == (9, 2)


def test_build_from_config_without_from_config_is_an_error(heads: Registry) -> None:
    with pytest.raises(TypeError, match=r"'NoConfigHead' .* has no from_config"):
        build(heads, "NoConfigHead", CFG)


def test_build_unknown_name(heads: Registry) -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'TinyHead'"):
        build(heads, "TinyHeads", CFG)


def test_subclass_changes_configuration_by_overriding_from_config(heads: Registry) -> None:
    @heads.register()
    class WideHead(TinyHead):
        @classmethod
        def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
            return {**super().from_config(cfg), "in_features": 2 * cfg.HEAD.IN_FEATURES}

    head = build(heads, "WideHead", CFG)
    assert isinstance(head, WideHead)
    assert head.fc.in_features == 8 and head.fc.out_features == 3


def test_every_pluggable_kind_has_a_registry() -> None:
    kinds = [
        "META_ARCH",
        "BACKBONE",
        "PROPOSAL_GENERATOR",
        "RPN_HEAD",
        "ANCHOR_GENERATOR",
        "ROI_HEADS",
        "ROI_BOX_HEAD",
        "ROI_MASK_HEAD",
        "POOLER",
        "DATASET",
        "EVALUATOR",
    ]
    for kind in kinds:
        registry = getattr(registry_module, f"{kind}_REGISTRY")
        assert isinstance(registry, Registry)
        assert registry._name == kind
        assert f"{kind}_REGISTRY" in registry_module.__all__
