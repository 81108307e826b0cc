"""Calibration: how much each input of each quantized matrix matters.

For a linear layer y = W x, the squared output error of a perturbed W is, summed over
calibration tokens, Σⱼₖ (ΔW)ᵢⱼ (ΔW)ᵢₖ Hⱼₖ with H = Σ x xᵀ; its diagonal, the mean of
xⱼ² over tokens, is the per-input importance the quantizer weighs errors by (when
choosing clip ranges and which groups get 4 bits).

The model is loaded whole for the forward passes (fine for the models this runs on
here; a layer-by-layer pass for models larger than memory is future work).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from weightops.quant.mixed import QuantError

MIN_TOKENS = 64


def read_texts(path: str | Path) -> list[str]:
    """Plain text (one document) or JSONL with a "text" or "prompt" field per line."""
    path = Path(path)
    try:
        body = path.read_text()
    except OSError as e:
        raise QuantError(f"{path}: cannot read calibration data: {e.strerror or e}") from e
    if path.suffix != ".jsonl":
        return [body]
    texts = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(row.get("text") or row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise QuantError(
                f"{path}:{n}: expected a JSON object with 'text' or 'prompt' ({e})"
            ) from e
    return texts


@torch.no_grad()
def importance(
    model_folder: str | Path,
    texts: list[str],
    names: list[str],
    *,
    max_tokens: int = 8192,
    window: int = 512,
) -> dict[str, torch.Tensor]:
    """{weight name: mean x² per input} over the calibration tokens, for `names`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightops.demo import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_folder)
    ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts if t.strip()]
    flat = torch.cat(ids)[:max_tokens] if ids else torch.zeros(0, dtype=torch.long)
    if flat.numel() < MIN_TOKENS:
        raise QuantError(
            f"calibration data has {flat.numel()} tokens; at least {MIN_TOKENS} are needed"
        )
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name[: -len(".weight")])
        handles.append(module.register_forward_pre_hook(make(name)))
    try:
        for start in range(0, flat.numel(), window):
            model(flat[start : start + window].unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in names}
