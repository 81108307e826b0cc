"""SteeringVector: one direction per layer, with the arithmetic of a value.

    v = SteeringVector.train(model, tokenizer, pairs, method="pca_diff")
    with v.apply(model, strength=4.0):
        model.generate(...)
    (2 * honesty - 0.5 * verbosity).save("mix.safetensors")

Vectors combine layer by layer (a layer missing on one side counts as zero); combining
vectors read from different model types or hidden sizes is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightops import __version__
from weightops.steering.layers import SteeringError

Pair = tuple[str, str]


@dataclass
class SteeringVector:
    """Directions in the residual stream, keyed by layer (the output of decoder block i)."""

    directions: dict[int, torch.Tensor]
    model_type: str
    hidden_size: int
    layers_path: str = ""
    method: str = ""
    read_at: str = "last"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer, d in self.directions.items():
            if d.dim() != 1 or d.numel() != self.hidden_size:
                raise SteeringError(
                    f"direction for layer {layer} has shape {list(d.shape)}, expected [{self.hidden_size}]"
                )
        self.directions = {
            int(k): v.detach().to(torch.float32).cpu() for k, v in sorted(self.directions.items())
        }

    # ---------------------------------------------------------------- values

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def _check_compatible(self, other: SteeringVector) -> None:
        if (self.model_type, self.hidden_size) != (other.model_type, other.hidden_size):
            raise SteeringError(
                f"cannot combine a vector for {self.model_type} (hidden {self.hidden_size}) "
                f"with one for {other.model_type} (hidden {other.hidden_size})"
            )

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other)
        zero = torch.zeros(self.hidden_size)
        layers = sorted(set(self.directions) | set(other.directions))
        dirs = {
            i: self.directions.get(i, zero) + sign * other.directions.get(i, zero) for i in layers
        }
        return replace(self, directions=dirs, method="combined")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> SteeringVector:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        _check_strength(scale)
        return replace(self, directions={i: d * scale for i, d in self.directions.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def normalized(self) -> SteeringVector:
        """Every layer's direction scaled to unit norm (zero directions stay zero)."""
        dirs = {i: d / n if (n := d.norm()) > 0 else d for i, d in self.directions.items()}
        return replace(self, directions=dirs)

    def select(self, layers: Sequence[int]) -> SteeringVector:
        """The same vector restricted to `layers`."""
        missing = sorted(set(layers) - set(self.directions))
        if missing:
            raise SteeringError(
                f"the vector has no direction for layers {missing} (it has {self.layers})"
            )
        return replace(self, directions={i: self.directions[i] for i in layers})

    # ---------------------------------------------------------------- files

    def _metadata(self) -> dict[str, str]:
        return {
            "format": "weightops-steering",
            "weightops_version": __version__,
            "model_type": self.model_type,
            "hidden_size": str(self.hidden_size),
            "layers_path": self.layers_path,
            "method": self.method,
            "read_at": self.read_at,
            "info": json.dumps(self.info),
        }

    def save(self, path: str | Path) -> Path:
        """Write the vector as safetensors (`direction.{layer}` tensors plus metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"direction.{i}": d.contiguous() for i, d in self.directions.items()}
        save_file(tensors, path, metadata=self._metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector written by `save` (or a .gguf control vector, by extension)."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.import_gguf(path)
        from weightops.io.safetensors_file import FileReader, read_header

        infos, meta = read_header(path)
        if meta.get("format") != "weightops-steering":
            raise SteeringError(f"{path}: not a weightops steering vector (no format metadata)")
        with FileReader() as reader:
            dirs = {_layer_of(name, path): reader.read(info) for name, info in infos.items()}
        return cls(
            directions=dirs,
            model_type=meta.get("model_type", "unknown"),
            hidden_size=int(meta.get("hidden_size", 0)),
            layers_path=meta.get("layers_path", ""),
            method=meta.get("method", ""),
            read_at=meta.get("read_at", "last"),
            info=json.loads(meta.get("info", "{}")),
        )

    def export_gguf(self, path: str | Path) -> Path:
        """Write a llama.cpp control vector (architecture `controlvector`, F32 tensors
        `direction.{i}`, i ≥ 1, applied to the output of block i)."""
        import gguf

        if 0 in self.directions:
            raise SteeringError(
                "llama.cpp cannot apply a direction at layer 0",
                hint="drop it first: vec.select([i for i in vec.layers if i > 0])",
            )
        path = Path(path)
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", self.model_type)
        writer.add_uint32("controlvector.layer_count", len(self.directions))
        for i, d in self.directions.items():
            writer.add_tensor(f"direction.{i}", d.numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    @classmethod
    def import_gguf(cls, path: str | Path) -> SteeringVector:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field_ = reader.get_field("general.architecture")
        arch = bytes(field_.parts[-1]).decode() if field_ is not None else ""
        if arch != "controlvector":
            raise SteeringError(f"{path}: GGUF architecture is {arch!r}, not 'controlvector'")
        hint = reader.get_field("controlvector.model_hint")
        model_type = bytes(hint.parts[-1]).decode() if hint is not None else "unknown"
        dirs = {
            _layer_of(t.name, Path(path)): torch.from_numpy(t.data.copy()).reshape(-1)
            for t in reader.tensors
            if t.name.startswith("direction.")
        }
        if not dirs:
            raise SteeringError(f"{path}: no direction.N tensors")
        hidden = next(iter(dirs.values())).numel()
        return cls(dirs, model_type=model_type, hidden_size=hidden, method="gguf")

    # ---------------------------------------------------------------- model

    @classmethod
    def train(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        pairs: Sequence[Pair],
        method: str = "pca_diff",
        layers: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> SteeringVector:
        """Extract a vector from (positive, negative) text pairs; see steering.extract."""
        from weightops.steering.extract import train

        return train(model, tokenizer, pairs, method=method, layers=layers, **kwargs)

    def apply(
        self,
        model: torch.nn.Module,
        strength: float = 1.0,
        *,
        mode: str = "add",
        layer: int | None = None,
        start: int = 0,
        layers_path: str | None = None,
    ) -> AbstractContextManager[torch.nn.Module]:
        """Steer `model` inside a `with` block (hooks; the model is never modified)."""
        from weightops.steering.hooks import steer

        return steer(
            model, [(self, strength)], mode=mode, layer=layer, start=start, layers_path=layers_path
        )


def _check_strength(value: float) -> None:
    if not math.isfinite(value):
        raise SteeringError(f"strength must be a finite number (got {value})")


def _layer_of(name: str, path: Path) -> int:
    prefix, _, index = name.partition(".")
    if prefix != "direction" or not index.isdigit():
        raise SteeringError(f"{path}: unexpected tensor {name!r} (expected direction.N)")
    return int(index)
