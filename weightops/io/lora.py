"""LoRA adapters merged on read: mergekit's `base_model_path+adapter_path` references.

A recipe may name a model as `path/to/base+path/to/adapter`, where the adapter is a
PEFT LoRA folder (adapter_config.json + adapter_model.safetensors). Its weights are
folded into the base's tensors as they stream into the merge, one tensor (or row
block) at a time, as PEFT's `merge_and_unload` would:

    W' = W + s · B @ A        s = lora_alpha / r   (lora_alpha / √r with use_rslora)

- r and lora_alpha are per module when the adapter has rank_pattern / alpha_pattern
  (a pattern applies to the module names it matches at their end, as in PEFT);
- the product is transposed, (B @ A)ᵀ, for layers stored input-major (GPT-2's Conv1D,
  `fan_in_fan_out`) and for embeddings (lora_embedding_A / lora_embedding_B): the
  orientation is the one the shapes allow, and the config's fan_in_fan_out decides
  for square weights;
- with `lora_bias`, the layer's bias gains s · lora_B.bias;
- tensors the adapter stores whole (modules_to_save, trained biases, saved embedding
  layers) replace the base's tensors of the same name; a saved `base_layer` of an
  adapted layer replaces the weight the update is then added to.

PEFT's tensor names are the base model's module names under `base_model.model.`:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` adapts
`model.layers.0.self_attn.q_proj.weight`. Adapters whose weights do not follow
W + s·B@A (DoRA, other PEFT types, LoRA variants) are refused with the reason, never
approximated. The sum is formed in the compute dtype, so a bf16 base gains the
adapter's small update without a bf16 rounding in between.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.io.checkpoint import Checkpoint
from weightops.io.safetensors_file import FileReader, TensorInfo, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config keys whose presence changes what the adapter's weights mean: (key, what it is).
_UNSUPPORTED = (
    ("use_dora", "DoRA (weight-decomposed LoRA) adapters"),
    ("use_qalora", "QA-LoRA adapters"),
    ("use_bdlora", "block-diagonal LoRA adapters"),
    ("layer_replication", "adapters that replicate layers (layer_replication)"),
    ("target_parameters", "adapters on bare parameters (target_parameters)"),
    ("trainable_token_indices", "adapters with trainable tokens (trainable_token_indices)"),
    (
        "alora_invocation_tokens",
        "activated LoRA (alora_invocation_tokens), which applies only after its trigger tokens",
    ),
    ("velora_config", "VeLoRA adapters"),
    ("monteclora_config", "MonteCLoRA adapters"),
    ("arrow_config", "Arrow routing between adapters"),
    ("kasa_config", "KaSA adapters"),
)


def split_reference(ref: str) -> tuple[str, str | None]:
    """(model, adapter or None) of a recipe model reference; ValueError if malformed."""
    parts = ref.split("+")
    if len(parts) == 1:
        return ref, None
    if len(parts) == 2 and all(p.strip() for p in parts):
        return parts[0], parts[1]
    raise ValueError(
        f"{ref!r} is not MODEL or MODEL+LORA_ADAPTER (one '+' between two non-empty paths)"
    )


def read_config(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The adapter's config and every reason it cannot be applied (no tensor is read)."""
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        return {}, [
            f"LoRA adapter {folder} is not a folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        ]
    try:
        config = json.loads(path.read_text())
    except OSError:
        return {}, [f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder"]
    except json.JSONDecodeError as e:
        return {}, [f"{path}: not valid JSON ({e})"]
    if not isinstance(config, dict):
        return {}, [f"{path}: not a JSON object"]
    problems = []
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        problems.append(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
            "only LoRA adapters (peft_type LORA) can be merged"
        )
    for key, what in _UNSUPPORTED:
        if config.get(key):
            problems.append(f"{path}: {what} are not supported ({key} is set)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append(f"{path}: {key} must be a positive number (got {value!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in pattern.values()
        ):
            problems.append(f"{path}: {key} must map module patterns to positive numbers")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        problems.append(
            f"{folder}: no {ADAPTER_WEIGHTS}"
            + (
                " (only the pickled adapter_model.bin, which weightops does not load; "
                "re-save it with save_pretrained(..., safe_serialization=True))"
                if pickled
                else ""
            )
        )
    return config, problems


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    # PEFT: the first pattern that matches the module name at its end, on a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


@dataclass(frozen=True)
class LoraDelta:
    """What the adapter adds to one base tensor: s · B @ A (transposed: s · (B @ A)ᵀ),
    or, for a bias (a is None), s · lora_B.bias."""

    a: TensorInfo | None
    b: TensorInfo
    scale: float
    transposed: bool = False


@dataclass
class LoraAdapter:
    folder: Path
    deltas: dict[str, LoraDelta]  # base tensor name -> its update
    replaced: dict[str, TensorInfo]  # base tensor name -> the adapter's whole tensor

    def apply(
        self,
        name: str,
        tensor: torch.Tensor,
        rows: tuple[int, int] | None,
        reader: FileReader,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """`tensor` (rows [r0, r1) of base tensor `name`, or all of it) with the
        adapter's update added, in `dtype`; unchanged if the adapter leaves it alone."""
        d = self.deltas.get(name)
        if d is None:
            return tensor
        out = tensor.to(dtype)
        if d.a is None:
            return out.add_(reader.read(d.b, rows).to(dtype), alpha=d.scale)
        a = reader.read(d.a).to(dtype)
        if d.transposed:
            # Rows r0:r1 of (B @ A)ᵀ = Aᵀ Bᵀ are columns r0:r1 of A, times Bᵀ.
            a_cols = a if rows is None else a[:, rows[0] : rows[1]]
            b = reader.read(d.b).to(dtype)
            return out.addmm_(a_cols.T, b.T, alpha=d.scale)
        return out.addmm_(reader.read(d.b, rows).to(dtype), a, alpha=d.scale)


def open_adapter(folder: Path, base: Checkpoint) -> tuple[LoraAdapter, list[str]]:
    """Read the adapter's config and header and match every tensor of it to a tensor
    of `base`; return the adapter and every problem found (shapes, names, ranks)."""
    config, problems = read_config(folder)
    if problems:
        return LoraAdapter(folder, {}, {}), problems
    infos, _ = read_header(folder / ADAPTER_WEIGHTS)
    binder = _Binder(folder, config, base, infos)
    binder.bind()
    return LoraAdapter(folder, binder.deltas, binder.replaced), binder.problems


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias"
    r"|lora_embedding_A|lora_embedding_B)$"
)


class _Binder:
    def __init__(
        self, folder: Path, config: dict[str, Any], base: Checkpoint, infos: dict[str, TensorInfo]
    ) -> None:
        self.folder = folder
        self.config = config
        self.base = base
        self.infos = infos
        self.problems: list[str] = []
        self.deltas: dict[str, LoraDelta] = {}
        self.replaced: dict[str, TensorInfo] = {}

    def problem(self, msg: str) -> None:
        self.problems.append(f"LoRA adapter {self.folder}: {msg}")

    def scale(self, module: str) -> tuple[float, float]:
        """(rank, scale) of a module, from the config and its patterns."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"]
        )
        return r, (alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r)

    def target(self, name: str, key: str) -> TensorInfo | None:
        """The base's stored tensor `name`, or None (with a problem) if it has none."""
        info = self.base.tensors.get(name)
        if info is not None:
            return info
        if name in self.base.aliases:
            self.problem(
                f"{key} adapts {name!r}, which {self.base.path} ties to "
                f"{self.base.aliases[name]!r}; adapters on tied weights are not supported"
            )
        else:
            self.problem(f"{key} adapts {name!r}, which {self.base.path} does not have")
        return None

    def bind(self) -> None:
        pairs: dict[str, dict[str, TensorInfo]] = {}
        for key, info in self.infos.items():
            if not key.startswith(_PREFIX):
                self.problem(f"tensor {key!r} is not named like a PEFT adapter's ({_PREFIX}…)")
                continue
            name = key[len(_PREFIX) :]
            m = _LORA_KEY.match(name)
            if m:
                pairs.setdefault(m["module"], {})[m["kind"]] = info
            elif "lora_magnitude_vector" in name:
                self.problem("DoRA adapters (lora_magnitude_vector) are not supported")
            elif ".lora_" in name:
                self.problem(f"tensor {key!r} is not a LoRA weight weightops knows")
            else:
                self.replace(name.replace(".base_layer.", "."), info, key)
        for module, parts in pairs.items():
            if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
                self.pair(
                    module,
                    parts.get("lora_embedding_A"),
                    parts.get("lora_embedding_B"),
                    embedding=True,
                )
            else:
                self.pair(
                    module, parts.get("lora_A.weight"), parts.get("lora_B.weight"), embedding=False
                )
                if "lora_B.bias" in parts:
                    self.bias(module, parts["lora_B.bias"])

    def replace(self, name: str, info: TensorInfo, key: str) -> None:
        target = self.target(name, key)
        if target is None:
            return
        if target.shape != info.shape:
            self.problem(
                f"{key} has shape {list(info.shape)} but {name!r} of {self.base.path} has "
                f"{list(target.shape)} (a resized vocabulary is not supported)"
            )
            return
        self.replaced[name] = info

    def pair(
        self, module: str, a: TensorInfo | None, b: TensorInfo | None, *, embedding: bool
    ) -> None:
        if a is None or b is None:
            have = (a or b).name  # type: ignore[union-attr]
            self.problem(f"{have} has no matching {'lora_A' if a is None else 'lora_B'}")
            return
        if len(a.shape) != 2 or len(b.shape) != 2:
            self.problem(
                f"{module}: LoRA on layers other than linear and embedding (here "
                f"{len(a.shape)}-D lora_A, e.g. a convolution) is not supported"
            )
            return
        name = f"{module}.weight"
        target = self.target(name, a.name)
        if target is None:
            return
        r, scale = self.scale(module)
        rank, fan_in = a.shape
        fan_out, rank_b = b.shape
        if rank != r or rank_b != r:
            self.problem(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have "
                f"rank r={r:g} that the config gives this module"
            )
            return
        straight = target.shape == (fan_out, fan_in)
        crossed = target.shape == (fan_in, fan_out)
        if embedding:
            straight = False
        elif straight and crossed:
            crossed = bool(self.config.get("fan_in_fan_out"))
            straight = not crossed
        if not (straight or crossed):
            self.problem(
                f"{module}: lora_B @ lora_A is {[fan_out, fan_in]} but {name!r} of "
                f"{self.base.path} is {list(target.shape)}"
            )
            return
        self.deltas[name] = LoraDelta(a, b, scale, transposed=not straight)

    def bias(self, module: str, b: TensorInfo) -> None:
        name = f"{module}.bias"
        target = self.target(name, b.name)
        if target is None:
            return
        if target.shape != b.shape:
            self.problem(
                f"{b.name} has shape {list(b.shape)} but {name!r} has {list(target.shape)}"
            )
            return
        self.deltas[name] = LoraDelta(None, b, self.scale(module)[1])
