"""Calibration: the second moment of each quantized matrix's inputs.

For a linear layer y = W x, the squared output error of a perturbed W is, summed over
calibration tokens, Σᵢ Σⱼₖ (ΔW)ᵢⱼ (ΔW)ᵢₖ Hⱼₖ with H = mean x xᵀ. The quantizer chooses
codes to minimise exactly that (GPTQ-style error feedback), and weighs each input's
error by H's diagonal, the mean of xⱼ², when choosing clip ranges and 4-bit groups.

The model is loaded whole for the forward passes and H is kept for every quantized
matrix until it is quantized: in × in floats each, about 0.5 GB for a 150M-parameter
Llama. A layer-by-layer pass for models larger than memory is future work.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightops.io.jsonl import JsonlError, read_jsonl
from weightops.quant.mixed import QuantError

MIN_TOKENS = 64


def read_texts(path: str | Path) -> list[str]:
    """Plain text (one document) or JSONL with a "text" or "prompt" field per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        try:
            return [path.read_text()]
        except OSError as e:
            raise QuantError(f"{path}: cannot read calibration data: {e.strerror or e}") from e
    try:
        rows = read_jsonl(path, what="calibration data")
    except JsonlError as e:
        raise QuantError(e.message, hint=e.hint) from e
    texts = []
    for n, row in rows:
        text = row.get("text") or row.get("prompt")
        if not isinstance(text, str):
            raise QuantError(f"{path}:{n}: expected a JSON object with 'text' or 'prompt'")
        texts.append(text)
    return texts


@torch.no_grad()
def hessians(
    model_folder: str | Path,
    texts: list[str],
    names: list[str],
    *,
    max_tokens: int = 8192,
    window: int = 512,
) -> dict[str, torch.Tensor]:
    """{weight name: mean x xᵀ [in, in]} over the calibration tokens, for `names`."""
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
    return model_hessians(
        model, [flat[i : i + window] for i in range(0, flat.numel(), window)], names
    )


@torch.no_grad()
def model_hessians(
    model: torch.nn.Module, windows: list[torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """{weight name: mean x xᵀ} of a loaded model's linear inputs over token windows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # Projections that read the same activations (q/k/v, gate/up) share one matrix; the
    # first window shows which: their hooks receive the very same input tensor.
    owner: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # holds x so its id is not reused

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if name in owner:
                return
            if id(x) in seen and not counts.get(name):
                owner[name] = seen[id(x)][1]
                return
            seen[id(x)] = (x, name)
            flat = x.detach().float().reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + flat.T @ flat
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name[: -len(".weight")])
        handles.append(module.register_forward_pre_hook(make(name)))
    try:
        for ids in windows:
            seen.clear()
            model(ids.reshape(1, -1))
    finally:
        for h in handles:
            h.remove()
    for name in sums:
        sums[name] /= counts[name]
    return {name: sums[owner.get(name, name)] for name in names}
