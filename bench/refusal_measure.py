"""Measures for the refusal-direction experiment (bench/refusal_steer.py): refusal rates
of greedy answers, first-answer-token distributions, and Arditi et al.'s choice of the
layer whose direction to ablate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from weightops.compat import causal_lm
from weightops.prompting import pad
from weightops.repair.data import Example, encode, pad_id
from weightops.repair.evaluate import generate, refuses
from weightops.steering import SteeringVector

BATCH = 32
LAST_SHARE = 0.8  # Arditi et al.'s bound on the depth: the last 20 % of layers are skipped
# Directions of the first quarter are not tried either: the instruction's meaning is not
# formed there yet, and each layer tried costs a pass over the prompts on busy CPUs.
FIRST_SHARE = 0.25


def load(folder: Path):
    from transformers import AutoTokenizer

    return causal_lm(folder, torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def refusals(model, tok, examples: Sequence[Example], new_tokens: int) -> dict:
    """Share of greedy answers that read as refusals, with the answers."""
    answers = generate(model, tok, examples, max_new_tokens=new_tokens, batch_size=BATCH)
    refused = [refuses(a) for a in answers]
    return {"rate": sum(refused) / len(refused), "n": len(refused), "answers": answers}


@torch.no_grad()
def next_token_logprobs(model, tok, examples: Sequence[Example]) -> torch.Tensor:
    """[prompts, vocab] fp64 log-probabilities of the first answer token."""
    rows = [encode(ex, tok, with_response=False)[0] for ex in examples]
    out = []
    for b in range(0, len(rows), BATCH):
        ids, mask = pad(rows[b : b + BATCH], pad_id(tok), "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out.append(torch.log_softmax(logits[:, -1].double(), -1))
    return torch.cat(out)


def kl(p: torch.Tensor, q: torch.Tensor) -> list[float]:
    """KL(p ‖ q) per prompt, from log-probabilities (p: the model as it is)."""
    return (p.exp() * (p - q)).sum(-1).tolist()


def refusal_tokens(tok, refusals_seen: Sequence[Example]) -> list[int]:
    """The first tokens of the training refusals (all of them open with "I")."""
    return sorted({encode(ex, tok, with_response=True)[1][0] for ex in refusals_seen})


def refusal_score(logprobs: torch.Tensor, tokens: Sequence[int]) -> float:
    """Arditi et al.'s refusal score: the mean over prompts of the log-odds that the
    answer opens with a refusal token."""
    p = logprobs[:, list(tokens)].exp().sum(-1).clamp(1e-12, 1 - 1e-12)
    return float((p.log() - (-p).log1p()).mean())


def select_layer(
    model,
    tok,
    vec: SteeringVector,
    harmful: Sequence[Example],
    tokens: Sequence[int],
    rows: list[dict] | None = None,
) -> tuple[int, list[dict]]:
    """Arditi et al.'s selection without their KL filter: of the directions of layers
    FIRST_SHARE to LAST_SHARE of the depth, the one whose ablation leaves the lowest
    refusal score on harmful prompts. (Their filter keeps directions whose ablation
    moves harmless prompts' first-token distribution by a mean KL under 0.1; the aligned
    model puts so much probability on refusal tokens for harmless prompts too that
    every direction whose ablation removes refusals moves it by more, so the filter
    would keep only directions that do little; docs/steering.md gives the numbers.)
    `rows` from an earlier call reuse its scores. Returns the layer and one row per
    layer tried."""
    depth = len(vec.layers)
    if rows is None:
        rows = []
        for layer in [i for i in vec.layers if FIRST_SHARE * depth <= i < LAST_SHARE * depth]:
            with vec.apply(model, mode="ablate", layer=layer):
                score = refusal_score(next_token_logprobs(model, tok, harmful), tokens)
            rows.append({"layer": layer, "score": score})
            print(f"  layer {layer:3d}  refusal score {score:+.2f}", flush=True)
    return min(rows, key=lambda r: r["score"])["layer"], rows
