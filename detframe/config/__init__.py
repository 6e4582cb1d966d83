"""detframe's one config system: declared keys, YAML files read by OmegaConf.

- `declare(key, type, default, help, choices=..., min=..., max=...)` (in `schema.py`)
  declares a key next to the code that reads it; `defaults.py` holds the core keys.
- `load_config(path, overrides)` (in `loader.py`) reads a YAML file with its `_BASE_` chain
  and `KEY=VALUE` overrides, imports the modules listed in `IMPORTS`, and validates the
  result against the keys declared so far; any problem is a `ConfigError` naming the file,
  the key, the value and the closest valid key.
- `save_config` / `format_config` write the effective config as YAML that loads back.

This package imports no component. `detframe.engine.setup.load_config` loads a config with
the keys of all of detframe's components declared (the command line, the tools and the tests
use it), and `detframe schema` prints those keys as the table in docs/configs.md.
User guide: docs/configs.md.
"""

from . import defaults  # noqa: F401  (declares the core keys)
from .loader import format_config, load_config, save_config
from .schema import REQUIRED, SCHEMA, ConfigError, Key, Schema, declare

__all__ = [
    "REQUIRED",
    "SCHEMA",
    "ConfigError",
    "Key",
    "Schema",
    "declare",
    "format_config",
    "load_config",
    "save_config",
]
