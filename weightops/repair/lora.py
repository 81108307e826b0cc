"""LoRA adapter folders for Antidote: reading the A/B pairs, finding the base model, and
measuring the activation norms of A (inputs of the adapted linear) and B (x·Aᵀ)."""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.io.checkpoint import Checkpoint
from weightops.io.safe_read import load_json
from weightops.io.safetensors_file import FileReader
from weightops.repair.activations import _load_causal_lm, _load_tokenizer, activation_sums
from weightops.repair.data import Example, RepairError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class _Lora:
    config: dict[str, Any]
    pairs: dict[str, tuple[str, str]]  # module path -> (A key, B key)

    def scaling(self, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", rank))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _read_lora(folder: Path, ckpt: Checkpoint) -> _Lora:
    path = folder / ADAPTER_CONFIG
    config = load_json(path, "adapter config", error=RepairError)
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise RepairError(f"{path}: peft_type {kind} is not supported (only LORA adapters)")
    for key, why in (
        ("use_dora", "DoRA adapters"),
        ("fan_in_fan_out", "fan_in_fan_out adapters (Conv1D layers)"),
        ("alpha_pattern", "per-module lora_alpha (alpha_pattern)"),
        ("lora_bias", "adapters with a bias on B"),
    ):
        if config.get(key):
            raise RepairError(f"{path}: {why} are not supported")
    pairs: dict[str, tuple[str, str]] = {}
    for name in ckpt.tensors:
        if name.endswith(_LORA_A):
            stem = name[: -len(_LORA_A)]
            b = stem + _LORA_B
            if b not in ckpt.tensors:
                raise RepairError(f"{folder}: adapter has {name} but no {b}")
            module = stem[len(_LORA_PREFIX) :] if stem.startswith(_LORA_PREFIX) else stem
            pairs[module] = (name, b)
        elif name.endswith(_LORA_B) and name[: -len(_LORA_B)] + _LORA_A not in ckpt.tensors:
            raise RepairError(f"{folder}: adapter has {name} but no matching lora_A")
    if not pairs:
        raise RepairError(f"{folder}: the adapter has no lora_A / lora_B weights")
    for module, (a, b) in pairs.items():
        sa, sb = ckpt.tensors[a].shape, ckpt.tensors[b].shape
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise RepairError(
                f"{folder}: {module}: lora_A {list(sa)} and lora_B {list(sb)} do not chain"
            )
    return _Lora(config, pairs)


def _lora_base(folder: Path, lora: _Lora, aligned: Path | None) -> Path:
    if aligned is not None:
        return aligned
    named = lora.config.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        for candidate in (Path(named), folder / named):
            if candidate.is_dir():
                return candidate
    raise RepairError(
        f"{folder}: the adapter's base model {named!r} is not a local folder",
        hint="pass the base model the adapter was trained on with --aligned",
    )


def _lora_norms(
    folder: Path,
    ckpt: Checkpoint,
    lora: _Lora,
    base: Path,
    examples: Sequence[Example],
    *,
    dtype: torch.dtype,
    device: str,
    batch_size: int,
    progress: bool | None,
) -> dict[str, torch.Tensor]:
    """Norms for every A (inputs of the adapted linear) and B (x·Aᵀ), measured on the
    base model with the adapter merged into this private copy of its weights."""
    if lora.config.get("modules_to_save"):
        raise RepairError(
            f"{folder}: the adapter replaces whole modules (modules_to_save), which the "
            "activations here would not include",
            hint="leave out the harmful data to prune by magnitude",
        )
    tokenizer = _load_tokenizer([folder, base])
    model = _load_causal_lm(base, dtype, device)
    taps: dict[str, list[tuple[str, torch.Tensor | None]]] = {}
    with FileReader() as reader, torch.no_grad():
        for module_path, (a_name, b_name) in lora.pairs.items():
            try:
                module = model.get_submodule(module_path)
            except AttributeError as e:
                raise RepairError(
                    f"{folder}: adapter module {module_path!r} is not in the base model {base}"
                ) from e
            a = reader.read(ckpt.tensors[a_name]).float()
            b = reader.read(ckpt.tensors[b_name]).float()
            weight = getattr(module, "weight", None)
            delta = b @ a * lora.scaling(a.shape[0])
            if weight is None or tuple(weight.shape) != tuple(delta.shape):
                raise RepairError(
                    f"{folder}: {module_path}: adapter shape {list(delta.shape)} does not fit "
                    f"the base model's weight"
                    + ("" if weight is None else f" {list(weight.shape)}")
                )
            weight.add_(delta.to(weight.device, weight.dtype))
            taps[module_path] = [(a_name, None), (b_name, a)]
    sums = activation_sums(
        model, tokenizer, examples, taps, batch_size=batch_size, progress=progress
    )
    del model
    gc.collect()
    return {k: v.sqrt() for k, v in sums.items()}
