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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.arch import family, is_block_linear
from weightops.compat import causal_lm
from weightops.engine.progress import Progress
from weightops.io.checkpoint import Checkpoint
from weightops.io.rewrite import ordered_names, write_model
from weightops.io.safe_read import load_json
from weightops.io.safetensors_file import FileReader
from weightops.io.writer import StagingFolder
from weightops.repair.data import (
    Example,
    RepairError,
    as_examples,
    batches,
    context_length,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
# Families whose block projections are Conv1D, storing (in, out) matrices.
_CONV1D = ("gpt2",)
# Scores are computed in float64 blocks of about this many entries.
_BLOCK = 1 << 20
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


def top_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores of every row; among entries equal to a
    row's k-th highest score, the lowest column indices are taken first."""
    cols = scores.shape[1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def per_row(ratio: float, cols: int) -> int:
    """Entries marked per row: ⌊ratio · cols⌋ (the 1e-9 absorbs 0.3 · 10 = 2.9999…)."""
    return math.floor(ratio * cols + 1e-9)


def mark(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    ratio: float,
    *,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The harmful mask of a (out, in) matrix: top `ratio` per row of
    |weight − reference| · norms (reference and norms optional)."""
    rows, cols = weight.shape
    k = per_row(ratio, cols)
    out = torch.zeros(weight.shape, dtype=torch.bool)
    if k == 0:
        return out
    step = max(1, _BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        w = weight[r0 : r0 + step].double()
        if reference is not None:
            w = w - reference[r0 : r0 + step].double()
        s = w.abs_()
        if norms is not None:
            s.mul_(norms.double())
        if not torch.isfinite(s).all():
            raise RepairError("a weight or activation norm is not finite (NaN or Inf)")
        out[r0 : r0 + step] = top_per_row(s, k)
    return out


# ------------------------------------------------------------------ activations


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
    current: dict[str, torch.Tensor] = {}

    def make(entries: list[tuple[str, torch.Tensor | None]]) -> Callable[..., None]:
        projections = [(k, None if p is None else p.to(device, torch.float32)) for k, p in entries]

        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0][current["mask"]].float()
            for key, proj in projections:
                y = x if proj is None else x @ proj.T
                # fp32 within a batch (a few thousand tokens), fp64 across batches.
                s = y.square().sum(0).double()
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


# ------------------------------------------------------------------ inputs


def _load_causal_lm(folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:

    from weightops.demo import quiet_transformers

    quiet_transformers()
    return causal_lm(folder, dtype).to(device).eval()


def _load_tokenizer(folders: Sequence[Path]) -> Any:
    from transformers import AutoTokenizer

    for folder in folders:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    raise RepairError(
        f"{folders[0]}: no tokenizer to encode the harmful data with",
        hint="copy the tokenizer files of the base model into the folder",
    )


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


# ------------------------------------------------------------------ the job


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
