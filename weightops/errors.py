"""The exceptions weightops raises on purpose.

Every error says what went wrong, where (file, tensor or recipe path) and how to fix it.
The CLI prints `str(err)` on one line and exits non-zero; tracebacks only with --debug.
"""

from __future__ import annotations


class WeightopsError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)

    def __reduce__(self) -> tuple:
        # Errors raised by a worker of a distributed executor are pickled back to the
        # driver; every field must survive, whatever the subclass's constructor takes.
        return (_restore, (type(self), self.args, self.__dict__))


def _restore(cls: type[WeightopsError], args: tuple, state: dict) -> WeightopsError:
    err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class CheckpointError(WeightopsError):
    """A checkpoint is missing, unsafe, corrupted or inconsistent."""


class RecipeError(WeightopsError):
    """A recipe is invalid; `problems` lists every (yaml path, message) found, and
    `warnings` what else was found that mergekit would ignore."""

    def __init__(
        self,
        source: str,
        problems: list[tuple[str, str]],
        warnings: list[tuple[str, str]] | None = None,
    ) -> None:
        self.source = source
        self.problems = problems
        self.warnings = warnings or []
        lines = "; ".join(f"{path}: {msg}" if path else msg for path, msg in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}: {lines}")

    def details(self) -> str:
        return "\n".join(f"  {path or '<recipe>'}: {msg}" for path, msg in self.problems)


class MergeError(WeightopsError):
    """A merge could not produce a valid tensor (shapes, NaN/Inf, method limits)."""


class OutputError(WeightopsError):
    """The output folder cannot be written (exists, disk full, permissions)."""
