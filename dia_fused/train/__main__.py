"""`python -m dia_fused.train`: see dia_fused/train/cli.py for the options and examples."""

import sys

from ..ops import BackendUnavailableError
from .cli import main
from .data import DatasetError
from .errors import TrainError
from .interrupt import Interrupted

if __name__ == "__main__":
    try:
        main()
    except (DatasetError, BackendUnavailableError, TrainError) as err:
        sys.exit(f"error: {err}")  # user errors: the message says why
    except Interrupted as err:  # the run said what it kept
        sys.exit(err.exit_status)
