"""`python -m dia_fused.train`: see dia_fused/train/cli.py for the options and examples."""

import sys

from .cli import command

if __name__ == "__main__":
    sys.exit(command())
