"""When the settings search of restoration by answers (`weightops.repair.crossfit`)
stops spending on a trajectory: the two rules that bound its cost.

A depth's trajectory (plain or with rollback) is run twice, fitted on half A and
measured on half B (fold A), then the other way round (fold B) to the last step fold A
measured; a candidate is a step measured in both, with pooled rates. Two rules cut
steps that cannot, or are very unlikely to, give the chosen candidate:

1. **Fold B's reach (exact for the run it cuts).** A candidate's pooled harmful rate is
   (a_A + a_B) / n, with a_A, a_B the harmful answers on the two held-out halves and n
   their size together, so it is at least a_A / n. `choose` keeps the lowest pooled
   harmful rate among the candidates that keep the task, so a step where
   a_A / n > the best such candidate's rate found so far (the fine-tune's included)
   can never be chosen, whatever fold B measures there. Fold B therefore runs only to
   the last step of fold A below that bound (`reach`), and not at all when there is
   none. Of the run it cuts, it misses nothing `choose` would pick; the steps past the
   reach are left out of the reported Pareto front. What it can miss: in a plain run
   whose fold A kept the task, a task loss that fold B would have shown only past its
   reach no longer starts the depth again with rollback, and that run, a different
   trajectory, might have found a better point. (In every search measured, a cut fold
   B either lost the task before its reach or never lost it.)

2. **Far behind and stalled (a judgement).** Fold A stops at a checkpoint when both
   hold: (i) `stall` checkpoints in a row (2) brought its held-out harmful rate no
   lower than the lowest it had before them (the fine-tune's rate counting as step
   0); (ii) its rate there is more than `margin` (0.25) above the lowest rate fold A
   of any earlier trajectory had reached by the same step at a candidate that kept
   the task (`behind`). Both halves are measured on the same held-out requests in
   every fold A, so the comparison is between like numbers. It can miss a trajectory
   that stays flat for two checkpoints, far above what another reached at the same
   step, and then falls below the best candidate; the number of steps a trajectory
   runs and the fraction per step are the same for every depth, so a trajectory
   that is behind by a quarter of the held-out requests and not moving has that much
   left to make up in the steps that remain. A plateau alone does not stop the
   leading trajectory: on the real model (docs/repair.md) fold A at all 30 blocks sat
   at 0.06 from step 12 to 24 and reached 0 at step 28, the point that was chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

# How far above (in harmful rate on fold A's held-out half) the best earlier trajectory
# a trajectory must be, and for how many checkpoints without a new low, to be stopped.
MARGIN = 0.25
STALL = 2
# Rates are counts over held-out sizes; pooling multiplies them back.
_EPS = 1e-9


def reach(fold_a: dict[int, float], held_a: int, held: int, best: float) -> int:
    """The last step of fold A (its held-out harmful rates by step, on `held_a` harmful
    prompts) at which the pooled harmful rate over both halves (`held` prompts) can
    still be at most `best`; 0 when there is none (rule 1, module docstring)."""
    return max((s for s, h in fold_a.items() if h * held_a / held <= best + _EPS), default=0)


def stalled(rates: Sequence[float], start: float, stall: int = STALL) -> bool:
    """Whether the last `stall` of `rates` (one trajectory's checkpoints, in order,
    after `start`, the fine-tune's rate) are all at or above the lowest before them."""
    if len(rates) < stall:
        return False
    before = min([start, *rates[: len(rates) - stall]])
    return all(r >= before - _EPS for r in rates[len(rates) - stall :])


def lowest_by(leaders: Sequence[tuple[int, float]], step: int) -> float | None:
    """The lowest fold-A harmful rate of `leaders` ((step, rate) of earlier trajectories,
    at candidates that kept the task) at or before `step`; None when there is none."""
    rates = [h for s, h in leaders if s <= step]
    return min(rates) if rates else None


def behind(
    points: Sequence[tuple[int, float]],
    start: float,
    leaders: Sequence[tuple[int, float]],
    margin: float = MARGIN,
    stall: int = STALL,
) -> bool:
    """Rule 2 (module docstring) for fold A's `points` so far ((step, harmful rate), in
    order): stalled, and its last rate more than `margin` above the leaders' lowest by
    that step."""
    if not points or not stalled([h for _, h in points], start, stall):
        return False
    step, rate = points[-1]
    lead = lowest_by(leaders, step)
    return lead is not None and rate > lead + margin + _EPS
