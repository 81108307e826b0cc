"""What `quantize_model` does to each tensor, for the local executor and a distributed one.

A `QuantJob` is the planned quantization of one checkpoint: which weights become packed
mixed 2/4-bit matrices (with their 4-bit group count and outliers per row) and the
calibration texts, if any. Locally, `producer` makes each output tensor when the writer
asks for it, walking the calibration through the blocks once. A distributed executor
(weightops.quant.ray_exec) runs the same steps as separate tasks: `start_calibration`,
then per decoder block `calibration_step` (its Hessians, and the activations handed to
the next block) and `write_block` (its tensors, quantized with those Hessians, written
at their offsets). Each block's Hessians come from the unquantized blocks before it
(see weightops.quant.calibrate), so the blocks' quantization is independent and gives
the same bytes however it is spread.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.arch import describe
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import Layout, ShardWriter
from weightops.quant.blocks import scratch
from weightops.quant.gptq import DAMP
from weightops.quant.mixed import Packed, QuantError, quantize_together
from weightops.threads import available_cores

Hessians = dict[str, torch.Tensor]

# Weights quantized together (weightops.quant.mixed.quantize_together) hold at most this
# many values: SmolLM2-135M's 210 matrices each cost 2.3 ms of fixed work (measured on
# matrices of 16 rows), a fifth of the time; a block's six matrices of 576 inputs then
# pay it once. Large matrices are quantized alone, and their float32 copy is no larger.
BATCH_VALUES = 1 << 23


def layer_of(name: str) -> int:
    """The decoder block of a tensor; -1 for those outside the blocks."""
    layer = describe(name).layer
    return -1 if layer is None else layer


@dataclass
class QuantJob:
    ckpt: Checkpoint
    names: list[str]  # every source tensor, blocks in increasing order
    plan: dict[str, tuple[int, int]]  # weight name -> (4-bit groups, outliers per row)
    group_size: int
    texts: list[str] | None  # calibration texts
    # Per weight, a weight per calibration token for its Hessian (weightops.quant.sensitivity).
    token_weights: dict[str, list[torch.Tensor]] | None = None
    batches: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        """Each planned weight's batch: the weights of its block with the same inputs
        and plan, in order, up to BATCH_VALUES; with calibration (a Hessian per weight)
        every weight alone."""
        self.batches = {}
        open_batches: dict[tuple[Any, ...], list[str]] = {}
        for name in self.names:
            if name not in self.plan:
                continue
            shape = self.ckpt.tensors[name].shape
            key = (layer_of(name), shape[1], self.plan[name])
            batch = open_batches.get(key)
            if (
                self.texts is not None
                or batch is None
                or (
                    sum(math.prod(self.ckpt.tensors[n].shape) for n in batch) + math.prod(shape)
                    > BATCH_VALUES
                )
            ):
                batch = open_batches[key] = []
            batch.append(name)
            self.batches[name] = batch

    def quantize(
        self, names: list[str], weights: list[torch.Tensor], hessian: torch.Tensor | None
    ) -> dict[str, tuple[Packed, dict[str, Any]]]:
        """Weights of one batch (a single one with a Hessian), packed, with their lines
        of the manifest."""
        k4, outliers = self.plan[names[0]]
        # The error is that of what the packed form dequantizes to, without unpacking it.
        try:
            results = quantize_together(
                weights,
                group_size=self.group_size,
                k4=k4,
                outliers=outliers,
                hessian=hessian,
                damp=DAMP,
            )
        except QuantError as e:
            # Named here: the quantizer sees one stacked matrix, not the batch's tensors.
            bad = [n for n, w in zip(names, weights, strict=True) if not torch.isfinite(w).all()]
            raise QuantError(f"{', '.join(bad or names)}: {e.message}", hint=e.hint) from None
        out = {}
        for name, w, (packed, err) in zip(names, weights, results, strict=True):
            report = {
                "shape": list(w.shape),
                "k4": packed.k4,
                "outliers": packed.outliers,
                "bits": packed.bits,
                "rel_error": err,
            }
            out[name] = packed, report
        return out

    @contextlib.contextmanager
    def producer(
        self, stats: dict[str, dict[str, Any]]
    ) -> Iterator[Callable[[str, FileReader], torch.Tensor]]:
        """produce(name, reader) for weightops.io.rewrite.write_model, output name by
        output name in block order; the calibration (if any) starts now, so a bad text
        fails before anything is written. While torch leaves a core free, the next
        batch is read on a thread of its own as this one is quantized: reading is a
        tenth of the run at one thread, in the kernel's copy from the page cache."""
        calibration = self.start_calibration() if self.texts is not None else None
        hessians: Hessians = {}
        # The packed weights of the batch being written, and the parts each has left.
        current: dict[str, Packed] = {}
        left: dict[str, set[str]] = {}
        order = [b for n, b in self.batches.items() if b[0] == n]
        position = {b[0]: i for i, b in enumerate(order)}
        pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightops-read")
            if torch.get_num_threads() < available_cores()
            else None
        )
        ahead: dict[int, Future[list[torch.Tensor]]] = {}

        def weights_of(i: int, reader: FileReader) -> list[torch.Tensor]:
            # Two buffers take turns: the batch being quantized and the one read next.
            future = ahead.pop(i, None)
            if future is not None:
                weights = future.result()
            else:
                weights = self.read_batch(reader, order[i], i % 2 if pool else 0)
            if pool is not None and i + 1 < len(order):
                ahead[i + 1] = pool.submit(self.read_batch, reader, order[i + 1], (i + 1) % 2)
            return weights

        def produce(name: str, reader: FileReader) -> torch.Tensor:
            if name in self.ckpt.tensors:
                return reader.read(self.ckpt.tensors[name])
            prefix, part = name.rsplit(".", 1)
            weight = prefix + ".weight"
            if weight not in current:
                layer = describe(weight).layer
                # An lm_head (outside the blocks) is quantized without calibration.
                if calibration is not None and layer is not None:
                    while calibration.next_layer <= layer:
                        hessians.clear()
                        hessians.update(calibration.layer(calibration.next_layer))
                batch = self.batches[weight]
                weights = weights_of(position[batch[0]], reader)
                for n, (packed, stats[n]) in self.quantize(
                    batch, weights, hessians.pop(weight, None)
                ).items():
                    current[n], left[n] = packed, set(packed.parts())
            left[weight].discard(part)
            if not left[weight]:
                del left[weight]
                return getattr(current.pop(weight), part)
            return getattr(current[weight], part)

        try:
            yield produce
        finally:
            if pool is not None:
                # A read under way finishes first: its reader is closed after this.
                pool.shutdown(wait=True, cancel_futures=True)

    def read_batch(self, reader: FileReader, batch: list[str], slot: int = 0) -> list[torch.Tensor]:
        """A batch's weights in their stored dtype, read into memory every batch reuses
        (weightops.quant.blocks.scratch, buffer `slot` of this thread): the quantizer
        converts them into one float32 copy and keeps nothing of them, and reading into
        fresh memory took twice as long, the kernel mapping and zeroing each new page
        first."""
        infos = [self.ckpt.tensors[n] for n in batch]
        # Each tensor starts on a 64-byte boundary, whatever its dtype.
        starts = [0]
        for info in infos:
            starts.append(starts[-1] + -(-info.nbytes // 64) * 64)
        buf = scratch(f"read{slot}", (starts[-1],), torch.uint8)
        return [
            reader.read(info, into=buf[start : start + info.nbytes])
            for info, start in zip(infos, starts[:-1], strict=True)
        ]

    def blocks(self) -> list[tuple[int, list[str]]]:
        """(block, its source tensors) in order; block -1 holds those outside blocks."""
        out: list[tuple[int, list[str]]] = []
        for name in self.names:
            layer = layer_of(name)
            if not out or out[-1][0] != layer:
                out.append((layer, []))
            out[-1][1].append(name)
        return out

    def start_calibration(self) -> Any:
        from weightops.quant.calibrate import LayerwiseCalibration

        assert self.texts is not None
        return LayerwiseCalibration(self.ckpt, self.texts, token_weights=self.token_weights)

    def write_block(
        self,
        names: list[str],
        hessians: Hessians | None,
        folder: Path,
        layout: Layout,
        dtypes: dict[str, torch.dtype],
        display: Path,
        flush: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Quantize or copy one block's tensors into the shards in `folder` (created
        elsewhere), flushed to disk with `flush`; return the quantized weights' reports."""
        stats: dict[str, dict[str, Any]] = {}
        writer = ShardWriter(folder, layout, display=display, create=False)
        try:
            with FileReader() as reader:
                for name in names:
                    if name in stats:
                        continue
                    if name not in self.plan:
                        tensor = reader.read(self.ckpt.tensors[name])
                        writer.write(name, tensor.to(dtypes[name]))
                        continue
                    batch = self.batches[name]
                    weights = self.read_batch(reader, batch)
                    hessian = (hessians or {}).get(name)
                    for n, (packed, stats[n]) in self.quantize(batch, weights, hessian).items():
                        prefix = n[: -len("weight")]
                        for part, value in packed.parts().items():
                            writer.write(prefix + part, value.to(dtypes[prefix + part]))
            if flush:
                writer.finish()
        finally:
            writer.close()
        return stats


def calibration_step(calibration: Any, layer: int) -> tuple[Any, Hessians]:
    """Block `layer`'s Hessians, and the calibration moved past it."""
    hessians = calibration.layer(layer)
    return calibration, hessians
