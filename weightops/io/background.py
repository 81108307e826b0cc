"""Reads and writes on background threads, so that computing one tensor overlaps reading
the next and writing the last (pread and pwrite release the GIL)."""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from weightops.io.safetensors_file import FileReader, TensorInfo
from weightops.io.writer import ShardWriter

# Bytes of finished tensors that may wait for the disk at once.
PENDING_BYTES = 64 * 2**20
# Bytes of source tensors read ahead of the one in use.
READ_AHEAD_BYTES = 64 * 2**20


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


class ReadAhead:
    """Reads `order` (the tensors the caller will ask for, in that order) on a thread of
    its own, at most READ_AHEAD_BYTES ahead of the caller, the next one always (a
    tensor larger than the budget is read alone). `read` has FileReader's signature: a
    tensor of the order is handed over (those skipped before it are dropped), anything
    else is read at once. A read's error is raised by the `read` that asks for it."""

    def __init__(self, reader: FileReader, order: list[TensorInfo]) -> None:
        self.reader = reader
        self._order = collections.deque(order)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightops-read")
        self._pending: collections.deque[tuple[TensorInfo, Future[torch.Tensor]]] = (
            collections.deque()
        )
        self._fill()

    def _fill(self) -> None:
        held = sum(info.nbytes for info, _ in self._pending)
        while self._order and (
            not self._pending or held + self._order[0].nbytes <= READ_AHEAD_BYTES
        ):
            info = self._order.popleft()
            self._pending.append((info, self._pool.submit(self.reader.read, info)))
            held += info.nbytes

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if rows is None and any(info == queued for queued, _ in self._pending):
            while True:
                queued, future = self._pending.popleft()
                if queued == info:
                    break
                future.cancel()
            self._fill()
            return future.result()
        return self.reader.read(info, rows)

    def close(self) -> None:
        """Stop: reads not started are dropped, the one running is waited for."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
