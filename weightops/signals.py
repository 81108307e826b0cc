"""Ctrl-C and termination for the command line: one clean stop, never a half result.

The first SIGINT (or SIGTERM) raises KeyboardInterrupt in the main thread, so the
running command unwinds and removes what it staged; later ones only note that they
came, so the clean-up itself cannot be cut short. Whatever the command then does
with the exception, `stop_code()` says the run was stopped, so it never exits 0, and
an output is never put in place after a stop (`raise_if_stopped` before the rename).
This module imports nothing but the built-in `_signal` (not even `signal`, which
loads `enum`), so the handler is in place a few milliseconds into start-up, before
torch and typer load.
"""

import _signal

_stopped: list[int] = []
_told: list[bool] = []  # whether the user was already told of the stop
# Whether a stop raises at once. Not while the start-up imports run: an exception
# raised there can land inside a C++ extension's import callback, where it cannot
# propagate and the process aborts; the stop is acted on when the imports are done.
_armed: list[bool] = []


def _handler(signum: int, frame: object) -> None:
    _stopped.append(signum)
    if len(_stopped) == 1 and _armed:
        raise KeyboardInterrupt


def arm() -> None:
    """From now on a stop raises KeyboardInterrupt at once; one that came before
    (during the imports) raises it here."""
    _armed.append(True)
    raise_if_stopped()


def install() -> None:
    """Take over SIGINT and SIGTERM for the rest of the process."""
    import sys  # built in, already loaded

    _signal.signal(_signal.SIGINT, _handler)
    _signal.signal(_signal.SIGTERM, _handler)
    default = sys.unraisablehook

    def unraisable(info: object) -> None:
        # The interrupt landed in a callback (a weakref or finaliser, often inside
        # importlib) that Python cannot propagate from: it is remembered in `_stopped`
        # and acted on at the next check, so the report would only be noise.
        if not issubclass(getattr(info, "exc_type", type(None)), KeyboardInterrupt):
            default(info)  # type: ignore[arg-type]

    sys.unraisablehook = unraisable


def stop_code() -> int | None:
    """The exit status a stopped run must end with (130 for SIGINT, 143 for SIGTERM),
    or None if no signal came."""
    return 128 + _stopped[0] if _stopped else None


def told() -> None:
    """Note that the stop was reported, so that no second line repeats it."""
    _told.append(True)


def untold() -> bool:
    """Whether a stop came that nobody reported yet."""
    return bool(_stopped) and not _told


def raise_if_stopped() -> None:
    """Raise KeyboardInterrupt if a stop was asked for, even one whose exception a
    library swallowed."""
    if _stopped:
        raise KeyboardInterrupt


def exit_stopped() -> None:
    """End a process stopped before a command took charge: one line, status 130/143."""
    import os  # already loaded by the interpreter's start-up

    os.write(2, b"interrupted\n")
    os._exit(stop_code() or 130)
