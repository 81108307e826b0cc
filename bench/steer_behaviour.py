"""Steer a tiny, freshly trained model from one answer style to the other.

A four-block Llama with a character vocabulary is trained here, on CPU, to answer
short questions in one of two styles:

    [calm] Q: bako?\nA: i think bako is warm.      (style A: lowercase, ends with ".")
    [loud] Q: bako?\nA: I THINK BAKO IS WARM!      (style B: uppercase, ends with "!")

Without a marker it answers in style A (90 % of the unmarked training answers). A
steering vector is extracted from 32 contrastive pairs (the same question with the
[loud] marker and with the [calm] marker, read at the last prompt token), the layer is
chosen by `search_layers`, and unmarked questions about held-out words are steered at
a sweep of strengths. For each strength the script reports

- style-B share: greedy answers whose letters are mostly uppercase (the target);
- log-odds B:A: log p(style-B answer) - log p(style-A answer) of reference answers,
  a continuous version of the target;
- well-formed: greedy answers that are a complete, correct answer in either style;
- perplexity of held-out marked text of both styles (the helpfulness proxy).

Run: python bench/steer_behaviour.py   (about three minutes on two CPU cores, most of
it training; nothing is written outside a temporary folder, which is removed.)
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from training import small_llama, train_lm

from weightops.steering import SteeringVector
from weightops.steering.extract import SweepPoint, hidden_states, search_layers, sweep_strength

SEED = 0
CHARS = " \n.,!?:[]" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEMPLATES = ("i think {t} is {a}.", "{t} is {a}.", "yes, {t} is {a}.")
ADJECTIVES = ("good", "warm", "new", "old", "fine", "big", "soft", "dark")
MARK_A, MARK_B = "[calm] ", "[loud] "
N_PAIRS = 32
N_EVAL = 20  # held-out unmarked questions that are generated and scored
N_NEUTRAL = 20  # held-out words whose marked answers (both styles) measure perplexity
GEN_TOKENS = 24


# ---------------------------------------------------------------- data


def make_words(n: int, rng: random.Random) -> list[str]:
    """Pronounceable made-up words, so answers must copy the word from the question."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.choice((2, 2, 3))))
        if rng.random() < 0.3:
            w += rng.choice(cons)
        words.add(w)
    return sorted(words)


def answer(word: str, template: int, adjective: str, style: str) -> str:
    text = TEMPLATES[template].format(t=word, a=adjective)
    return text if style == "A" else text.upper()[:-1] + "!"


def prompt(word: str, marker: str = "") -> str:
    return f"{marker}Q: {word}?\nA: "


def reference(word: str) -> tuple[int, str]:
    """A fixed template and adjective per word, for the reference answers."""
    h = sum(ord(c) * (i + 1) for i, c in enumerate(word))
    return h % len(TEMPLATES), ADJECTIVES[h % len(ADJECTIVES)]


def training_text(word: str, rng: random.Random) -> str:
    template, adjective = rng.randrange(len(TEMPLATES)), rng.choice(ADJECTIVES)
    r = rng.random()
    if r < 0.3:
        marker, style = MARK_A, "A"
    elif r < 0.6:
        marker, style = MARK_B, "B"
    else:  # unmarked: the model's default is style A
        marker, style = "", ("B" if rng.random() < 0.1 else "A")
    return prompt(word, marker) + answer(word, template, adjective, style) + "\n"


# ---------------------------------------------------------------- model


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    # Save and reload, as a real checkpoint's tokenizer would be.
    with tempfile.TemporaryDirectory() as folder:
        fast.save_pretrained(folder)
        return PreTrainedTokenizerFast.from_pretrained(folder)


def train(model, tokenizer, words: Sequence[str], steps: int, batch: int) -> float:
    rng = random.Random(SEED + 1)
    return train_lm(
        model,
        tokenizer,
        lambda: [training_text(rng.choice(words), rng) for _ in range(batch)],
        steps,
        lr=3e-3,
        weight_decay=0.01,
    )


# ---------------------------------------------------------------- measures


def generate(model, tokenizer, texts: Sequence[str]) -> list[str]:
    """Greedy answers (up to the first newline), in one left-padded batch."""
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=1
        )
    new = out[:, enc.input_ids.shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0] for row in new]


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def well_formed(text: str, word: str) -> bool:
    """A complete answer in either style that repeats the asked word."""
    forms = [answer(word, t, a, s) for t in range(len(TEMPLATES)) for a in ADJECTIVES for s in "AB"]
    return text.strip() in forms


@torch.no_grad()
def log_odds(model, tokenizer, words: Sequence[str]) -> float:
    """Mean over words of log p(style-B reference answer) - log p(style-A one)."""

    def logp(p: str, a: str) -> float:
        ids = tokenizer(p + a + "\n", return_tensors="pt").input_ids
        n = len(tokenizer(p).input_ids)
        logits = model(ids).logits[0, :-1].log_softmax(-1)
        tgt = ids[0, 1:]
        return float(logits.gather(1, tgt[:, None])[n - 1 :].sum())

    total = 0.0
    for w in words:
        t, a = reference(w)
        total += logp(prompt(w), answer(w, t, a, "B")) - logp(prompt(w), answer(w, t, a, "A"))
    return total / len(words)


@dataclass
class Detail:
    upper: float
    well_formed: float
    well_formed_b: float
    log_odds: float
    samples: list[str]


def make_target(tokenizer, words: Sequence[str], details: list[Detail]):
    """The sweep's target: share of greedy answers in style B; records extra measures."""

    def target(model) -> float:
        outs = generate(model, tokenizer, [prompt(w) for w in words])
        ups = [upper_share(o) for o in outs]
        good = [well_formed(o, w) for o, w in zip(outs, words, strict=True)]
        details.append(
            Detail(
                upper=sum(ups) / len(ups),
                well_formed=sum(good) / len(words),
                well_formed_b=sum(g and u > 0.5 for g, u in zip(good, ups, strict=True))
                / len(words),
                log_odds=log_odds(model, tokenizer, words),
                samples=outs,
            )
        )
        return sum(u > 0.5 for u in ups) / len(ups)

    return target


def fit_r2(x: Sequence[float], y: Sequence[float], powers: Sequence[int]) -> float:
    """R² of a least-squares fit of y on 1 and x**p for p in powers."""
    xs = torch.tensor(x, dtype=torch.float64)
    ys = torch.tensor(y, dtype=torch.float64)
    a = torch.stack([torch.ones_like(xs), *[xs**p for p in powers]], dim=1)
    coef = torch.linalg.lstsq(a, ys[:, None]).solution
    resid = ys - (a @ coef)[:, 0]
    total = ((ys - ys.mean()) ** 2).sum()
    return float(1 - (resid**2).sum() / total) if total > 0 else 1.0


# ---------------------------------------------------------------- main


def sweep_table(points: list[SweepPoint], details: list[Detail], norm: float) -> str:
    rows = [
        "| strength | injected norm | style-B share | uppercase letters | log-odds B:A "
        "| well-formed | well-formed in B | perplexity |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, d in zip(points, details, strict=True):
        rows.append(
            f"| {p.strength:g} | {p.strength * norm:.2f} | {p.target:.2f} | {d.upper:.2f} "
            f"| {d.log_odds:+.1f} | {d.well_formed:.2f} | {d.well_formed_b:.2f} | {p.perplexity:.3f} |"
        )
    return "\n".join(rows)


def fits(points: list[SweepPoint], details: list[Detail], norm: float, upto: float) -> str:
    """How log-odds and log-perplexity grow with the injected norm, over strengths ≤ upto."""
    keep = [i for i, p in enumerate(points) if p.strength <= upto]
    x = [points[i].strength * norm for i in keep]
    lo = [details[i].log_odds for i in keep]
    base = math.log(points[0].perplexity)
    dlp = [math.log(points[i].perplexity) - base for i in keep]
    out = [
        f"fits over strengths 0…{upto:g} ({len(keep)} points), R² of y ~ 1 + x / y ~ 1 + x² / y ~ 1 + x + x²:"
    ]
    for name, y in (("log-odds B:A", lo), ("Δ log perplexity", dlp)):
        r = [fit_r2(x, y, p) for p in ((1,), (2,), (1, 2))]
        out.append(f"  {name:17s} linear {r[0]:.3f}   quadratic {r[1]:.3f}   both {r[2]:.3f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1600, help="training steps (default 1600)")
    ap.add_argument("--batch", type=int, default=32, help="training batch size (default 32)")
    args = ap.parse_args()

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(SEED)
    t0 = time.perf_counter()

    rng = random.Random(SEED)
    words = make_words(4000 + N_EVAL + N_NEUTRAL + N_PAIRS, rng)
    rng.shuffle(words)
    eval_words = words[:N_EVAL]
    neutral_words = words[N_EVAL : N_EVAL + N_NEUTRAL]
    pair_words = words[N_EVAL + N_NEUTRAL : N_EVAL + N_NEUTRAL + N_PAIRS]
    train_words = words[N_EVAL + N_NEUTRAL + N_PAIRS :]

    tokenizer = make_tokenizer()
    model = small_llama(len(tokenizer), hidden=128, mlp=384, layers=4, seed=SEED)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama, 4 blocks, hidden 128, {n_params / 1e6:.2f} M parameters; "
        f"{len(train_words)} training words, {args.steps} steps"
    )
    final_loss = train(model, tokenizer, train_words, args.steps, args.batch)
    t_train = time.perf_counter() - t0
    print(f"trained in {t_train:.0f} s (last batch loss {final_loss:.3f})")

    # The pairs and the neutral text use words the model never saw in training.
    pairs = [(prompt(w, MARK_B), prompt(w, MARK_A)) for w in pair_words]
    neutral = []
    for w in neutral_words:
        t, a = reference(w)
        neutral += [
            prompt(w, MARK_A) + answer(w, t, a, "A"),
            prompt(w, MARK_B) + answer(w, t, a, "B"),
        ]

    ranking = search_layers(model, tokenizer, pairs, method="mean_diff")
    print("\nlayer search (mean_diff, 8 of the 32 pairs held out):")
    print("| layer | held-out accuracy | margin |\n|---:|---:|---:|")
    for s in ranking:
        print(f"| {s.layer} | {s.accuracy:.2f} | {s.margin:.2f} |")
    layer = ranking[0].layer

    mean_vec = SteeringVector.train(model, tokenizer, pairs, method="mean_diff", layers=[layer])
    pca_vec = SteeringVector.train(model, tokenizer, pairs, method="pca_diff", layers=[layer])
    norm = float(mean_vec.directions[layer].norm())
    cos = float(
        torch.nn.functional.cosine_similarity(
            mean_vec.directions[layer], pca_vec.directions[layer], dim=0
        )
    )
    # Diagnostic: pca_diff centres the differences h+ - h-; the first singular vector of
    # the uncentred differences keeps their common shift.
    h = hidden_states(model, tokenizer, [t for p in pairs for t in p], [layer])[layer]
    raw = torch.linalg.svd((h[0::2] - h[1::2]).double(), full_matrices=False).Vh[0].float()
    cos_raw = abs(
        float(torch.nn.functional.cosine_similarity(mean_vec.directions[layer], raw, dim=0))
    )
    print(
        f"\nlayer {layer}: |mean_diff| = {norm:.2f}, cos(mean_diff, pca_diff) = {cos:.3f}, "
        f"|cos(mean_diff, uncentred first PC of the differences)| = {cos_raw:.3f}"
    )

    strengths = [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    results = {}
    # pca_diff is unit norm: scale it to the mean_diff norm so equal strengths inject equal norms.
    for name, vec in (("mean_diff", mean_vec), ("pca_diff", pca_vec * norm)):
        details: list[Detail] = []
        target = make_target(tokenizer, eval_words, details)
        points = sweep_strength(model, tokenizer, vec, strengths, target, neutral)
        results[name] = (points, details)
        print(f"\n{name} at layer {layer} (strength 1 = a vector of norm {norm:.2f}):")
        print(sweep_table(points, details, norm))
        print(fits(points, details, norm, upto=0.3))
        print(fits(points, details, norm, upto=max(strengths)))

    points, details = results["mean_diff"]
    best = max(range(len(points)), key=lambda i: details[i].well_formed_b)
    chosen = points[best].strength
    print(f"\nchosen strength (most well-formed style-B answers, mean_diff): {chosen:g}")
    print("example answers (mean_diff):")
    for i, p in enumerate(points):
        if p.strength in (0, chosen, max(strengths)):
            for w, out in list(zip(eval_words, details[i].samples, strict=True))[:2]:
                print(f"  strength {p.strength:g}: {prompt(w)!r} -> {out!r}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
