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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.arch import describe
from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import Layout, ShardWriter
from weightops.quant.gptq import DAMP
from weightops.quant.mixed import Packed, quantize_with_error

Hessians = dict[str, torch.Tensor]


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

    def quantize(
        self, name: str, w: torch.Tensor, hessian: torch.Tensor | None
    ) -> tuple[Packed, dict[str, Any]]:
        """One weight, packed, and its line of the manifest."""
        k4, outliers = self.plan[name]
        # The error is that of what the packed form dequantizes to, without unpacking it.
        packed, err = quantize_with_error(
            w,
            group_size=self.group_size,
            k4=k4,
            outliers=outliers,
            hessian=hessian,
            damp=DAMP,
        )
        report = {
            "shape": list(w.shape),
            "k4": packed.k4,
            "outliers": packed.outliers,
            "bits": packed.bits,
            "rel_error": err,
        }
        return packed, report

    def producer(self, stats: dict[str, dict[str, Any]]) -> Callable[[str, Any], torch.Tensor]:
        """produce(name, reader) for weightops.io.rewrite.write_model, output name by
        output name in block order; the calibration (if any) starts now, so a bad text
        fails before anything is written."""
        calibration = self.start_calibration() if self.texts is not None else None
        hessians: Hessians = {}
        current: dict[str, Packed] = {}

        def produce(name: str, reader: FileReader) -> torch.Tensor:
            if name in self.ckpt.tensors:
                return reader.read(self.ckpt.tensors[name])
            prefix, part = name.rsplit(".", 1)
            weight = prefix + ".weight"
            if weight not in current:
                current.clear()
                layer = describe(weight).layer
                # An lm_head (outside the blocks) is quantized without calibration.
                if calibration is not None and layer is not None:
                    while calibration.next_layer <= layer:
                        hessians.clear()
                        hessians.update(calibration.layer(calibration.next_layer))
                # In the stored dtype: the quantizer converts one row block at a time.
                w = reader.read(self.ckpt.tensors[weight])
                current[weight], stats[weight] = self.quantize(
                    weight, w, hessians.pop(weight, None)
                )
            return getattr(current[weight], part)

        return produce

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
                    tensor = reader.read(self.ckpt.tensors[name])
                    if name not in self.plan:
                        writer.write(name, tensor.to(dtypes[name]))
                        continue
                    packed, stats[name] = self.quantize(name, tensor, (hessians or {}).get(name))
                    prefix = name[: -len("weight")]
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
