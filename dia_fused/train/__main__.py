"""`python -m dia_fused.train`: see dia_fused/train/cli.py for the options and examples."""
import sys

from .cli import main
from .data import DatasetError

if __name__ == "__main__":
    try:
        main()
    except DatasetError as err:  # a user error, not a bug: the message says what is expected
        sys.exit(f"error: {err}")
