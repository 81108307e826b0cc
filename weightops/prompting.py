"""Turning prompts into token ids the way the model was trained.

Every part of weightops that runs a model on text (repair's pruning, restoration and
evaluation, AMA, steering's extraction) encodes it here, so a model sees the same
tokens everywhere.

A prompt (`encode_prompt`):

- When the tokenizer has a chat template, the prompt is a user message rendered with
  the generation prompt; with a response, the conversation [user, assistant] is
  rendered and the response is the text after the prompt's rendering. The template
  writes its own special tokens; the text is tokenized without adding any.
- Otherwise the text is the prompt followed directly by the response (put the
  separator the model was trained with in the data).

Plain text (`encode_text`, steering's contrastive texts) is never templated.

In both cases the BOS rule then applies: the tokenizer's BOS token is put first when
`uses_bos(tokenizer)` and the ids do not already start with it (a template such as
SmolLM2's or Llama's that writes the BOS itself does not get a second one).
`uses_bos` is true when the tokenizer defines a BOS token and

1. the tokenizer adds it itself (Llama, Mistral, Gemma: their post-processor puts it
   first): the model was trained with it; or else
2. its tokenizer_config.json says `add_bos_token` explicitly: that is the answer; or else
3. the BOS is neither the EOS nor a token the chat template opens every turn with.
   A tokenizer that defines a BOS it forgets to add (a fast tokenizer saved without
   its post-processor) would otherwise silently feed the model text it never saw. A
   BOS that is also the EOS (GPT-2's and SmolLM2's `<|endoftext|>`) separates
   documents in training, and a BOS that opens every turn (SmolLM2-Instruct's
   `<|im_start|>`) is the template's; those models are run on text without it, as
   transformers' own pipelines do.

Qwen2 defines no BOS at all and gets none. Response ids never get special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightops.errors import WeightopsError


class PromptError(WeightopsError):
    """A prompt cannot be encoded as the model was trained."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def bos_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's BOS token, or None when it defines none."""
    if getattr(tokenizer, "bos_token", None) is None:
        return None
    value = getattr(tokenizer, "bos_token_id", None)
    return value if isinstance(value, int) else None


def _configured_add_bos(tokenizer: Any) -> bool | None:
    value = (getattr(tokenizer, "init_kwargs", None) or {}).get("add_bos_token")
    if value is None:
        # Recent transformers drop the key when loading; the file still says it.
        config = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text(encoding="utf-8")).get("add_bos_token")
            except (OSError, ValueError):
                value = None
    return value if isinstance(value, bool) else None


def _opens_turns(tokenizer: Any, token: str) -> bool:
    if not has_chat_template(tokenizer):
        return False
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about the BOS
        return False
    return text.count(token) > 1


def uses_bos(tokenizer: Any) -> bool:
    """Whether text for this tokenizer's model starts with its BOS token (the rule in
    the module docstring)."""
    bos = bos_id(tokenizer)
    if bos is None:
        return False
    if _ids(tokenizer, "a", special=True)[:1] == [bos]:
        return True
    configured = _configured_add_bos(tokenizer)
    if configured is not None:
        return configured
    if bos == getattr(tokenizer, "eos_token_id", None):
        return False
    return not _opens_turns(tokenizer, str(tokenizer.bos_token))


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = bos_id(tokenizer)
    if uses_bos(tokenizer) and ids[:1] != [bos]:
        return [bos, *ids]
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text (no chat template), with the BOS when the model uses one."""
    return _with_bos(tokenizer, _ids(tokenizer, text))


def render_prompt(tokenizer: Any, prompt: str, response: str | None = None) -> str:
    """The text of a prompt (and response): chat-templated when the tokenizer has a
    template, else the prompt followed directly by the response. No BOS is added here."""
    if not has_chat_template(tokenizer):
        return prompt + (response or "")
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_prompt(
    tokenizer: Any, prompt: str, response: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as the model was trained (module docstring); the
    response ids are empty without a response. Raises PromptError when a chat template
    does not render the prompt as the start of the conversation."""
    head = render_prompt(tokenizer, prompt)
    prompt_ids = _with_bos(tokenizer, _ids(tokenizer, head))
    if response is None:
        return prompt_ids, []
    if not has_chat_template(tokenizer):
        return prompt_ids, _ids(tokenizer, response)
    whole = render_prompt(tokenizer, prompt, response)
    if not whole.startswith(head):
        raise PromptError(
            "the tokenizer's chat template does not render a prompt as the start of its "
            "conversation, so the response cannot be told apart",
            hint="fix the template, or remove it to use plain prompt + response text",
        )
    # Tokenized apart so that no token straddles the prompt/response boundary.
    return prompt_ids, _ids(tokenizer, whole[len(head) :])


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(rows), longest] padded on `side` ("left" or
    "right", as a tokenizer's padding_side)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, at] = torch.tensor(list(row), dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def pad_id(tokenizer: Any) -> int:
    """The id written into padding (masked out everywhere, so any valid id will do)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    decided: Callable[[str], bool] | None = None,
) -> list[str]:
    """The greedy completion of each encoded prompt, cut at the end-of-sequence token.
    Rows are padded on the left, so that every row's next token comes at one index.

    decided(text): true once a completion's text so far settles whatever the caller
    wants to know of it (say, it holds a refusal), which no later token may undo; the
    completion is then cut there, and a batch stops once every row is settled. Rows
    do not interact, so the others come out as they would without it."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    pad_value = pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_value,
        eos_token_id=eos,
    )
    texts = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad(rows[start : start + batch_size], pad_value, "left")
        settled = None if decided is None else _Settled(tokenizer, ids.shape[1], eos, decided)
        result = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            stopping_criteria=None if settled is None else StoppingCriteriaList([settled]),
        )
        for i, row in enumerate(result[:, ids.shape[1] :].tolist()):
            if settled is not None and i in settled.length:
                row = row[: settled.length[i]]
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


class _Settled:
    """A stopping criterion of `greedy_completions`: marks each row done once
    `decided` holds for its text, and remembers how many new tokens it had then."""

    def __init__(self, tokenizer: Any, start: int, eos: int | None, decided: Callable) -> None:
        self.tokenizer, self.start, self.eos, self.decided = tokenizer, start, eos, decided
        self.length: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(input_ids[:, self.start :].tolist()):
            if i not in self.length:
                if self.eos is not None and self.eos in row:
                    continue  # finished anyway; the caller cuts it at the end of sequence
                if not self.decided(self.tokenizer.decode(row, skip_special_tokens=True)):
                    continue
                self.length[i] = len(row)
            done[i] = True
        return done
