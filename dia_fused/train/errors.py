"""User errors of the training command: `python -m dia_fused.train` prints them in one line."""


class TrainError(ValueError):
    """A command line or environment the training cannot run with; the message says why and what
    to do instead."""
