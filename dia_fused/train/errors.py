"""Errors of the training command: `python -m dia_fused.train` prints each as one `error:` line.

Exit statuses follow argparse: 2 for input the run cannot start with (flags, files, folders, the
environment), 1 for a run that started and had to stop (a non-finite loss, a failed write).
"""


class TrainError(ValueError):
    """A command line or environment the training cannot run with; the message says why and what
    to do instead."""

    exit_status = 2


class TrainingStopped(RuntimeError):
    """The run started and stopped before its end; the message says why and what was kept."""

    exit_status = 1


class NonFiniteError(TrainingStopped):
    """A training loss or the weights after an epoch are NaN or infinite."""


class WriteError(TrainingStopped):
    """A file of the run could not be written (disk full, removed folder, ...)."""
