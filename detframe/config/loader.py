"""Loading, validating and saving configs.

`load_config(path, overrides)` builds the effective config in this order:

1. read `path` and, recursively, the file named by its `_BASE_` (relative to the file that
   names it); a base is applied first and the file that names it wins, so the layers are
   defaults < deepest base < ... < `path` < command-line `KEY=VALUE` overrides (each one a
   layer, in order). Sections merge key by key; a key's value replaces the earlier one as a
   whole, be it a list or the mapping of a `dict[str, T]` key (its entries are not merged);
2. import the modules listed in the effective `IMPORTS` (so they can register components
   and declare keys);
3. flatten every layer into declared keys (a section's mapping is opened, a declared key's
   value is taken whole, dots in its entries' names included) and validate it against
   `SCHEMA` as declared at that moment: an unknown key, a wrong type, a value outside the
   declared choices or range, or a required key left unset is a `ConfigError` naming the
   file (or "command line"), the key, the value and, for unknown keys, the closest declared
   key;
4. return an OmegaConf `DictConfig` with every declared key, read-only and in struct mode.

The config layer imports no component: whoever builds components makes sure their keys are
declared first. detframe's own are declared by `detframe.engine.setup.load_config`, which
imports them and then calls this `load_config`; the command line, the tools and the tests
load configs through it.

A config file is UTF-8 YAML text (anything else, e.g. a checkpoint, is a `ConfigError`
naming the file), read with PyYAML's safe loader plus two fixes: `1e-3` is a float (not a
string) and a key given twice in one mapping is an error (not silently dropped). OmegaConf
interpolations (`${...}`) are not supported: a config says its values literally.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .schema import REQUIRED, SCHEMA, ConfigError, type_name

__all__ = ["format_config", "load_config", "save_config"]

COMMAND_LINE = "command line"
# (source: a file path or COMMAND_LINE, the values as written: a file's top-level mapping, or
# {KEY: VALUE} of one override); flattened into declared keys once IMPORTS are imported, so
# that a key declared by an imported module is known when its layer is flattened.
Layer = tuple[str, dict[Any, Any]]


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that reads 1e-3 as a float and rejects a key repeated in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


# YAML 1.1 wants a dot in every float (so 1e-3 would be a string); this matches YAML 1.2.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def _read_text(path: Path, source: str) -> str:
    """The text of the config file `path`; a file that is not UTF-8 text is a ConfigError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{source}: not a YAML text file: byte {data[e.start]:#04x} at offset {e.start} "
            "is not UTF-8 (a checkpoint or another binary file given as the config?)"
        ) from None


def _flatten(tree: dict[Any, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """{"MODEL": {"DEVICE": "cpu"}} -> {"MODEL.DEVICE": "cpu"}.

    A mapping is opened unless it is the value of a declared key (a `dict[str, T]`):
    {"SOLVER": {"LR_MULTIPLIERS": {"backbone.res2": 0.1}}} ->
    {"SOLVER.LR_MULTIPLIERS": {"backbone.res2": 0.1}}.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"{source}: key {key!r} under {where} is not a name")
        name = prefix + key
        if isinstance(value, dict) and name not in SCHEMA:
            flat.update(_flatten(value, source, name + "."))
        else:
            flat[name] = value
    return flat


def _read_chain(path: Path, named_by: str | None, stack: tuple[Path, ...] = ()) -> list[Layer]:
    """The layers of `path` and its `_BASE_` chain, deepest base first."""
    source = os.path.normpath(path)
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in (*stack, real))
        raise ConfigError(f"{source}: _BASE_ cycle: {chain}")
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {source}"
            + (f" (the _BASE_ of {named_by})" if named_by else "")
        )
    tree = _parse_yaml(_read_text(path, source), source)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(tree).__name__}")
    layers: list[Layer] = []
    base = tree.pop("_BASE_", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{source}: _BASE_ must be a file path, got {base!r}")
        layers = _read_chain(path.parent / base, source, (*stack, real))
    layers.append((source, tree))
    return layers


def _parse_overrides(overrides: Iterable[str]) -> list[Layer]:
    """["SOLVER.BASE_LR=0.01", ...] -> [(COMMAND_LINE, {"SOLVER.BASE_LR": 0.01}), ...]; the
    values are YAML."""
    layers: list[Layer] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not KEY=VALUE")
        layers.append((COMMAND_LINE, {key: _parse_yaml(text, f"{COMMAND_LINE}: {key}")}))
    return layers


def _import_modules(layers: Sequence[Layer]) -> None:
    """Imports the modules of the effective IMPORTS (the last layer that sets it wins)."""
    setting = [(source, tree["IMPORTS"]) for source, tree in layers if "IMPORTS" in tree]
    if not setting:
        return
    source, modules = setting[-1]
    for module in _check(source, "IMPORTS", modules):
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ConfigError(
                f"{source}: IMPORTS: cannot import module {module!r}: {type(e).__name__}: {e}"
            ) from e


def _declared_prefix(name: str) -> str | None:
    """The declared key that `name` continues, e.g. "SOLVER.LR_MULTIPLIERS" for
    "SOLVER.LR_MULTIPLIERS.backbone", or None."""
    head = name.rpartition(".")[0]
    while head and head not in SCHEMA:
        head = head.rpartition(".")[0]
    return head or None


def _strings(value: Any) -> Iterator[str]:
    """The strings of a value: itself, the elements of its lists, the values of its mappings."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _check(source: str, name: str, value: Any) -> Any:
    """`value` validated against the declaration of `name`; raises ConfigError."""
    if name not in SCHEMA:
        if SCHEMA.is_section(name):
            raise ConfigError(f"{source}: {name} is a section: give it a mapping of keys")
        owner = _declared_prefix(name)
        if owner is not None:
            raise ConfigError(
                f"{source}: unknown key {name}: {owner} is a key of type "
                f"{type_name(SCHEMA[owner].type)}, not a section; set its whole value"
            )
        message = f"{source}: unknown key {name}"
        close = SCHEMA.closest(name)
        section = name.rpartition(".")[0]
        if close:
            message += f"; did you mean {close}?"
        elif section and not SCHEMA.is_section(section):
            message += (
                f" (no key of {section} is declared: is the module that declares it imported,"
                " e.g. through IMPORTS?)"
            )
        raise ConfigError(message)
    if any("${" in s for s in _strings(value)):
        raise ConfigError(f"{source}: {name}: interpolation (${{...}}) is not supported")
    try:
        return SCHEMA[name].check(value)
    except ConfigError as e:
        raise ConfigError(f"{source}: {name}: {e}") from None


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """{"MODEL.DEVICE": "cpu"} -> {"MODEL": {"DEVICE": "cpu"}}."""
    tree: dict[str, Any] = {}
    for name, value in values.items():
        *sections, leaf = name.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DictConfig:
    """The effective config of `path` (with its `_BASE_` chain) and `KEY=VALUE` overrides.

    Args:
        path: a YAML config file.
        overrides: command-line items such as "SOLVER.BASE_LR=0.01", "DATASETS.TRAIN=[a,b]"
            or "SOLVER.LR_MULTIPLIERS={backbone.bottom_up: 0.1}"; the value is parsed as YAML
            (null, true, 3, 1e-3, [1, 2], {name: 0.5}, text).

    Returns:
        Every declared key with its effective value; read-only, and in struct mode (reading
        an undeclared key raises).

    Raises:
        ConfigError: a missing, binary or malformed file, a `_BASE_` cycle, a failed import,
            an unknown key, a wrong type, a value out of its choices or range, or a required
            key left unset.
    """
    files = _read_chain(Path(path), named_by=None)
    layers = [*files, *_parse_overrides(overrides)]
    _import_modules(layers)
    values = {key.name: key.default for key in SCHEMA}
    for source, tree in layers:
        for name, value in _flatten(tree, source).items():
            values[name] = _check(source, name, value)
    missing = [name for name, value in values.items() if value is REQUIRED]
    if missing:
        raise ConfigError(
            f"{files[-1][0]}: required key not set: {', '.join(missing)} "
            "(set it in the file or as KEY=VALUE on the command line)"
        )
    cfg = OmegaConf.create(_nest(values))
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def format_config(cfg: DictConfig) -> str:
    """The config as YAML text, in declaration order."""
    return OmegaConf.to_yaml(cfg)


def save_config(cfg: DictConfig, path: str | os.PathLike[str]) -> None:
    """Writes `cfg` as YAML that `load_config` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_config(cfg), encoding="utf-8")
