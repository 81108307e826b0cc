"""Work units of a distributed executor, and what a worker does with each.

A unit is the share of a plan that one remote task computes on its own: one output
tensor, a row range of a large tensor of an elementwise method, or a batch of tensors
(of linear-time methods up to a row range's entries, of others only those smaller than
a row block: norms, biases) so that the per-task overhead stays small beside the work. A worker reads its unit's inputs from storage every machine
sees, with the engine's reader, after checking that each input file is the one that was
planned; computes them exactly as the local executor does (the same row blocks, cuts
and thread count, hence the same bytes); and writes them at their precomputed offsets
in the shards the driver created. Only the unit itself goes back to the driver.

Nothing here imports a cluster framework: weightops.engine.ray_exec submits these
functions as Ray tasks, and a test can call them in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.align.match import Alignment
from weightops.align.model import AlignTarget, match_inputs
from weightops.engine.plan import Plan, TensorTask
from weightops.engine.run import (
    compute_threads,
    make_observers,
    observe,
    pad_vocab_rows,
    resolve_device,
    write_pieces,
)
from weightops.engine.select import find_cuts
from weightops.engine.stream import RunOptions, splits
from weightops.errors import CheckpointError
from weightops.io.safe_read import Stamp, file_stamp
from weightops.io.writer import Layout, ShardWriter
from weightops.merge.registry import Observer
from weightops.threads import intra_op_threads

# A row range covers this many row blocks (of RunOptions.chunk_elements entries): with
# the default 2^20, 16 blocks are 64 MB of fp32 per input, a second or so of work for
# the heaviest elementwise method against milliseconds of scheduling, and small enough
# that the workers share a model's few huge tensors evenly.
UNIT_CHUNKS = 16
# Linear-time units per slot a cluster of few slots gets at least: each unit refills and
# drains the reader/writer pipeline, which a local run does once, so on a small cluster
# units grow until each slot has this many (enough to even out the slots' ends).
UNITS_PER_SLOT = 4


@dataclass(frozen=True)
class Unit:
    """Output tensors computed by one task: whole (rows None) or rows [r0, r1) of one."""

    names: tuple[str, ...]
    rows: tuple[int, int] | None
    out_bytes: int
    peak_bytes: int  # estimated peak memory of its tensor data


def _row_split(plan: Plan, task: TensorTask, options: RunOptions) -> bool:
    """Whether the task may be cut into row ranges computed apart: its method is
    elementwise (no cut needs the whole tensor) and its vocabulary, if re-indexed,
    needs no pass over all rows first."""
    method = plan.method_of(task)
    return (
        splits(plan, task, options.chunk_elements)
        and method.elementwise
        and method.cut_positions(dict(task.params), task.numel, plan.numerics) is None
        and not (plan.vocab is not None and task.name in plan.vocab.reindex)
    )


def _peak(plan: Plan, tasks: list[TensorTask], options: RunOptions, fraction: float) -> int:
    """Peak memory of a unit's tensor data, counted as Plan.peak_bytes does (the
    largest piece in compute with room for temporaries, its output, the read-ahead)."""
    item = torch.empty((), dtype=plan.compute_dtype or torch.float32).element_size()
    compute = 0
    for t in tasks:
        entries = min(t.numel, options.chunk_elements) if plan.blockable(t) else t.numel
        compute = max(compute, (len(t.inputs) + 3) * entries * item + t.out_bytes)
    inputs = sum(plan.task_input_bytes(t) for t in tasks) * fraction
    return compute + int(min(options.read_ahead_bytes, inputs))


def _linear_time(plan: Plan, task: TensorTask) -> bool:
    """Whether the task's work grows only with its size (a copy, an elementwise method,
    one that cuts at magnitude ranks), so tasks may be batched by entries alone."""
    method = plan.method_of(task)
    return task.copy or method.elementwise or method.ranks is not None


def plan_units(plan: Plan, options: RunOptions, slots: int | None = None) -> list[Unit]:
    """The plan's tasks as units. Linear-time tensors are batched up to a row range's
    entries (UNIT_CHUNKS row blocks, or more on a cluster of `slots` slots, so that each
    gets about UNITS_PER_SLOT of them); any other tensor of a row block or more is a
    unit of its own (batching SVD-heavy matrices would leave workers idle while one
    works through many), and the smaller ones are batched up to a row block."""
    target = UNIT_CHUNKS * options.chunk_elements
    if slots:
        linear = sum(t.numel for t in plan.tasks if _linear_time(plan, t))
        target = max(target, linear // (slots * UNITS_PER_SLOT))
    units: list[Unit] = []
    # By linear time or not: the entries a batch of each kind is closed at.
    limits = {True: target, False: options.chunk_elements}
    batches: dict[bool, list[TensorTask]] = {True: [], False: []}

    def add(tasks: list[TensorTask]) -> None:
        names = tuple(t.name for t in tasks)
        out = sum(t.out_bytes for t in tasks)
        units.append(Unit(names, None, out, _peak(plan, tasks, options, 1.0)))

    for task in plan.tasks:
        if task.numel > target and _row_split(plan, task, options):
            rows = task.shape[0]
            # Ranges are whole row blocks of the local executor's size, so every block
            # is the same as in a local run.
            step = max(1, options.chunk_elements // (task.numel // rows))
            span = step * max(1, target // (step * (task.numel // rows)))
            for r0 in range(0, rows, span):
                r1 = min(rows, r0 + span)
                fraction = (r1 - r0) / rows
                units.append(
                    Unit(
                        (task.name,),
                        (r0, r1),
                        task.out_bytes * (r1 - r0) // rows,
                        _peak(plan, [task], options, fraction),
                    )
                )
            continue
        kind = _linear_time(plan, task)
        if task.numel >= limits[kind]:
            add([task])
            continue
        batch = batches[kind]
        batch.append(task)
        if sum(t.numel for t in batch) >= limits[kind]:
            add(batch)
            batch.clear()
    for batch in batches.values():
        if batch:
            add(batch)
    return units


def _only(plan: Plan, names: tuple[str, ...] | list[str]) -> Plan:
    wanted = set(names)
    return dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name in wanted])


def check_inputs(plan: Plan) -> None:
    """Fail unless every input file the plan reads here is the one that was planned."""
    files = {
        plan.sources[(r.model, r.name)].path
        for t in plan.tasks
        for r in [*t.inputs, *([t.base] if t.base else [])]
    }
    check_files(plan.stamps, files)


def check_files(stamps: dict[Path, Stamp | None], files: Iterable[Path]) -> None:
    """Fail unless each file is as `stamps` recorded it: same size and modification
    time (device and inode numbers differ between machines that mount one
    filesystem). A file that is gone is left to the reader, which reports it as a
    local run does."""
    for path in sorted(set(files)):
        planned, here = stamps.get(path), file_stamp(path)
        if planned is not None and here is not None and planned[2:] != here[2:]:
            raise CheckpointError(
                f"{path}: the input changed while it was read",
                hint=f"on {socket.gethostname()} it is not the file that was planned; every "
                "machine must see the same files at the same path",
            )


@contextlib.contextmanager
def _compute_on(plan: Plan, options: RunOptions) -> Iterator[torch.device]:
    """This worker's device, with the thread count a local run would use."""
    device = resolve_device(options.device)
    with intra_op_threads(compute_threads(plan, options, device)):
        yield device


def run_unit(
    plan: Plan,
    unit: Unit,
    folder: Path,
    layout: Layout,
    options: RunOptions,
    stats: dict[str, object],
    display: Path,
    *,
    flush: bool = True,
) -> Unit:
    """Compute one unit and write it into the shards in `folder`, flushed to disk with
    `flush` (else left to whoever fsyncs the shards on this machine)."""
    sub = _only(plan, unit.names)
    check_inputs(sub)
    with _compute_on(plan, options) as device:
        pad_vocab_rows(sub, options, device)
        cuts = find_cuts(sub, options, device)
        writer = ShardWriter(folder, layout, display=display, create=False)
        try:
            write_pieces(sub, writer, options, device, stats, cuts, rows=unit.rows)
            if flush:
                writer.finish()
        finally:
            writer.close()
    return unit


def observe_unit(plan: Plan, module: str, names: tuple[str, ...], options: RunOptions) -> Observer:
    """A fresh observer of `module` that has seen the named tensors, in plan order."""
    sub = _only(plan, names)
    check_inputs(sub)
    observers = {module: make_observers(sub)[module]}
    with _compute_on(plan, options) as device:
        observe(sub, options, device, observers)
    return observers[module]


def match_model(
    plan: Plan, target: AlignTarget, model: int, options: RunOptions
) -> Alignment | None:
    """`align:`'s permutations of one input model onto the reference (None: none)."""
    with _compute_on(plan, options) as device:
        found = match_inputs(target, [plan.models[model]], progress=False, device=device)
    return found.get(0)
