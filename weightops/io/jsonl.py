"""Reading JSON Lines data files (calibration texts, prompts, pairs).

One JSON object per line; blank lines are skipped. Problems are reported with the
file and line number, so a user can open the file at the right place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from weightops.errors import WeightopsError
from weightops.io.safe_read import decode_utf8, json_type, parse_json, read_regular


class JsonlError(WeightopsError):
    """A JSONL file is missing, unreadable, or has a line that is not a JSON object.

    `line` is the 1-based line number, or None for problems with the whole file."""

    def __init__(self, path: Path, line: int | None, reason: str, *, hint: str | None = None):
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}", hint=hint)


# Data files are prompts and texts, not corpora: bounded so a wrong file is an error,
# not minutes of parsing or gigabytes of memory.
MAX_DATA_BYTES = 1024 * 2**20
# One string in one row; a prompt, response or calibration text is far shorter.
MAX_TEXT_CHARS = 100_000


def read_jsonl(path: str | Path, *, what: str = "data") -> list[tuple[int, dict[str, Any]]]:
    """[(line number, object)] for every non-blank line of `path`."""
    path = Path(path)
    if not os.path.lexists(path):
        raise JsonlError(path, None, f"no such {what} file", hint="check the path")

    def whole(message: str, *, hint: str | None = None) -> JsonlError:
        return JsonlError(path, None, message.removeprefix(f"{path}: "), hint=hint)

    data = read_regular(path, what, limit=MAX_DATA_BYTES, error=whole)
    rows = []
    start = 0
    for n, raw in enumerate(data.split(b"\n"), 1):
        offset, start = start, start + len(raw) + 1

        def at_line(message: str, *, hint: str | None = None, n: int = n) -> JsonlError:
            reason = message.removeprefix(f"{path}:{n}: ").removeprefix("the line is ")
            return JsonlError(path, n, reason, hint=hint)

        where = f"{path}:{n}"
        line = decode_utf8(raw, where, "the line", error=at_line, base=offset)
        if not line.strip():
            continue
        row = parse_json(line, where, "the line", error=at_line, base=offset)
        if not isinstance(row, dict):
            raise JsonlError(path, n, f"expected a JSON object, got {json_type(row)}")
        for key, value in row.items():
            if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
                raise JsonlError(
                    path,
                    n,
                    f"{key!r} is {len(value):,} characters, more than the {MAX_TEXT_CHARS:,} "
                    "allowed",
                    hint="split long texts into several lines",
                )
        rows.append((n, row))
    return rows
