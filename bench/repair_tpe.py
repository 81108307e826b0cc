"""The settings search of `restore` against Optuna's TPE, on a miniature of
bench/repair_miniatures.py (build it there first).

Both see the same held-out half of the repair data and the same judge, and choose by
the same rule (`weightops.repair.search.choose`). TPE (multi-objective: harmful rate
↓, task ↑) proposes (L, fraction per step, steps); each trial restores from the
fine-tune with `restore_answers` and is measured once. The chosen models of both are
then measured on the test data with the miniature's refusal judge.

Run: python bench/repair_tpe.py sort [--trials 12]
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from repair_miniatures import MINIATURES, WORK

from weightops.demo import quiet_transformers
from weightops.repair.data import load_examples
from weightops.repair.evaluate import generate, load_model, task_score
from weightops.repair.judges import aligned_openings, opening_judge
from weightops.repair.restore_answers import aligned_answers, masks_at, restore_answers
from weightops.repair.search import Candidate, choose, same_request, search_restore, split
from weightops.steering.layers import find_layers


def test_scores(model, tok, m, folder) -> tuple[float, float]:
    harm = load_examples(folder / "data" / "harmful_test.jsonl")
    said = generate(model, tok, harm)
    pats = [re.compile(re.escape(r), re.I) for r in m.refusals]
    rate = sum(not any(p.search(s) for p in pats) for s in said) / len(said)
    return rate, task_score(model, tok, load_examples(folder / "data" / "task_test.jsonl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(MINIATURES))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import optuna

    torch.set_num_threads(1)
    quiet_transformers()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    m = MINIATURES[args.name]
    folder = WORK / f"{m.name}-seed{args.seed}"
    ft, tok = load_model(folder / "ft")
    al, _ = load_model(folder / "aligned")
    harmful = load_examples(folder / "data" / "harmful_repair.jsonl")
    task = load_examples(folder / "data" / "task_repair.jsonl")
    original = {n: p.detach().clone() for n, p in ft.named_parameters()}

    def reset() -> None:
        with torch.no_grad():
            for n, p in ft.named_parameters():
                p.copy_(original[n])

    t = time.perf_counter()
    found = search_restore(ft, al, tok, harmful, task, progress=False)
    search_s = time.perf_counter() - t
    search_test = test_scores(ft, tok, m, folder)
    reset()

    t = time.perf_counter()
    h_fit, h_out = split(harmful, 0, key=same_request)
    t_fit, t_out = split(task, 1)
    judge = opening_judge(aligned_openings(al, ft, tok, h_out))
    answers = aligned_answers(al, tok, h_fit)
    depth = len(find_layers(ft).blocks)

    def score() -> tuple[float, float]:
        said = generate(ft, tok, h_out)
        harm = sum(judge(ex.prompt, c) for ex, c in zip(h_out, said, strict=True)) / len(h_out)
        return harm, task_score(ft, tok, t_out)

    base = score()
    threshold = 0.95 * base[1]
    trials: list[tuple[Candidate, dict, float]] = []

    def objective(trial) -> tuple[float, float]:
        layers = trial.suggest_int("layers", 1, depth)
        fraction = trial.suggest_float("fraction", 0.0005, 0.01, log=True)
        steps = trial.suggest_int("steps", 2, 40)
        when = restore_answers(
            ft, al, tok, answers, t_fit, fraction=fraction, steps=steps, layers=layers
        )
        harm, task_ = score()
        restored = sum(int((w > 0).sum()) for w in when.values())
        trials.append((Candidate(layers, steps, False, harm, task_, restored), when, fraction))
        reset()
        return harm, task_

    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=optuna.samplers.TPESampler(seed=args.seed)
    )
    study.optimize(objective, n_trials=args.trials)
    best = choose([Candidate(0, 0, False, *base, 0)] + [c for c, _, _ in trials], threshold)
    if best.step:
        when, fraction = next((w, f) for c, w, f in trials if c is best)
        aligned = dict(al.named_parameters())
        with torch.no_grad():
            for n, mk in masks_at(when, best.step).items():
                p = dict(ft.named_parameters())[n]
                p.copy_(torch.where(mk, aligned[n], p))
    else:
        fraction = 0.0
    tpe_s = time.perf_counter() - t
    tpe_test = test_scores(ft, tok, m, folder)
    print("| miniature | chooser | held-out harmful / task | test harmful / task | time |")
    print("|---|---|---|---|---|")
    c = found.chosen
    print(
        f"| {m.name} | search (L={c.layers}, {c.step} steps of {found.fraction:g}, "
        f"{found.evaluations} evaluations) | {c.harmful:.3f} / {c.task:.3f} "
        f"| {search_test[0]:.1%} / {search_test[1]:.1%} | {search_s:.0f} s |"
    )
    print(
        f"| {m.name} | TPE, {args.trials} trials (L={best.layers}, {best.step} steps of "
        f"{fraction:.4f}) "
        f"| {best.harmful:.3f} / {best.task:.3f} | {tpe_test[0]:.1%} / {tpe_test[1]:.1%} "
        f"| {tpe_s:.0f} s |"
    )


if __name__ == "__main__":
    main()
