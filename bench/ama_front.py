"""Reward vs alignment tax: single-ratio model averaging against AMA, on tiny models.

For each seed, two character-level Llamas (6 blocks) are trained here on CPU:

- "SFT" (θ_pre) on a mix of two kinds of text: corpus A, the capability the RLHF
  stage should not lose (sentences of a small grammar,
  `the calm fox lifts the red kettle.`), and corpus B, question/answer pairs
  (`q: what does the red fox do?\\na:`) whose preferred answers follow a fixed rule
  (each noun has its own verb, and the answer ends `politely!`); 30 % of the SFT
  answers are preferred, the rest take a random verb and no `politely`.
- "RLHF" (θ_post): the SFT model fine-tuned further on preferred B answers only (a
  reward-ranked fine-tune), at the SFT learning rate, so the update is large: it gains
  reward and forgets part of A (the alignment tax).

Every training text ends with `<eos>`, as the AMA search frames its responses.

B questions come from 100 (adjective, noun) pairs; 20 of them (adjective index +
noun index ≡ 0 mod 5, each noun twice) are held out of every training stage (SFT,
RLHF and the AMA search data) and used only to measure the reward.

Measures, on held-out data only:
- reward = preference margin: log p(preferred answer) − log p(rejected answer) in nats,
  summed over the answer tokens, averaged over 256 held-out questions; the rejected
  answer has another verb and no `politely` (the log-odds a Bradley–Terry model gives
  the preferred answer). Unlike the likelihood of the preferred answer it does not
  saturate: it keeps growing as RLHF makes the model surer. Higher is better.
- tax = loss in nats per character on 256 fresh corpus-A sentences. Lower is better.

Points, each at a mean ratio (θ_pre's share):
- single ratio, every tensor averaged: α·θ_pre + (1 − α)·θ_post, α = 0, 0.05, …, 1
  (the paper's model averaging);
- single ratio with the AMA reference's blend (linear weights at α, embeddings and
  norms from θ_pre, lm_head at α) — the family AMA searches in;
- fixed partwise ratios: the whole budget in the low half of the blocks, or in the
  high half (Lin et al.: averaging the low layers helps most);
- AMA: `weightops.ama.search` with its own objective (LM loss of the preferred
  answers to 256 training-split questions + L1 pull to the budget), one ratio per
  layer, at several budgets, with the reference blend and with every tensor blended;
- a control for each AMA point: its learned ratios put on the layers in a random
  order (same mean, same spread, placement not searched).

Each AMA or partwise point is compared with its seed's single-ratio fronts: Δtax is
its tax minus the front's tax at the same reward (the lower envelope of the front,
linearly interpolated between grid points), Δreward its reward minus the front's
reward at the same tax. Negative Δtax / positive Δreward means the point beats the
front. Table cells are mean ± standard deviation over seeds, and how many seeds beat
the front.

Run: python bench/ama_front.py   (about 6 minutes per seed on two shared CPU cores, 3
of them training the two models, which are cached in bench/.work/ama/models/; the rows
go to bench/.work/ama/front.json and the tables of docs/ama.md are printed;
`--report` prints them again from front.json.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import torch
from training import small_llama, train_lm

from weightops.ama import search
from weightops.demo import quiet_transformers
from weightops.merge.model_averaging import ratio_for
from weightops.merge.registry import Blocks

CHARS = " \n.!?:" + "abcdefghijklmnopqrstuvwxyz"
ADJ = ("red", "calm", "old", "tiny", "bold", "wet", "soft", "dark", "loud", "pale")
NOUN = ("fox", "kettle", "robot", "lamp", "crow", "river", "miner", "cloud", "drum", "boat")
VERB = ("lifts", "paints", "finds", "pulls", "hides", "turns", "feeds", "holds", "cuts", "moves")
# The B preference rule: each noun has one verb, and preferred answers are polite.
RULE = {n: VERB[(i * 3 + 1) % len(VERB)] for i, n in enumerate(NOUN)}
PAIRS = [(a, n) for a in range(len(ADJ)) for n in range(len(NOUN))]
HELD_OUT = [(ADJ[a], NOUN[n]) for a, n in PAIRS if (a + n) % 5 == 0]
TRAIN = [(ADJ[a], NOUN[n]) for a, n in PAIRS if (a + n) % 5 != 0]
LAYERS = 6
DATA_VERSION = 3  # part of the cache key: bump when the data or the model changes
OUT = Path(__file__).resolve().parent / ".work" / "ama"


# ---------------------------------------------------------------- data


def a_line(rng: random.Random) -> str:
    return (
        f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} "
        f"the {rng.choice(ADJ)} {rng.choice(NOUN)}.\n"
    )


def b_prompt(adj: str, noun: str) -> str:
    return f"q: what does the {adj} {noun} do?\na:"


def b_preferred(adj: str, noun: str) -> str:
    return f" the {adj} {noun} {RULE[noun]} politely!\n"


def b_rejected(adj: str, noun: str, rng: random.Random) -> str:
    verb = rng.choice([v for v in VERB if v != RULE[noun]])
    return f" the {adj} {noun} {verb}.\n"


def sft_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return a_line(rng)
    adj, noun = rng.choice(TRAIN)
    if rng.random() < 0.3:
        answer = b_preferred(adj, noun)
    else:
        answer = f" the {adj} {noun} {rng.choice(VERB)}.\n"
    return b_prompt(adj, noun) + answer


def rlhf_text(rng: random.Random) -> str:
    adj, noun = rng.choice(TRAIN)
    return b_prompt(adj, noun) + b_preferred(adj, noun)


# ---------------------------------------------------------------- model


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )


def train(model, tok, make, steps: int, lr: float, seed: int, batch: int = 32) -> None:
    rng = random.Random(seed)
    # Every text ends with <eos>, as the AMA search frames its responses.
    train_lm(
        model,
        tok,
        lambda: [make(rng) + tok.eos_token for _ in range(batch)],
        steps,
        lr=lr,
        weight_decay=0.0,
    )


def trained_pair(args, seed: int) -> tuple[Path, Path]:
    """SFT and RLHF checkpoints for `seed`, trained once and cached."""
    from transformers import AutoModelForCausalLM

    key = f"v{DATA_VERSION}-seed{seed}-sft{args.sft_steps}-rlhf{args.rlhf_steps}-lr{args.rlhf_lr:g}"
    folder = OUT / "models" / key
    sft, rlhf = folder / "sft", folder / "rlhf"
    if (rlhf / "config.json").exists():
        return sft, rlhf
    tok = make_tokenizer()
    model = small_llama(len(tok), hidden=64, mlp=192, layers=LAYERS, seed=seed)
    print(f"seed {seed}: training the SFT model (A + B text)", flush=True)
    train(model, tok, sft_text, args.sft_steps, 3e-3, 1000 * seed + 1)
    model.save_pretrained(sft)
    tok.save_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft)
    print(f"seed {seed}: fine-tuning on preferred B answers only (the RLHF stage)", flush=True)
    train(model, tok, rlhf_text, args.rlhf_steps, args.rlhf_lr, 1000 * seed + 2)
    tmp = folder / "rlhf.tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(rlhf)
    return sft, rlhf


# ---------------------------------------------------------------- measures


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


class Meter:
    """Fixed held-out batches: B preference pairs (reward) and A text (tax)."""

    def __init__(self, tok, seed: int, n: int = 256) -> None:
        rng = random.Random(10_000 + seed)
        self.a = tok([a_line(rng) for _ in range(n)], padding=True, return_tensors="pt")
        self.a_labels = self.a.input_ids.masked_fill(self.a.attention_mask == 0, -100)
        ids, labels = [], []
        for _ in range(n):
            adj, noun = rng.choice(HELD_OUT)
            prompt = tok(b_prompt(adj, noun)).input_ids
            for answer in (b_preferred(adj, noun), b_rejected(adj, noun, rng)):
                r = tok(answer).input_ids
                ids.append(prompt + r)
                labels.append([-100] * len(prompt) + r)
        self.b_ids = _pad(ids, 0)
        self.b_mask = _pad([[1] * len(x) for x in ids], 0)
        self.b_labels = _pad(labels, -100)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        def token_nll(ids, mask, labels) -> torch.Tensor:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            )

        a = token_nll(self.a.input_ids, self.a.attention_mask, self.a_labels)
        tax = (a.sum() / (self.a_labels[:, 1:] != -100).sum()).item()
        b = token_nll(self.b_ids, self.b_mask, self.b_labels).sum(1)  # nats per answer
        chosen, rejected = -b[0::2], -b[1::2]
        n_chosen = (self.b_labels[0::2, 1:] != -100).sum()
        return {
            "reward": (chosen - rejected).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(),
            "chosen_ll_per_token": (chosen.sum() / n_chosen).item(),
            "tax": tax,
        }


def blend(pre: dict, post: dict, alpha: float, blocks=None, others: str = "alpha") -> dict:
    table = None if blocks is None else Blocks.parse(blocks)[0]
    out = {}
    for name, p in pre.items():
        a = ratio_for(name, tuple(p.shape), alpha, table, others)
        out[name] = torch.lerp(post[name], p, a)
    return out


# ---------------------------------------------------------------- fronts


def _segments(rows: list[dict], kind: str) -> list[tuple[tuple[float, float], ...]]:
    pts = sorted((r["mean_ratio"], r["reward"], r["tax"]) for r in rows if r["kind"] == kind)
    return [((r0, t0), (r1, t1)) for (_, r0, t0), (_, r1, t1) in itertools.pairwise(pts)]


def front_tax(rows: list[dict], kind: str, reward: float) -> float | None:
    """The lowest tax the single-ratio curve `kind` reaches at `reward`, interpolated
    linearly between grid points; None outside its reward range."""
    best = None
    for (r0, t0), (r1, t1) in _segments(rows, kind):
        lo, hi = min(r0, r1), max(r0, r1)
        if lo <= reward <= hi:
            t = min(t0, t1) if hi == lo else t0 + (t1 - t0) * (reward - r0) / (r1 - r0)
            best = t if best is None else min(best, t)
    return best


def front_reward(rows: list[dict], kind: str, tax: float) -> float | None:
    """The highest reward the single-ratio curve `kind` reaches at `tax`."""
    best = None
    for (r0, t0), (r1, t1) in _segments(rows, kind):
        lo, hi = min(t0, t1), max(t0, t1)
        if lo <= tax <= hi:
            r = max(r0, r1) if hi == lo else r0 + (r1 - r0) * (tax - t0) / (t1 - t0)
            best = r if best is None else max(best, r)
    return best


FRONTS = {"plain": "single ratio", "blend": "single ratio, AMA blend"}


# ---------------------------------------------------------------- the run


def run_seed(args, seed: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    sft, rlhf = trained_pair(args, seed)
    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    post = {
        k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(rlhf).state_dict().items()
    }
    meter = Meter(tok, seed)

    def score(state: dict) -> dict[str, float]:
        model.load_state_dict(state)
        return meter(model)

    rows: list[dict] = []
    for a in [round(0.05 * i, 2) for i in range(21)]:
        for others, label in (("alpha", FRONTS["plain"]), ("pre", FRONTS["blend"])):
            rows.append(dict(kind=label, mean_ratio=a, **score(blend(pre, post, a, others=others))))
    half = LAYERS // 2
    for b in args.budgets:
        if 2 * b > 1:
            continue
        low = [[0, half - 1, 2 * b], [half, LAYERS - 1, 0.0]]
        high = [[0, half - 1, 0.0], [half, LAYERS - 1, 2 * b]]
        for blocks, label in ((low, "low half only"), (high, "high half only")):
            m = score(blend(pre, post, b, blocks, others="pre"))
            rows.append(dict(kind=label, mean_ratio=b, blocks=blocks, **m))
    rng = random.Random(20_000 + seed)
    shuffle = random.Random(30_000 + seed)
    prefs = [(b_prompt(*p), b_preferred(*p)) for p in (rng.choice(TRAIN) for _ in range(256))]
    for others, label in (("pre", "AMA, AMA blend"), ("alpha", "AMA, every tensor")):
        for budget in args.budgets:
            t0 = time.perf_counter()
            result = search(
                sft,
                rlhf,
                data=prefs,
                groups="layer",
                budget=budget,
                lr=args.ama_lr,
                epochs=args.ama_epochs,
                batch_size=16,
                others=others,
                seed=seed,
                progress=False,
            )
            blocks = [
                [a, b, min(r, 1.0)] for (a, b), r in zip(result.groups, result.ratios, strict=True)
            ]
            m = score(blend(pre, post, budget, blocks, others=others))
            rows.append(
                dict(
                    kind=label,
                    mean_ratio=budget,
                    ratios=[round(r, 3) for r in result.ratios],
                    objective=[
                        round(result.history[0].objective, 5),
                        round(result.history[-1].objective, 5),
                    ],
                    seconds=round(time.perf_counter() - t0, 1),
                    **m,
                )
            )
            # Control: the same ratios in a random order over the layers. It shows
            # whether the searched placement matters or any uneven spread would do.
            order = list(range(len(blocks)))
            while order == sorted(order):
                shuffle.shuffle(order)
            mixed = [[a, b, blocks[j][2]] for (a, b, _), j in zip(blocks, order, strict=True)]
            m = score(blend(pre, post, budget, mixed, others=others))
            rows.append(
                dict(
                    kind=f"{label}, ratios shuffled",
                    mean_ratio=budget,
                    ratios=[round(x[2], 3) for x in mixed],
                    **m,
                )
            )
            print(
                f"  seed {seed} {label} {budget}: ratios {rows[-2]['ratios']} "
                f"reward {rows[-2]['reward']:.3f} tax {rows[-2]['tax']:.4f}",
                flush=True,
            )
    for r in rows:
        r["seed"] = seed
        for short, kind in FRONTS.items():
            t = front_tax(rows, kind, r["reward"])
            w = front_reward(rows, kind, r["tax"])
            r[f"dtax_{short}"] = None if t is None else r["tax"] - t
            r[f"dreward_{short}"] = None if w is None else r["reward"] - w
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One seed, fewer steps (smoke).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--rlhf-steps", type=int, default=300)
    parser.add_argument("--rlhf-lr", type=float, default=3e-3)
    parser.add_argument("--ama-epochs", type=int, default=2)
    parser.add_argument("--ama-lr", type=float, default=0.05)
    parser.add_argument("--report", action="store_true", help="Print the tables of front.json.")
    args = parser.parse_args()
    if args.report:
        rows = json.loads((OUT / "front.json").read_text())
        args.seeds = sorted({r["seed"] for r in rows})
        report(rows, args)
        return
    if args.quick:
        args.seeds, args.sft_steps, args.rlhf_steps = args.seeds[:1], 150, 60
    torch.set_num_threads(1)
    quiet_transformers()
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [r for seed in args.seeds for r in run_seed(args, seed)]
    (OUT / "front.json").write_text(json.dumps(rows, indent=1))
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; rows in {OUT / 'front.json'}\n")
    report(rows, args)


def _ms(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt[1:] if fmt.startswith('+') else fmt}}"


def _wins(values: list[float | None], better) -> str:
    have = [v for v in values if v is not None]
    return f"{sum(better(v) for v in have)}/{len(have)}"


def report(rows: list[dict], args) -> None:
    n = len(args.seeds)
    print(f"Single-ratio fronts (mean over {n} seeds):\n")
    print("| α (θ_pre share) | reward, plain | tax, plain | reward, AMA blend | tax, AMA blend |")
    print("|---|---|---|---|---|")
    for a in sorted({r["mean_ratio"] for r in rows if r["kind"] == FRONTS["plain"]}):
        if round(a * 20) % 2:
            continue  # every 0.1 in the table; the fronts use every 0.05
        cells = []
        for kind in FRONTS.values():
            sel = [r for r in rows if r["kind"] == kind and r["mean_ratio"] == a]
            cells += [_ms([r["reward"] for r in sel], ".2f"), _ms([r["tax"] for r in sel], ".4f")]
        print(f"| {a:.1f} | " + " | ".join(cells) + " |")
    # Linear interpolation between grid points of a curved front misplaces it; the
    # middle of three neighbouring points lies off their chord by about 4× the error
    # within one grid step.
    for short, kind in FRONTS.items():
        err = 0.0
        for seed in args.seeds:
            pts = sorted(
                (r["reward"], r["tax"]) for r in rows if r["kind"] == kind and r["seed"] == seed
            )
            for (r0, t0), (r1, t1), (r2, t2) in zip(pts, pts[1:], pts[2:], strict=False):
                err = max(err, abs(t1 - (t0 + (t2 - t0) * (r1 - r0) / (r2 - r0))) / 4)
        print(f"\n{short} front: interpolation error in tax at most about {err:.4f}")
    print(
        "\nPoints against the fronts (mean ± sd over seeds; wins = seeds where the point "
        "beats that front):\n"
    )
    print(
        "| points | mean ratio | reward | tax | Δtax vs plain front (wins) "
        "| Δtax vs AMA-blend front (wins) | Δreward vs plain front (wins) "
        "| Δreward vs AMA-blend front (wins) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    kinds = [
        "low half only",
        "high half only",
        "AMA, AMA blend",
        "AMA, AMA blend, ratios shuffled",
        "AMA, every tensor",
        "AMA, every tensor, ratios shuffled",
    ]
    for kind in kinds:
        for b in sorted({r["mean_ratio"] for r in rows if r["kind"] == kind}):
            sel = [r for r in rows if r["kind"] == kind and r["mean_ratio"] == b]
            cells = [_ms([r["reward"] for r in sel], ".2f"), _ms([r["tax"] for r in sel], ".4f")]
            for metric, fmt, better in (
                ("dtax", "+.4f", lambda v: v < 0),
                ("dreward", "+.2f", lambda v: v > 0),
            ):
                for short in FRONTS:
                    vals = [r[f"{metric}_{short}"] for r in sel]
                    have = [v for v in vals if v is not None]
                    cells.append(f"{_ms(have, fmt)} ({_wins(vals, better)})")
            print(f"| {kind} | {b:.1f} | " + " | ".join(cells) + " |")
    print("\nLearned per-layer ratios, AMA (layer 0 first; mean over seeds):\n")
    for kind in (kinds[2], kinds[4]):
        for b in sorted({r["mean_ratio"] for r in rows if r["kind"] == kind}):
            sel = [r for r in rows if r["kind"] == kind and r["mean_ratio"] == b]
            mean = [
                round(statistics.fmean(x), 3) for x in zip(*(r["ratios"] for r in sel), strict=True)
            ]
            obj = [r["objective"] for r in sel]
            print(
                f"{kind} {b}: {mean}  (search objective first→last step, per seed: "
                f"{', '.join(f'{o[0]:.4f}→{o[1]:.4f}' for o in obj)})"
            )


if __name__ == "__main__":
    main()
