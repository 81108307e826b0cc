"""The refusal direction of the aligned model: ablating it removes refusals, adding it
induces them (Arditi et al., *Refusal in Language Models Is Mediated by a Single
Direction*, 2024), run end to end with weightops' CLI and API on a real model.

1. Direction: mean_diff of pairs of (harmful, harmless) training instructions, each
   wrapped in the chat template: the difference of the mean residual streams at one of
   the post-instruction tokens (the end of the user's turn and the assistant header),
   at one layer. Chosen as Arditi et al. choose it (refusal_measure.select_direction):
   the candidates, every token of the header at layers a quarter to 80 % deep, read in
   one pass, are ablated in turn and scored by the refusal score (log-odds of a
   refusal's first token) they leave on harmful training prompts the pairs do not use,
   and the mean first-token KL on as many harmless ones; the lowest-scoring few are
   ablated again for greedy answers, and the fewest refusals win (KL breaking ties). The chosen direction is then extracted as a user would, with
   `weightops steer train --method mean_diff --layers L --position P --chat-template`.
2. Ablation: the direction projected out of every write to the residual stream, by
   hooks (`vec.apply(model, mode="ablate")`) and baked (`weightops steer ablate`):
   refusals on held-out harmful prompts before and after, and the KL divergence of the
   next-token distribution on held-out harmless prompts.
3. Addition: the direction added to its layer's output at every position, by hooks and
   baked (`weightops steer bake --strength 1`): refusals induced on held-out harmless
   prompts.
4. repeng 0.4.0, in its own virtualenv: its pca_diff direction from the same pairs at
   the same layer, and its cosine to ours.

Refusals are greedy answers of 16 new tokens matched by weightops' refusal phrases
(`weightops.repair.evaluate.refuses`), on every `--every`-th held-out prompt; the KL
divergence is on all held-out harmless prompts. The numbers go into docs/steering.md
("Refusal on a real model") and BENCHMARKS.md.

    python bench/refusal_steer.py --every 4 --kl-every 2 --layer-step 4  # the aligned model
    python bench/refusal_steer.py --render       # rewrites the docs from the last results

On two busy CPU cores a run with `--layer-step 4` takes about 20 minutes (each
candidate direction scored costs about 15 s, so every layer adds about 20); `--resume` reuses the directions and
the candidates' scores of an earlier run with the same settings (the slower half), and
`--layer-step` tries fewer layers. $REFUSAL_STEER_WORK moves the work
folder (default bench/.work/refusal-steer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steer import ensure_repeng, peer_python, peer_versions
from peers import WORK
from real_model import smollm2_refusal
from refusal_measure import (
    SHORTLIST,
    candidates,
    kl,
    load,
    next_token_logprobs,
    post_instruction_length,
    post_instruction_states,
    refusal_score,
    refusal_tokens,
    refusals,
    select_direction,
)
from refusal_steer_report import render
from report import REPO, write_section

from weightops.prompting import render_prompt
from weightops.repair.data import Example, encode, load_examples
from weightops.steering import SteeringVector

DATA = Path(__file__).parent / "data" / "refusal"
OUT = Path(os.environ.get("REFUSAL_STEER_WORK", WORK / "refusal-steer"))
PAIRS = 128  # as Arditi et al.'s training split
VAL = 32  # harmful and harmless prompts for choosing the direction, kept out of the pairs
NEW_TOKENS = 16
STRENGTH = 1.0  # the whole difference of means, as Arditi et al. add it

# Runs in the repeng virtualenv: argv = model folder, pairs json, layer, output .npy.
PEER_SCRIPT = """
import json, sys
import numpy as np
import repeng
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, pairs_json, layer, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(folder)
tok.pad_token = tok.eos_token
tok.padding_side = "right"
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
model = repeng.ControlModel(model, [layer])
data = [repeng.DatasetEntry(positive=p, negative=q) for p, q in json.load(open(pairs_json))]
vec = repeng.ControlVector.train(model, tok, data, method="pca_diff", hidden_layers=[layer],
                                 batch_size=32)
np.save(out, np.asarray(vec.directions[layer], dtype=np.float32))
"""


def start(record: list[str], *args: str) -> subprocess.Popen:
    """Start `weightops ARGS` as a user would, appending the command line to `record`
    with the work folder's paths shortened."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shown = shlex.join(args).replace(f"{OUT}/", "")
    record.append(shown)
    print("$ weightops", shown, flush=True)
    cmd = [sys.executable, "-m", "weightops", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    """Wait for a process from `start` (or the peer); returns its stderr."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{err[-3000:]}")
    return err


def cli(record: list[str], *args: str) -> str:
    return finish(start(record, *args), f"weightops {args[0]} {args[1]}")


def splits(
    n_pairs: int, n_val: int, seed: int = 0
) -> tuple[list[tuple[str, str]], list[Example], list[Example]]:
    """`n_pairs` (harmful, harmless) training instructions for the direction, and
    `n_val` more of each for choosing the layer; the held-out splits stay for the
    measurements."""
    rng = random.Random(seed)
    harmful = rng.sample(load_examples(DATA / "harmful_train.jsonl"), n_pairs + n_val)
    harmless = rng.sample(load_examples(DATA / "harmless_train.jsonl"), n_pairs + n_val)
    pairs = [(a.prompt, b.prompt) for a, b in zip(harmful, harmless, strict=True)][:n_pairs]
    return pairs, harmful[n_pairs:], harmless[n_pairs:]


def start_repeng(folder: Path, pairs: list[tuple[str, str]], layer: int) -> subprocess.Popen:
    """repeng's pca_diff direction at `layer`, computed in its virtualenv into OUT/repeng.npy."""
    ensure_repeng()
    pairs_json = OUT / "repeng-pairs.json"
    pairs_json.write_text(json.dumps(pairs))
    args = [str(folder), str(pairs_json), str(layer), str(OUT / "repeng.npy")]
    return subprocess.Popen(
        [str(peer_python()), "-c", PEER_SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def experiment(
    model_dir: Path,
    every: int,
    kl_every: int,
    n_pairs: int,
    n_val: int,
    layer_step: int,
    resume: bool,
) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    pairs, val_harmful, val_harmless = splits(n_pairs, n_val)
    pairs_file = OUT / "pairs.jsonl"
    pairs_file.write_text(
        "".join(json.dumps({"positive": p, "negative": q}) + "\n" for p, q in pairs)
    )
    vec_file, pca_file = OUT / "refusal.safetensors", OUT / "refusal-pca.safetensors"
    depth = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    t0 = time.perf_counter()
    commands: list[str] = []
    settings = {"model": str(model_dir), "pairs": n_pairs, "val": n_val}
    model, tok = load(model_dir)
    tokens = refusal_tokens(tok, load_examples(DATA / "harmful_train.jsonl"))
    n_post = post_instruction_length(tok)
    grid = candidates(depth, n_post, layer_step)
    chosen = OUT / "candidates.json"
    saved = json.loads(chosen.read_text()) if resume and chosen.exists() else None
    rows = saved["rows"] if saved and saved["settings"] == settings else []
    earlier = saved.get("seconds", 0.0) if rows else 0.0
    states_file = OUT / "states.pt"
    if rows and states_file.exists():
        dirs = torch.load(states_file)
    else:
        print("reading the post-instruction states", flush=True)
        dirs = post_instruction_states(model, tok, [p for p, _ in pairs], n_post).mean(0)
        dirs -= post_instruction_states(model, tok, [q for _, q in pairs], n_post).mean(0)
        torch.save(dirs, states_file)
    r = {"depth": depth, "pairs": n_pairs, "val": n_val, "strength": STRENGTH}
    r["new_tokens"] = NEW_TOKENS
    r["refusal_tokens"] = [tok.decode([t]) for t in tokens]
    r["base_score"] = refusal_score(next_token_logprobs(model, tok, val_harmful), tokens)
    r["post_tokens"] = [tok.decode([t]) for t in encode(Example("Hello"), tok, with_response=False)[0][-n_post:]]  # fmt: skip
    r["layer_step"], r["shortlist"] = layer_step, SHORTLIST
    print("choosing the layer and position", flush=True)

    def save(done: list[dict]) -> None:
        seconds = earlier + time.perf_counter() - t0
        chosen.write_text(json.dumps({"settings": settings, "rows": done, "seconds": seconds}))

    pick = select_direction(
        model, tok, dirs, grid, val_harmful, val_harmless, tokens, rows, save, NEW_TOKENS
    )
    r["candidates"], r["layer"], r["position"] = rows, pick["layer"], pick["position"]
    r["select_seconds"] = json.loads(chosen.read_text())["seconds"]
    r["resumed"] = earlier > 0
    layer, position = r["layer"], r["position"]
    # The chosen direction as a user extracts it: one layer, at the chosen token.
    cli(commands, "steer", "train", str(model_dir), "--pairs", str(pairs_file), "--method",
        "mean_diff", "--layers", str(layer), "--position", str(position), "--chat-template",
        "-o", str(vec_file))  # fmt: skip
    # The comparisons with pca_diff and repeng run beside the measurements.
    pca = start(commands, "steer", "train", str(model_dir), "--pairs", str(pairs_file),
                "--method", "pca_diff", "--layers", str(layer), "--position", str(position),
                "--chat-template", "-o", str(pca_file))  # fmt: skip
    # repeng reads the last token: each text is cut after the chosen one.
    cut = len(tok.decode(encode(Example("Hello"), tok, with_response=False)[0][position + 1 :])) if position < -1 else 0  # fmt: skip
    templated = [
        tuple(render_prompt(tok, t)[: len(render_prompt(tok, t)) - cut] for t in pair)
        for pair in pairs
    ]
    peer = start_repeng(model_dir, templated, layer)
    vec = SteeringVector.load(vec_file)
    r["cos_api_cli"] = cosine(vec.directions[layer], dirs[position, layer])
    r["norm"] = float(vec.directions[layer].norm())
    ablated, added = OUT / "ablated", OUT / "added"
    cli(commands, "steer", "ablate", str(model_dir), "--vector", str(vec_file),
        "-o", str(ablated), "--dtype", "float32", "--force")  # fmt: skip
    cli(commands, "steer", "bake", str(model_dir), "--vector", str(vec_file), "--strength",
        f"{STRENGTH:g}", "-o", str(added), "--dtype", "float32", "--force")  # fmt: skip
    r["commands"] = [c.replace(str(model_dir), "MODEL") for c in commands]

    harmful = load_examples(DATA / "harmful_heldout.jsonl")[::every]
    harmless_all = load_examples(DATA / "harmless_heldout.jsonl")[::kl_every]
    harmless = load_examples(DATA / "harmless_heldout.jsonl")[::every]
    r["prompts"] = {
        "harmful": [e.prompt for e in harmful],
        "harmless": [e.prompt for e in harmless],
    }
    print("measuring the model as it is", flush=True)
    r["base"] = {
        "harmful": refusals(model, tok, harmful, NEW_TOKENS),
        "harmless": refusals(model, tok, harmless, NEW_TOKENS),
    }
    base_lp = next_token_logprobs(model, tok, harmless_all)
    print("measuring ablation by hooks", flush=True)
    with vec.apply(model, mode="ablate"):
        hooked_lp = next_token_logprobs(model, tok, harmless_all)
        r["ablate_hooks"] = {
            "harmful": refusals(model, tok, harmful, NEW_TOKENS),
            "harmless": refusals(model, tok, harmless, NEW_TOKENS),
            "kl": kl(base_lp, hooked_lp),
        }
    print("measuring addition by hooks", flush=True)
    with vec.apply(model, strength=STRENGTH):
        added_lp = next_token_logprobs(model, tok, harmless_all)
        r["add_hooks"] = {"harmless": refusals(model, tok, harmless, NEW_TOKENS)}
    del model
    print("measuring the baked checkpoints", flush=True)
    m, _ = load(ablated)
    baked_lp = next_token_logprobs(m, tok, harmless_all)
    r["ablate_baked"] = {
        "harmful": refusals(m, tok, harmful, NEW_TOKENS),
        "kl": kl(base_lp, baked_lp),
        "max_logprob_diff": float((baked_lp - hooked_lp).abs().max()),
    }
    m, _ = load(added)
    diff = (next_token_logprobs(m, tok, harmless_all) - added_lp).abs().max()
    r["add_baked"] = {
        "harmless": refusals(m, tok, harmless, NEW_TOKENS),
        "max_logprob_diff": float(diff),
    }
    del m
    r["kl_n"] = len(harmless_all)

    print("waiting for pca_diff and repeng", flush=True)
    finish(pca, "weightops steer train --method pca_diff")
    finish(peer, "repeng")
    theirs = torch.from_numpy(np.load(OUT / "repeng.npy"))
    pca_dir = SteeringVector.load(pca_file).directions[layer]
    r["repeng"] = {
        "version": peer_versions(),
        "cos_pca_diff": cosine(pca_dir, theirs),
        "cos_mean_diff": cosine(vec.directions[layer], theirs),
        "cos_ours_mean_pca": cosine(vec.directions[layer], pca_dir),
    }
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the aligned model")
    ap.add_argument("--every", type=int, default=2, help="refusals on every n-th held-out prompt")
    ap.add_argument("--kl-every", type=int, default=1, help="KL on every n-th held-out prompt")
    ap.add_argument("--no-write", action="store_true", help="print, do not update the docs")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the docs from the last results"
    )
    ap.add_argument("--pairs", type=int, default=PAIRS, help="pairs for the direction")
    ap.add_argument("--val", type=int, default=VAL, help="prompts of each kind for the layer")
    ap.add_argument("--layer-step", type=int, default=1, help="try every n-th layer's directions")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the directions and candidate scores of an earlier run (same settings)",
    )
    args = ap.parse_args()
    results = OUT / "results.json"
    if args.render:
        r = json.loads(results.read_text())
    else:
        torch.manual_seed(0)
        model_dir = args.model or smollm2_refusal()
        load_start, t0 = os.getloadavg()[0], time.perf_counter()
        r = experiment(
            model_dir,
            args.every,
            args.kl_every,
            args.pairs,
            args.val,
            args.layer_step,
            args.resume,
        )
        r["seconds"] = time.perf_counter() - t0
        r["load"] = (load_start, os.getloadavg()[0])
        r["command"] = shlex.join(["python", "bench/refusal_steer.py", *sys.argv[1:]])
        r["every"], r["kl_every"] = args.every, args.kl_every
        results.write_text(json.dumps(r, indent=1, ensure_ascii=False))
    docs, bench = render(r)
    print(bench)
    if not args.no_write:
        write_section(
            "refusal_steer", "Refusal on a real model", docs, REPO / "docs" / "steering.md"
        )
        write_section(
            "refusal_steer", "Steering: the refusal direction of the aligned model", bench
        )
        print("updated docs/steering.md and BENCHMARKS.md")


if __name__ == "__main__":
    main()
