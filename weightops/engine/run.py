"""The streaming executor: read ahead, compute one tensor, hand it to the writer.

Three things overlap: worker threads read the next tasks' inputs from disk (in their
stored dtype, so read-ahead costs half of fp32 for bf16 models), the calling thread
computes the current tensor in the compute dtype on the chosen device, and a writer
thread puts finished tensors at their final offsets. At most `prefetch` tasks are read
ahead and two results wait for the writer, so memory is bounded by a few tensors,
never by the depth of the model.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops import __version__
from weightops.engine.plan import InputRef, Plan, TensorTask
from weightops.engine.progress import Progress
from weightops.errors import MergeError, WeightopsError
from weightops.io import sidefiles
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import ShardWriter, StagingFolder, plan_layout


@dataclass
class RunOptions:
    shard_size: int = 5 * 10**9
    device: str = "auto"
    threads: int | None = None
    force: bool = False
    progress: bool | None = None  # None: only on a terminal
    prefetch: int = 2


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


Loaded = tuple[list[torch.Tensor], torch.Tensor | None]


class _Stream:
    """Reads each task's inputs ahead of use on a small thread pool."""

    def __init__(self, plan: Plan, prefetch: int) -> None:
        self.plan = plan
        self.prefetch = max(0, prefetch)
        self.reader = FileReader()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weightops-read")
        self._infos = {i: Checkpoint(p) for i, p in enumerate(plan.models)}

    def _read(self, ref: InputRef) -> torch.Tensor:
        return self.reader.read(self._infos[ref.model].tensors[ref.name])

    def _load(self, task: TensorTask) -> Loaded:
        cache: dict[InputRef, torch.Tensor] = {}
        for ref in [*task.inputs, *([task.base] if task.base else [])]:
            if ref not in cache:
                cache[ref] = self._read(ref)
        return [cache[r] for r in task.inputs], (cache[task.base] if task.base else None)

    def __iter__(self) -> Iterator[tuple[TensorTask, Loaded]]:
        tasks = iter(self.plan.tasks)
        queue: collections.deque[tuple[TensorTask, Future[Loaded]]] = collections.deque()

        def submit() -> None:
            task = next(tasks, None)
            if task is not None:
                queue.append((task, self.pool.submit(self._load, task)))

        for _ in range(self.prefetch + 1):
            submit()
        while queue:
            task, future = queue.popleft()
            loaded = future.result()
            submit()
            yield task, loaded

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


def _compute(plan: Plan, task: TensorTask, loaded: Loaded, device: torch.device, stats: object) -> torch.Tensor:
    tensors, base = loaded
    if task.copy:
        return tensors[0]
    dtype = plan.compute_dtype
    inputs = [t.to(device=device, dtype=dtype) for t in tensors]
    base_t = base.to(device=device, dtype=dtype) if base is not None else None
    rng = None
    if task.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(task.seed)
    try:
        with torch.no_grad():
            out = plan.method(inputs, base_t, dict(task.params), rng=rng, stats=stats)
    except WeightopsError:
        raise
    except (ValueError, RuntimeError) as e:
        raise MergeError(f"{task.name}: {plan.method.name} failed: {e}") from e
    if out.shape != task.shape:
        raise MergeError(f"{task.name}: {plan.method.name} returned shape {list(out.shape)}, expected {list(task.shape)}")
    if not torch.isfinite(out).all():
        raise MergeError(
            f"{task.name}: the merge produced NaN or Inf",
            hint="check the inputs for NaN/Inf and the parameters (e.g. weights that cancel out)",
        )
    return out.to(dtype=task.out_dtype)


def _statistics(plan: Plan, options: RunOptions, device: torch.device) -> object:
    """The statistics pass: stream every tensor once through the method's observer."""
    observer = plan.method.observer()
    stream = _Stream(plan, options.prefetch)
    progress = Progress(len(plan.tasks), plan.output_bytes, "statistics", enabled=options.progress)
    try:
        for task, (tensors, base) in stream:
            if not task.copy:
                inputs = [t.to(device=device, dtype=plan.compute_dtype) for t in tensors]
                base_t = base.to(device=device, dtype=plan.compute_dtype) if base is not None else None
                observer.observe(task.name, inputs, base_t, dict(task.params))
            progress.update(task.out_bytes, task.name)
    finally:
        stream.close()
        progress.close()
    return observer.result()


def execute(plan: Plan, out: Path, options: RunOptions | None = None) -> Path:
    """Run a plan and write the output folder `out` atomically; return it."""
    options = options or RunOptions()
    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    staging = StagingFolder(out, force=options.force)
    try:
        metadata = {
            "format": "pt",
            "weightops_version": __version__,
            "weightops_recipe": plan.recipe.to_yaml(),
        }
        layout = plan_layout([(t.name, t.shape, t.out_dtype) for t in plan.tasks], options.shard_size, metadata)
        staging.check_space(layout.total_bytes)
        stats = _statistics(plan, options, device) if plan.method.observer else None
        writer = ShardWriter(staging.path, layout)
        try:
            _apply(plan, writer, options, device, stats)
            writer.finish()
        finally:
            writer.close()
        writer.write_index(plan.output_bytes)
        _side_files(plan, staging.path)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return out


def _apply(plan: Plan, writer: ShardWriter, options: RunOptions, device: torch.device, stats: object) -> None:
    stream = _Stream(plan, options.prefetch)
    write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightops-write")
    pending: collections.deque[Future[None]] = collections.deque()
    progress = Progress(len(plan.tasks), plan.output_bytes, "merge", enabled=options.progress)
    try:
        for task, loaded in stream:
            result = _compute(plan, task, loaded, device, stats)
            del loaded
            pending.append(write_pool.submit(writer.write, task.name, result))
            del result
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.popleft().result()
            progress.update(task.out_bytes, task.name)
        while pending:
            pending.popleft().result()
    finally:
        write_pool.shutdown(wait=True, cancel_futures=True)
        stream.close()
        progress.close()


def _side_files(plan: Plan, folder: Path) -> None:
    sidefiles.write_config(folder, plan.config)
    sidefiles.copy_generation_config(plan.config_source, folder)
    tokenizer = sidefiles.copy_tokenizer(plan.tokenizer_source, folder, plan.recipe.chat_template)
    recipe = plan.recipe
    inputs = [f"- `{p}`" + (" (base)" if recipe.base_model and os.fspath(p).endswith(recipe.base_model.rstrip("/")) else "") for p in plan.models]
    summary = [
        f"This model was made by merging {len(plan.models)} checkpoint(s) with the "
        f"`{plan.method.name}` method" + (f" ({plan.method.reference})." if plan.method.reference else "."),
        "",
        "## Inputs",
        "",
        *inputs,
        "",
        f"Tokenizer from `{plan.tokenizer_source}`" + (f" ({', '.join(tokenizer)})." if tokenizer else " (no tokenizer files found)."),
    ]
    sidefiles.write_card(folder, title=folder_title(plan), summary=summary, recipe_yaml=recipe.to_yaml(), version=__version__)


def folder_title(plan: Plan) -> str:
    return f"{plan.method.name} merge of {', '.join(p.name for p in plan.models)}"
