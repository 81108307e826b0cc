"""Exact streaming selection: the cuts of magnitude-trimming methods, found over row
blocks so that no tensor is ever held whole.

A method declaring `ranks=` (see weightops.merge.registry) names, per input, ascending
ranks of |δᵢ| = |θᵢ − θ_base| (ties in index order) at which it cuts. For every tensor
cut into row blocks, up to three streaming passes find each cut exactly:

1. the count of exact zeros: task vectors of bf16 fine-tunes are often mostly zeros,
   and a cut below that count is at 0, with the zeros per block as its ties;
2. otherwise a histogram of the high 16 bits of |δ|'s bit pattern (for non-negative
   floats the bit pattern, read as an integer, orders like the value), which puts
   each rank in one bucket;
3. a tally of the low bits of the entries inside that bucket, per row block: merged,
   it gives the exact value at the rank and how many entries lie below and at it;
   per block, how many of the tied entries lie in earlier rows.

Memory is a 65536-entry histogram per input of the current tensor, and per block the
distinct low bits in the bucket with their counts: one pair when most of a tensor ties
at one value (the exact zeros of a sparse task vector).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import torch

from weightops.engine.plan import Plan, TensorTask
from weightops.engine.progress import Progress
from weightops.engine.stream import InputStream, RunOptions, release_free_memory, splits
from weightops.merge.cuts import Cut

_HIGH_BITS = 16
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass
class _Rank:
    """One cut of one input while it is being found."""

    position: int
    bucket: int = 0
    below: int = 0  # entries in lower buckets
    dtype: torch.dtype = torch.float32  # of |δ| as the method computes it
    settled: bool = False  # its tallies are complete
    # Per row block (by first row): the distinct low bits in the bucket and their counts.
    lows: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskCuts:
    """The cuts of one tensor: per input, per requested rank, a finished Cut for the
    whole tensor and the count of tied entries before each row block."""

    cuts: list[tuple[Cut | None, ...]]
    before: list[tuple[dict[int, int] | None, ...]]

    def for_rows(self, r0: int) -> list[tuple[Cut | None, ...]]:
        return [
            tuple(
                None if c is None else dataclasses.replace(c, before=b[r0])
                for c, b in zip(cs, bs, strict=True)
            )
            for cs, bs in zip(self.cuts, self.before, strict=True)
        ]


def _high(mag: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of non-negative floats' bit patterns, as non-negative integers."""
    if mag.dtype == torch.float32 and sys.byteorder == "little":
        return mag.reshape(-1).view(torch.int16)[1::2]  # no shift: the upper halves
    bits = mag.reshape(-1).view(_INT_VIEW[mag.element_size()])
    return (
        bits.to(torch.int32)
        if mag.element_size() == 2
        else bits >> (bits.dtype.itemsize * 8 - _HIGH_BITS)
    )


def _low_in(mag: torch.Tensor, bucket: int) -> torch.Tensor:
    """The low bits (below the high 16) of the entries whose high bits are `bucket`."""
    flat = mag.reshape(-1)
    inside = flat[_high(mag) == bucket]
    if mag.element_size() == 2:
        return torch.zeros(inside.numel(), dtype=torch.int32, device=mag.device)
    bits = inside.view(_INT_VIEW[mag.element_size()])
    return bits & ((1 << (bits.dtype.itemsize * 8 - _HIGH_BITS)) - 1)


def _tally(lows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of `lows` and how often each occurs, small whatever the
    share of the tensor that ties at one value."""
    if width <= 32:
        counts = torch.bincount(lows, minlength=1 << (width - _HIGH_BITS))
        values = torch.nonzero(counts).squeeze(1)
        return values.cpu(), counts[values].cpu()
    values, counts = torch.unique(lows, return_counts=True)
    return values.cpu(), counts.cpu()


def _bits_value(high: int, low: int, dtype: torch.dtype) -> float:
    width = torch.empty((), dtype=dtype).element_size() * 8
    bits = torch.tensor([(high << (width - _HIGH_BITS)) | low], dtype=torch.int64)
    return float(bits.to(_INT_VIEW[width // 8]).view(dtype).item())


def _magnitudes(
    plan: Plan, task: TensorTask, loaded: tuple[list[torch.Tensor], torch.Tensor | None]
) -> Iterator[tuple[int, torch.Tensor]]:
    """|θᵢ − θ_base| of each input of a block, computed as the methods compute δᵢ."""
    tensors, base = loaded
    for i, t in enumerate(tensors):
        dtype = plan.compute_dtype or t.dtype
        delta = t.to(dtype=dtype).sub_(base.to(dtype=dtype)) if base is not None else t
        yield i, delta.abs_()


def _nonzero(mag: torch.Tensor) -> int:
    """How many entries of |δ| are nonzero; overwrites it. Summing signs (0 or 1, exact
    in fp32 below 2^24) is several times faster on CPU than count_nonzero."""
    if mag.numel() < 1 << 24:
        count = float(mag.sign_().sum())
        if count == count:  # no NaN
            return int(count)
    return int(mag.bool().sum())


def _scan(
    plan: Plan, names: set[str], options: RunOptions, device: torch.device
) -> Iterator[tuple[TensorTask, int, bool, Iterator[tuple[int, torch.Tensor]]]]:
    """Stream the named tasks' row blocks: (task, first row, last block?, |δᵢ| by input)."""
    if not names:
        return
    sub = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name in names])
    stream = InputStream(sub, options, device, chunked=True)
    progress = Progress(len(sub.tasks), sub.output_bytes, "thresholds", enabled=options.progress)
    try:
        for piece, box in stream:
            tensors, base = box.pop()
            loaded = (
                [t.to(device) for t in tensors],
                base.to(device) if base is not None else None,
            )
            last = piece.rows is None or piece.rows[1] == piece.task.shape[0]
            r0 = piece.rows[0] if piece.rows else 0
            yield piece.task, r0, last, _magnitudes(plan, piece.task, loaded)
            if last:
                progress.update(piece.task.out_bytes, piece.task.name)
                release_free_memory()
    finally:
        stream.close()
        progress.close()


def find_cuts(plan: Plan, options: RunOptions, device: torch.device) -> dict[str, TaskCuts]:
    """The cuts of every tensor that a method with `ranks` runs on row blocks."""
    ranks: dict[str, list[list[_Rank | None]]] = {}
    for task in plan.tasks:
        if task.copy or not splits(plan, task, options.chunk_elements):
            continue
        positions = plan.method_of(task).cut_positions(dict(task.params), task.numel, plan.numerics)
        if positions is not None:
            ranks[task.name] = [[None if p is None else _Rank(p) for p in ps] for ps in positions]

    def unsettled() -> set[str]:
        return {n for n, rs in ranks.items() for ps in rs for r in ps if r and not r.settled}

    # Pass 1: exact zeros per block. Task vectors of bf16 fine-tunes are often mostly
    # zeros, and a cut below their count is at 0: nothing more to find.
    zeros: dict[int, dict[int, int]] = {}
    for task, r0, last, mags in _scan(plan, unsettled(), options, device):
        for i, mag in mags:
            if any(ranks[task.name][i]):
                zeros.setdefault(i, {})[r0] = mag.numel() - _nonzero(mag)
                for r in filter(None, ranks[task.name][i]):
                    r.dtype = mag.dtype
        if last:
            for i, per_block in zeros.items():
                for r in filter(None, ranks[task.name][i]):
                    if r.position < sum(per_block.values()):
                        zero = torch.zeros(1, dtype=torch.int64)
                        r.lows = {row: (zero, torch.tensor([z])) for row, z in per_block.items()}
                        r.settled = True
            zeros.clear()
    # Pass 2: which bucket of the high bits holds each remaining rank.
    hists: dict[int, torch.Tensor] = {}
    for task, _, last, mags in _scan(plan, unsettled(), options, device):
        for i, mag in mags:
            if any(r and not r.settled for r in ranks[task.name][i]):
                counts = torch.bincount(_high(mag), minlength=1 << _HIGH_BITS).cpu()
                hists[i] = counts if i not in hists else hists[i].add_(counts)
        if last:
            for i, hist in hists.items():
                cum = torch.cumsum(hist, 0)
                for r in ranks[task.name][i]:
                    if r is None or r.settled:
                        continue
                    r.bucket = int(torch.searchsorted(cum, r.position, right=True))
                    r.below = int(cum[r.bucket - 1]) if r.bucket else 0
            hists.clear()
    # Pass 3: a tally of the low bits of each bucket's entries, block by block.
    for task, r0, _, mags in _scan(plan, unsettled(), options, device):
        for i, mag in mags:
            for r in ranks[task.name][i]:
                if r is not None and not r.settled:
                    r.lows[r0] = _tally(_low_in(mag, r.bucket), mag.element_size() * 8)
    return {name: _finish(rs) for name, rs in ranks.items()}


def _finish(ranks: list[list[_Rank | None]]) -> TaskCuts:
    cuts: list[tuple[Cut | None, ...]] = []
    before: list[tuple[dict[int, int] | None, ...]] = []
    for per_input in ranks:
        cs: list[Cut | None] = []
        bs: list[dict[int, int] | None] = []
        for r in per_input:
            if r is None:
                cs.append(None)
                bs.append(None)
                continue
            values = torch.cat([v for v, _ in r.lows.values()])
            counts = torch.cat([c for _, c in r.lows.values()])
            distinct, where = torch.unique(values, return_inverse=True)
            totals = torch.zeros(len(distinct), dtype=torch.int64).index_add_(0, where, counts)
            at = int(torch.searchsorted(torch.cumsum(totals, 0), r.position - r.below, right=True))
            low = int(distinct[at])
            cs.append(
                Cut(
                    position=r.position,
                    value=_bits_value(r.bucket, low, r.dtype),
                    less=r.below + int(totals[:at].sum()),
                    equal=int(totals[at]),
                    before=0,
                )
            )
            seen, before_block = 0, {}
            for row, (v, c) in r.lows.items():
                before_block[row] = seen
                seen += int(c[v == low].sum())
            bs.append(before_block)
        cuts.append(tuple(cs))
        before.append(tuple(bs))
    return TaskCuts(cuts, before)
