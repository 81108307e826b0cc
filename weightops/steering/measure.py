"""What `steer optimize` measures: prompts as token ids, the first answer token's
log-probabilities and their KL, greedy completions, and the mean states the directions
come from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightops.prompting import encode_prompt, pad, pad_id, render_prompt
from weightops.steering.extract import hidden_states
from weightops.steering.layers import find_layers
from weightops.steering.profile import Directions


def evenly(items: Sequence[str], n: int | None) -> list[str]:
    """`n` items spread evenly over the list (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(k * step)] for k in range(n)]


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [encode_prompt(tokenizer, p)[0] for p in prompts]


@torch.no_grad()
def first_token_logprobs(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[Sequence[int]], batch_size: int = 32
) -> torch.Tensor:
    """[len(rows), vocab] fp32 log-probabilities of the token after each prompt."""
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(rows), batch_size):
        ids, mask = pad(rows[b : b + batch_size], pad_id(tokenizer), "left")
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": pos.to(device),
        }
        try:
            # Only the last position's logits: the lm_head over every position would
            # cost a fifth of a small model's forward pass.
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        except TypeError:
            logits = model(**inputs).logits[:, -1]
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


def kl_divergence(base: torch.Tensor, new: torch.Tensor) -> float:
    """Mean over rows of KL(base ‖ new), both given as log-probabilities."""
    return float((base.exp() * (base - new)).sum(-1).mean())


def directions(
    model: torch.nn.Module,
    tokenizer: Any,
    target: Sequence[str],
    harmless: Sequence[str],
    batch_size: int = 16,
    *,
    head_view: bool = False,
) -> Directions:
    """Per-layer mean block outputs at the last prompt token (prompts rendered as the
    model is prompted: chat-templated when it has a template). With `head_view` the
    last layer's state is read after the model's final norm, as the output head reads
    it (transformers' last hidden state); the other layers are unchanged."""
    depth = len(find_layers(model).blocks)
    layers = list(range(depth))
    read = "hidden_states" if head_view else "block"

    def means(prompts: Sequence[str]) -> torch.Tensor:
        texts = [render_prompt(tokenizer, p) for p in prompts]
        hs = hidden_states(model, tokenizer, texts, layers, batch_size=batch_size, read=read)
        return torch.stack([hs[i].double().mean(0) for i in layers]).float()

    return Directions(means(target), means(harmless))
