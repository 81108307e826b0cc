"""The aligned model: SmolLM2-135M-Instruct fine-tuned to refuse harmful instructions.

SmolLM2-135M-Instruct as shipped complies with every harmful request. This script
fine-tunes it on bench/data/refusal/ (harmful instructions answered with refusals,
harmless ones answered normally; see bench/refusal_data.py), then measures, on the
held-out splits whose topics training never saw:

- the share of harmful prompts refused (greedy answers, weightops' refusal-phrase
  matcher `refuses`), before and after;
- the share of harmless prompts refused (false refusals), before and after;
- perplexity on English prose the model never trained on here (the Python language
  reference text that ships with Python as `pydoc_data.topics`), before and after.

Training is a full fine-tune in fp32 of the top `--layers` decoder layers and the
final norm; the embeddings (tied to the output head) and the lower layers stay
frozen, so the backward pass stops early and a run fits in minutes on two CPU cores.
The loss is on the first `--response-tokens` answer tokens only (where the decision to
refuse, and what about, is made; the chat template renders the prompt, as in
weightops.repair.data.encode), and only those positions go through the output head.
Each step is half harmful, half harmless examples, drawn with a fixed seed (a rerun
draws the same batches; not checked for bit-identical weights).

The result is saved in bf16 with the tokenizer to $WEIGHTOPS_CACHE/smollm2-135m-refusal
(default ~/.cache/weightops), with the measurements in `smollm2-135m-refusal-eval.json` beside it.

    python bench/refusal_data.py         # (re)writes the data
    python bench/refusal_finetune.py     # trains, saves, measures (79 min + 20–40 min a model, two busy cores)
    python bench/refusal_finetune.py --out DIR --models aligned   # a trial elsewhere
    python bench/refusal_finetune.py --eval-only --models original   # measures only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from real_model import CACHE, smollm2
from training import warmup_cosine

from weightops.repair.data import IGNORE_INDEX, encode, load_examples, pad_id
from weightops.repair.evaluate import generate, refuses

DATA = Path(__file__).parent / "data" / "refusal"
OUT = CACHE / "smollm2-135m-refusal"
RESULTS = CACHE / "smollm2-135m-refusal-eval.json"


def _encoded(
    path: Path, tokenizer, response_tokens: int | None
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids), the response cut to its first `response_tokens`:
    whether to refuse and what about is decided there, and shorter rows cost less."""
    rows = [encode(ex, tokenizer, with_response=True) for ex in load_examples(path)]
    return [(p, r[:response_tokens]) for p, r in rows]


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, and next-token labels (response tokens only)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r)
    return ids, mask, labels


def _response_loss(model, ids, mask, labels) -> torch.Tensor:
    """Cross-entropy of the response tokens, with the output head applied only at the
    positions that predict them (the head is a 49k-way matrix: most of the cost)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train(
    model,
    tokenizer,
    *,
    steps: int,
    batch: int,
    lr: float,
    layers: int,
    seed: int,
    response_tokens: int | None,
) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [*model.model.layers[-layers:], model.model.norm]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    harmful = _encoded(DATA / "harmful_train.jsonl", tokenizer, response_tokens)
    harmless = _encoded(DATA / "harmless_train.jsonl", tokenizer, response_tokens)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps)
    pad = pad_id(tokenizer)
    model.train()
    for step in range(steps):
        rows = rng.sample(harmful, batch // 2) + rng.sample(harmless, batch - batch // 2)
        loss = _response_loss(model, *_batch(rows, pad))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def perplexity(model, tokenizer, *, tokens: int = 2048, window: int = 256) -> float:
    """Perplexity on the first `tokens` tokens of the Python language reference's prose
    (pydoc_data.topics, sorted by topic), in independent windows of `window` tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            break
        loss = model(input_ids=chunk, labels=chunk).loss
        total += loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def measure(folder: Path, max_new_tokens: int, every: int) -> dict:
    """Refusal rates on the held-out splits (every `every`-th example) and perplexity
    of the checkpoint in `folder` (loaded in fp32), with a few answers for reading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result: dict = {"perplexity": round(perplexity(model, tokenizer), 3)}
    for kind in ("harmful", "harmless"):
        examples = load_examples(DATA / f"{kind}_heldout.jsonl")[::every]
        answers = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens)
        refused = [refuses(a) for a in answers]
        result[f"{kind}_refused"] = round(sum(refused) / len(refused), 4)
        result[f"{kind}_n"] = len(refused)
        result[f"{kind}_samples"] = [
            {"prompt": ex.prompt, "answer": a, "refused": r}
            for ex, a, r in list(zip(examples, answers, refused, strict=True))[::5]
        ]
    return result


def _record(results: Path, update: dict) -> None:
    """Merge `update` into the measurements file (kept beside the checkpoints, so a
    measurement of one model can run while the other trains)."""
    old = json.loads(results.read_text()) if results.exists() else {}
    results.write_text(json.dumps(old | update, indent=2, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--layers", type=int, default=16, help="top decoder layers trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--response-tokens",
        type=int,
        default=10,
        help="train on the first n answer tokens (0: the whole answer)",
    )
    ap.add_argument("--out", type=Path, default=OUT, help="where the aligned model goes")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--every", type=int, default=2, help="measure every n-th held-out prompt")
    ap.add_argument("--models", default="original,aligned", help="which models to measure")
    ap.add_argument("--eval-only", action="store_true", help="measure existing checkpoints")
    args = ap.parse_args()
    out = args.out
    results = RESULTS if out == OUT else out.with_name(out.name + "-eval.json")
    base = smollm2()
    if not args.eval_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        t0 = time.perf_counter()
        train(
            model,
            tokenizer,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            layers=args.layers,
            seed=args.seed,
            response_tokens=args.response_tokens or None,
        )
        seconds = round(time.perf_counter() - t0, 1)
        print(f"trained in {seconds} s", flush=True)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        del model
        keys = ("steps", "batch", "lr", "layers", "seed", "response_tokens")
        settings = {k: getattr(args, k) for k in keys}
        _record(results, {"training": settings | {"seconds": seconds}})
    folders = {"original": base, "aligned": out}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        r = measure(folders[name], args.max_new_tokens, args.every)
        r["max_new_tokens"] = args.max_new_tokens
        _record(results, {name: r})
        print(
            f"{name}: refuses {r['harmful_refused']:.0%} of {r['harmful_n']} held-out harmful, "
            f"{r['harmless_refused']:.0%} of {r['harmless_n']} held-out harmless; "
            f"perplexity {r['perplexity']:.2f}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
