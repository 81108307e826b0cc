"""Merging two real fine-tunes: does the merge keep both skills?

SmolLM2-135M-Instruct is fine-tuned twice from the same weights, once per task of
bench/merge_tasks.py (`caps`: rewrite a phrase in capitals; `sentiment`: label a
review), training the same top decoder layers and final norm each time, so the two
task vectors live in the same tensors. The two fine-tunes are then merged by every
method in RECIPES, each through the `weightops merge` CLI (bf16 output, fp32
arithmetic), and each model is scored on examples training never saw (COLUMNS: caps
on new phrases of training words and on unseen words, sentiment on unseen words;
greedy answers, exact match) and on perplexity of held-out English prose
(refusal_finetune.perplexity: the Python language reference text).

Fine-tunes follow bench/refusal_finetune.py: fp32 full fine-tune of the top
`--layers` layers and the final norm, AdamW with warm-up and cosine decay, loss on
the response tokens only, prompts through the chat template, saved in bf16. They are
cached under $WEIGHTOPS_CACHE/merge-real (default ~/.cache/weightops) with the
recipes and the scores (scores.json); a merged model is deleted once scored. A rerun
reuses what is there (--fresh rebuilds).

    python bench/merge_real.py            # trains, merges, scores; writes docs/merging_real.md's table
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_tasks import TRAIN_N, correct, examples
from real_model import CACHE, smollm2
from refusal_finetune import _batch, _response_loss, perplexity
from report import REPO
from training import warmup_cosine

from weightops.repair.data import encode, pad_id
from weightops.repair.evaluate import generate

WORK = CACHE / "merge-real"
SCORES = WORK / "scores.json"
DOC = REPO / "docs" / "merging_real.md"
MAX_NEW_TOKENS = {"caps": 16, "sentiment": 4}
# The scored columns: (task, split).
COLUMNS = (("caps", "recombined"), ("caps", "heldout"), ("sentiment", "heldout"))


def _recipe(
    method: str, base: str | None = "BASE", models: tuple[str, ...] = ("A", "B"), **parameters
) -> dict:
    recipe: dict = {"merge_method": method}
    if base is not None:
        recipe["base_model"] = base
    recipe["models"] = [{"model": m} for m in models]
    if parameters:
        recipe["parameters"] = parameters
    return recipe


# Each merge of the two fine-tunes A (caps) and B (sentiment); "BASE", "A" and "B"
# stand for the folders. Values are each method's documented defaults, or mergekit's
# example values (weight 0.5, density 0.5) where a method requires them. The methods
# that take exactly two models, one of them as base_model (model_averaging, nearswap,
# arcee_fusion), get A as base_model and B as the other.
RECIPES: dict[str, dict] = {
    "linear": _recipe("linear", base=None, weight=0.5),
    "task_arithmetic": _recipe("task_arithmetic", weight=1.0),
    "ties": _recipe("ties", weight=0.5, density=0.5),
    "tsv_m": _recipe("tsv_m"),
    "r_tsvm": _recipe("r_tsvm"),
    "model_averaging": _recipe("model_averaging", base="A", models=("B",), alpha=0.5),
    "della": _recipe("della", weight=0.5, density=0.5, epsilon=0.15),
    "della_linear": _recipe("della_linear", weight=0.5, density=0.5, epsilon=0.15),
    "sce": _recipe("sce"),
    "nuslerp": _recipe("nuslerp", weight=0.5),
    "multislerp": _recipe("multislerp", weight=0.5),
    "karcher": _recipe("karcher", base=None),
    "nearswap": _recipe("nearswap", base="A", models=("B",), t=0.0001),
    "arcee_fusion": _recipe("arcee_fusion", base="A", models=("B",)),
    "ram": _recipe("ram"),
    "ramplus_tl": _recipe("ramplus_tl"),
}


def finetune(
    task: str, out: Path, *, steps: int, batch: int, lr: float, layers: int, seed: int
) -> float:
    """Fine-tune the base on `task`'s training examples and save to `out` (bf16, with
    the tokenizer); returns the training seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in [*model.model.layers[-layers:], model.model.norm] for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    rows = [
        encode(ex, tokenizer, with_response=True) for ex in examples(task, "train", TRAIN_N, seed)
    ]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps)
    pad = pad_id(tokenizer)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = _response_loss(model, *_batch(rng.sample(rows, batch), pad))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  {task} step {step:4d}  loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t0
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    settings = {"task": task, "steps": steps, "batch": batch, "lr": lr, "layers": layers}
    record = settings | {"seed": seed, "seconds": round(seconds, 1)}
    (staging / "finetune.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def write_recipe(name: str, folders: dict[str, Path]) -> Path:
    """RECIPES[name] with the folders filled in, as a YAML file under WORK/recipes."""
    recipe = json.loads(json.dumps(RECIPES[name]))
    if "base_model" in recipe:
        recipe["base_model"] = str(folders[recipe["base_model"]])
    for entry in recipe["models"]:
        entry["model"] = str(folders[entry["model"]])
    recipe["dtype"] = "bfloat16"
    path = WORK / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def merge(recipe: Path, out: Path) -> float:
    """Run `recipe` through `weightops merge` into `out`; returns the wall seconds."""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    command = ["-m", "weightops", "merge", str(recipe), "-o", str(out), "--force", "--threads", "1"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, env=env)
    return time.perf_counter() - t0


def score(folder: Path, n: int) -> dict:
    """Accuracy on each of COLUMNS (n examples each), perplexity, and a few answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result: dict = {"perplexity": round(perplexity(model, tokenizer), 3)}
    for task, split in COLUMNS:
        held = examples(task, split, n)
        answers = generate(
            model, tokenizer, held, max_new_tokens=MAX_NEW_TOKENS[task], batch_size=16
        )
        hits = [correct(task, a, ex.response) for ex, a in zip(held, answers, strict=True)]
        result[f"{task}_{split}"] = round(sum(hits) / n, 4)
        result[f"{task}_{split}_samples"] = [
            {"prompt": ex.prompt, "answer": a}
            for ex, a in list(zip(held, answers, strict=True))[:3]
        ]
    return result


def overlap(base: Path, a: Path, b: Path) -> dict:
    """How the two task vectors sit: tensors changed, share of their entries each
    fine-tune changed (in bf16, as saved), share both changed, norms and cosine."""
    from safetensors.torch import load_file

    tb, ta, tc = (load_file(f / "model.safetensors") for f in (base, a, b))
    tensors = entries = in_a = in_b = both = 0
    norm_a = norm_b = dot = 0.0
    for name, t in tb.items():
        da, db = ta[name].float() - t.float(), tc[name].float() - t.float()
        if not (da.any() or db.any()):
            continue
        tensors += 1
        entries += t.numel()
        in_a += int(da.count_nonzero())
        in_b += int(db.count_nonzero())
        both += int((da.ne(0) & db.ne(0)).sum())
        norm_a += da.square().sum().item()
        norm_b += db.square().sum().item()
        dot += (da * db).sum().item()
    return {
        "tensors": tensors,
        "changed_a": round(in_a / entries, 3),
        "changed_b": round(in_b / entries, 3),
        "changed_both": round(both / entries, 3),
        "norm_a": round(norm_a**0.5, 3),
        "norm_b": round(norm_b**0.5, 3),
        "cosine": round(dot / (norm_a * norm_b) ** 0.5, 4),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def table(scores: dict) -> str:
    """The markdown table of `scores`, fine-tunes first, then merges in RECIPES' order."""
    base_ppl = scores["base"]["perplexity"]
    lines = [
        "| model | caps, new phrases | caps, unseen words | sentiment, unseen words "
        "| perplexity | vs base |",
        "|---|---|---|---|---|---|",
    ]
    for name in ["base", "ft_caps", "ft_sentiment", *RECIPES]:
        if name not in scores:
            continue
        r = scores[name]
        change = 100 * (r["perplexity"] / base_ppl - 1)
        label = f"`{name}`" if name in RECIPES else name
        lines.append(
            f"| {label} | {_pct(r['caps_recombined'])} | {_pct(r['caps_heldout'])} "
            f"| {_pct(r['sentiment_heldout'])} | "
            f"{r['perplexity']:.2f} | {change:+.1f} % |"
        )
    return "\n".join(lines) + "\n"


def write_doc_table(body: str) -> None:
    """Replace the text between the table markers of docs/merging_real.md."""
    start, end = "<!-- merge_real:start -->", "<!-- merge_real:end -->"
    text = DOC.read_text()
    head, rest = text.split(start, 1)
    DOC.write_text(f"{head}{start}\n{body}{end}{rest.split(end, 1)[1]}")


def _record(scores: dict) -> None:
    SCORES.write_text(json.dumps(scores, indent=2, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layers", type=int, default=8, help="top decoder layers trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=64, help="held-out examples per task")
    ap.add_argument("--methods", default=",".join(RECIPES), help="merges to run")
    ap.add_argument("--fresh", action="store_true", help="rebuild fine-tunes, merges and scores")
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    settings = {k: getattr(args, k) for k in ("steps", "batch", "lr", "layers", "seed", "n")}
    if scores.get("settings") != settings:
        scores = {"settings": settings}
    folders = {"BASE": smollm2(), "A": WORK / "ft-caps", "B": WORK / "ft-sentiment"}
    for key, task in (("A", "caps"), ("B", "sentiment")):
        if not (folders[key] / "config.json").exists():
            train = {k: getattr(args, k) for k in ("steps", "batch", "lr", "layers", "seed")}
            finetune(task, folders[key], **train)
        scores[f"finetune_{task}"] = json.loads((folders[key] / "finetune.json").read_text())
        print(scores[f"finetune_{task}"], flush=True)
    scores["overlap"] = overlap(folders["BASE"], folders["A"], folders["B"])
    _record(scores)
    print("task vectors", scores["overlap"], flush=True)
    runs = [("base", folders["BASE"]), ("ft_caps", folders["A"]), ("ft_sentiment", folders["B"])]
    for name, folder in runs:
        if name not in scores:
            scores[name] = score(folder, args.n)
            _record(scores)
        print(name, {k: v for k, v in scores[name].items() if "samples" not in k}, flush=True)
    for name in args.methods.split(","):
        recipe = write_recipe(name, folders)
        if name not in scores:
            out = WORK / "merged" / name
            seconds = merge(recipe, out)
            scores[name] = score(out, args.n) | {"merge_seconds": round(seconds, 1)}
            _record(scores)
            # 270 MB each; the recipe beside it rebuilds it.
            shutil.rmtree(out)
        print(name, {k: v for k, v in scores[name].items() if "samples" not in k}, flush=True)
    body = table(scores)
    print(body)
    if not args.no_doc:
        write_doc_table(body)


if __name__ == "__main__":
    main()
