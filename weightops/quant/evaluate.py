"""Evaluating a quantized checkpoint against its original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightops.io.safe_read import load_json
from weightops.quant.mixed import QuantError
from weightops.quant.model import MANIFEST, load

MIN_TOKENS = 16


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    """Perplexity over consecutive windows of `ids` (no overlap)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        loss = model(chunk, labels=chunk).loss
        total += float(loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def evaluate(
    model: str | Path, quantized: str | Path, text: str | Path, *, max_tokens: int = 4096
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightops.demo import quiet_transformers

    quiet_transformers()
    manifest = (
        load_json(Path(quantized) / MANIFEST, MANIFEST, error=QuantError)
        if (Path(quantized) / MANIFEST).is_file()
        else None
    )
    if manifest is None:
        raise QuantError(f"{quantized}: no {MANIFEST}; not a weightops-quantized model")
    tok = AutoTokenizer.from_pretrained(model)
    from weightops.io.jsonl import MAX_DATA_BYTES
    from weightops.io.safe_read import decode_utf8, read_regular

    raw = read_regular(Path(text), "evaluation text", limit=MAX_DATA_BYTES, error=QuantError)
    body = decode_utf8(raw, str(text), "evaluation text", error=QuantError)
    ids = tok(body, return_tensors="pt").input_ids[0][:max_tokens]
    if ids.numel() < MIN_TOKENS:
        raise QuantError(
            f"{text}: only {ids.numel()} tokens; perplexity needs at least {MIN_TOKENS}"
        )
    original = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True).eval()
    window = min(1024, int(getattr(original.config, "max_position_embeddings", 1024) or 1024))
    report = {
        "tokens": int(ids.numel()),
        "perplexity_original": perplexity(original, ids, window),
        "perplexity_quantized": perplexity(load(quantized), ids, window),
        "bits_per_weight": manifest["quantized_bits_per_weight"],
        "rel_error": {name: t["rel_error"] for name, t in manifest["tensors"].items()},
    }
    return report
