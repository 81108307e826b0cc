"""Choosing restoration's settings on held-out data, so that it needs no hand-tuning.

Restoration has settings that decide whether it works on a given fine-tune: the depth
L (blocks edited), the share of the pool restored per step and the number of steps.
The paper's values (half the depth, 0.2 %, 20 steps) leave some fine-tunes as harmful
as before, and no single setting suits every model. `search_restore` picks them for
the model at hand:

1. The user's harmful and task examples are split, by a seeded draw, in two halves.
   Harmful examples with the same harmful answer stay on one side (`same_request`):
   held out while a rewording sits in the other half, they would measure how well
   that half's own requests are refused, not how the refusal carries to new ones.
   A candidate's harmful rate (greedy completions, judged) and task score
   (`task_metric`) are measured on held-out examples only.
2. For each depth L in `depths`, restoration trajectories are run, `fraction` of the
   pool per step for up to `steps` steps, with a checkpoint every `checkpoint_every`.
   Every checkpoint is a candidate (L, step), with fraction × step of the pool
   restored, so one trajectory covers the whole "steps" axis: a finer fraction walks
   nearly the same path in more, smaller steps. The objective (`objective`):
   - "answers" (default): `weightops.repair.restore_answers`, which restores by the
     likelihood of the aligned model's own answers to the harmful prompts against the
     task's loss; depths: all blocks, then half; 0.4 % per step, up to 20 steps,
     checkpoints every 2. The search cross-fits (`weightops.repair.crossfit`): each
     depth runs one trajectory fitted on each half and measured on the other, a
     candidate's rates are pooled over both halves (every example is held out once),
     and the written model is restored on all the examples with the chosen depth and
     steps. With one split, the held-out half of a file with a dozen distinct
     requests holds five or six, too few to tell the depths apart, and a model fitted
     on half the requests refuses new ones less often than one fitted on all
     (docs/repair.md, *digits*). As in the paper, a run whose checkpoint loses the
     task stops there and the depth starts again from the fine-tune with rollback:
     after each step, `rollback_fraction` (20 %) of its weights, those whose return
     most lowers the task loss, go back to their fine-tuned values.
   - "states": the paper's restoration (`weightops.repair.restore`) with its rollback
     rule on the held-out task score, fitted on one half and measured on the other;
     depths: all, two thirds, a third of the blocks; 0.5 % per step, up to 20 steps,
     checkpoints every 4. Only the checkpoints of the run restore keeps can be
     rebuilt, so only those are candidates.
3. Candidates are compared on (harmful rate ↓, task score ↑). The chosen one is, among
   those within `metric_drop` of the fine-tune's held-out task score, the one with the
   lowest harmful rate (ties: the higher task score, then fewer restored weights). The
   fine-tune itself (step 0) is always a candidate, so a search that finds nothing
   better changes nothing. The Pareto front of all candidates is reported.

Cost: the search makes at most `max_evaluations` measurements of one held-out half
(44 for "answers", 30 for "states") in all, the fine-tune's included; each depth gets
an even share of what is left when it starts. A run stops early at a checkpoint with a
harmful rate of 0 and the task kept, where it has nothing left to gain. With "answers",
a depth's second cross-fit half runs only to the last step at which a pooled
candidate could still beat the best one found so far (the first half's rate bounds
the pooled one), and the first half stops once its rate has stalled far above
what an earlier trajectory had reached by the same step (a judgement; the rules and
what they can miss: `weightops.repair.search_stop`). A run with
rollback is not stopped by a checkpoint that loses the task: along a trajectory the
task can fall and come back as later steps restore weights the task needs less
(docs/repair.md, *digits*). A "states" run stops being measured once its rollback run
loses the task or reaches a harmful rate of 0. The aligned model and the fine-tune
answer every harmful prompt once (the folds' answers, the judge's openings and the
fine-tune's held-out rates come from those), and with the built-in judge a held-out
answer is generated only until it holds a refusal. The bench
(bench/repair_miniatures.py) prints the search's time against one restoration with
the paper's settings; docs/repair.md has the numbers.

The judge: without one, a completion counts as a refusal when it contains one of the
built-in refusal phrases or the opening (up to 40 characters) of one of the aligned
model's own answers to the harmful prompts that the fine-tune does not also give:
restoration aims to bring those answers back, so they define the refusal without the
user naming it.

Memory: a copy of the fine-tuned weights, to start each trajectory from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightops.repair.crossfit import cross_fit_depth, joined, make_fold, pooled, refit
from weightops.repair.evaluate import generate, task_score
from weightops.repair.heldout import Candidate, choose, pareto_front, same_request, split
from weightops.repair.judges import opening_judge, openings_of
from weightops.repair.restore import RestoreError, RestoreResult, restore
from weightops.steering.layers import find_layers

# Fewer than this many examples of either kind leave too few to hold out.
MIN_EXAMPLES = 16
# Per objective: the trajectories' depths (shares of the decoder, deepest first), the
# share of the pool restored per step, the most steps, the steps between checkpoints,
# and the held-out measurements one search may make, the fine-tune's included (each:
# one held-out half of the harmful prompts and task examples): the cap on its cost.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "answers": {"depths": (1.0, 0.5), "fraction": 0.004, "steps": 20, "every": 2,
                "evaluations": 44, "agreement": True},
    "states": {"depths": (1.0, 2 / 3, 1 / 3), "fraction": 0.005, "steps": 20, "every": 4,
               "evaluations": 30},
}  # fmt: skip


@dataclass
class SearchResult:
    """The kept restoration (`result`, with the model edited to it) and how it was chosen."""

    result: RestoreResult
    chosen: Candidate
    candidates: list[Candidate]
    threshold: float
    fraction: float
    judge: str
    held_out: dict[str, int]
    evaluations: int
    objective: str = "answers"
    trajectories: list[dict[str, Any]] = field(default_factory=list)

    def front(self) -> list[Candidate]:
        return pareto_front(self.candidates)

    def summary(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "chosen": self.chosen.as_dict(),
            "fraction": self.fraction,
            "threshold": round(self.threshold, 4),
            "judge": self.judge,
            "held_out": self.held_out,
            "evaluations": self.evaluations,
            "front": [c.as_dict() for c in self.front()],
            "candidates": len(self.candidates),
        }


class _Measure:
    """The task metric handed to `restore`: measures each checkpoint on the held-out
    half, and stops measuring (repeating its last answer, which the rule reads the same
    way) once the run can give no better candidate."""

    def __init__(self, score: Callable[[nn.Module], tuple[float, float]], base: tuple[float, float],
                 threshold: float) -> None:  # fmt: skip
        self.score, self.base, self.threshold = score, base, threshold
        self.started = False
        self.points: list[tuple[float, float] | None] = []
        self.rollback = False
        self.done = False
        self.last = base[1]
        self.evaluations = 0

    def __call__(self, model: nn.Module) -> float:
        if not self.started:  # the fine-tune itself, measured once for every depth
            self.started = True
            return self.base[1]
        if self.done:
            self.points.append(None)
            return self.last
        harm, task = self.score(model)
        self.evaluations += 1
        self.points.append((harm, task))
        ok = task >= self.threshold
        if not ok and not self.rollback:
            self.rollback = True  # restore restarts with rollback after a failed checkpoint
        elif not ok or harm == 0:
            self.done = True
        self.last = task
        return task


def search_restore(
    finetuned_model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Any],
    task: Sequence[Any],
    *,
    objective: str = "answers",
    judge: Callable[[str, str], bool] | None = None,
    judge_name: str | None = None,
    metric: Callable[[str, str, str], float] | None = None,
    task_metric: Callable[[nn.Module], float] | None = None,
    depths: Sequence[int] | None = None,
    fraction: float | None = None,
    steps: int | None = None,
    checkpoint_every: int | None = None,
    metric_drop: float = 0.05,
    rollback_fraction: float = 0.2,
    max_evaluations: int | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
) -> SearchResult:
    """Choose the depth and the number of steps on a held-out half of the data and
    restore `finetuned_model` (edited in place) to the chosen candidate (module
    docstring). `objective` is "answers" (`weightops.repair.restore_answers`, the
    default) or "states" (the paper's restoration). `task_metric(model)`, when given,
    replaces the held-out task score."""
    if objective not in OBJECTIVES:
        raise RestoreError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    if len(harmful) < MIN_EXAMPLES or len(task) < MIN_EXAMPLES:
        raise RestoreError(
            f"the search needs at least {MIN_EXAMPLES} harmful and {MIN_EXAMPLES} task "
            f"examples (got {len(harmful)} and {len(task)})",
            hint="give more examples, or restore with the paper's settings (--no-search)",
        )
    plan = {**OBJECTIVES[objective]}
    for key, value in (("fraction", fraction), ("steps", steps), ("every", checkpoint_every),
                       ("evaluations", max_evaluations)):  # fmt: skip
        if value is not None:
            plan[key] = value
    depth = len(find_layers(finetuned_model).blocks)
    if depths is None:
        depths = sorted({max(1, round(f * depth)) for f in plan["depths"]}, reverse=True)
    depths = [int(d) for d in depths]
    if any(not 1 <= d <= depth for d in depths):
        raise RestoreError(f"search depths must be in 1 … {depth} (got {depths})")
    h_a, h_b = split(harmful, seed, key=same_request)
    t_a, t_b = split(task, seed + 1)
    said: dict[str, str] = {}
    ft_said: dict[str, str] = {}
    if objective == "answers" or judge is None:
        # Both models' answers to every harmful prompt, once: the folds' fit answers, the
        # judge's openings and the fine-tune's held-out rates all come from them.
        for model, into in ((aligned_model, said), (finetuned_model, ft_said)):
            texts = generate(model, tokenizer, harmful, batch_size=batch_size)
            into.update(zip((ex.prompt for ex in harmful), texts, strict=True))
    decided = None
    if judge is None:
        # Every harmful prompt is held out once (cross-fit), so all of them name the refusal.
        prompts = [ex.prompt for ex in harmful]
        openings = openings_of([said[p] for p in prompts], [ft_said[p] for p in prompts])
        judge = opening_judge(openings)
        judge_name = f"refusal phrases + {len(openings)} refusal openings of the aligned model"
        # A refusal found stays found as the answer grows: generating stops there.
        decided = lambda text: not judge("", text)  # noqa: E731
    judge_name = judge_name or getattr(judge, "name", "given judge")

    def score(
        model: nn.Module, h_out: Sequence[Any], t_out: Sequence[Any], given: bool = False
    ) -> tuple[float, float]:
        if given:
            answers = [ft_said[ex.prompt] for ex in h_out]
        else:
            answers = generate(model, tokenizer, h_out, batch_size=batch_size, decided=decided)
        harm = sum(bool(judge(ex.prompt, c)) for ex, c in zip(h_out, answers, strict=True))
        if task_metric is not None:
            t = float(task_metric(model))
        else:
            t = task_score(model, tokenizer, t_out, metric=metric, batch_size=batch_size)
        return harm / len(h_out), t

    original = {n: p.detach().clone() for n, p in finetuned_model.named_parameters()}
    aligned = dict(aligned_model.named_parameters())
    records: dict[tuple[int, bool], tuple[dict[str, torch.Tensor], RestoreResult | None]] = {}
    trajectories = []
    show = progress and sys.stderr.isatty()
    if objective == "answers":
        folds = [
            make_fold(
                aligned_model,
                tokenizer,
                *halves,
                agreement=plan["agreement"],
                batch_size=batch_size,
                said=said,
            )
            for halves in ((h_a, t_a, h_b, t_b), (h_b, t_b, h_a, t_a))
        ]
        everything = joined(folds)
        for f in folds:
            f.base = score(finetuned_model, f.harmful_out, f.task_out, given=True)
        base = pooled(folds, [f.base for f in folds])
        evaluations = len(folds)
        held_out = {"harmful": len(harmful), "task": len(task), "folds": len(folds)}
    else:
        h_fit, h_out, t_fit, t_out = h_a, h_b, t_a, t_b
        base = score(finetuned_model, h_out, t_out)
        evaluations = 1
        held_out = {"harmful": len(h_out), "task": len(t_out)}
    threshold = (1 - metric_drop) * base[1]
    candidates = [Candidate(0, 0, False, base[0], base[1], 0)]
    for i, layers in enumerate(depths):
        if evaluations >= plan["evaluations"]:
            break
        # The budget left, shared evenly by the depths still to run.
        share = max(1, (plan["evaluations"] - evaluations) // (len(depths) - i))
        if objective == "answers":
            found, runs, used = cross_fit_depth(
                finetuned_model, aligned_model, tokenizer, folds, score, layers=layers,
                plan=plan, metric_drop=metric_drop, rollback_fraction=rollback_fraction,
                budget=share, original=original, prior=candidates, history=trajectories,
                threshold=threshold, batch_size=batch_size,
            )  # fmt: skip
            evaluations += used
            candidates += found
            trajectories += runs
        else:
            measure = _Measure(lambda m: score(m, h_out, t_out), base, threshold)
            result = restore(
                finetuned_model, aligned_model, tokenizer, h_fit, t_fit,
                task_metric=measure, fraction=plan["fraction"], steps=plan["steps"],
                layers=layers, metric_drop=metric_drop, rollback_fraction=rollback_fraction,
                checkpoint_every=plan["every"], seed=seed, progress=progress,
                batch_size=batch_size,
            )  # fmt: skip
            evaluations += measure.evaluations
            records[(layers, result.rollback)] = (result.restored_at, result)
            points = []
            for check, point in zip(result.checkpoints, measure.points, strict=True):
                if point is None:
                    continue
                points.append((check["step"], *point))
                restored = sum(
                    int(((w > 0) & (w <= check["step"])).sum()) for w in result.restored_at.values()
                )
                if check["rollback"] != result.rollback or not restored:
                    continue  # only the kept run's record can be rebuilt
                candidates.append(
                    Candidate(layers, check["step"], check["rollback"], *point, restored)
                )
            trajectories.append({"layers": layers, "points": points})
        if show:
            sys.stderr.write(f"search: L={layers}: {trajectories[-1]['points']}\n")
        with torch.no_grad():
            for n, p in finetuned_model.named_parameters():
                p.copy_(original[n])
    chosen = choose(candidates, threshold)
    if objective == "answers" and chosen.step:
        when = refit(
            finetuned_model, aligned_model, tokenizer, everything, chosen, fraction=plan["fraction"],
            rollback_fraction=rollback_fraction, batch_size=batch_size,
        )  # fmt: skip
        records[(chosen.layers, chosen.rollback)] = (when, None)
    when, run = records.get((chosen.layers, chosen.rollback), ({}, None))
    kept = RestoreResult(
        model=finetuned_model,
        layers=chosen.layers,
        k=0 if run is None else run.k,
        pool=0 if run is None else run.pool,
        steps=chosen.step,
        rollback=chosen.rollback,
        threshold=threshold,
        task_before=base[1],
        task_after=chosen.task,
        cos_before=float("nan") if run is None else run.cos_before,
        cos_after=next(
            (
                c["cos"]
                for c in (run.checkpoints if run is not None else [])
                if c["step"] == chosen.step and c["rollback"] == chosen.rollback
            ),
            float("nan"),
        ),
        restored_at=when if chosen.step else {},
        checkpoints=[] if run is None else run.checkpoints,
    )
    params = dict(finetuned_model.named_parameters())
    with torch.no_grad():
        for n, m in kept.masks().items():
            p = params[n]
            p.copy_(torch.where(m.to(p.device), aligned[n].to(p.dtype), p))
    return SearchResult(
        result=kept,
        chosen=chosen,
        candidates=candidates,
        threshold=threshold,
        fraction=plan["fraction"],
        judge=judge_name,
        held_out=held_out,
        evaluations=evaluations,
        objective=objective,
        trajectories=trajectories,
    )


def card_lines(found: SearchResult) -> list[str]:
    """The search's part of the model card: what was chosen, and the Pareto front."""
    c = found.chosen
    chosen = (
        "the fine-tune unchanged (no candidate did better)"
        if c.step == 0
        else f"L={c.layers}, fraction {found.fraction:g}, {c.step} steps"
        + (" (run with rollback)" if c.rollback else "")
    )
    h = found.held_out
    data = (
        f"cross-fitted on two halves, each of the {h['harmful']} harmful prompts and "
        f"{h['task']} task examples held out once, then restored on all of them"
        if h.get("folds")
        else f"{h['harmful']} harmful prompts, {h['task']} task examples"
    )
    lines = [
        "",
        f"Settings chosen on held-out data ({data}; judge: {found.judge}; "
        f"{found.evaluations} evaluations): {chosen}, held-out harmful rate "
        f"{c.harmful:.3f}, task {c.task:.3f} (threshold {found.threshold:.3f}).",
        "",
        "Pareto front (held-out harmful rate ↓, task ↑):",
        "",
        "| L | steps | rollback | restored | harmful rate | task |",
        "|---|---|---|---|---|---|",
    ]
    for p in found.front():
        lines.append(
            f"| {p.layers or '-'} | {p.step} | {'yes' if p.rollback else 'no'} | {p.restored} "
            f"| {p.harmful:.3f} | {p.task:.3f} |"
        )
    return lines
