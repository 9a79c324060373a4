"""What every `python -m dia_fused...` command shares: bad input is one `error:` line on stderr and
exit status 2 (argparse's own status for a bad command line), with no traceback; a package a
command needs and the install lacks is named, with the extra that brings it, before any work."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

USAGE_ERROR = 2  # the exit status of a command line the command cannot run with


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`error: ...`, then where the options are
    listed) instead of the usage text and a line; its subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str) -> NoReturn:
    """Ends the command: `error: message` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


class MissingPackageError(ImportError):
    """An optional package a command needs is not installed; the message names the install."""


def require(module: str, package: str, extra: str, command: str) -> None:
    """Raises MissingPackageError naming `pip install "dia_fused[extra]"` when `module` (of the
    distribution `package`) cannot be imported; `command` is what needs it."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{command} needs {package}, which is not installed ({err}): "
            f'pip install "dia_fused[{extra}]"'
        ) from err
