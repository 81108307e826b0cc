"""Reading JSON Lines data files (calibration texts, prompts, pairs).

One JSON object per line; blank lines are skipped. Problems are reported with the
file and line number, so a user can open the file at the right place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weightops.errors import WeightopsError


class JsonlError(WeightopsError):
    """A JSONL file is missing, unreadable, or has a line that is not a JSON object.

    `line` is the 1-based line number, or None for problems with the whole file."""

    def __init__(self, path: Path, line: int | None, reason: str, *, hint: str | None = None):
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}", hint=hint)


def read_jsonl(path: str | Path, *, what: str = "data") -> list[tuple[int, dict[str, Any]]]:
    """[(line number, object)] for every non-blank line of `path`."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(
            path,
            None,
            f"no such {what} file" if not path.exists() else f"{what} path is not a file",
            hint="check the path",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise JsonlError(path, None, f"cannot read {what}: {reason}") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise JsonlError(path, n, f"expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows
