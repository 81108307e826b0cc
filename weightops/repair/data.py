"""Prompts and responses for repair: reading them, rendering them, batching them.

Data files are JSON Lines, one example per line:

    {"prompt": "How do I pick a lock?", "response": "I can't help with that."}
    {"prompt": "Classify the sentiment: great film!"}

`prompt` is a non-empty string; `response` is a string, null or absent. Any other key
is an error (a misspelt "respone" would otherwise silently drop the response).

How an example becomes tokens (`encode`, `batches`): as the model was trained, by
`weightops.prompting.encode_prompt`: the chat template when the tokenizer has one,
else the prompt followed directly by the response with nothing in between (put the
separator the model was trained with, a space, a newline, in the data), and the BOS
first when the model uses one (the rule is in weightops/prompting.py). The prompt and
the response are tokenized separately and joined, so a token never straddles the
boundary and `labels` mark exactly the response. No end-of-sequence token is added
after the response (chat templates add their own end of turn).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightops.errors import WeightopsError
from weightops.io.jsonl import JsonlError, read_jsonl
from weightops.prompting import PromptError, encode_prompt, pad_id, render_prompt

KEYS = ("prompt", "response")
IGNORE_INDEX = -100


class RepairError(WeightopsError):
    """A repair (pruning, restoration, evaluation) cannot run as asked."""


class DataError(RepairError):
    """A prompt/response data file is missing, empty or unusable."""


class DataLineError(DataError):
    """One example of a data file is unusable; `path` and `line` say which."""

    def __init__(self, where: str, reason: str, *, hint: str | None = None) -> None:
        self.where = where
        self.reason = reason
        path, _, line = where.rpartition(":")
        self.path = Path(path) if path else None
        self.line = int(line) if line.isdigit() else None
        super().__init__(f"{where}: {reason}", hint=hint)


@dataclass(frozen=True)
class Example:
    """A prompt, and optionally the response that should follow it.

    `source` ("file.jsonl:12") is where it was read from, for error messages; it takes
    no part in comparisons."""

    prompt: str
    response: str | None = None
    source: str | None = field(default=None, compare=False, repr=False, kw_only=True)


def load_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file (see the module docstring for the format)."""
    path = Path(path)
    try:
        rows = read_jsonl(path, what="examples")
    except JsonlError as e:
        if e.line is None:
            raise DataError(e.message, hint=e.hint) from e
        raise DataLineError(f"{path}:{e.line}", e.reason) from e
    examples = []
    for n, row in rows:
        where = f"{path}:{n}"
        unknown = sorted(set(row) - set(KEYS))
        if unknown:
            raise DataLineError(
                where,
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                hint='each line is {"prompt": …} or {"prompt": …, "response": …}',
            )
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise DataLineError(
                where,
                "missing 'prompt'"
                if prompt is None
                else f"'prompt' must be a string, not {type(prompt).__name__}",
            )
        if not prompt.strip():
            raise DataLineError(where, "'prompt' is empty")
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise DataLineError(
                where, f"'response' must be a string or null, not {type(response).__name__}"
            )
        examples.append(Example(prompt, response, source=where))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def as_examples(data: Sequence[Example] | str | Path | None) -> list[Example] | None:
    """Examples given directly or as a JSONL path (None stays None)."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_examples(data)
    return list(data)


def render(example: Example, tokenizer: Any, *, with_response: bool) -> str:
    """The text of an example: the prompt as the model sees it before answering, or,
    `with_response`, followed by the response (no BOS: `encode` adds it)."""
    return render_prompt(tokenizer, example.prompt, example.response if with_response else None)


def describe_example(example: Example, index: int) -> str:
    return example.source or f"example {index}"


def encode(example: Example, tokenizer: Any, *, with_response: bool) -> tuple[list[int], list[int]]:
    """(prompt token ids, response token ids) of an example, as the model was trained."""
    response = example.response if with_response else None
    try:
        return encode_prompt(tokenizer, example.prompt, response)
    except PromptError as e:
        raise DataError(e.message, hint=e.hint) from e


def context_length(model_or_config: Any) -> int | None:
    """The longest sequence a model takes (max_position_embeddings, n_positions), if known."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer_limit(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    # transformers uses a huge sentinel when the tokenizer does not know the model's limit.
    return value if isinstance(value, int) and 0 < value < 10**9 else None


def check_lengths(
    examples: Sequence[Example], tokenizer: Any, max_length: int | None
) -> list[tuple[list[int], list[int]]]:
    """Encode every example, refusing prompts that do not fit in `max_length` tokens."""
    encoded = []
    for i, ex in enumerate(examples):
        prompt, response = encode(ex, tokenizer, with_response=True)
        if not prompt:
            raise DataLineError(describe_example(ex, i), "the prompt encodes to no tokens")
        if max_length is not None and len(prompt) > max_length:
            raise DataLineError(
                describe_example(ex, i),
                f"the prompt is {len(prompt)} tokens, longer than the model's context of "
                f"{max_length}",
                hint="shorten the prompt or leave it out",
            )
        encoded.append((prompt, response))
    return encoded


def batches(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    batch_size: int = 8,
    with_response: bool = True,
    max_length: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of examples, in order.

    Each batch has `input_ids`, `attention_mask` and `position_ids` ([B, T]; pass these
    three to the model), `last` ([B]: the index of each row's last prompt token, where a
    prompt's hidden state is read) and `labels` ([B, T]: the response tokens, -100 on
    the prompt and the padding; all -100 without `with_response` or for an example
    without a response).

    `max_length` is the model's context (default: the tokenizer's `model_max_length`
    when it is set; pass `context_length(model)` to use the config's
    max_position_embeddings). A prompt longer than that is an error naming its line;
    a response that does not fit is cut at the context."""
    if batch_size < 1:
        raise RepairError(f"batch_size must be at least 1 (got {batch_size})")
    limit = max_length if max_length is not None else _tokenizer_limit(tokenizer)
    encoded = check_lengths(examples, tokenizer, limit)
    pad = pad_id(tokenizer)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        rows = []
        for prompt, response in chunk:
            response = response if with_response else []
            if limit is not None:
                response = response[: limit - len(prompt)]
            rows.append((prompt, response))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        last = torch.empty(len(rows), dtype=torch.long)
        for j, (prompt, response) in enumerate(rows):
            n, m = len(prompt), len(response)
            ids[j, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
            mask[j, : n + m] = 1
            if m:
                labels[j, n : n + m] = torch.tensor(response, dtype=torch.long)
            last[j] = n - 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
            "last": last.to(device),
            "labels": labels.to(device),
        }
