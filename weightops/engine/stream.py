"""Reading a plan's inputs ahead of the computation: the pieces a plan is cut into
(whole tensors, or row blocks of elementwise ones and of those whose magnitude cuts
are found beforehand), and a small thread pool that reads each piece's inputs
(adapter folded in, aligned, vocabulary re-indexed, converted to the compute dtype)
while the previous piece is computed."""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from weightops.engine.plan import InputRef, Plan, TensorTask
from weightops.io.safetensors_file import FileReader

# Elementwise methods work on row blocks of about this many entries (4 MB in fp32):
# small enough that a method's chain of passes stays in cache and its buffers are
# reused by the allocator instead of being page-faulted in afresh for every tensor.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class RunOptions:
    shard_size: int = 5 * 10**9
    device: str = "auto"
    threads: int | None = None
    force: bool = False
    progress: bool | None = None  # None: only on a terminal
    prefetch: int = 2
    read_ahead_bytes: int = 256 * 2**20
    chunk_elements: int = CHUNK_ELEMENTS
    # "local" (this process) or "ray" (weightops.engine.ray_exec: a Ray cluster at
    # `ray_address`, or RAY_ADDRESS, or a Ray instance started for the run).
    executor: str = "local"
    ray_address: str | None = None


@dataclass(frozen=True)
class Piece:
    """A whole output tensor (rows None) or rows [r0, r1) of it."""

    task: TensorTask
    rows: tuple[int, int] | None
    in_bytes: int

    @property
    def fraction(self) -> float:
        if self.rows is None:
            return 1.0
        return (self.rows[1] - self.rows[0]) / self.task.shape[0]

    @property
    def out_offset(self) -> int:
        """Byte offset of this piece inside the output tensor."""
        if self.rows is None:
            return 0
        return self.rows[0] * (self.task.out_bytes // self.task.shape[0])


def pieces(
    plan: Plan, chunk_elements: int | None, item_bytes: int | None = None
) -> Iterator[Piece]:
    """The plan's tasks as pieces; `item_bytes` counts inputs at that size per entry
    (when they are converted as they are read) instead of their stored size."""
    for task in plan.tasks:
        in_bytes = plan.task_input_bytes(task)
        if item_bytes is not None and not task.copy:
            in_bytes = task.numel * item_bytes * (len(task.inputs) + (task.base is not None))
        rows = task.shape[0] if task.shape else 0
        if chunk_elements and splits(plan, task, chunk_elements):
            step = max(1, chunk_elements // (task.numel // rows))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                yield Piece(task, (r0, r1), math.ceil(in_bytes * (r1 - r0) / rows))
        else:
            yield Piece(task, None, in_bytes)


def splits(plan: Plan, task: TensorTask, chunk_elements: int) -> bool:
    """Whether the task is computed in row blocks of about `chunk_elements` entries."""
    return (
        plan.blockable(task)
        and not task.copy
        and not plan.permutes_rows(task)
        and task.numel > chunk_elements
        and len(task.shape) > 0
        and task.shape[0] > 1
    )


def _load_trim() -> Callable[[], object]:
    """glibc's malloc_trim, or a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# Buffers of a few MB freed by one thread after another thread allocated them stay
# in glibc's heaps, fragmented, and resident memory creeps up with the number of
# tensors. Handing the free pages back every so often keeps peak RSS flat; doing it
# after every tensor costs the page faults of re-touching them (~15% of a merge).
release_free_memory = _load_trim()
Loaded = tuple[list[torch.Tensor], torch.Tensor | None]


def _widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert to the compute dtype. bf16 -> fp32 is exact as a 16-bit shift of the bit
    pattern, which runs about 1.5x faster on CPU than the general conversion."""
    if t.dtype == torch.bfloat16 and dtype == torch.float32:
        return t.view(torch.int16).to(torch.int32).bitwise_left_shift_(16).view(torch.float32)
    return t.to(dtype)


class InputStream:
    """Reads each piece's inputs ahead of use on a small thread pool."""

    def __init__(
        self,
        plan: Plan,
        options: RunOptions,
        device: torch.device,
        *,
        chunked: bool,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """`rows` keeps only the row blocks starting in [r0, r1) of a one-task plan
        (a distributed executor's share of a large tensor)."""
        self.plan = plan
        self.options = options
        self.chunk = options.chunk_elements if chunked else None
        self.rows = rows
        # On the CPU the readers also convert to the compute dtype, so that work runs
        # beside the computation instead of before it.
        self.convert = plan.compute_dtype if device.type == "cpu" else None
        self.reader = FileReader()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weightops-read")

    def _read(self, ref: InputRef, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows of one stored input as the merge sees it: adapter folded in, aligned."""
        tensor = self.reader.read(self.plan.sources[(ref.model, ref.name)], rows)
        adapter = self.plan.adapters.get(ref.model)
        if adapter is not None:
            tensor = adapter.apply(ref.name, tensor, rows, self.reader, self.plan.compute_dtype)
        if ref.model in self.plan.permutations:
            tensor = self.plan.permutations[ref.model].apply(ref.name, tensor, rows)
        return tensor

    def _fetch(self, task: TensorTask) -> Callable[[int, int, int], torch.Tensor]:
        """Reads rows of the task's input of one model, aligned, in the compute dtype."""
        refs = {r.model: r for r in [*task.inputs, *([task.base] if task.base else [])]}
        dtype = self.plan.compute_dtype or torch.float32
        return lambda model, r0, r1: _widen(self._read(refs[model], (r0, r1)), dtype)

    def _load(self, piece: Piece) -> Loaded:
        task = piece.task
        vocab = self.plan.vocab
        if vocab is not None and task.name in vocab.reindex:
            return vocab.load(task, piece.rows, self._fetch(task), self.plan.compute_dtype)
        # A model listed twice is read once, but each use gets its own copy: methods
        # overwrite their inputs.
        cache: dict[InputRef, torch.Tensor] = {}

        def get(ref: InputRef) -> torch.Tensor:
            if ref in cache:
                return cache[ref].clone()
            tensor = self._read(ref, piece.rows)
            if self.convert is not None and not task.copy:
                tensor = _widen(tensor, self.convert)
            cache[ref] = tensor
            return tensor

        inputs = [get(r) for r in task.inputs]
        return inputs, (get(task.base) if task.base else None)

    def __iter__(self) -> Iterator[tuple[Piece, list[Loaded]]]:
        """Yield (piece, [inputs]). The consumer pops the inputs out of the list, so
        nothing here keeps them alive while it computes. While a piece is computed,
        the next ones are read if their bytes, with the current piece's, fit in the
        read-ahead budget; a piece larger than the budget is read on its own."""
        item = torch.empty((), dtype=self.convert).element_size() if self.convert else None
        todo = pieces(self.plan, self.chunk, item)
        if self.rows is not None:
            r0, r1 = self.rows
            todo = (p for p in todo if p.rows is not None and r0 <= p.rows[0] < r1)
        queue: collections.deque[tuple[Piece, Future[Loaded]]] = collections.deque()
        upcoming: list[Piece] = []

        def fill(current: int) -> None:
            ahead = current + sum(p.in_bytes for p, _ in queue)
            while True:
                if not upcoming:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    upcoming.append(nxt)
                piece = upcoming[0]
                fits = len(queue) <= self.options.prefetch and (
                    ahead + piece.in_bytes <= self.options.read_ahead_bytes
                )
                if not (fits or (not queue and current == 0)):
                    return
                upcoming.pop()
                queue.append((piece, self.pool.submit(self._load, piece)))
                ahead += piece.in_bytes

        fill(0)
        while queue:
            piece, future = queue.popleft()
            box = [future.result()]
            del future
            fill(piece.in_bytes)
            yield piece, box
            fill(0)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
