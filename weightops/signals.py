"""Ctrl-C and termination for the command line: one clean stop, never a half result.

The first SIGINT (or SIGTERM) raises KeyboardInterrupt in the main thread, so the
running command unwinds and removes what it staged; later ones only note that they
came, so the clean-up itself cannot be cut short. Whatever the command then does
with the exception, `stop_code()` says the run was stopped, so it never exits 0, and
an output is never put in place after a stop (`raise_if_stopped` before the rename).
This module imports nothing heavy: the handler goes in before torch and typer load.
"""

from __future__ import annotations

import signal
from types import FrameType

_stopped: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _stopped.append(signum)
    if len(_stopped) == 1:
        raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT and SIGTERM for the rest of the process."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def stop_code() -> int | None:
    """The exit status a stopped run must end with (130 for SIGINT, 143 for SIGTERM),
    or None if no signal came."""
    return 128 + _stopped[0] if _stopped else None


def raise_if_stopped() -> None:
    """Raise KeyboardInterrupt if a stop was asked for, even one whose exception a
    library swallowed."""
    if _stopped:
        raise KeyboardInterrupt
