"""`python -m detframe`: the `detframe` command (detframe/cli.py)."""

import sys

from detframe.cli import main

sys.exit(main())
