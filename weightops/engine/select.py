"""Exact streaming selection: the cuts of magnitude-trimming methods, found over row
blocks so that no tensor is ever held whole.

A method declaring `ranks=` (see weightops.merge.registry) names, per input, ascending
ranks of |δᵢ| = |θᵢ − θ_base| (ties in index order) at which it cuts. For every tensor
cut into row blocks, two streaming passes find each cut exactly:

1. a histogram of the high 16 bits of |δ|'s bit pattern (for non-negative floats the
   bit pattern, read as an integer, orders like the value), which puts each rank in
   one bucket;
2. the low bits of the entries inside that bucket, kept per row block: sorting them
   gives the exact value at the rank, how many entries lie below and at it, and how
   many of those tied entries lie in each block's earlier rows.

Memory is a 65536-entry histogram per input of the current tensor, and the bucket's
entries (a small share of the tensor unless most of it ties at one value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from weightops.engine.plan import Plan, TensorTask
from weightops.engine.stream import InputStream, RunOptions, splits
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
    lows: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # by first row


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


def _split_bits(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High 16 bits and the remaining low bits of non-negative floats, as integers."""
    width = mag.element_size() * 8
    bits = mag.reshape(-1).view(_INT_VIEW[mag.element_size()]).to(torch.int64)
    shift = width - _HIGH_BITS
    return (bits >> shift) & 0xFFFF, bits & ((1 << shift) - 1)


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


def _pass(plan: Plan, options: RunOptions, device: torch.device) -> Iterator:
    stream = InputStream(plan, options, device, chunked=True)
    try:
        for piece, box in stream:
            tensors, base = box.pop()
            yield (
                piece,
                (
                    [t.to(device) for t in tensors],
                    base.to(device) if base is not None else None,
                ),
            )
    finally:
        stream.close()


def find_cuts(plan: Plan, options: RunOptions, device: torch.device) -> dict[str, TaskCuts]:
    """The cuts of every tensor that a method with `ranks` runs on row blocks."""
    wanted: dict[str, list[tuple[int | None, ...]]] = {}
    for task in plan.tasks:
        if task.copy or not splits(plan, task, options.chunk_elements):
            continue
        positions = plan.method_of(task).cut_positions(dict(task.params), task.numel, plan.numerics)
        if positions is not None:
            wanted[task.name] = positions
    ranks = {
        name: [[None if p is None else _Rank(p) for p in ps] for ps in positions]
        for name, positions in wanted.items()
    }
    scanned = {n for n, rs in ranks.items() if any(r is not None for ps in rs for r in ps)}
    if not scanned:
        return {name: _finish(rs) for name, rs in ranks.items()}
    sub = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name in scanned])
    # Pass 1: which bucket of the high bits holds each rank.
    hists: dict[int, torch.Tensor] = {}
    for piece, loaded in _pass(sub, options, device):
        task = piece.task
        for i, mag in _magnitudes(plan, task, loaded):
            if any(r is not None for r in ranks[task.name][i]):
                high, _ = _split_bits(mag)
                for r in ranks[task.name][i]:
                    if r is not None:
                        r.dtype = mag.dtype
                counts = torch.bincount(high, minlength=1 << _HIGH_BITS).cpu()
                hists[i] = counts if i not in hists else hists[i].add_(counts)
        if piece.rows is None or piece.rows[1] == task.shape[0]:
            for i, hist in hists.items():
                cum = torch.cumsum(hist, 0)
                for r in ranks[task.name][i]:
                    if r is not None:
                        r.bucket = int(torch.searchsorted(cum, r.position, right=True))
                        r.below = int(cum[r.bucket - 1]) if r.bucket else 0
            hists.clear()
    # Pass 2: the low bits of each bucket's entries, block by block.
    for piece, loaded in _pass(sub, options, device):
        task = piece.task
        r0 = piece.rows[0] if piece.rows else 0
        for i, mag in _magnitudes(plan, task, loaded):
            wanted_here = [r for r in ranks[task.name][i] if r is not None]
            if wanted_here:
                high, low = _split_bits(mag)
                for r in wanted_here:
                    r.lows[r0] = low[high == r.bucket].cpu()
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
            lows = torch.cat(list(r.lows.values()))
            low = int(torch.kthvalue(lows, r.position - r.below + 1).values)
            cs.append(
                Cut(
                    position=r.position,
                    value=_bits_value(r.bucket, low, r.dtype),
                    less=r.below + int(torch.count_nonzero(lows < low)),
                    equal=int(torch.count_nonzero(lows == low)),
                    before=0,
                )
            )
            seen, counts = 0, {}
            for row, block in r.lows.items():
                counts[row] = seen
                seen += int(torch.count_nonzero(block == low))
            bs.append(counts)
        cuts.append(tuple(cs))
        before.append(tuple(bs))
    return TaskCuts(cuts, before)
