"""Benchmark steering vectors: parity with repeng, and the cost of hooked generation.

1. Parity: weightops and repeng (in its own virtualenv) extract pca_diff and
   pca_center directions from the same 32 contrastive pairs on the same tiny random
   models; the table gives the minimum and median over layers of |cos| between the
   two directions for each layer.
2. Overhead: greedy generation of 64 tokens at batch 1 on CPU, plain versus inside
   `vec.apply(...)` on every layer (from the first token, and from `start=`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import TORCH_VERSION, WORK
from report import BENCHMARKS_MD, machine, write_section

from weightops.compat import causal_lm
from weightops.demo import tiny_model
from weightops.steering import SteeringVector

REPENG_VENV = WORK / "venv-repeng"
REPENG_VERSION = "0.4.0"
METHODS = ("pca_diff", "pca_center")
# weightops reads block outputs by default; "hidden_states" reads transformers'
# output_hidden_states as repeng does (they differ only at the last layer).
READS = ("hidden_states", "block")
PARITY_MODELS = (("llama", 6), ("gpt2", 6))
COS_BAR = 0.99
OVERHEAD_BAR = 5.0  # percent of plain tokens/s
BATCH = 32  # texts per forward pass, the same for both tools
NEW_TOKENS = 64
STRENGTH = 4.0

SUBJECTS = (
    "cats",
    "dogs",
    "rain",
    "snow",
    "music",
    "jazz",
    "coffee",
    "tea",
    "books",
    "films",
    "trains",
    "boats",
    "summer",
    "winter",
    "math",
    "chess",
    "bread",
    "cheese",
    "the sea",
    "the city",
    "mornings",
    "mountains",
    "my job",
    "this song",
    "the news",
    "football",
    "gardens",
    "soup",
    "poetry",
    "my town",
    "long walks",
    "the radio",
)
PAIRS = [(f"I love {s}.", f"I hate {s}.") for s in SUBJECTS]

# Runs in the repeng virtualenv: argv = model folder, pairs json, output npz.
PEER_SCRIPT = """
import json, sys
import numpy as np
import repeng
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, pairs_json, out = sys.argv[1:4]
methods = sys.argv[4].split(",")
batch = int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(folder)
tok.pad_token = tok.eos_token
tok.padding_side = "right"
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
n = model.config.num_hidden_layers
model = repeng.ControlModel(model, list(range(n)))
data = [repeng.DatasetEntry(positive=p, negative=q) for p, q in json.load(open(pairs_json))]
arrays = {}
for method in methods:
    vec = repeng.ControlVector.train(model, tok, data, method=method,
                                     hidden_layers=list(range(n)), batch_size=batch)
    for layer, d in vec.directions.items():
        arrays[f"{method}.{layer}"] = np.asarray(d, dtype=np.float32)
np.savez(out, **arrays)
"""


# ---------------------------------------------------------------- peer


def peer_python() -> Path:
    return REPENG_VENV / "bin" / "python"


def ensure_repeng() -> Path:
    """Create the repeng virtualenv if needed and return its python."""
    py = peer_python()
    if not py.exists():
        REPENG_VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(REPENG_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet"]
        # torch first and pinned: repeng's unpinned requirement would pull a CUDA build.
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
        subprocess.run([*pip, f"repeng=={REPENG_VERSION}"], check=True)
    return py


def peer_versions() -> str:
    out = subprocess.run(
        [
            str(peer_python()),
            "-c",
            "import importlib.metadata as m; "
            "print(*(m.version(p) for p in ('repeng', 'transformers', 'torch', 'numpy')))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    rp, tf, th, npv = out.stdout.split()
    return f"repeng {rp} (transformers {tf}, torch {th}, numpy {npv})"


def run_peer(folder: Path, out: Path) -> dict[str, dict[int, np.ndarray]]:
    pairs_json = WORK / "steer" / "pairs.json"
    pairs_json.write_text(json.dumps(PAIRS))
    cmd = [
        str(peer_python()),
        "-c",
        PEER_SCRIPT,
        str(folder),
        str(pairs_json),
        str(out),
        ",".join(METHODS),
        str(BATCH),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # repeng 0.4.0 predates transformers 5; fall back to the 4.x line once.
        print(done.stderr[-3000:], file=sys.stderr)
        print("repeng failed with this transformers; installing transformers<5", flush=True)
        subprocess.run(
            [str(peer_python()), "-m", "pip", "install", "--quiet", "transformers<5"], check=True
        )
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = np.load(out)
    dirs: dict[str, dict[int, np.ndarray]] = {m: {} for m in METHODS}
    for key in data.files:
        method, layer = key.rsplit(".", 1)
        dirs[method][int(layer)] = data[key]
    return dirs


# ---------------------------------------------------------------- parity


def load(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = causal_lm(folder, torch.float32).eval()
    return model, tok


def last_layer_gap(model, tok) -> float:
    """Max |hidden_states[n] − output of the last block| at the last token of the first
    text: zero when transformers' last hidden state is the raw block output."""
    from weightops.steering import find_layers

    blocks = find_layers(model).blocks
    seen: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach())
    )
    try:
        with torch.no_grad():
            enc = tok([PAIRS[0][0]], return_tensors="pt")
            states = model(**enc, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return float((states[len(blocks)][0, -1] - seen[0][0, -1]).abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b).abs() / (a.norm() * b.norm()))


def parity(family: str, layers: int, skip_peer: bool) -> dict:
    folder = WORK / "steer" / f"{family}-{layers}L"
    if not (folder / "config.json").exists():
        tiny_model(folder, family, seed=0, layers=layers)
    model, tok = load(folder)
    ours = {
        (m, read): SteeringVector.train(model, tok, PAIRS, method=m, batch_size=BATCH, read=read)
        for m in METHODS
        for read in READS
    }
    last = layers - 1
    row = {
        "family": family,
        "layers": layers,
        "last_gap": last_layer_gap(model, tok),
        # how far the default read (block outputs) moves the last layer's direction
        "last_cos": {
            m: cosine(ours[m, "block"].directions[last], ours[m, "hidden_states"].directions[last])
            for m in METHODS
        },
        "methods": {},
    }
    if skip_peer:
        return row
    theirs = run_peer(folder, WORK / "steer" / f"repeng-{family}-{layers}L.npz")
    for (m, read), vec in ours.items():
        row["methods"][m, read] = {
            i: cosine(d, torch.from_numpy(theirs[m][i])) for i, d in vec.directions.items()
        }
    return row


# ---------------------------------------------------------------- overhead


def bench_model(tok_folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=320,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tok = load(tok_folder)[1]
    return model, tok


def overhead(tok_folder: Path, repeats: int) -> dict:
    model, tok = bench_model(tok_folder)
    vec = SteeringVector.train(model, tok, PAIRS, method="pca_diff", batch_size=BATCH)
    prompt = tok(["Tell me about the weather today."], return_tensors="pt")["input_ids"]
    start = prompt.shape[1]
    eos = tok.eos_token_id

    def gen() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=eos,
            )

    def plain() -> torch.Tensor:
        return gen()

    def steered() -> torch.Tensor:
        with vec.apply(model, strength=STRENGTH):
            return gen()

    def steered_start() -> torch.Tensor:
        with vec.apply(model, strength=STRENGTH, start=start):
            return gen()

    variants = {"plain": plain, "steered": steered, f"steered, start={start}": steered_start}
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and a sanity check
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            out = variants[name]()
            dt = time.perf_counter() - t0
            assert out.shape[1] - prompt.shape[1] == NEW_TOKENS
            rates[name].append(NEW_TOKENS / dt)
    base = outputs["plain"][0, start:]
    return {
        "start": start,
        "prompt_tokens": prompt.shape[1],
        "params": sum(p.numel() for p in model.parameters()),
        "median": {n: statistics.median(r) for n, r in rates.items()},
        "range": {n: (min(r), max(r)) for n, r in rates.items()},
        # per round, plain rate over this variant's rate: robust to slow load drift
        "paired": {
            n: statistics.median(p / q - 1 for p, q in zip(rates["plain"], r, strict=True)) * 100
            for n, r in rates.items()
        },
        "changed": {n: int((o[0, start:] != base).sum()) for n, o in outputs.items()},
    }


# ---------------------------------------------------------------- report


def render(
    command: str,
    rows: list[dict],
    speed: dict,
    peer: str | None,
    threads: int,
    repeats: int,
    load: tuple[float, float],
) -> str:
    lines = [
        "Parity: weightops and repeng extract directions from the same 32 contrastive pairs "
        '("I love X." / "I hate X.") on tiny random models built by `weightops.demo.tiny_model` '
        f"(fp32, right padding with pad = eos, {BATCH} texts per forward pass in both), all layers. "
        "Overhead: greedy generation of "
        f"{NEW_TOKENS} new tokens at batch 1 on a random Llama (hidden 256, 8 layers, "
        f"{speed['params'] / 1e6:.1f}M parameters), plain versus inside "
        f"`vec.apply(model, strength={STRENGTH})` on all 8 layers; median tokens/s over "
        f"{repeats} alternating runs each after a warm-up, `torch.set_num_threads({threads})`.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Peer: {peer or 'not run (--skip-peer)'}",
        f"- 1-minute load average: {load[0]:.1f} at start, {load[1]:.1f} at end",
        "",
    ]
    if peer:
        lines += [
            "| model | method | weightops `read=` | min \\|cos\\| | median \\|cos\\| | "
            f"1 − min \\|cos\\| | worst layer | all layers >= {COS_BAR} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            for (m, read), cos in row["methods"].items():
                worst = min(cos, key=cos.get)
                ok = "yes" if cos[worst] >= COS_BAR else "**no**"
                lines.append(
                    f"| {row['family']}, {row['layers']} layers | {m} | {read} | {cos[worst]:.6f} | "
                    f"{statistics.median(cos.values()):.6f} | {1 - cos[worst]:.1e} | {worst} | {ok} |"
                )
        lines += [
            "",
            'The bar applies to `read="hidden_states"`, which reads what repeng reads. '
            'The default `read="block"` differs from it only at the last layer:',
            "",
        ]
    for row in rows:
        n = row["layers"]
        what = (
            f"is the raw output of block {n - 1}"
            if row["last_gap"] < 1e-5
            else f"is the final norm's output, not block {n - 1}'s, which is where the hooks add "
            f"(max abs difference {row['last_gap']:.1f} at one token)"
        )
        cos = ", ".join(f"{m} {c:.3f}" for m, c in row["last_cos"].items())
        lines.append(
            f"- {row['family']}: transformers' `hidden_states[{n}]` {what}; |cos| between the "
            f"layer-{n - 1} directions read from the block and from `hidden_states`: {cos}."
        )
    med = speed["median"]
    plain = med["plain"]
    lines += [
        "",
        "| generation | tokens/s (median) | min–max | overhead vs plain | paired overhead | "
        "within 5% bar | tokens changed vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rate in med.items():
        lo, hi = speed["range"][name]
        spread = f"{lo:.1f}–{hi:.1f}"
        if name == "plain":
            lines.append(f"| {name} | {rate:.1f} | {spread} | — | — | — | — |")
            continue
        pct = (plain / rate - 1) * 100
        ok = "yes" if pct < OVERHEAD_BAR else "**no**"
        lines.append(
            f"| {name} | {rate:.1f} | {spread} | {pct:+.1f}% | {speed['paired'][name]:+.1f}% | {ok} | "
            f"{speed['changed'][name]} of {NEW_TOKENS} |"
        )
    lines += [
        "",
        "Overhead is median plain tokens/s over median steered tokens/s, minus one; paired "
        "overhead is the median over rounds of the same ratio within a round (the variants run "
        "back to back), less sensitive to load that drifts between rounds. The bar is judged on "
        f"the first. The prompt has "
        f"{speed['prompt_tokens']} tokens, so `start={speed['start']}` steers only the generated "
        'ones; "tokens changed" confirms the hooks were active.',
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-peer", action="store_true", help="run weightops only")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per generation variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for generation")
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not update {BENCHMARKS_MD.name}"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    (WORK / "steer").mkdir(parents=True, exist_ok=True)
    peer = None
    if not args.skip_peer:
        ensure_repeng()
    rows = []
    for family, layers in PARITY_MODELS:
        print(f"parity: {family}, {layers} layers", flush=True)
        rows.append(parity(family, layers, args.skip_peer))
    if not args.skip_peer:
        peer = peer_versions()  # after run_peer, which may have changed transformers
    print(f"overhead: {args.repeats} runs per variant", flush=True)
    speed = overhead(WORK / "steer" / "llama-6L", args.repeats)
    command = shlex.join(["python", "bench/bench_steer.py", *sys.argv[1:]])
    body = render(
        command, rows, speed, peer, args.threads, args.repeats, (load_start, os.getloadavg()[0])
    )
    print(body)
    if not args.no_write:
        write_section("bench_steer", "Steering: weightops vs repeng, and hooked generation", body)
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
