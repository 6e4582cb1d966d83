"""`python -m detframe.config --print-schema`: the declared keys as a markdown table.

`python -m detframe.config CONFIG.yaml [KEY=VALUE ...]` prints the effective config instead.
The table in docs/configs.md is this command's output (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import SCHEMA, ConfigError, format_config, load_config
from .loader import import_builtin_components


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m detframe.config", description=__doc__)
    parser.add_argument("--print-schema", action="store_true", help="print the schema table")
    parser.add_argument("config", nargs="?", help="a YAML config file to load and print")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides")
    args = parser.parse_args(argv)
    if args.print_schema:
        import_builtin_components()
        sys.stdout.write(SCHEMA.markdown())
        return 0
    if args.config is None:
        parser.error("give --print-schema or a config file")
    try:
        sys.stdout.write(format_config(load_config(args.config, args.overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
