"""Config key declarations: every key that code reads is declared once, next to that code.

    from detframe.config import REQUIRED, declare

    declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 80, "number of foreground classes", min=1)
    declare("INPUT.FORMAT", str, "BGR", "channel order of input images", choices=("RGB", "BGR"))
    declare("MODEL.MY_HEAD.ANCHORS", list[int], REQUIRED, "anchor sizes; must be set", min=1)
    declare("MODEL.MY_HEAD.SIZES", list[list[float]], [[32, 40]], "per level", min=1)
    declare("MODEL.MY_HEAD.WEIGHTS", dict[str, float], {"cls": 1.0}, "loss weight per name", min=0)

A key is a dotted upper-case path; the part before the last dot is its section. The
supported types are `int`, `float`, `bool`, `str`, `list[T]` and `list[list[T]]` of one of
those, `dict[str, T]` (a mapping from any string, dots included, to a T), and any of these
`| None` (which allows `null`). An `int` is accepted where a `float` is declared and
converted; nothing else is converted (a `bool` is not an `int`, `"1"` is not a number, `1`
is not a string key).

A declaration may restrict the values: `choices` lists the allowed values, and `min` / `max`
bound a number (inclusive, or exclusive with `min_exclusive` / `max_exclusive`; NaN is outside
every range, and `max=math.inf, max_exclusive=True` keeps infinity out). Both apply to each
scalar of a list and to each value of a mapping. A value that breaks a declaration is a
`ConfigError` that names the bad element's position in a list, e.g. "element [1][0]", or the
entry of a mapping, e.g. "entry 'backbone'".

All declarations go into one process-wide `Schema`, `SCHEMA`; the loader validates configs
against it, and `Schema.markdown()` renders it as the table in docs/configs.md. Declaring the
same key twice with identical fields is allowed (a module imported twice); with different
fields it is an error.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union, get_args, get_origin

__all__ = ["REQUIRED", "SCHEMA", "ConfigError", "Key", "Schema", "declare", "type_name"]

_SCALARS = (int, float, bool, str)
_MAX_LIST_DEPTH = 2
_KEY_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, value out of range, bad file."""


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


class _Layout(NamedTuple):
    """A declared type taken apart: `list[list[float]] | None` is (float, 2, False, True)."""

    scalar: Any  # as found; `Schema.declare` checks that it is one of `_SCALARS`
    depth: int  # list nesting: 0 for a scalar or a mapping
    mapping: bool  # dict[str, scalar]
    optional: bool  # `| None`


def _layout(type_: Any) -> _Layout:
    """The layout of a declared type; an unsupported type comes back as its own scalar."""
    inner, optional = _split_optional(type_)
    if get_origin(inner) is dict:
        args = get_args(inner)
        if len(args) == 2 and args[0] is str:
            return _Layout(args[1], 0, True, optional)
        return _Layout(inner, 0, False, optional)
    depth = 0
    while get_origin(inner) is list and len(get_args(inner)) == 1:
        inner, depth = get_args(inner)[0], depth + 1
    return _Layout(inner, depth, False, optional)


def _list_of(scalar: type, depth: int) -> str:
    """`float`, `list[float]`, `list[list[float]]` for depth 0, 1, 2."""
    return "list[" * depth + scalar.__name__ + "]" * depth


def type_name(type_: Any) -> str:
    """`int`, `list[float]`, `list[list[int]]`, `dict[str, float]`, `str | None`: how a
    declared type is written."""
    scalar, depth, mapping, optional = _layout(type_)
    name = f"dict[str, {scalar.__name__}]" if mapping else _list_of(scalar, depth)
    return f"{name} | None" if optional else name


def _shown(value: Any) -> str:
    """A value as an error message shows what it got: "null", "int 32", "str 'big'"."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _position(index: tuple[int, ...]) -> str:
    """The prefix of a message about the value at `index`: empty for the value itself,
    "element [1][0]: " for the first element of its second list."""
    return "element " + "".join(f"[{i}]" for i in index) + ": " if index else ""


def _entry(name: Any) -> str:
    """The prefix of a message about the entry `name` of a mapping: "entry 'backbone': "."""
    return f"entry {name!r}: "


def _check_scalar(scalar: type, value: Any, where: str) -> Any:
    """`value` as `scalar` (int -> float is the only conversion); raises ConfigError whose
    message starts with `where` (see `_position`, `_entry`)."""
    if scalar is float and type(value) is int:
        return float(value)
    if type(value) is not scalar:
        raise ConfigError(f"{where}expected {scalar.__name__}, got {_shown(value)}")
    return value


@dataclass(frozen=True)
class Key:
    """One declared config key.

    Attributes:
        name: dotted path, e.g. "MODEL.ROI_HEADS.NUM_CLASSES".
        type: the declared type (see the module docstring).
        default: the value when no config sets it, or REQUIRED.
        help: one line for the schema table.
        choices: the allowed values (of the value, of each scalar of a list, of each value
            of a mapping), or None.
        min, max: bounds of a number (of the value, of each scalar of a list, of each value
            of a mapping), or None.
        min_exclusive, max_exclusive: whether the value may not equal `min` / `max`.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def check(self, value: Any) -> Any:
        """`value` validated (and int converted to float where declared); raises ConfigError.

        A list comes back as a list, a mapping as a dict. The message names the position of
        a bad element in a list, e.g. "element [1][0]: ...", or the entry of a mapping, e.g.
        "entry 'backbone': ...".
        """
        scalar, depth, mapping, optional = _layout(self.type)
        if value is None:
            if optional:
                return None
            raise ConfigError(f"expected {type_name(self.type)}, got null")
        if mapping:
            return self._check_mapping(value, scalar)
        return self._check(value, scalar, depth, ())

    def _check(self, value: Any, scalar: type, depth: int, index: tuple[int, ...]) -> Any:
        """`value` checked as a `depth`-deep list of `scalar` found at `index`."""
        if depth == 0:
            where = _position(index)
            return self._check_allowed(_check_scalar(scalar, value, where), where)
        if not isinstance(value, list | tuple):
            expected = _list_of(scalar, depth)
            raise ConfigError(f"{_position(index)}expected {expected}, got {_shown(value)}")
        return [self._check(v, scalar, depth - 1, (*index, i)) for i, v in enumerate(value)]

    def _check_mapping(self, value: Any, scalar: type) -> dict[str, Any]:
        """`value` checked as a mapping from strings to `scalar`."""
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected {type_name(self.type)}, got {_shown(value)}")
        checked: dict[str, Any] = {}
        for name, item in value.items():
            if type(name) is not str:
                raise ConfigError(f"{_entry(name)}expected a str name, got {_shown(name)}")
            checked[name] = self._check_allowed(
                _check_scalar(scalar, item, _entry(name)), _entry(name)
            )
        return checked

    def _check_allowed(self, value: Any, where: str) -> Any:
        """`value` (a checked scalar) if the choices and the range allow it; a message
        about it starts with `where`."""
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise ConfigError(f"{where}{value!r} is not one of the allowed values: {allowed}")
        if not self.in_range(value):
            raise ConfigError(f"{where}{value!r} is out of range: must be {self.range}")
        return value

    def in_range(self, number: float) -> bool:
        """Whether `number` lies within `min` and `max` (always true without a range)."""
        if self.min is None and self.max is None:
            return True
        if math.isnan(number):
            return False
        above = (
            self.min is None or number > self.min or (number == self.min and not self.min_exclusive)
        )
        below = (
            self.max is None or number < self.max or (number == self.max and not self.max_exclusive)
        )
        return above and below

    @property
    def range(self) -> str | None:
        """The range in words: ">= 1", "> 0", "<= 1", "in [0, 1]", "in [0, 1)"; or None."""
        if self.min is None and self.max is None:
            return None
        if self.max is None:
            return f"{'>' if self.min_exclusive else '>='} {self.min:g}"
        if self.min is None:
            return f"{'<' if self.max_exclusive else '<='} {self.max:g}"
        left = "(" if self.min_exclusive else "["
        right = ")" if self.max_exclusive else "]"
        return f"in {left}{self.min:g}, {self.max:g}{right}"


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
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
        max_exclusive: bool = False,
    ) -> Key:
        """Declares a key (see the module docstring); returns it.

        Raises:
            ValueError: a malformed declaration, or a clash with an earlier one.
        """
        scalar, depth, _, _ = _layout(type)
        if scalar not in _SCALARS or depth > _MAX_LIST_DEPTH:
            raise ValueError(f"{name}: unsupported type {type!r}")
        if not _KEY_PATTERN.match(name):
            raise ValueError(f"{name!r}: keys are dotted UPPER_CASE names, e.g. MODEL.DEVICE")
        if not help or "\n" in help:
            raise ValueError(f"{name}: help must be one non-empty line")
        bounded = min is not None or max is not None
        if bounded and scalar not in (int, float):
            raise ValueError(f"{name}: a range needs a number type, not {type_name(type)}")
        if (min_exclusive and min is None) or (max_exclusive and max is None):
            raise ValueError(f"{name}: an exclusive bound needs its min / max")
        if min is not None and max is not None and not min < max:
            raise ValueError(f"{name}: empty range: min {min} is not below max {max}")
        key = Key(
            name,
            type,
            default,
            help,
            None if choices is None else tuple(choices),
            min,
            max,
            min_exclusive,
            max_exclusive,
        )
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
            if key.range is not None:
                help_ += f" (range: {key.range})"
            cells = [f"`{key.name}`", f"`{type_name(key.type)}`", default, help_]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(rows) + "\n"


SCHEMA = Schema()


def declare(
    name: str,
    type: Any,
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> Key:
    """Declares a key in the process-wide `SCHEMA`; see `Schema.declare`."""
    return SCHEMA.declare(
        name,
        type,
        default,
        help,
        choices=choices,
        min=min,
        max=max,
        min_exclusive=min_exclusive,
        max_exclusive=max_exclusive,
    )
