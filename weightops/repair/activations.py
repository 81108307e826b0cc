"""Input-activation norms of a model's linear layers over prompt + response data, and
loading the model and tokenizer they are measured with."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightops.arch import is_block_linear
from weightops.io.checkpoint import Checkpoint
from weightops.repair.data import Example, RepairError, batches, context_length
from weightops.repair.precision import load_narrow, output_head, stored_dtype, widen_except


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """The weight names of a loaded model's decoder linear layers."""
    return [n for n, p in model.named_parameters() if is_block_linear(n, tuple(p.shape))]


@torch.no_grad()
def activation_sums(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    taps: dict[str, list[tuple[str, torch.Tensor | None]]],
    *,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Sums of squares over every non-padding token of prompt + response, per feature.

    `taps` maps a module path to [(key, projection)]: the module's input x is summed
    under `key` as x² per input feature, or, with a projection P, as (x·Pᵀ)²."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, Any] = {}

    def make(entries: list[tuple[str, torch.Tensor | None]]) -> Callable[..., None]:
        projections = [(k, None if p is None else p.to(device, torch.float32)) for k, p in entries]

        def hook(module: torch.nn.Module, args: tuple) -> None:
            # Modules fed the same tensor one after the other (q, k, v; gate, up) share
            # one masked copy and one sum of squares. Only the latest input is held, so
            # no more than one layer input is kept alive beyond what the model holds.
            inp = args[0]
            seen = current["seen"]
            if seen is None or seen[0] is not inp:
                seen = current["seen"] = [inp, inp[current["mask"]].float(), None]
            x = seen[1]
            for key, proj in projections:
                if proj is None:
                    # fp32 within a batch (a few thousand tokens), fp64 across batches.
                    if seen[2] is None:
                        seen[2] = x.square().sum(0).double()
                    s = seen[2]
                else:
                    s = (x @ proj.T).square().sum(0).double()
                sums[key] = sums[key] + s if key in sums else s

        return hook

    handles = []
    try:
        for path, entries in taps.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise RepairError(f"the model has no module {path!r} to read activations at") from e
            handles.append(module.register_forward_pre_hook(make(entries)))
        # The decoder without its head: the logits are not needed, and over a large
        # vocabulary they cost a fifth of the compute and most of the activation memory.
        body = getattr(model, "base_model", model)
        total = math.ceil(len(examples) / batch_size)
        show = sys.stderr.isatty() if progress is None else progress
        for i, batch in enumerate(
            batches(
                examples,
                tokenizer,
                batch_size=batch_size,
                with_response=True,
                max_length=context_length(model),
                device=device,
            ),
            1,
        ):
            current["mask"] = batch["attention_mask"].bool()
            current["seen"] = None
            body(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
            if show:
                sys.stderr.write(f"\rscoring on harmful data: batch {i}/{total}")
                sys.stderr.flush()
        if show:
            sys.stderr.write("\n")
    finally:
        for h in handles:
            h.remove()
    missing = [k for entries in taps.values() for k, _ in entries if k not in sums]
    if missing:
        raise RepairError(f"no activations reached {missing[0]} during the forward passes")
    return {k: v.cpu() for k, v in sums.items()}


def activation_norms(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """{weight name: ‖X_j‖₂ per input feature (float64)} over every non-padding token
    of the examples (prompt + response), for the decoder linear layers (or `names`)."""
    names = list(names) if names is not None else block_linear_names(model)
    taps = {n[: -len(".weight")]: [(n, None)] for n in names}
    sums = activation_sums(
        model, tokenizer, examples, taps, batch_size=batch_size, progress=progress
    )
    return {n: sums[n].sqrt() for n in names}


def _load_causal_lm(folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model to measure activations with, computing in `dtype`. The passes stop
    before the output head, so an untied head stays in its stored dtype (bfloat16 or
    float16 widen into float32 exactly: the body computes as on a float32 load)."""
    from weightops.demo import quiet_transformers

    quiet_transformers()
    model = load_narrow(folder, stored_dtype(Checkpoint(folder), dtype), dtype, device)
    widen_except(model, dtype, output_head(model))
    return model


def _load_tokenizer(folders: Sequence[Path]) -> Any:
    from transformers import AutoTokenizer

    for folder in folders:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    raise RepairError(
        f"{folders[0]}: no tokenizer to encode the harmful data with",
        hint="copy the tokenizer files of the base model into the folder",
    )
