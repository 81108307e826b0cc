"""Two-fold cross-fitting for the settings search of restoration by answers
(`weightops.repair.search`, objective "answers").

One split of the user's data into a fit half and a held-out half measures how the
restored refusal carries to new requests on few of them: a repair file of 64 harmful
prompts may hold a dozen distinct requests, so the held-out half holds five or six, and
the search then keeps the point that was luckiest on those (docs/repair.md, *digits*:
held-out harmful rate 0.03, 60 % on the test). Here every example is held out once:

1. The data is split in halves A and B (harmful examples by request, `same_request`).
   For each depth and mode (plain, then with rollback), a trajectory is fitted on A and
   measured on B at its checkpoints, then one is fitted on B and measured on A at the
   same steps. A candidate (depth, step, mode) is a step measured in both folds; its
   harmful rate and task score are pooled over both held-out halves, so they count
   every harmful request and every task example once.
2. The written model is fitted on all the examples, A and B together, with the chosen
   depth, steps and mode (`refit`). A model fitted on half the requests refuses new
   ones less often than one fitted on all of them, at the same number of steps
   (docs/repair.md), so the pooled held-out rates err on the side of caution.

Stopping: a plain run stops when it loses the task on its held-out half (either
fold's loss restarts the depth with rollback, in both folds); fold A stops after two
checkpoints in a row with nothing left to gain (harmful rate 0, task kept), at half of
the depth's measurements, or when it has stalled far behind an earlier trajectory;
fold B runs to the last step of fold A at which a pooled candidate could still be
chosen, and not at all when there is none (both rules: `weightops.repair.search_stop`,
which says what each can miss). Candidates
pooled over both folds are pessimistic for the refitted model (fitted on twice the
requests and task examples), on the task as well as on the harm: on *digits* the folds
lost the task at L=4 where the refit kept it (docs/repair.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightops.repair.data import Example
from weightops.repair.heldout import Candidate, choose, same_request
from weightops.repair.restore_answers import aligned_answers, restore_answers
from weightops.repair.search_stop import behind, reach

Score = Callable[[nn.Module, Sequence[Any], Sequence[Any]], tuple[float, float]]


@dataclass
class Fold:
    """One side of the cross-fit: what restoration reads and where it is measured."""

    answers: list[Any]  # harmful prompts with the aligned model's answers
    task_fit: list[Any]
    harmful_out: list[Any]
    task_out: list[Any]
    groups: list[str] | None = None  # per answer, its request (None: no agreement rule)
    base: tuple[float, float] = (1.0, 0.0)  # the fine-tune's (harmful, task) on the held-out


def make_fold(
    aligned_model: nn.Module, tokenizer: Any, harmful_fit: Sequence[Any], task_fit: Sequence[Any],
    harmful_out: Sequence[Any], task_out: Sequence[Any], *, agreement: bool, batch_size: int = 8,
    said: Mapping[str, str] | None = None,
) -> Fold:  # fmt: skip
    """A fold: the aligned model answers its fit half's harmful prompts (or `said`
    holds its answer to each prompt); with `agreement`, each answer is keyed by the
    request it answers (`same_request`)."""
    if said is None:
        answers = aligned_answers(aligned_model, tokenizer, harmful_fit, batch_size)
    else:
        answers = [
            Example(ex.prompt, said[ex.prompt]) for ex in harmful_fit if said[ex.prompt].strip()
        ]
    request = {ex.prompt: same_request(ex) for ex in harmful_fit}
    groups = [request[a.prompt] for a in answers] if agreement else None
    return Fold(answers, list(task_fit), list(harmful_out), list(task_out), groups)


def joined(folds: Sequence[Fold]) -> Fold:
    """All the folds' fit data as one (what `refit` restores on); nothing held out."""
    groups = None if folds[0].groups is None else [k for f in folds for k in f.groups or ()]
    answers = [a for f in folds for a in f.answers]
    return Fold(answers, [t for f in folds for t in f.task_fit], [], [], groups)


def pooled(folds: Sequence[Fold], points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(harmful rate, task score) over both held-out halves together: each fold's rates
    weighted by its number of held-out examples."""
    nh = sum(len(f.harmful_out) for f in folds)
    nt = sum(len(f.task_out) for f in folds)
    harm = sum(p[0] * len(f.harmful_out) for f, p in zip(folds, points, strict=True)) / nh
    task = sum(p[1] * len(f.task_out) for f, p in zip(folds, points, strict=True)) / nt
    return harm, task


def restored_count(when: dict[str, torch.Tensor], step: int) -> int:
    return sum(int(((w > 0) & (w <= step)).sum()) for w in when.values())


def leader_points(
    trajectories: Sequence[dict[str, Any]], candidates: Sequence[Candidate], threshold: float
) -> list[tuple[int, float]]:
    """(step, fold A's harmful rate) of the trajectories' fold-A checkpoints whose pooled
    candidate keeps the task: what a later trajectory is compared with (`behind`)."""
    kept = {(c.layers, c.step, c.rollback) for c in candidates if c.task >= threshold}
    return [
        (p[0], p[1])
        for t in trajectories
        if t["fold"] == 0
        for p in t["points"]
        if (t["layers"], p[0], t["rollback"]) in kept
    ]


def _reset(model: nn.Module, original: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(original[n])


def cross_fit_depth(
    model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    folds: Sequence[Fold],
    score: Score,
    *,
    layers: int,
    plan: dict[str, Any],
    metric_drop: float,
    rollback_fraction: float,
    budget: int,
    original: dict[str, torch.Tensor],
    prior: Sequence[Candidate] = (),
    history: Sequence[dict[str, Any]] = (),
    threshold: float = float("-inf"),
    batch_size: int = 8,
) -> tuple[list[Candidate], list[dict[str, Any]], int]:
    """The candidates of one depth (module docstring), its trajectories, and the
    measurements made (at most `budget`). `prior` and `history` are the candidates and
    trajectories of the depths before, `threshold` the pooled task score a candidate
    must keep: the stopping rules (`weightops.repair.search_stop`) compare with them.
    `model` is left at the fine-tune."""
    candidates: list[Candidate] = []
    trajectories: list[dict[str, Any]] = []
    used = 0
    held = sum(len(f.harmful_out) for f in folds)
    for rollback in (False, True):
        runs: list[dict[int, tuple[float, float]]] = []
        counts: list[dict[str, torch.Tensor]] = []
        lost = False
        last = plan["steps"]
        known = [*prior, *candidates]
        best = choose(known, threshold).harmful if known else float("inf")
        leaders = leader_points([*history, *trajectories], known, threshold)
        for i, fold in enumerate(folds):
            points: dict[int, tuple[float, float]] = {}
            # Fold A takes half of what is left, so that the other folds can follow it.
            left = (budget - used) // (len(folds) - i) if i == 0 else budget - used
            fold_floor = (1 - metric_drop) * fold.base[1]

            def checkpoint(step: int, fold: Fold = fold, points: dict = points, left: int = left,
                           floor: float = fold_floor, first: bool = i == 0,
                           plain: bool = not rollback, leaders: list = leaders) -> bool:  # fmt: skip
                nonlocal lost
                harm, t = score(model, fold.harmful_out, fold.task_out)
                points[step] = (harm, t)
                if plain and t < floor:
                    lost = True  # the paper's rule: restart with rollback
                    return False
                if (
                    first
                    and all(h == 0 and x >= floor for h, x in list(points.values())[-2:])
                    and len(points) >= 2
                ):
                    return False  # nothing left to gain
                if first and behind([(s, p[0]) for s, p in points.items()], fold.base[0], leaders):
                    return False  # far behind an earlier trajectory and not moving
                return len(points) < left

            if left < 1 or last < 1:
                break
            when = restore_answers(
                model, aligned_model, tokenizer, fold.answers, fold.task_fit,
                fraction=plan["fraction"], steps=last, layers=layers,
                rollback_fraction=rollback_fraction if rollback else 0.0,
                checkpoint_every=plan["every"], on_checkpoint=checkpoint, batch_size=batch_size,
                groups=fold.groups,
            )  # fmt: skip
            _reset(model, original)
            used += len(points)
            runs.append(points)
            counts.append(when)
            trajectories.append({
                "layers": layers, "rollback": rollback, "fold": i,
                "points": [(s, *p) for s, p in points.items()],
            })  # fmt: skip
            if i == 0:
                # Fold B goes only as far as a candidate could still be chosen.
                rates = {step: p[0] for step, p in points.items()}
                last = reach(rates, len(fold.harmful_out), held, best)
        if len(runs) == len(folds):
            for step in sorted(set.intersection(*(set(r) for r in runs))):
                harm, t = pooled(folds, [r[step] for r in runs])
                restored = round(sum(restored_count(w, step) for w in counts) / len(counts))
                candidates.append(Candidate(layers, step, rollback, harm, t, restored))
        if not lost or used >= budget:
            break
    return candidates, trajectories, used


def refit(
    model: nn.Module,
    aligned_model: nn.Module,
    tokenizer: Any,
    everything: Fold,
    chosen: Candidate,
    *,
    fraction: float,
    rollback_fraction: float,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Restore `model` (in place) on `everything` (`joined`) with the chosen depth,
    steps and mode; returns restored_at of that run."""
    return restore_answers(
        model, aligned_model, tokenizer, everything.answers, everything.task_fit,
        fraction=fraction, steps=chosen.step,
        layers=chosen.layers, rollback_fraction=rollback_fraction if chosen.rollback else 0.0,
        checkpoint_every=chosen.step, batch_size=batch_size, groups=everything.groups,
    )  # fmt: skip
