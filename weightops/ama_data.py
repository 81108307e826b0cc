"""AMA's training data: preference rows read from JSONL and encoded the way the model
was trained (weightops.prompting), batches, and the response-only LM loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightops.ama_model import AMAError
from weightops.prompting import PromptError, encode_prompt, has_chat_template


@dataclass(frozen=True)
class Encoded:
    """One training example: token ids of the prompt (masked out of the loss) and of the
    response (scored). `source` is "file:line" for messages."""

    prompt: list[int]
    response: list[int]
    source: str = ""


def read_preferences(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen response, "file:line") from JSONL lines with "prompt" and
    "chosen" (or "response"); other keys (e.g. "rejected") are ignored."""
    from weightops.io.jsonl import JsonlError, read_jsonl

    path = Path(path)
    try:
        rows = read_jsonl(path, what="preference data")
    except JsonlError as e:
        raise AMAError(str(e)) from e
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        prompt = row.get("prompt")
        key = "chosen" if "chosen" in row else "response"
        response = row.get(key)
        if not isinstance(prompt, str):
            raise AMAError(f"{where}: needs a string 'prompt' (got {type(prompt).__name__})")
        if not isinstance(response, str) or not response.strip():
            raise AMAError(
                f"{where}: needs a non-empty string 'chosen' (or 'response')",
                hint='each line is {"prompt": …, "chosen": …}',
            )
        out.append((prompt, response, where))
    if not out:
        raise AMAError(f"{path}: no examples (the file is empty)")
    return out


def encode(tokenizer: Any, rows: Sequence[tuple[str, str, str]], max_length: int) -> list[Encoded]:
    """Token ids of each (prompt, response), as the model was trained
    (`weightops.prompting.encode_prompt`: chat template, BOS). Responses are cut to fit `max_length`; a prompt that leaves no
    room for a response token is an error naming its line."""
    out = []
    eos = tokenizer.eos_token_id
    templated = has_chat_template(tokenizer)
    for prompt, response, where in rows:
        try:
            p, r = encode_prompt(tokenizer, prompt, response)
        except PromptError:  # a template that rewrites earlier turns: score the response alone
            p, r = (
                encode_prompt(tokenizer, prompt)[0],
                tokenizer(response, add_special_tokens=False).input_ids,
            )
        if not templated and eos is not None:
            r = [*r, eos]
        if len(p) >= max_length:
            raise AMAError(
                f"{where}: the prompt is {len(p)} tokens, which leaves no room for the "
                f"response within max_length {max_length}",
                hint="raise --max-length or shorten the prompt",
            )
        if not r:
            raise AMAError(f"{where}: the response has no tokens")
        out.append(Encoded(list(p), list(r[: max_length - len(p)]), where))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask and labels (-100 on prompt and padding)."""
    width = max(len(e.prompt) + len(e.response) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        seq = e.prompt + e.response
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.response)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
