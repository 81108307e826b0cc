"""Writes handed to one background thread, so that computing the next tensor overlaps
writing the last one (the write releases the GIL in pwrite)."""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from weightops.io.writer import ShardWriter

# Bytes of finished tensors that may wait for the disk at once.
PENDING_BYTES = 64 * 2**20


class BackgroundWrites:
    """`writer.write` on a thread of its own. At most `depth` writes wait, holding at
    most PENDING_BYTES beyond the oldest; a write's error is raised by a later `write`
    or by `drain`. The tensors handed over must not be changed afterwards."""

    def __init__(self, writer: ShardWriter, depth: int = 2) -> None:
        self.writer = writer
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightops-write")
        self._pending: collections.deque[tuple[Future[None], int]] = collections.deque()

    def write(self, name: str, tensor: torch.Tensor, at: int = 0) -> None:
        size = tensor.numel() * tensor.element_size()
        self._pending.append((self._pool.submit(self.writer.write, name, tensor, at), size))
        while self._pending and (
            self._pending[0][0].done()
            or len(self._pending) > self.depth
            or sum(s for _, s in self._pending) > PENDING_BYTES
        ):
            self._pending.popleft()[0].result()

    def drain(self) -> None:
        """Wait for every write, raising the first error."""
        while self._pending:
            self._pending.popleft()[0].result()

    def close(self) -> None:
        """Stop: writes not started are dropped, the one running is waited for (the
        writer's files stay open until then)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
