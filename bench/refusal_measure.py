"""Measures for the refusal-direction experiment (bench/refusal_steer.py): refusal rates
of greedy answers, first-answer-token distributions, and Arditi et al.'s choice of the
layer and post-instruction token whose direction to ablate."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from weightops.compat import causal_lm
from weightops.prompting import pad, render_prompt
from weightops.repair.data import Example, encode, pad_id
from weightops.repair.evaluate import generate, refuses
from weightops.steering import SteeringVector

BATCH = 32
LAST_SHARE = 0.8  # Arditi et al.'s bound on the depth: the last 20 % of layers are skipped
# Directions of the first quarter are not tried either: the instruction's meaning is not
# formed there yet, and each layer tried costs a pass over the prompts on busy CPUs.
FIRST_SHARE = 0.25
# Candidates with the lowest first-token refusal scores whose greedy answers are read.
SHORTLIST = 6


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


def post_instruction_length(tok) -> int:
    """Tokens the chat template puts after the user's text: the end of the turn and the
    assistant header (6 for SmolLM2: `<|im_end|>`, newline, `<|im_start|>`, `ass`,
    `istant`, newline)."""
    text = render_prompt(tok, "Hello")
    return len(tok(text[text.rindex("Hello") + 5 :], add_special_tokens=False).input_ids)


@torch.no_grad()
def post_instruction_states(model, tok, prompts: Sequence[str], n: int) -> torch.Tensor:
    """[prompts, n, depth, hidden] fp32 residual streams at the last `n` tokens of each
    chat-templated prompt, at the output of every decoder block, in one pass per batch
    (transformers' hidden_states[i + 1], which `steer train` reads too except at the
    last block, where transformers gives the final norm's output; the last blocks are
    never candidates)."""
    rows = [encode(Example(p), tok, with_response=False)[0] for p in prompts]
    out = []
    for b in range(0, len(rows), BATCH):
        ids, mask = pad(rows[b : b + BATCH], pad_id(tok), "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hs = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
        ).hidden_states[1:]
        out.append(torch.stack([h[:, -n:] for h in hs], 2).float())
    return torch.cat(out)


def candidates(depth: int, n_positions: int, layer_step: int) -> list[tuple[int, int]]:
    """(layer, position from the end) pairs: every `layer_step`-th layer from a quarter
    to 80 % of the depth, at each post-instruction position."""
    first, last = math.ceil(FIRST_SHARE * depth), math.ceil(LAST_SHARE * depth)
    return [(i, -p) for i in range(first, last, layer_step) for p in range(n_positions, 0, -1)]


def select_direction(
    model,
    tok,
    dirs: torch.Tensor,
    grid: Sequence[tuple[int, int]],
    harmful: Sequence[Example],
    harmless: Sequence[Example],
    tokens: Sequence[int],
    rows: list[dict],
    save: Callable[[list[dict]], None],
    new_tokens: int,
) -> dict:
    """Arditi et al.'s selection over layers and post-instruction positions, with the
    refusals of greedy answers as the last word. Each candidate direction
    (dirs[position, layer]) is ablated in turn (hooks) and scored by the refusal score
    it leaves on `harmful` and the mean first-token KL it causes on `harmless`. The
    first-token score misleads here: directions of the header's earlier tokens lower it
    as much as the last token's does while the answers still refuse after another
    opening word. So the SHORTLIST lowest-scoring candidates are ablated again for
    greedy answers of `new_tokens` to `harmful`, and the fewest refusals win, the KL
    breaking ties. (Arditi et al. drop directions whose ablation moves the harmless
    first-token distribution by a mean KL over 0.1; the aligned model puts so much
    probability on refusal tokens for harmless prompts too that no direction that
    removes refusals moves it that little; docs/steering.md gives the numbers.) `rows`
    from an earlier run with the same settings are reused, and `save` is called after
    each new measurement. Returns the winning row."""
    base = next_token_logprobs(model, tok, harmless) if len(rows) < len(grid) else None
    done = {(r["layer"], r["position"]) for r in rows}
    for layer, pos in grid:
        if (layer, pos) in done:
            continue
        vec = SteeringVector({layer: dirs[pos, layer]}, model_type="", hidden_size=dirs.shape[-1])
        with vec.apply(model, mode="ablate"):
            score = refusal_score(next_token_logprobs(model, tok, harmful), tokens)
            moved = statistics.fmean(kl(base, next_token_logprobs(model, tok, harmless)))
        rows.append({"layer": layer, "position": pos, "score": score, "kl": moved})
        save(rows)
        print(f"  layer {layer:3d} position {pos:2d}  refusal score {score:+.2f}  KL {moved:.3f}",
              flush=True)  # fmt: skip
    for row in sorted(rows, key=lambda r: r["score"])[:SHORTLIST]:
        if "refused" not in row:
            d = dirs[row["position"], row["layer"]]
            vec = SteeringVector({row["layer"]: d}, model_type="", hidden_size=dirs.shape[-1])
            with vec.apply(model, mode="ablate"):
                row["refused"] = refusals(model, tok, harmful, new_tokens)["rate"]
            save(rows)
            print(f"  layer {row['layer']:3d} position {row['position']:2d}  "
                  f"refused {row['refused']:.0%}", flush=True)  # fmt: skip
    return min((r for r in rows if "refused" in r), key=lambda r: (r["refused"], r["kl"]))
