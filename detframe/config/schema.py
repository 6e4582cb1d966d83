"""Config key declarations: every key that code reads is declared once, next to that code.

    from detframe.config import REQUIRED, declare

    declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 80, "number of foreground classes")
    declare("INPUT.FORMAT", str, "BGR", "channel order of input images", choices=("RGB", "BGR"))
    declare("MODEL.MY_HEAD.ANCHORS", list[int], REQUIRED, "anchor sizes; must be set")

A key is a dotted upper-case path; the part before the last dot is its section. The
supported types are `int`, `float`, `bool`, `str`, `list[T]` of one of those, and any of
these `| None` (which allows `null`). An `int` is accepted where a `float` is declared and
converted; nothing else is converted (a `bool` is not an `int`, `"1"` is not a number).

All declarations go into one process-wide `Schema`, `SCHEMA`; the loader validates configs
against it and `python -m detframe.config --print-schema` prints it as a markdown table.
Declaring the same key twice with identical fields is allowed (a module imported twice);
with different fields it is an error.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

__all__ = ["REQUIRED", "SCHEMA", "ConfigError", "Key", "Schema", "declare"]

_SCALARS = (int, float, bool, str)
_KEY_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, missing value, bad file."""


class _Required:
    """The default of a key that has none: a config must set it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def _split_optional(type_: Any) -> tuple[Any, bool]:
    """(`T`, True) for `T | None`, (`T`, False) for `T`."""
    if get_origin(type_) in (Union, types.UnionType):
        args = [a for a in get_args(type_) if a is not type(None)]
        if len(args) == 1 and len(get_args(type_)) == 2:
            return args[0], True
    return type_, False


def _check_scalar(scalar: type, value: Any) -> Any:
    """`value` as `scalar` (int -> float is the only conversion); raises ConfigError."""
    if scalar is float and type(value) is int:
        return float(value)
    if type(value) is not scalar:
        raise ConfigError(f"expected {scalar.__name__}, got {type(value).__name__} {value!r}")
    return value


def type_name(type_: Any) -> str:
    """`int`, `list[float]`, `str | None`: how a declared type is written."""
    inner, optional = _split_optional(type_)
    is_list = get_origin(inner) is list
    name = f"list[{get_args(inner)[0].__name__}]" if is_list else inner.__name__
    return f"{name} | None" if optional else name


@dataclass(frozen=True)
class Key:
    """One declared config key.

    Attributes:
        name: dotted path, e.g. "MODEL.ROI_HEADS.NUM_CLASSES".
        type: the declared type (see the module docstring).
        default: the value when no config sets it, or REQUIRED.
        help: one line for the schema table.
        choices: the allowed values (of the value, or of each element of a list), or None.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any) -> Any:
        """`value` validated (and int converted to float where declared); raises ConfigError."""
        inner, optional = _split_optional(self.type)
        if value is None:
            if optional:
                return None
            raise ConfigError(f"expected {type_name(self.type)}, got null")
        if get_origin(inner) is list:
            if not isinstance(value, list | tuple):
                raise ConfigError(
                    f"expected {type_name(self.type)}, got {type(value).__name__} {value!r}"
                )
            element = get_args(inner)[0]
            try:
                checked = [_check_scalar(element, v) for v in value]
            except ConfigError as e:
                raise ConfigError(f"expected {type_name(self.type)}: element {e}") from None
        else:
            checked = _check_scalar(inner, value)
        if self.choices is not None:
            for v in checked if isinstance(checked, list) else [checked]:
                if v not in self.choices:
                    allowed = ", ".join(repr(c) for c in self.choices)
                    raise ConfigError(f"{v!r} is not one of the allowed values: {allowed}")
        return checked


class Schema:
    """The declared keys, in declaration order."""

    def __init__(self) -> None:
        self._keys: dict[str, Key] = {}

    def declare(
        self,
        name: str,
        type: Any,
        default: Any,
        help: str,
        *,
        choices: Sequence[Any] | None = None,
    ) -> Key:
        """Declares a key (see the module docstring); returns it.

        Raises:
            ValueError: a malformed declaration, or a clash with an earlier one.
        """
        inner, _ = _split_optional(type)
        element = get_args(inner)[0] if get_origin(inner) is list else inner
        if element not in _SCALARS:
            raise ValueError(f"{name}: unsupported type {type!r}")
        if not _KEY_PATTERN.match(name):
            raise ValueError(f"{name!r}: keys are dotted UPPER_CASE names, e.g. MODEL.DEVICE")
        if not help or "\n" in help:
            raise ValueError(f"{name}: help must be one non-empty line")
        key = Key(name, type, default, help, None if choices is None else tuple(choices))
        if default is not REQUIRED:
            try:
                key.check(default)
            except ConfigError as e:
                raise ValueError(f"{name}: default {default!r} is invalid: {e}") from None
        existing = self._keys.get(name)
        if existing is not None:
            if existing != key:
                raise ValueError(f"{name} is already declared differently: {existing}")
            return existing
        for other in self._keys:
            if other.startswith(name + ".") or name.startswith(other + "."):
                raise ValueError(f"{name} clashes with {other}: a key cannot also be a section")
        self._keys[name] = key
        return key

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __getitem__(self, name: str) -> Key:
        return self._keys[name]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys.values())

    def is_section(self, name: str) -> bool:
        """Whether `name` is a prefix of declared keys, e.g. "MODEL.ROI_HEADS"."""
        return any(k.startswith(name + ".") for k in self._keys)

    def closest(self, name: str) -> str | None:
        """The declared key nearest to `name` in spelling, if any is reasonably near."""
        close = difflib.get_close_matches(name, list(self._keys), n=1, cutoff=0.6)
        return close[0] if close else None

    def markdown(self) -> str:
        """The schema as a markdown table, sorted by key."""
        rows = ["| key | type | default | help |", "|---|---|---|---|"]
        for key in sorted(self, key=lambda k: k.name):
            default = "*required*" if key.default is REQUIRED else f"`{json.dumps(key.default)}`"
            help_ = key.help
            if key.choices is not None:
                help_ += " (one of: " + ", ".join(f"`{c}`" for c in key.choices) + ")"
            cells = [f"`{key.name}`", f"`{type_name(key.type)}`", default, help_]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(rows) + "\n"


SCHEMA = Schema()


def declare(
    name: str, type: Any, default: Any, help: str, *, choices: Sequence[Any] | None = None
) -> Key:
    """Declares a key in the process-wide `SCHEMA`; see `Schema.declare`."""
    return SCHEMA.declare(name, type, default, help, choices=choices)
