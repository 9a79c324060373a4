"""SIGINT and SIGTERM (what schedulers and torchrun send) stop a training run the same way: an
`Interrupted` exception in the main thread, so that `finally` blocks run and temporary files are
removed, while the files of the last completed epoch stay. A signal that arrives inside
`deferred()` (writing an epoch's log row and checkpoints) is acted on when the section ends, so
that an epoch that has finished is also saved."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by `signum`; the exit status of the command is 128 + signum."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_depth = 0  # nesting of deferred() sections
_pending: List[int] = []


def _handler(signum, frame) -> None:
    if _depth:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise Interrupted (main thread only: elsewhere Python
    cannot install handlers, and the caller's own handling stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        _pending.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section a signal does not cut short: Interrupted is raised when it ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending:
        signum: Optional[int] = _pending[0]
        _pending.clear()
        raise Interrupted(signum)
