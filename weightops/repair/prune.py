"""Antidote: pruning the weights a harmful fine-tune relies on (Huang et al.,
"Post-fine-tuning Safety Alignment for LLMs against Harmful Fine-tuning").

Every linear weight W of the decoder blocks (q, k, v, o, gate, up, down) is scored
Wanda-style on harmful re-alignment data, prompt and response tokens together:

    S_ij = |W_ij| · ‖X_j‖₂

where ‖X_j‖₂ is the norm of input feature j over every (non-padding) token of the
data, gathered by forward hooks on the fine-tuned model as running sums of squares
(so nothing beyond the batch in flight is held). In each output row the top `ratio` of
the entries (⌊ratio · in_features⌋, 0.1 in the paper) are marked harmful; ties at the
row's threshold go to the lower column index. Without harmful data the score is |W|
alone, the paper's fallback. No training is involved.

What happens to the marked entries depends on what is pruned:

- a LoRA adapter folder (peft layout: adapter_config.json + adapter_model.safetensors;
  the reference applies Antidote here): the marked entries of A and B are zeroed. A is
  scored with the input activations of the adapted linear, B with the activations
  after A (x·Aᵀ); the activations come from the base model (`aligned`, else the
  adapter's base_model_name_or_path) with the adapter merged in. The output is an
  adapter folder.
- a full fine-tune with an aligned reference (`aligned`): the marked entries are reset
  to the aligned model's values. By default the score uses the fine-tune's update
  |W_ft − W_aligned| in place of |W|, the analogue of scoring a LoRA adapter (which is
  that update): a reset there removes what the fine-tune added where the harmful data
  flows most. `score_on="weights"` scores |W_ft| as the formula above reads.
- a fine-tune alone: the marked entries are zeroed. The top 10% of a full weight
  matrix are its most important entries, so this damages any model much more than
  pruning an adapter does; use a small ratio.

Ratio 0 leaves every tensor bit-identical. Other tensors (embeddings, norms, biases,
lm_head) are copied unchanged. The output goes through the atomic writer, with the
settings and the number of changed weights of every tensor in the model card.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.arch import family, is_block_linear
from weightops.engine.progress import Progress
from weightops.io.checkpoint import Checkpoint
from weightops.io.rewrite import ordered_names, write_model
from weightops.io.safe_read import load_json
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import StagingFolder
from weightops.repair.activations import (
    _load_causal_lm,
    _load_tokenizer,
    activation_norms,
    activation_sums,
    block_linear_names,
)
from weightops.repair.data import Example, RepairError, as_examples
from weightops.repair.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    _Lora,
    _lora_base,
    _lora_norms,
    _read_lora,
)
from weightops.repair.marking import mark, per_row, top_per_row

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "TARGETS",
    "PruneResult",
    "activation_norms",
    "activation_sums",
    "block_linear_names",
    "mark",
    "per_row",
    "prune",
    "top_per_row",
]

# Families whose block projections are Conv1D, storing (in, out) matrices.
_CONV1D = ("gpt2",)
TARGETS = ("lora", "reset", "zero")


@dataclass
class PruneResult:
    """What a pruning run did.

    `changed[name]` counts the entries of each pruned tensor whose value changed,
    `marked[name]` those marked harmful (an entry already equal to its new value is
    marked but unchanged). `tensors` holds the pruned tensors when no output folder
    was asked for."""

    target: str
    out: Path | None
    settings: dict[str, Any]
    changed: dict[str, int] = field(default_factory=dict)
    marked: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _as_examples(harmful: Sequence[Example] | str | Path | None) -> list[Example] | None:
    examples = as_examples(harmful)
    if examples == []:
        raise RepairError("no harmful examples given (pass None to score by magnitude)")
    return examples


def prune(
    finetuned: str | Path,
    *,
    aligned: str | Path | None = None,
    harmful: Sequence[Example] | str | Path | None = None,
    ratio: float = 0.1,
    out: str | Path | None = None,
    score_on: str = "delta",
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    shard_size: int = 5 * 10**9,
    progress: bool | None = None,
) -> PruneResult:
    """Antidote on a LoRA adapter folder, a fine-tune with its aligned reference, or a
    fine-tune alone (see the module docstring).

    `harmful`: harmful re-alignment examples (prompt + response) or a JSONL path; None
    scores by magnitude. `score_on` ("delta" or "weights") applies with `aligned` on a
    full fine-tune. Forward passes run on `device` in `dtype`. With `out`, the result
    is written there (atomically); without it, the pruned tensors are returned in
    `PruneResult.tensors`."""
    if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1 or math.isnan(ratio):
        raise RepairError(f"ratio must be between 0 and 1 (got {ratio!r})")
    if score_on not in ("delta", "weights"):
        raise RepairError(f"score_on must be 'delta' or 'weights' (got {score_on!r})")
    if batch_size < 1:
        raise RepairError(f"batch_size must be at least 1 (got {batch_size})")
    ft_path = Path(finetuned)
    al_path = Path(aligned) if aligned is not None else None
    if out is not None:
        # Refuses a non-empty folder, or one over an input, before the work.
        StagingFolder(Path(out), force=force, inputs=[p for p in (ft_path, al_path) if p])
    ckpt = Checkpoint(ft_path)
    folder = ckpt.folder
    examples = _as_examples(harmful)
    is_lora = (folder / ADAPTER_CONFIG).is_file()
    target = "lora" if is_lora else ("reset" if al_path is not None else "zero")
    ref: Checkpoint | None = None
    lora: _Lora | None = None
    if is_lora:
        lora = _read_lora(folder, ckpt)
        names = [n for pair in lora.pairs.values() for n in pair]
    else:
        names = [n for n in ordered_names(ckpt) if is_block_linear(n, ckpt.tensors[n].shape)]
        if not names:
            raise RepairError(f"{ft_path}: no linear weights of decoder blocks found to prune")
        if al_path is not None:
            ref = Checkpoint(al_path)
            for n in names:
                info = ref.tensors.get(n)
                if info is None:
                    raise RepairError(f"{al_path}: has no tensor {n!r}, which {ft_path} has")
                if info.shape != ckpt.tensors[n].shape:
                    raise RepairError(
                        f"{n}: shape {list(ckpt.tensors[n].shape)} in {ft_path} but "
                        f"{list(info.shape)} in {al_path}"
                    )
    transposed = not is_lora and family(ckpt.config) in _CONV1D
    on_delta = target == "reset" and score_on == "delta"

    norms: dict[str, torch.Tensor] | None = None
    if examples is not None and ratio > 0:
        if lora is not None:
            base = _lora_base(folder, lora, al_path)
            norms = _lora_norms(
                folder,
                ckpt,
                lora,
                base,
                examples,
                dtype=dtype,
                device=device,
                batch_size=batch_size,
                progress=progress,
            )
        else:
            tokenizer = _load_tokenizer([folder, *([al_path] if al_path else [])])
            model = _load_causal_lm(folder, dtype, device)
            norms = activation_norms(
                model, tokenizer, examples, names=names, batch_size=batch_size, progress=progress
            )
            del model
            gc.collect()

    settings: dict[str, Any] = {
        "job": "repair prune",
        "method": "antidote",
        "target": target,
        "ratio": ratio,
        "score": "activation-weighted" if examples is not None else "magnitude",
        "score_on": ("delta" if on_delta else "weights") if target != "lora" else "adapter",
        "finetuned": str(ft_path),
        "aligned": str(al_path) if al_path is not None else None,
        "harmful": str(harmful) if isinstance(harmful, (str, Path)) else None,
        "harmful_examples": len(examples) if examples is not None else 0,
        "pruned_tensors": len(names),
    }
    result = PruneResult(target, None, settings)
    todo = set(names)
    nbytes = sum(ckpt.tensors[n].nbytes for n in ckpt.tensors)
    bar = Progress(len(ckpt.tensors), nbytes, "prune", enabled=progress)

    def apply(name: str, tensor: torch.Tensor, reader: FileReader) -> torch.Tensor:
        if name not in todo or ratio == 0:
            return tensor
        reference = None
        if ref is not None:
            reference = reader.read(ref.tensors[name])
        w, r = tensor, reference
        if transposed:
            w, r = tensor.T, None if reference is None else reference.T
        mask = mark(
            w,
            None if norms is None else norms[name],
            ratio,
            reference=r if on_delta else None,
        )
        new = w.clone()
        new[mask] = r[mask] if r is not None else 0
        changed = int((new != w).sum())
        result.marked[name] = int(mask.sum())
        result.changed[name] = changed
        return new.T.contiguous() if transposed else new

    summary = _summary(target, ratio, settings, ft_path, al_path)

    def produce(name: str, reader: FileReader) -> torch.Tensor:
        tensor = apply(name, reader.read(ckpt.tensors[name]), reader)
        if name in todo:
            # The writer renders the card after the last tensor, so rows added here
            # while the tensors are written all reach it.
            if len(summary) == 1:
                summary.extend(["", "| tensor | weights changed | weights |", "|---|---|---|"])
            summary.append(f"| `{name}` | {result.changed.get(name, 0)} | {tensor.numel()} |")
        bar.update(ckpt.tensors[name].nbytes, name)
        return tensor

    try:
        if out is None:
            with FileReader() as reader:
                for name in names:
                    result.tensors[name] = produce(name, reader)
        else:
            entries = [
                (n, ckpt.tensors[n].shape, ckpt.tensors[n].dtype) for n in ordered_names(ckpt)
            ]
            extra = None
            if is_lora:
                text = json.dumps(load_json(folder / ADAPTER_CONFIG, "adapter config"), indent=2)
                extra = {ADAPTER_CONFIG: lambda: text}
            result.out = write_model(
                ckpt,
                Path(out),
                entries,
                produce,
                title=f"{folder.name}, harmful weights pruned (Antidote)",
                summary=summary,
                settings=settings,
                tag="repair",
                force=force,
                shard_size=shard_size,
                extra_files=extra,
                single_file=ADAPTER_WEIGHTS if is_lora else None,
            )
    finally:
        bar.close()
    return result


def _summary(
    target: str,
    ratio: float,
    settings: dict[str, Any],
    ft: Path,
    aligned: Path | None,
) -> list[str]:
    """The opening of the model card (the table of counts follows it)."""
    what = {
        "lora": "the LoRA adapter's A and B matrices were zeroed",
        "reset": f"the marked entries were reset to their values in {aligned}",
        "zero": "the marked entries were zeroed",
    }[target]
    score = (
        f"|W|·‖X‖₂ with activations from {settings['harmful_examples']} harmful examples"
        if settings["score"] == "activation-weighted"
        else "|W| (no harmful data given)"
    )
    if settings["score_on"] == "delta":
        score = score.replace("|W|", "|W − W_aligned|")
    return [
        f"Antidote (Huang et al.) applied to {ft}: in every output row of every linear "
        f"weight of the decoder blocks the top {ratio:g} of the entries by {score} were "
        f"marked harmful, and {what}."
    ]
