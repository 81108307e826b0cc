"""Progress for long work: tensors done, GB/s and ETA on a terminal, silent when piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        total: int,
        total_bytes: int,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.total_bytes, self.label = total, total_bytes, label
        self.done = self.done_bytes = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, nbytes: int, name: str = "") -> None:
        self.done += 1
        self.done_bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done_bytes / elapsed
            left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0
            line = (
                f"\r{self.label} {self.done}/{self.total} tensors  {rate / 1e9:5.2f} GB/s  "
                f"ETA {int(left) // 60}:{int(left) % 60:02d}  {name[:48]:<48}"
            )
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
