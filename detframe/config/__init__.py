"""detframe's one config system: declared keys, YAML files read by OmegaConf.

- `declare(key, type, default, help)` (in `schema.py`) declares a key next to the code that
  reads it; `defaults.py` holds the core keys.
- `load_config(path, overrides)` (in `loader.py`) reads a YAML file with its `_BASE_` chain
  and `KEY=VALUE` overrides, imports the modules listed in `IMPORTS`, and validates the
  result; any problem is a `ConfigError` naming the file, the key and the closest valid key.
- `save_config` / `format_config` write the effective config as YAML that loads back.

User guide: docs/configs.md. `python -m detframe.config --print-schema` prints the schema.
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
