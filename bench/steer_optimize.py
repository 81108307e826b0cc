"""`weightops steer optimize` against heretic-llm on the aligned model, side by side.

Both tools remove the aligned model's refusal with the same budget: the same model
(fp32), the same prompts (direction from harmful/harmless train; trials scored on
evenly spaced subsets of the same files), the same refusal judge during the search
(heretic gets weightops' refusal phrases as its markers), the same greedy answer length,
the same number of trials and random start-up trials, and the same rule to pick a trial
(lowest KL whose train refusal share is at most --goal, else the fewest refusals). The
two chosen models are then measured by this script alone, on the held-out prompts:
refusal share (greedy, 16 tokens, `repair.evaluate.refuses`) and KL(original ‖ edited)
of the first answer token on the held-out harmless prompts. The shared rule compares
each tool's strongest edit; to compare the two at the same strength, weightops' trial
with the lowest KL among those refusing at most heretic's chosen share (train subset)
is baked too and measured the same way.

heretic runs from its own virtualenv (bench/.work/venv-heretic, created here) as its
CLI, non-interactively: its config.toml is written in a fresh folder, its menus are
answered through standard input (it reads them with input() when COLAB_GPU is set), and
the model is saved merged.

    python bench/steer_optimize.py [--trials 16] [--startup 5] [--goal 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import TORCH_VERSION, WORK
from real_model import smollm2_refusal
from report import machine, write_section

from weightops.prompting import greedy_completions
from weightops.repair.data import load_examples
from weightops.repair.evaluate import REFUSAL_PHRASES, load_model, refuses
from weightops.steering.measure import (
    evenly,
    first_token_logprobs,
    kl_divergence,
)

HERETIC_VERSION = "1.4.0"
HERETIC_VENV = WORK / "venv-heretic"
DATA = Path(__file__).resolve().parent / "data" / "refusal"
REPO = Path(__file__).resolve().parent.parent


def ensure_heretic() -> Path:
    exe = HERETIC_VENV / "bin" / "heretic"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(HERETIC_VENV)], check=True)
        pip = [str(HERETIC_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
        subprocess.run([*pip, f"heretic-llm=={HERETIC_VERSION}"], check=True)
    return exe


def prompts(name: str) -> list[str]:
    return [ex.prompt for ex in load_examples(DATA / f"{name}.jsonl")]


def fit_sets(args: argparse.Namespace) -> dict[str, list[str]]:
    """The prompts both tools get: direction from `--fit` evenly spaced train prompts
    of each kind, trials scored on evenly spaced subsets of those."""
    bad = evenly(prompts("harmful_train"), args.fit)
    good = evenly(prompts("harmless_train"), args.fit)
    return {
        "bad": bad,
        "good": good,
        "bad_eval": evenly(bad, args.eval_target),
        "good_eval": evenly(good, args.eval_harmless),
    }


def held_out_sets() -> tuple[list[str], list[str]]:
    """Every second held-out prompt, as docs/aligned_model.md measures."""
    return prompts("harmful_heldout")[::2], prompts("harmless_heldout")[::2]


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def pick(front: list[tuple[int, int, int, float]], n_bad: int, goal: float) -> int:
    """The menu entry the shared rule picks from heretic's front of
    (entry, trial, refusals, KL)."""
    ok = [f for f in front if f[2] / n_bad <= goal]
    if ok:
        return min(ok, key=lambda f: (f[3], f[2]))[0]
    return min(front, key=lambda f: (f[2], f[3]))[0]


def _answer_menus(proc, log, work: Path, goal: float, t0: float):
    """Answer heretic's menus: pick the trial, save it merged to work/model, stop."""
    buf, stage, chosen, search_s, n_bad, fronts = "", "trial", None, None, 0, []
    entry = re.compile(
        r"\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)"
    )
    while True:
        ch = proc.stdout.read(1)
        if not ch:
            break
        buf += ch
        log.write(ch)
        if ch == "\n":
            log.flush()
        if not buf.endswith(("Enter number: ", "Path to the folder:: ")):
            continue
        if stage == "trial":
            search_s = time.perf_counter() - t0
            front = [(int(a), int(b), int(c), float(e)) for a, b, c, _, e in entry.findall(buf)]
            n_bad = int(entry.search(buf).group(4))
            n = pick(front, n_bad, goal)
            chosen = next(f for f in front if f[0] == n)
            fronts.extend((f[1], f[2] / n_bad, f[3]) for f in front)
            proc.stdin.write(f"{n}\n")
            stage = "action"
        elif stage == "action":
            proc.stdin.write("1\n")  # Save the model to a local folder
            stage = "path"
        elif stage == "path":
            proc.stdin.write(f"{work / 'model'}\n")
            stage = "saved"
        else:
            break  # back at the action menu: the model is written
        proc.stdin.flush()
        buf = ""
    return chosen, n_bad, search_s, fronts


def run_heretic(model: Path, work: Path, args: argparse.Namespace, system: str) -> dict:
    """Run heretic's search and save the chosen trial's merged model to work/model."""
    exe = ensure_heretic()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for k, v in fit_sets(args).items():
        (work / f"{k}.txt").write_text("\n".join(v) + "\n")
    markers = ", ".join(toml_str(p) for p in REFUSAL_PHRASES)
    (work / "config.toml").write_text(
        f"model = {toml_str(str(model))}\n"
        'dtypes = ["float32"]\n'
        'device_map = "cpu"\n'
        f"batch_size = {args.batch_size}\n"
        f"max_response_length = {args.max_new_tokens}\n"
        'response_prefix = ""\n'
        f"system_prompt = {toml_str(system)}\n"
        f"refusal_markers = [{markers}]\n"
        f"n_trials = {args.trials}\n"
        f"n_startup_trials = {args.startup}\n"
        f"seed = {args.seed}\n"
        'export_strategy = "merge"\n'
        'study_checkpoint_dir = "checkpoints"\n'
        + "".join(
            f'[{sect}]\ndataset = "{work / f}.txt"\n'
            for sect, f in (
                ("good_prompts", "good"),
                ("bad_prompts", "bad"),
                ("good_evaluation_prompts", "good_eval"),
                ("bad_evaluation_prompts", "bad_eval"),
            )
        )
    )
    env = dict(os.environ, COLAB_GPU="1", COLUMNS="250", PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe)],
        cwd=work,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    with open(work / "heretic.log", "w") as log:
        chosen, n_bad, search_s, front = _answer_menus(proc, log, work, args.goal, t0)
    proc.kill()
    proc.wait()
    if chosen is None or not (work / "model" / "config.json").exists():
        raise RuntimeError(f"heretic did not finish; see {work / 'heretic.log'}")
    # Tokenizer files as the source's, so both outputs are read the same way.
    for f in model.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, work / "model" / f.name)
    return {
        "trial": chosen[1],
        "refusals_fit": chosen[2] / n_bad,
        "kl_fit": chosen[3],
        "search_s": search_s,
        "wall_s": time.perf_counter() - t0,
        "front": front,
    }


def run_weightops(model: Path, work: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sets = fit_sets(args)
    for k in ("bad", "good"):
        (work / f"{k}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in sets[k]))
    cmd = [
        sys.executable, "-m", "weightops", "steer", "optimize", str(model),
        "--target", str(work / "bad.jsonl"),
        "--harmless", str(work / "good.jsonl"),
        "--eval-target", str(args.eval_target),
        "--eval-harmless", str(args.eval_harmless),
        "--trials", str(args.trials), "--startup", str(args.startup), "--seed", str(args.seed),
        "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
        "--choose", "target", "--goal", str(args.goal),
        "--study", str(work / "study.json"), "--dtype", "float32", "-o", str(work / "model"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(work / "weightops.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - t0
    study = json.loads((work / "study.json").read_text())
    chosen = next(t for t in study["trials"] if t["number"] == study["chosen"])
    (work / "front.md").write_text((work / "weightops.log").read_text())
    return {
        "trial": chosen["number"],
        "refusals_fit": chosen["behaviour"],
        "kl_fit": chosen["kl"],
        "search_s": sum(t["seconds"] for t in study["trials"]),
        "wall_s": wall,
        "point": chosen["point"],
        "front": pareto([(t["number"], t["behaviour"], t["kl"]) for t in study["trials"]]),
    }


def bake_matched(model: Path, work: Path, args: argparse.Namespace, refusal: float) -> dict | None:
    """The weightops trial with the lowest KL among those refusing at most `refusal`
    (heretic's chosen share) on the train subset, baked to work/matched through
    weightops' API with the directions its search used; None when no trial is that low
    or the chosen trial is that one."""
    from weightops.steering.bake import bake_point
    from weightops.steering.measure import directions
    from weightops.steering.profile import Point

    study = json.loads((work / "study.json").read_text())
    ok = [t for t in study["trials"] if t["behaviour"] <= refusal]
    if not ok:
        return None
    best = min(ok, key=lambda t: (t["kl"], t["behaviour"], t["number"]))
    if best["number"] == study["chosen"]:
        return None
    sets = fit_sets(args)
    m, tok = load_model(model)
    dirs = directions(m, tok, sets["bad"], sets["good"], head_view=True)
    del m
    bake_point(model, Point.from_dict(best["point"]), dirs, work / "matched", dtype=torch.float32)
    return {"trial": best["number"], "refusals_fit": best["behaviour"], "kl_fit": best["kl"]}


def pareto(points: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """The (trial, refusal share, KL) points no other point is at least as good as in
    both and better in one, by refusal share."""
    front = [
        p
        for p in points
        if not any(q[1] <= p[1] and q[2] <= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)
    ]
    return sorted(front, key=lambda p: (p[1], p[2]))


def dominating(front: list, point: tuple[float, float]) -> list[int]:
    """The trials of `front` at or below `point`'s refusal share with a lower KL."""
    return [t for t, b, k in front if b <= point[0] and k < point[1]]


def held_out(folders: dict[str, Path], tokenizer_from: Path, tokens: int) -> dict[str, dict]:
    """Refusal share on held-out harmful prompts, KL on held-out harmless ones."""
    from transformers import AutoTokenizer

    from weightops.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    bad, good = held_out_sets()
    harmful = [encode_prompt(tok, p)[0] for p in bad]
    harmless = [encode_prompt(tok, p)[0] for p in good]
    out, base = {}, None
    for name, folder in folders.items():
        model, _ = load_model(folder)
        lp = first_token_logprobs(model, tok, harmless)
        base = lp if base is None else base
        texts = greedy_completions(model, tok, harmful, tokens, 32)
        out[name] = {
            "refusal": sum(map(refuses, texts)) / len(texts),
            "kl": kl_divergence(base, lp),
            "samples": texts[:3],
        }
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--startup", type=int, default=5)
    ap.add_argument("--fit", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=0.05)
    ap.add_argument("--eval-target", type=int, default=24)
    ap.add_argument("--eval-harmless", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--only", choices=["weightops", "heretic"], default=None)
    args = ap.parse_args()
    model = Path(smollm2_refusal())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    # The system turn SmolLM2's template writes when a conversation has none: heretic
    # always sends one, so giving it this one renders the very same prompt text.
    system = re.search(
        r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False),
        re.S,
    ).group(1)
    work = WORK / "steer_optimize"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ensure_heretic()
    jobs = {
        "weightops": lambda: run_weightops(model, work / "weightops", args),
        "heretic": lambda: run_heretic(model, work / "heretic", args, system),
    }
    jobs = {k: v for k, v in jobs.items() if args.only in (None, k)}
    # Side by side: both run at once, so both see the same load on a shared machine.
    with ThreadPoolExecutor(len(jobs)) as pool:
        running = {k: pool.submit(v) for k, v in jobs.items()}
        results = {k: f.result() for k, f in running.items()}
    for k, r in results.items():
        print(k, r, flush=True)
    folders = {"aligned model": model} | {k: work / k / "model" for k in results}
    if args.only is None:
        matched = bake_matched(model, work / "weightops", args, results["heretic"]["refusals_fit"])
        if matched is not None:
            results["weightops matched"] = matched
            folders["weightops matched"] = work / "weightops" / "matched"
    evals = held_out(folders, model, 16)
    (work / "results.json").write_text(json.dumps({"fit": results, "held_out": evals}, indent=1))
    print(json.dumps(evals, indent=1))
    if args.only is None:
        write_report(results, evals, args)


def write_report(results: dict, evals: dict, args: argparse.Namespace) -> None:
    n_h, n_n = (len(s) for s in held_out_sets())
    rows = [
        "| model | held-out refusal | held-out KL | train-subset refusal | train-subset KL "
        "| chosen trial | search | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| aligned model | {evals['aligned model']['refusal']:.1%} | 0 | | | | | |",
    ]
    for name, label in (
        ("weightops", "`weightops steer optimize`"),
        ("heretic", f"heretic-llm {HERETIC_VERSION}"),
    ):
        r, e = results[name], evals[name]
        rows.append(
            f"| {label} | {e['refusal']:.1%} | {e['kl']:.4f} | {r['refusals_fit']:.1%} | "
            f"{r['kl_fit']:.4f} | {r['trial']} | {r['search_s']:.0f} s | {r['wall_s']:.0f} s |"
        )
    wo, he = results["weightops"], results["heretic"]
    matched = ""
    if "weightops matched" in results:
        r, e, h = results["weightops matched"], evals["weightops matched"], evals["heretic"]
        rows.insert(
            -1,
            f"| `weightops steer optimize`, trial at heretic's refusal | {e['refusal']:.1%} | "
            f"{e['kl']:.4f} | {r['refusals_fit']:.1%} | {r['kl_fit']:.4f} | {r['trial']} | | |",
        )
        better = e["refusal"] <= h["refusal"] and e["kl"] < h["kl"]
        matched = (
            f"\n\nAt heretic's refusal level: weightops' lowest-KL trial refusing at most "
            f"heretic's chosen train-subset share ({he['refusals_fit']:.1%}) is trial "
            f"{r['trial']}; on the held-out prompts it refuses {e['refusal']:.1%} at KL "
            f"{e['kl']:.4f} against heretic's {h['refusal']:.1%} at {h['kl']:.4f}: "
            + ("as few refusals or fewer at a lower KL." if better else
               "not both as few refusals and a lower KL.")
        )  # fmt: skip

    def cells(front: list) -> list[str]:
        return [f"{b:.1%} at {k:.4f} (trial {t})" for t, b, k in front]

    a, b = cells(wo["front"]), cells(he["front"])
    fronts = ["| weightops front (refusal, KL) | heretic front (refusal, KL) |", "|---|---|"] + [
        f"| {a[i] if i < len(a) else ''} | {b[i] if i < len(b) else ''} |"
        for i in range(max(len(a), len(b)))
    ]
    beat = dominating(wo["front"], (he["refusals_fit"], he["kl_fit"]))
    lost = dominating(he["front"], (wo["refusals_fit"], wo["kl_fit"]))
    verdict = (
        f"heretic's chosen trial ({he['refusals_fit']:.1%}, KL {he['kl_fit']:.4f}) has "
        + (f"weightops trials {beat} at as few refusals and a lower KL" if beat else
           "no weightops trial at as few refusals and a lower KL")
        + f"; weightops' chosen trial ({wo['refusals_fit']:.1%}, KL {wo['kl_fit']:.4f}) has "
        + (f"heretic trials {lost} at as few refusals and a lower KL." if lost else
           "no heretic trial at as few refusals and a lower KL.")
    )  # fmt: skip
    cmd = "python bench/steer_optimize.py" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "only" and v != {"trials": 16, "startup": 5, "fit": 64, "seed": 0, "goal": 0.05,
                                  "eval_target": 24, "eval_harmless": 16,
                                  "max_new_tokens": 8, "batch_size": 48}[k]
    )  # fmt: skip
    body = (
        f"- Command: `{cmd}`\n- Machine: {machine()}\n"
        f"- Aligned model (SmolLM2-135M-Instruct fine-tuned to refuse), fp32. Both tools: "
        f"{args.trials} trials ({args.startup} random first), seed {args.seed}, direction "
        f"from {args.fit} harmful_train vs {args.fit} harmless_train prompts (evenly "
        f"spaced); trials scored on {args.eval_target} harmful and {args.eval_harmless} "
        f"harmless of those, greedy answers of {args.max_new_tokens} tokens judged by the "
        f"same refusal phrases; the trial chosen by the same rule (lowest KL with refusal "
        f"≤ {args.goal:.0%}, else fewest refusals).\n"
        f"- Held-out (every second one): {n_h} harmful prompts (greedy, 16 tokens, `refuses`) and {n_n} "
        "harmless prompts (KL(original ‖ edited) of the first answer token), measured "
        "by this script for both outputs.\n\n" + "\n".join(rows) + "\n\n"
        "Each tool's Pareto front of its trials (train-subset refusal share, KL):\n\n"
        + "\n".join(fronts)
        + "\n\n"
        + verdict
        + matched
        + "\n\n"
        "The two ran at the same time, so both saw the same load on the shared machine. "
        "Search is the time inside trials (weightops) or until heretic's trial menu "
        "(model loading, direction and trials); wall includes loading and saving.\n"
    )
    write_section("steer_optimize", "steer optimize vs heretic-llm (removing refusal)", body)


if __name__ == "__main__":
    main()
