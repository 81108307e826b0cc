"""`weightops quantize --executor ray`: one Ray task per decoder block.

The driver stages the output (weightops.io.rewrite.staged_model) and creates every
shard with its header written and its final size; the blocks' tasks then quantize
and write their own tensors in place, read from the filesystem every node shares.
With calibration, a chain of small tasks carries the activations from block to block
(weightops.quant.job: `start_calibration`, then one `calibration_step` per block),
each handing its block's Hessians to that block's quantization task through the
object store: neither weights nor activations pass through the driver. The chain is
sequential, as the forward passes are, but only a forward pass long; the
quantization, the costly part, runs on every worker at once, at most two tasks per
slot in flight (weightops.engine.ray_exec), so the activations and Hessians waiting
in the object store stay a few blocks' worth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch

from weightops.engine.distributed import check_files
from weightops.engine.ray_exec import (
    Job,
    Runner,
    connect,
    fetch_shared,
    on_other_node,
    resources,
)
from weightops.engine.stream import RunOptions
from weightops.io.rewrite import Entry
from weightops.io.writer import Layout, ShardWriter
from weightops.quant.job import QuantJob, calibration_step

__all__ = ["quantize_on_ray"]


def _write_block(
    box: list,
    driver: str,
    names: list[str],
    hessians: dict[str, torch.Tensor] | None,
    folder: Path,
    display: Path,
) -> dict[str, dict[str, Any]]:
    job, layout, dtypes = fetch_shared(box)
    check_files(job.ckpt.stamps, (job.ckpt.tensors[n].path for n in names))
    flush = on_other_node(driver)
    return job.write_block(names, hessians, folder, layout, dtypes, display, flush)


def _start(job: QuantJob) -> Any:
    check_files(job.ckpt.stamps, job.ckpt.stamps)
    return job.start_calibration()


def _bytes(job: QuantJob, names: list[str]) -> int:
    return sum(job.ckpt.tensors[n].nbytes for n in names)


def quantize_on_ray(
    job: QuantJob,
    folder: Path,
    layout: Layout,
    entries: list[Entry],
    display: Path,
    address: str | None,
) -> dict[str, dict[str, Any]]:
    """Quantize `job` into the staged `folder`; return the manifest's per-weight
    reports in the local executor's order."""
    connect(address)
    runner = Runner(resources(RunOptions(device="cpu")))
    writer = ShardWriter(folder, layout, display=display)
    try:
        writer.presize()
    finally:
        writer.close()
    dtypes = {name: dtype for name, _, dtype in entries}
    job_ref = ray.put(job)
    box = [ray.put((job, layout, dtypes))]
    driver = ray.get_runtime_context().get_node_id()
    blocks = job.blocks()
    # A block's tensors in fp32, the quantizer's temporaries and its Hessians.
    peaks = [4 * 4 * _bytes(job, names) for _, names in blocks]
    step_fn = ray.remote(calibration_step)

    def jobs() -> Iterator[Job]:
        calibration = None
        if job.texts is not None:
            start = Job((job_ref,), max(peaks), "calibration", ())
            calibration = runner.submit(ray.remote(_start), start)
        for (layer, names), peak in zip(blocks, peaks, strict=True):
            hessians = None
            if calibration is not None and layer >= 0:
                step = Job((calibration, layer), peak, f"calibration of block {layer}", ())
                calibration, hessians = runner.submit(step_fn, step, num_returns=2)
            label = f"block {layer}" if layer >= 0 else "tensors outside the blocks"
            args = (box, driver, names, hessians, folder, display)
            yield Job(args, peak, label, tuple(names))

    reports: dict[int, dict[str, dict[str, Any]]] = {}
    runner.run(_write_block, jobs(), reports.__setitem__, peak=max(peaks))
    # Flushes the headers and sizes, and what the workers on this node wrote (the
    # others flushed their own).
    ShardWriter(folder, layout, display=display, create=False).finish()
    return {name: r for i in sorted(reports) for name, r in reports[i].items()}
