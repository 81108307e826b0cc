"""The streaming executor: read ahead, compute one tensor, hand it to the writer.

Three things overlap: worker threads read the next pieces' inputs from disk (in their
stored dtype, so read-ahead costs half of fp32 for bf16 models), the calling thread
computes the current piece in the compute dtype on the chosen device, and a writer
thread puts finished pieces at their final offsets. A piece is a whole tensor, or for
elementwise methods a block of rows of a large tensor (so a 128k-vocabulary embedding
never needs to be in memory whole). Read-ahead and pending writes are bounded in
bytes, so memory is a few pieces, never the depth or width of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from weightops import __version__, signals
from weightops.engine.card import write_side_files
from weightops.engine.draws import BlockDraws
from weightops.engine.plan import Plan
from weightops.engine.progress import Progress
from weightops.engine.select import TaskCuts, find_cuts
from weightops.engine.stream import (
    CHUNK_ELEMENTS,
    InputStream,
    Loaded,
    Piece,
    RunOptions,
    pieces,
    release_free_memory,
)
from weightops.errors import MergeError, WeightopsError
from weightops.io.background import BackgroundWrites
from weightops.io.writer import (
    Layout,
    ShardWriter,
    StagingFolder,
    check_unchanged,
    disk_error,
    plan_layout,
    write_index,
)
from weightops.merge.registry import Observer
from weightops.threads import intra_op_threads

__all__ = [
    "CHUNK_ELEMENTS",
    "Piece",
    "RunOptions",
    "compute_threads",
    "execute",
    "make_observers",
    "observe",
    "pieces",
    "resolve_device",
    "staged",
    "write_pieces",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(
            f"--device {name}: no CUDA device is available to this torch ({torch.__version__})",
            hint="use --device cpu, or install a CUDA build of torch on a machine with a GPU",
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise MergeError(f"--device {name}: unknown device", hint="use auto, cpu or cuda[:N]")
    return torch.device(name)


def _to_compute(plan: Plan, loaded: Loaded, device: torch.device) -> Loaded:
    tensors, base = loaded
    dtype = plan.compute_dtype or (base if base is not None else tensors[0]).dtype
    # Convert one input at a time, letting go of each stored-dtype copy as we go.
    inputs = []
    while tensors:
        inputs.append(tensors.pop(0).to(device=device, dtype=dtype))
    return inputs, (base.to(device=device, dtype=dtype) if base is not None else None)


def _compute(
    plan: Plan,
    piece: Piece,
    loaded: Loaded,
    device: torch.device,
    stats: dict[str, object],
    cuts: dict[str, TaskCuts],
    draws: BlockDraws,
) -> torch.Tensor:
    task = piece.task
    if task.copy:
        return loaded[0][0]
    method = plan.method_of(task)
    inputs, base = _to_compute(plan, loaded, device)
    del loaded
    rng = draws.for_piece(piece, (base if base is not None else inputs[0]).dtype)
    try:
        with torch.no_grad():
            out = method(
                inputs,
                base,
                dict(task.params),
                rng=rng,
                stats=stats.get(task.module),
                name=task.name,
                numerics=plan.numerics,
                cuts=_block_cuts(cuts, piece),
            )
    except WeightopsError:
        raise
    except (ValueError, RuntimeError) as e:
        raise MergeError(f"{task.name}: {method.name} failed: {e}") from e
    del inputs, base
    expected = (
        task.shape if piece.rows is None else (piece.rows[1] - piece.rows[0], *task.shape[1:])
    )
    if tuple(out.shape) != tuple(expected):
        raise MergeError(
            f"{task.name}: {method.name} returned shape {list(out.shape)}, expected {list(expected)}"
        )
    out = out.to(dtype=task.out_dtype)
    # A finite sum proves every entry finite at the cost of one reduction; only a
    # non-finite sum (or an overflowing one) needs the exact, much slower check.
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        raise MergeError(
            f"{task.name}: the merge produced NaN or Inf",
            hint="check the inputs for NaN/Inf and the parameters (e.g. weights that cancel out)",
        )
    return out


def _block_cuts(cuts: dict[str, TaskCuts], piece: Piece) -> list | None:
    task_cuts = cuts.get(piece.task.name)
    if task_cuts is None or piece.rows is None:
        return None
    return task_cuts.for_rows(piece.rows[0])


def make_observers(plan: Plan) -> dict[str, Observer]:
    """One observer per module whose method has one, so each sees only its own part."""
    observers: dict[str, Observer] = {}
    for task in plan.tasks:
        factory = plan.method_of(task).observer
        if factory is not None and task.module not in observers:
            observers[task.module] = factory()
    return observers


def observe(
    plan: Plan,
    options: RunOptions,
    device: torch.device,
    observers: dict[str, Observer],
    label: str = "statistics",
) -> None:
    """Stream the plan's tensors of the observed modules, whole, through `observers`."""
    observed = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.module in observers])
    stream = InputStream(observed, options, device, chunked=False)
    progress = Progress(len(observed.tasks), observed.output_bytes, label, enabled=options.progress)
    try:
        for piece, box in stream:
            task = piece.task
            if not task.copy:
                inputs, base = _to_compute(plan, box.pop(), device)
                observers[task.module].observe(task.name, inputs, base, dict(task.params))
            progress.update(task.out_bytes, task.name)
    finally:
        stream.close()
        progress.close()


def _statistics(plan: Plan, options: RunOptions, device: torch.device) -> dict[str, object]:
    """The statistics pass: every method with an observer sees its tensors once."""
    observers = make_observers(plan)
    if not observers:
        return {}
    observe(plan, options, device, observers)
    return {module: o.result() for module, o in observers.items()}


def compute_threads(plan: Plan, options: RunOptions, device: torch.device) -> int | None:
    """The intra-op thread count a run sets (None: leave torch's). Every executor sets
    the same, as torch's reductions may round differently with another count."""
    if options.threads:
        return options.threads
    if (
        all(m.elementwise or m.ranks or m.draws for m in plan.methods.values())
        and device.type == "cpu"
    ):
        # Small row blocks gain nothing from intra-op threads, which would only contend
        # with the readers for the cores.
        return 1
    return None


def execute(plan: Plan, out: Path, options: RunOptions | None = None) -> Path:
    """Run a plan and write the output folder `out` atomically; return it. With
    `options.executor == "ray"` the work runs on a Ray cluster (weightops.engine.ray_exec)."""
    options = options or RunOptions()
    device = resolve_device(options.device)
    plan.draws_in_blocks = device.type == "cpu"
    if options.executor == "ray":
        return _ray_executor()(plan, out, options)
    if options.executor != "local":
        raise MergeError(
            f"--executor {options.executor}: unknown executor", hint="use local or ray"
        )
    with intra_op_threads(compute_threads(plan, options, device)):
        return _execute(plan, out, options, device)


def _ray_executor() -> Callable[[Plan, Path, RunOptions], Path]:
    try:
        from weightops.engine.ray_exec import execute_on_ray
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "ray":
            raise
        raise MergeError(
            "--executor ray: Ray is not installed", hint="pip install 'weightops[ray]'"
        ) from None
    return execute_on_ray


@contextlib.contextmanager
def staged(plan: Plan, out: Path, options: RunOptions) -> Iterator[tuple[Path, Layout]]:
    """The output's staging folder and shard layout, with the space checked and the
    side files written (a bad one fails the run before the long work, not after). On a
    clean exit the shard index is written, the inputs are checked unchanged and the
    folder is renamed to `out`; on any failure or interrupt it is removed."""
    inputs = [*plan.models, plan.config_source]
    if plan.tokenizer_source is not None:
        inputs.append(plan.tokenizer_source)
    staging = StagingFolder(out, force=options.force, inputs=inputs)
    try:
        staging.create()
        metadata = {
            "format": "pt",
            "weightops_version": __version__,
            "weightops_recipe": plan.recipe.to_yaml(),
        }
        layout = plan_layout(
            [(t.name, t.shape, t.out_dtype) for t in plan.tasks], options.shard_size, metadata
        )
        staging.check_space(layout.total_bytes)
        write_side_files(plan, staging.path)
        yield staging.path, layout
        write_index(staging.path, layout, plan.output_bytes)
        check_unchanged(plan.stamps)
        staging.commit()
    except OSError as e:
        staging.discard()
        raise disk_error(out, e) from e
    except BaseException:
        staging.discard()
        raise


def pad_vocab_rows(plan: Plan, options: RunOptions, device: torch.device) -> None:
    """The rows a merged vocabulary adds, from a pass over the inputs' embeddings (the
    first step of every executor that writes re-indexed tensors)."""
    if plan.vocab is None:
        return
    stream = InputStream(plan, options, device, chunked=True)
    try:
        plan.vocab.padding_rows(
            plan.tasks, stream._fetch, plan.compute_dtype, options.chunk_elements
        )
    finally:
        stream.close()


def _execute(plan: Plan, out: Path, options: RunOptions, device: torch.device) -> Path:
    with staged(plan, out, options) as (folder, layout):
        if plan.align is not None:
            from weightops.align.model import match_inputs

            plan.permutations = match_inputs(
                plan.align, plan.models, progress=options.progress, device=device
            )
        pad_vocab_rows(plan, options, device)
        stats = _statistics(plan, options, device)
        cuts = find_cuts(plan, options, device)
        writer = ShardWriter(folder, layout, display=out)
        try:
            write_pieces(plan, writer, options, device, stats, cuts)
            writer.finish()
        finally:
            writer.close()
    return out


_TRIM_EVERY = 64 * 2**20


def write_pieces(
    plan: Plan,
    writer: ShardWriter,
    options: RunOptions,
    device: torch.device,
    stats: dict[str, object],
    cuts: dict[str, TaskCuts],
    *,
    rows: tuple[int, int] | None = None,
) -> None:
    """Compute every piece of the plan (of `rows` only, for a one-task plan) and hand
    it to `writer` at its offset."""
    stream = InputStream(plan, options, device, chunked=True, rows=rows)
    writes = BackgroundWrites(writer)
    progress = Progress(len(plan.tasks), plan.output_bytes, "merge", enabled=options.progress)
    draws = BlockDraws(plan, device)
    since_trim = 0
    try:
        for piece, box in stream:
            signals.raise_if_stopped()
            result = _compute(plan, piece, box.pop(), device, stats, cuts, draws)
            writes.write(piece.task.name, result, piece.out_offset)
            del result
            if piece.rows is None or piece.rows[1] == piece.task.shape[0]:
                progress.update(piece.task.out_bytes, piece.task.name)
                since_trim += piece.task.out_bytes
                if since_trim >= _TRIM_EVERY:
                    release_free_memory()
                    since_trim = 0
        writes.drain()
    finally:
        writes.close()
        stream.close()
        progress.close()
