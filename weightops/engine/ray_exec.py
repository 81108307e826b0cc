"""Running a plan on a Ray cluster: `weightops merge --executor ray`.

The driver stages the output as the local executor does (weightops.engine.run.staged:
a hidden folder beside the destination, the shard layout, the side files) and creates
every shard with its header written and its final size. Each work unit
(weightops.engine.distributed: a tensor, a row range of a large one, or a batch of
small ones) is then one Ray task that reads its own inputs from the filesystem every
node shares, computes on its worker's device and writes its bytes at their offsets.
Only unit descriptions come back: tensors never pass through the driver or the object
store. The driver then fsyncs the shards, writes the index and renames the folder into
place, exactly as locally.

The whole-model passes before the merge run as Ray tasks too: `align:`'s matching (one
task per input model) and the statistics of methods with an observer (one task per
batch of tensors, their partial observers reduced on the driver with `merge`, when the
observer has one; otherwise one task per module). Only their small results come back.

Backpressure: every task asks Ray for the memory its unit's tensor data needs at peak
(`memory=`), so the scheduler never puts more on a node than it holds, and the driver
keeps at most two tasks per slot in flight (a slot: one task a node can run at once,
its CPUs, GPUs and memory counted), so the queue and the object store stay small
whatever the model's size.

Faults: a task whose worker dies is run again by Ray (`MAX_RETRIES`); it writes the
same bytes at the same offsets, so the output is the same as a clean run's. An error
raised in a task (a missing input, NaN) stops the run with the one-line error a local
run gives. On Ctrl-C or any failure the driver cancels the tasks in flight, waits for
them to end and removes the staging folder; a late task finds no shard to open and
writes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from weightops import signals
from weightops.engine.distributed import (
    UNIT_CHUNKS,
    Unit,
    match_model,
    observe_unit,
    plan_units,
    run_unit,
)
from weightops.engine.plan import Plan
from weightops.engine.progress import Progress
from weightops.engine.run import make_observers, staged
from weightops.engine.stream import RunOptions
from weightops.errors import MergeError, WeightopsError
from weightops.io.writer import ShardWriter

# Ray runs a task again this many times when its worker or node dies.
MAX_RETRIES = 3
# Tasks in flight per slot: one running, one queued so the slot never waits on the driver.
_PER_SLOT = 2
# How long a cancelled run waits for its tasks to end before removing the staging folder.
_CANCEL_WAIT_S = 30.0


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local instance;
    a session already open in this process is used as it is."""
    if ray.is_initialized():
        return
    # ray.init makes SIGTERM exit at once; weightops' own handler (weightops.signals)
    # unwinds the run instead, so the staging folder is removed and the exit status
    # says the run was stopped. Ray's local instance is shut down at exit either way.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise MergeError(
            f"--executor ray: cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'}: {e}",
            hint="start one with `ray start --head`, or pass --ray-address",
        ) from None
    finally:
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


@dataclasses.dataclass
class _Resources:
    cpus: int
    gpus: int

    def slots(self, peak: int) -> int:
        """Tasks of `peak` bytes the cluster runs at once, node by node."""
        total = 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            n = min(int(res.get("CPU", 0)) // self.cpus, int(res.get("memory", 0) // peak))
            if self.gpus:
                n = min(n, int(res.get("GPU", 0)) // self.gpus)
            total += n
        if total == 0:
            gpus = f", {self.gpus} GPU" if self.gpus else ""
            raise MergeError(
                f"--executor ray: no Ray node can run a task needing {peak / 1e9:.2f} GB of "
                f"memory, {self.cpus} CPU{gpus}",
                hint="add nodes with more memory, or lower --threads",
            )
        return total


def resources(options: RunOptions) -> _Resources:
    """What each task asks for: CPUs (--threads, default 1) and a GPU if the cluster has them."""
    gpus_there = ray.cluster_resources().get("GPU", 0) > 0
    if options.device.startswith("cuda") and not gpus_there:
        raise MergeError(
            f"--device {options.device}: the Ray cluster has no GPU",
            hint="use --device cpu or auto, or add GPU nodes",
        )
    # With a GPU in the cluster, "auto" computes on it, as a local run would.
    return _Resources(cpus=options.threads or 1, gpus=int(gpus_there and options.device != "cpu"))


def _raise_from(ref: ray.ObjectRef, what: str) -> Any:
    """The task's result; its own error (a WeightopsError) raised as it was raised."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (WeightopsError, MemoryError)):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise MergeError(
            f"{what}: the Ray task failed ({type(e).__name__}), retried up to {MAX_RETRIES} times",
            hint="a worker or node died (out of memory?); see `ray logs` on the cluster",
        ) from None


@dataclasses.dataclass(frozen=True)
class Job:
    args: tuple
    peak: int  # bytes of memory it asks for
    label: str  # what it computes, for errors
    names: tuple[str, ...]  # the output tensors it covers, for progress


class Runner:
    """Runs jobs as Ray tasks, at most `_PER_SLOT` per slot in flight."""

    def __init__(self, resources: _Resources) -> None:
        self.res = resources

    def run(
        self,
        fn: Callable[..., Any],
        jobs: Iterable[Job],
        done: Callable[[int, Any], None],
        peak: int | None = None,
    ) -> None:
        """Run `fn(*job.args)` for every job, pulling the next job only when a slot is
        free; call `done(index, result)` as each ends. `peak` sizes the slots (default:
        the largest job's memory, for a list)."""
        if peak is None:
            jobs = list(jobs)
            if not jobs:
                return
            peak = max(job.peak for job in jobs)
        limit = _PER_SLOT * self.res.slots(max(peak, 1))
        remote = ray.remote(fn)
        todo = enumerate(jobs)
        labels: dict[int, str] = {}
        inflight: dict[ray.ObjectRef, int] = {}
        more = True
        try:
            while more or inflight:
                signals.raise_if_stopped()
                while more and len(inflight) < limit:
                    index, job = next(todo, (-1, None))
                    if job is None:
                        more = False
                        break
                    inflight[self.submit(remote, job)] = index
                    labels[index] = job.label
                    del job
                if not inflight:
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
                for ref in ready:
                    index = inflight.pop(ref)
                    done(index, _raise_from(ref, labels.pop(index)))
        except BaseException:
            _cancel(list(inflight))
            raise

    def submit(self, remote: Any, job: Job, num_returns: int = 1) -> Any:
        """One task now, outside the slot count (a step of a chain the jobs wait on)."""
        return remote.options(
            num_cpus=self.res.cpus,
            num_gpus=self.res.gpus,
            memory=max(job.peak, 1),
            max_retries=MAX_RETRIES,
            retry_exceptions=False,
            num_returns=num_returns,
        ).remote(*job.args)


def _cancel(refs: list[ray.ObjectRef]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # finished already, or the cluster is gone
            ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_WAIT_S)


class _TaskProgress:
    """The local executor's progress figures: a tensor counts once all its units are in."""

    def __init__(self, plan: Plan, jobs: list[Job], label: str, enabled: bool | None) -> None:
        names = {n for job in jobs for n in job.names}
        tasks = [t for t in plan.tasks if t.name in names]
        self.out_bytes = {t.name: t.out_bytes for t in tasks}
        self.left = collections.Counter(n for job in jobs for n in job.names)
        self.bar = Progress(len(tasks), sum(self.out_bytes.values()), label, enabled=enabled)

    def done(self, job: Job) -> None:
        for name in job.names:
            self.left[name] -= 1
            if not self.left[name]:
                self.bar.update(self.out_bytes[name], name)


_SHARED: dict[str, Any] = {}


def fetch_shared(box: list[ray.ObjectRef]) -> Any:
    """What `box` holds a reference to, fetched and unpickled once per worker process:
    every task of a run reads the same plan and layout (a 70B model's take a while to
    unpickle). Only the latest run's is kept. The reference travels inside a list, so
    Ray hands it over as it is instead of resolving it for every task."""
    key = box[0].hex()
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = ray.get(box[0])
    return _SHARED[key]


def on_other_node(driver: str) -> bool:
    """Whether this task runs on another node than the driver: its writes must then
    reach the shared filesystem before it returns, as the driver's final fsync flushes
    only its own machine's page cache (which same-node workers write through)."""
    return ray.get_runtime_context().get_node_id() != driver


def _unit_task(
    box: list, driver: str, unit: Unit, folder: Path, options: RunOptions, stats: Any, out: Path
) -> Unit:
    plan, layout = fetch_shared(box)
    return run_unit(plan, unit, folder, layout, options, stats, out, flush=on_other_node(driver))


def _observe_task(box: list, module: str, names: tuple[str, ...], options: RunOptions) -> Any:
    return observe_unit(fetch_shared(box)[0], module, names, options)


def _match_task(box: list, target: Any, model: int, options: RunOptions) -> Any:
    return match_model(fetch_shared(box)[0], target, model, options)


def _statistics(plan: Plan, box: list, options: RunOptions, runner: Runner) -> dict[str, object]:
    """Observers as a reduction: partial observers of batches merged in plan order
    (an observer without `merge` sees all its module's tensors in one task)."""
    observers = make_observers(plan)
    if not observers:
        return {}
    target = UNIT_CHUNKS * options.chunk_elements
    jobs: list[Job] = []
    for module, observer in observers.items():
        tasks = [t for t in plan.tasks if t.module == module]
        batches: list[list] = [[]]
        for task in tasks:
            full = sum(t.numel for t in batches[-1]) >= target
            if batches[-1] and full and hasattr(observer, "merge"):
                batches.append([])
            batches[-1].append(task)
        for batch in batches:
            names = tuple(t.name for t in batch)
            # Whole tensors, each converted to the compute dtype beside its stored copy.
            peak = max(plan.task_input_bytes(t) * 3 for t in batch)
            jobs.append(Job((box, module, names, options), peak, names[0], names))
    parts: dict[int, Any] = {}
    progress = _TaskProgress(plan, jobs, "statistics", options.progress)

    def done(index: int, part: Any) -> None:
        parts[index] = part
        progress.done(jobs[index])

    try:
        runner.run(_observe_task, jobs, done)
    finally:
        progress.bar.close()
    merged: dict[str, Any] = {}
    for index, job in enumerate(jobs):
        module = job.args[1]
        if module in merged:
            merged[module].merge(parts[index])
        else:
            merged[module] = parts[index]
    return {module: o.result() for module, o in merged.items()}


def _align(plan: Plan, box: list, options: RunOptions, runner: Runner) -> None:
    assert plan.align is not None
    jobs = [
        Job((box, plan.align, i, options), 0, f"align {path.name}", ())
        for i, path in enumerate(plan.models)
    ]
    found: dict[int, Any] = {}
    runner.run(_match_task, jobs, lambda i, alignment: found.__setitem__(i, alignment))
    plan.permutations = {i: a for i, a in sorted(found.items()) if a is not None and a.perms}


def execute_on_ray(plan: Plan, out: Path, options: RunOptions) -> Path:
    """Run a plan as Ray tasks and write `out` atomically (see the module doc)."""
    connect(options.ray_address)
    cluster = resources(options)
    remote_options = dataclasses.replace(options, progress=False)
    driver = ray.get_runtime_context().get_node_id()
    with staged(plan, out, options) as (folder, layout):
        runner = Runner(cluster)
        if plan.align is not None:
            _align(plan, [ray.put((plan, layout))], remote_options, runner)
        box = [ray.put((plan, layout))]
        stats = _statistics(plan, box, remote_options, runner)
        stats_ref = ray.put(stats)
        units = plan_units(plan, options, slots=cluster.slots(1))
        writer = ShardWriter(folder, layout, display=out)
        try:
            writer.presize()
        finally:
            writer.close()
        jobs = [
            Job(
                (box, driver, unit, folder, remote_options, stats_ref, out),
                unit.peak_bytes,
                unit.names[0]
                if len(unit.names) == 1
                else f"{unit.names[0]} (and {len(unit.names) - 1} more)",
                unit.names,
            )
            for unit in units
        ]
        progress = _TaskProgress(plan, jobs, "merge", options.progress)
        try:
            runner.run(_unit_task, jobs, lambda i, _: progress.done(jobs[i]))
        finally:
            progress.bar.close()
        # Flushes the headers and sizes, and what the workers on this node wrote (the
        # others flushed their own).
        ShardWriter(folder, layout, display=out, create=False).finish()
    return out


__all__ = [
    "MAX_RETRIES",
    "Job",
    "Runner",
    "Unit",
    "connect",
    "execute_on_ray",
    "fetch_shared",
    "on_other_node",
    "resources",
]
