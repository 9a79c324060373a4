"""`python -m dia_fused.train`: see dia_fused/train/cli.py for the options and examples."""
import sys

from ..ops import BackendUnavailableError
from .cli import main
from .data import DatasetError

if __name__ == "__main__":
    try:
        main()
    except (DatasetError, BackendUnavailableError) as err:  # user errors: the message says why
        sys.exit(f"error: {err}")
